"""What ``clipdex serve``'s routes read: the request bodies as typed models (extra fields refused), read from JSON
of any content type (as clip-retrieval's clients send it) or a multipart form with the image as a file field; base64
images bounded before they are decoded; and the OpenAPI description of a route that reads its body itself."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from clipdex.app.inputs import InputError
from clipdex.exceptions import ClipdexError


class TooLarge(ClipdexError):
    """A body or upload over the limit (HTTP 413)."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchRequest(_Body):
    """A search: exactly one of ``text``, ``image`` (base64, or a multipart file field), ``image_id`` (an image
    of the collection) or ``vector``; ``target`` images (default) or captions (image and vector queries)."""

    collection: str | None = Field(None, description="default: the only collection served, else 'default'")
    text: str | None = Field(None, max_length=2000)
    image: str | None = Field(None, description="base64 of an image file (JSON); a file field (multipart)")
    image_id: str | None = Field(None, max_length=4096)
    vector: list[float] | None = Field(None, max_length=8192, description="an L2-normalised embedding")
    target: Literal["images", "captions"] = "images"
    k: int = Field(10, ge=1)
    min_score: float | None = None
    where: str | None = Field(None, max_length=2000, description="a filter as in clipdex search --where")
    path: str | None = Field(None, max_length=2000, description="a glob on image paths, as in --path")
    rerank: int | None = Field(None, ge=0, description="text queries: re-rank the top K (0: off)")


class AskRequest(_Body):
    """A question about an image (``image`` base64 or file field, or ``image_id``), or about the collection."""

    collection: str | None = None
    question: str | None = Field(None, max_length=1000)
    image: str | None = None
    image_id: str | None = Field(None, max_length=4096)
    k: int = Field(5, ge=0, le=50)
    beams: int = Field(1, ge=1, le=8)
    max_new_tokens: int = Field(32, ge=1, le=128)


class IndexRequest(_Body):
    """Index a folder (under the server's index roots) into a collection."""

    folder: str = Field(..., max_length=4096)
    collection: str | None = None
    model: str | None = Field(None, max_length=500, description="a new collection's model (default: the server's)")


async def read_body(request: Request, model: type[_Body], *, max_upload: int) -> tuple[_Body, bytes | None]:
    """The request's fields as ``model`` (JSON of any content type, as clip-retrieval's clients send it, or a
    multipart form) and the image bytes it carries (None when none)."""
    ctype = request.headers.get("content-type", "")
    upload = None
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=32, max_part_size=max_upload + 1)
        data = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "image":
                    raise InputError(f"file field {key!r}: send the image as the field 'image'")
                upload = await value.read(max_upload + 1)
            elif value != "":
                data[key] = value
    else:
        data = json_object(await request.body())
    body = model.model_validate(data)
    if getattr(body, "image", None) is not None:
        if upload is not None:
            raise InputError("image: give the image once (a file field or base64, not both)")
        upload = decode_base64(body.image, field="image", max_bytes=max_upload)
    if upload is not None and len(upload) > max_upload:
        raise TooLarge(f"image: the upload is over {max_upload / 2**20:.0f} MB")
    return body, upload


def json_object(raw: bytes) -> dict:
    """A request body as a JSON object (empty: ``{}``), whatever its Content-Type said; InputError otherwise."""
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"the body is not JSON ({e})") from e
    if not isinstance(data, dict):
        raise InputError("the body must be a JSON object")
    return data


def decode_base64(text: str, *, field: str, max_bytes: int) -> bytes:
    """Base64 (standard or URL-safe, with or without a ``data:...;base64,`` prefix) -> bytes, bounded."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) > max_bytes * 4 // 3 + 8:
        raise TooLarge(f"{field}: the upload is over {max_bytes / 2**20:.0f} MB")
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{field}: not base64 ({e})") from e



def body_doc(model: type[BaseModel], *, multipart: bool = True) -> dict:
    """OpenAPI for a route that reads its body itself: the JSON schema, and the same fields as a form."""
    schema = model.model_json_schema()
    content = {"application/json": {"schema": schema}}
    if multipart:
        form = dict(schema, properties={**schema["properties"], "image": {"type": "string", "format": "binary"}})
        content["multipart/form-data"] = {"schema": form}
    return {"requestBody": {"required": True, "content": content}}
