"""The HTTP API of ``clipdex serve`` (FastAPI on uvicorn): search, images, ask and index jobs, with the
clip-retrieval back-end protocol beside it (:mod:`clipdex.server.clip_compat`).

Every endpoint answers JSON (images excepted); every error is ``{"error": message, "status": code}`` with a
code that fits: 400 bad input (naming the field), 401 no or wrong token, 403 a folder or file outside the
configured roots, 404 unknown collection, image or job, 409 an index run already going on, 413 a body or
upload over the limit, 414 a query string too long, 422 a model mismatch, 500 damaged data (with what to run)
and nothing else: never a traceback. Requests run in a thread pool; concurrent text queries are embedded in
one batch (:mod:`clipdex.server.batching`), image queries take their turn at the encoder, answers theirs at
the decoder.

The guard in front of every request (:class:`Guard`, plain ASGI) checks the token, bounds the query string and
the body (counted as it arrives, whatever Content-Length says) before any route reads them.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import os
from contextlib import asynccontextmanager
from functools import lru_cache, partial
from pathlib import Path
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from clipdex.app.inputs import InputError, check_collection_name, check_index_folder, decode_checked, inside
from clipdex.app.jobs import JobRunningError
from clipdex.exceptions import ClipdexError, CorruptStoreError, ModelMismatchError
from clipdex.server.bodies import AskRequest, IndexRequest, SearchRequest, TooLarge, body_doc, read_body
from clipdex.server.state import NotFound, ServerState

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/docs", "/docs/oauth2-redirect", "/openapi.json")  # no token needed
MAX_QUERY_STRING = 4096
THUMB_SIZES = (16, 1024)  # ?size= bounds, pixels on the longer side


class Forbidden(ClipdexError):
    """A folder or file outside the roots this server may read (HTTP 403)."""


def error_status(e: Exception) -> int:
    """The HTTP status of a clipdex error."""
    for cls, status in ((NotFound, 404), (Forbidden, 403), (TooLarge, 413), (JobRunningError, 409),
                        (ModelMismatchError, 422), (CorruptStoreError, 500)):
        if isinstance(e, cls):
            return status
    return 400  # InputError and every other ClipdexError: what the request asked for cannot be done


def json_bytes(content: dict) -> bytes:
    """``content`` as JSON, written as Starlette's JSONResponse writes it."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def json_response(content: bytes) -> Response:
    """A 200 response of JSON already written (FastAPI then has nothing left to encode or check)."""
    return Response(content, media_type="application/json")


def image_url(base: str, collection: str, image_id: str) -> str:
    """The URL of an image of ``collection`` at ``base`` (the request's base URL, ending in '/'): what
    ``GET /images/{collection}/{image_id}`` answers; built as a string (a route lookup per hit cost more)."""
    return f"{base}images/{quote(collection, safe='')}/{quote(image_id, safe='/')}"


def error_response(status: int, message: str, **extra) -> JSONResponse:
    """The one error shape."""
    return JSONResponse({"error": message, "status": status, **extra}, status_code=status)


class Guard:
    """Plain ASGI middleware: the bearer token (constant-time compare), the query string's length and the
    body's size, checked before any route runs."""

    def __init__(self, app, *, token: str, max_body: int):
        self.app, self.token, self.max_body = app, token.encode(), max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = headers.get(b"authorization", b"")
            scheme, _, value = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
                response = error_response(401, "this server needs a token: send 'Authorization: Bearer <token>'")
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
        if len(scope.get("query_string", b"")) > MAX_QUERY_STRING:
            return await error_response(414, f"the query string is over {MAX_QUERY_STRING} bytes")(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await error_response(413, f"the request body is over {self.max_body} bytes")(scope, receive, send)
        seen = 0

        async def bounded_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise TooLarge(f"the request body is over {self.max_body} bytes")
            return message

        return await self.app(scope, bounded_receive, send)


def _field_errors(e: ValidationError | RequestValidationError) -> JSONResponse:
    fields = []
    for err in e.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        fields.append({"field": ".".join(loc) or "body", "problem": err.get("msg", "invalid")})
    named = "; ".join(f"{f['field']}: {f['problem']}" for f in fields)
    return error_response(400, f"bad request: {named}", fields=fields)


# ---- the application -----------------------------------------------------------------------------------

def create_app(state: ServerState) -> FastAPI:
    """The ASGI application over ``state`` (what ``clipdex serve`` runs under uvicorn)."""
    from clipdex import __version__
    from clipdex.server import clip_compat

    settings = state.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(state.preload)
        yield
        left = await run_in_threadpool(state.jobs.stop_all, timeout=4.0)
        for job in left:
            logger.warning("index job %s into %s still running at shutdown; it stops with the process (its "
                           "committed rows are kept)", job.id, job.settings.collection)

    app = FastAPI(title="clipdex", version=__version__, lifespan=lifespan,
                  description="Search an image collection by text or image, answer questions about an image from "
                  "it, index folders; plus clip-retrieval's back-end protocol (/indices-list, /knn-service, "
                  "/metadata). Send 'Authorization: Bearer <token>' when the server has a token.")

    @app.exception_handler(ClipdexError)
    async def _clipdex_error(request: Request, e: ClipdexError):
        return error_response(error_status(e), str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return _field_errors(e)

    @app.exception_handler(ValidationError)
    async def _validation2(request: Request, e: ValidationError):
        return _field_errors(e)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        logger.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error ({type(e).__name__}); the server's log has the details")

    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path} (see /docs)",
                   405: f"{request.method} is not allowed on {request.url.path} (see /docs)"}.get(e.status_code,
                                                                                             str(e.detail))
        return error_response(e.status_code, message)

    def collection_name(name: str | None) -> str:
        if name:
            return state.check_name(name)
        names = state.names()
        if len(names) == 1:
            return names[0]
        from clipdex.retrieval.store.record import DEFAULT_COLLECTION

        if DEFAULT_COLLECTION in names:
            return DEFAULT_COLLECTION
        raise InputError(f"collection: name one of {', '.join(names) or '(none served)'}")

    def with_urls(base: str, collection: str, hit: dict) -> dict:
        """``hit`` with the URLs of its image and thumbnail; ``base`` is the request's base URL."""
        url = image_url(base, collection, hit.get("image_id") or hit["id"])
        return hit | {"url": url, "thumbnail": url + "?size=192"}

    def query_image(loaded, upload: bytes | None, image_id: str | None):
        if upload is not None:
            return decode_checked(upload, label="image", max_pixels=settings.max_pixels)
        if image_id not in loaded.position:
            raise NotFound(f"image_id: no image {image_id!r} in collection {loaded.name!r}")
        return loaded.image(image_id, max_pixels=settings.max_pixels)

    @app.get("/health", summary="liveness: always 200 while the server runs (no token needed)")
    def health() -> dict:
        return {"status": "ok", "version": __version__}

    @app.get("/collections", summary="the collections served: size, model, FAISS index and its recall@10 vs exact")
    def collections() -> dict:
        out = []
        for name in state.names():
            try:
                loaded = state.collection(name)
            except ClipdexError as e:
                out.append({"name": name, "error": str(e)})
                continue
            s = loaded.search
            indexes = {t: {k: s.index(t).sidecar.get(k) for k in ("factory", "rows", "nprobe", "recall_at_10_vs_exact")}
                       for t in ("images", "captions")}
            rerank = s.rerank_info()
            out.append({"name": name, "images": indexes["images"]["rows"], "captions": indexes["captions"]["rows"],
                        "model": s.info.spec, "embed_dim": s.info.embed_dim, "index": indexes,
                        "grids": s.collection.grid_layout() is not None,
                        "rerank": {"available": rerank.used, "reason": rerank.reason}})
        return {"collections": out}

    @app.post("/search", summary="text->image, image->image, image->text or vector search",
              openapi_extra=body_doc(SearchRequest))
    async def search(request: Request) -> Response:
        body, upload = await read_body(request, SearchRequest, max_upload=settings.max_upload_bytes)
        _check_search(body, upload)
        name = collection_name(body.collection)
        loaded = state.fresh_collection(name)
        plain = body.text is not None and not (body.where or body.path)
        if plain and loaded is not None and not loaded.search.rerank_info(body.rerank).used:
            # the plain text search, the common case: the batcher's worker embeds the text with the other
            # queries waiting, searches FAISS and writes the JSON; this request needs no thread of its own
            # (a filtered one goes through LanceDB first, too slow to hold the worker up: a thread's)
            loaded.search.check_text(body.text)
            base = str(request.base_url)
            finish = partial(_text_results, base, loaded, body)
            return json_response(await asyncio.wrap_future(
                state.text_batcher.submit(loaded.search.encoder, body.text, then=finish)))
        return json_response(await run_in_threadpool(_search, str(request.base_url), name, body, upload))

    def _check_search(body: SearchRequest, upload: bytes | None) -> None:
        given = [n for n, v in (("text", body.text), ("image", upload), ("image_id", body.image_id),
                                ("vector", body.vector)) if v is not None]
        if len(given) != 1:
            raise InputError("give exactly one of text, image, image_id, vector" + (f" (got {', '.join(given)})"
                                                                                    if given else ""))
        if body.k > settings.max_k:
            raise InputError(f"k: at most {settings.max_k}")
        if body.text is not None and not body.text.strip():
            raise InputError("text: the query is blank")
        if body.text is not None and body.target == "captions":
            raise InputError("target: captions are searched with an image or a vector, not text")

    def _text_results(base: str, loaded, body: SearchRequest, vector: np.ndarray) -> bytes:
        """The JSON of a plain text search, given the query's embedding (run by the batcher's worker)."""
        with state.store_lock:
            hits = loaded.search.search_vector(vector, table="images", k=body.k, min_score=body.min_score)
        return json_bytes(_results(base, loaded.name, hits, query=body.text, kind="text->image",
                                   rerank=loaded.search.rerank_info(body.rerank)))

    def _results(base: str, name: str, hits, *, query, kind: str, rerank) -> dict:
        return {"query": query, "kind": kind, "collection": name,
                "results": [with_urls(base, name, h.as_dict()) for h in hits], "rerank": rerank.as_dict()}

    def _search(base: str, name: str, body: SearchRequest, upload: bytes | None) -> bytes:
        loaded = state.collection(name)
        opts = {"k": body.k, "min_score": body.min_score, "where": body.where, "path_glob": body.path}
        from clipdex.retrieval.store.rerank import RerankInfo, resolve_rerank

        rerank = RerankInfo(resolve_rerank(body.rerank), False, "re-ranking applies to text queries only")
        search = loaded.search
        if body.text is not None:
            kind, query = "text->image", body.text
            rerank = search.rerank_info(body.rerank)
            if rerank.used:  # the matcher reads the query's token states: its own pass, in its turn
                with state.model_lock, state.store_lock:
                    hits = search.search_text(body.text, **opts, rerank=body.rerank)
            else:
                search.check_text(body.text)
                vector = state.text_batcher.embed(search.encoder, body.text)
                with state.store_lock:
                    hits = search.search_vector(vector, table="images", **opts)
        elif body.vector is not None:
            with state.store_lock:
                hits = search.search_vector(np.asarray(body.vector, np.float32), table=body.target, **opts)
            kind, query = f"vector->{body.target[:-1]}", None
        else:
            im = query_image(loaded, upload, body.image_id)
            with state.model_lock:
                vector = search.embed_image(im)
            with state.store_lock:
                hits = search.search_vector(vector, table=body.target, **opts)
            kind = "image->text" if body.target == "captions" else "image->image"
            query = body.image_id if body.image_id is not None else "(uploaded image)"
        return json_bytes(_results(base, name, hits, query=query, kind=kind, rerank=rerank))

    @app.get("/images/{collection}/{image_id:path}", name="image",
             summary="an image of a collection (?size=N: a thumbnail N pixels on its longer side)",
             response_class=Response, responses={200: {"content": {"image/*": {}}}})
    def image(collection: str, image_id: str, size: int | None = None) -> Response:
        loaded = state.collection(state.check_name(collection))
        if image_id not in loaded.position:
            raise NotFound(f"no image {image_id!r} in collection {collection!r}")
        path = loaded.path_of(image_id)
        if inside(path, roots=loaded.roots) is None:
            if not os.path.exists(path):
                raise NotFound(f"image {image_id!r}: its file is gone; re-index the collection")
            raise Forbidden(f"image {image_id!r}: its file lies outside the folders this server may open")
        headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'",
                   "Cache-Control": "private, max-age=300"}
        if size is None:
            from clipdex.app.inputs import read_confined

            data = read_confined(path, roots=loaded.roots)
            return Response(data, media_type=_mime(data), headers=headers)
        if not THUMB_SIZES[0] <= size <= THUMB_SIZES[1]:
            raise InputError(f"size: between {THUMB_SIZES[0]} and {THUMB_SIZES[1]} pixels")
        data = _thumbnail(path, os.stat(path).st_mtime_ns, size, loaded.roots, settings.max_pixels)
        return Response(data, media_type="image/png", headers=headers)

    @app.post("/ask", summary="answer a question about an image from the collection, with the evidence",
              openapi_extra=body_doc(AskRequest))
    async def ask(request: Request) -> dict:
        body, upload = await read_body(request, AskRequest, max_upload=settings.max_upload_bytes)
        return await run_in_threadpool(_ask, request, body, upload)

    def _ask(request: Request, body: AskRequest, upload: bytes | None) -> dict:
        from clipdex.retrieval.answer.answerer import Answerer, AskSettings

        question = body.question.strip() if body.question else None
        if upload is None and body.image_id is None and not question:
            raise InputError("give a question, an image (image or image_id), or both")
        if upload is not None and body.image_id is not None:
            raise InputError("give image or image_id, not both")
        name = collection_name(body.collection)
        loaded = state.collection(name)
        ask_settings = AskSettings(db=settings.db, collection=name, k=body.k, beams=body.beams,
                                   max_new_tokens=body.max_new_tokens, device=settings.device)
        im = None if upload is None and body.image_id is None else query_image(loaded, upload, body.image_id)
        answerer = Answerer(loaded.search, state.backend(), settings=ask_settings)
        with state.answer_lock:  # beside the searches: the decoder is its own model
            result = answerer.ask(image=im, question=question)
        out = result.as_dict()
        out["collection"] = name
        out["evidence"] = [with_urls(str(request.base_url), name, e) for e in out["evidence"]]
        return out

    @app.post("/index", status_code=202, summary="index a folder under the server's index roots (returns a job)",
              openapi_extra=body_doc(IndexRequest, multipart=False))
    async def index(request: Request) -> dict:
        body, _ = await read_body(request, IndexRequest, max_upload=0)
        return await run_in_threadpool(_index, request, body)

    def _index(request: Request, body: IndexRequest) -> dict:
        from clipdex.indexer.runner import IndexSettings
        from clipdex.retrieval.store.record import DEFAULT_COLLECTION

        if not settings.index_roots:
            raise Forbidden("this server may index no folder: start it with clipdex serve --index-root DIR")
        name = check_collection_name(body.collection or DEFAULT_COLLECTION)
        if settings.collections and name not in settings.collections:
            raise Forbidden(f"collection: this server serves only {', '.join(settings.collections)}")
        try:
            folder = check_index_folder(body.folder, roots=settings.index_roots, db=settings.db)
        except InputError as e:
            raise (Forbidden(f"folder: {e}") if "outside the folders" in str(e) else InputError(f"folder: {e}")) from e
        exists = name in state.db.collections()
        model = state.db.open(name).encoder_info().spec if exists else (body.model or settings.model)
        if exists and body.model and body.model != model:
            raise ModelMismatchError(f"model: collection {name!r} was indexed with {model}, not {body.model}")
        encoder = state.encoder(model)
        job = state.jobs.start(IndexSettings(source=str(folder), db=settings.db, collection=name, model=model,
                                             device=settings.device, batch_size=64, max_pixels=settings.max_pixels),
                               roots=settings.index_roots, encoder=encoder)
        return {"job": job.as_dict(), "url": str(request.url_for("job", job_id=job.id))}

    @app.get("/jobs/{job_id}", name="job", summary="an index job: progress, counts, failures")
    def job(job_id: str) -> dict:
        return state.job(job_id).as_dict()

    app.include_router(clip_compat.router(state, image_url=image_url, collection_name=collection_name))
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, token=settings.token, max_body=settings.max_body_bytes)
    return app


def _mime(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.get_format_mimetype() or "application/octet-stream"
    except Exception:  # noqa: BLE001 - not an image Pillow knows: the browser gets bytes it will not sniff
        return "application/octet-stream"


@lru_cache(maxsize=2048)
def _thumbnail(path: str, mtime_ns: int, size: int, roots: tuple[Path, ...], max_pixels: int) -> bytes:
    """A PNG of the file at most ``size`` pixels on its longer side (small images enlarged with nearest-
    neighbour so their pixels stay crisp), cached per file version."""
    from clipdex.app.inputs import read_confined

    im = decode_checked(read_confined(path, roots=roots), label=path, max_pixels=max_pixels)
    scale = size / max(im.size)
    new = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    im = im.resize(new, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
