"""``clipdex serve``: the HTTP API (FastAPI on uvicorn) over a database: search, images, ask, index jobs and
clip-retrieval's back-end protocol. Loopback unless told otherwise; any other address needs a token."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipdex.commands.argtypes import DEVICE_HELP, RUNTIME_HELP, RUNTIMES, int_at_least, read_first_line
from clipdex.retrieval.store.record import DEFAULT_DB

MIN_TOKEN = 16


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``clipdex serve`` to the ``clipdex`` parser."""
    p = sub.add_parser(
        "serve", help="the HTTP API: search, ask, index (OpenAPI at /docs; clip-retrieval's protocol too)",
        description="Serve a database over HTTP. The model, the collections and their FAISS indexes load once; "
        "a collection is reopened when its tables change (an index run of this server, the CLI or the app). "
        "JSON in and out; the schema is at /openapi.json and a docs page at /docs. Binds 127.0.0.1 unless "
        "--host says otherwise, and any other address needs --token-file (every request but /health and the "
        "docs must then send 'Authorization: Bearer <token>'). clip-retrieval's clients work unchanged against "
        "/knn-service, /indices-list and /metadata. SIGTERM or Ctrl-C stops it: a running index job stops "
        "after its batch and commits what it embedded.",
        epilog="examples:\n"
        "  clipdex serve --db clipdex-data/demo-world/db      # http://127.0.0.1:8600, docs at /docs\n"
        "  curl -s localhost:8600/search -d '{\"text\": \"a red circle\", \"k\": 3}'\n"
        "  curl -s localhost:8600/search -F image=@photo.jpg -F k=5\n"
        "  curl -s localhost:8600/ask -F image=@photo.jpg -F question='when was it built?'\n"
        "  clipdex serve --host 0.0.0.0 --token-file ~/.clipdex-token --index-root ~/Pictures\n"
        "endpoints: GET /health, GET /collections, POST /search, GET /images/{collection}/{id}[?size=N], "
        "POST /ask, POST /index, GET /jobs/{id}; clip-retrieval: GET /indices-list, POST /knn-service, "
        "POST /metadata")
    p.add_argument("--db", default=DEFAULT_DB, metavar="DIR", help="database folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; any other than loopback (127.0.0.1, ::1, localhost) needs --token-file")
    p.add_argument("--port", type=int_at_least(0), default=8600, help="port to listen on (0: a free one)")
    p.add_argument("--collections", default="", metavar="A,B",
                   help="serve only these collections (default: every collection of the database)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help=f"a file whose first line is the bearer token (at least {MIN_TOKEN} characters) every "
                   "request must carry; required off loopback")
    p.add_argument("--index-root", action="append", default=None, metavar="DIR",
                   help="a folder under which POST /index may index (repeatable; none: indexing is refused)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="URL",
                   help="a browser origin allowed to call the API, e.g. http://localhost:3000 (repeatable; "
                   "default: CORS off)")
    p.add_argument("--max-upload-mb", type=int_at_least(1), default=20, metavar="MB", help="largest image upload")
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="the model POST /index gives a new collection (default: the embedded clipdex-world)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--decoder", default="", metavar="FILE", help="answering decoder (default: the shipped one)")
    p.add_argument("--runtime", default="auto", choices=RUNTIMES, help=RUNTIME_HELP)
    p.add_argument("--threads", type=int_at_least(0), default=1, metavar="N",
                   help="torch threads per model call (0: torch's default, every core). One is the fastest under "
                   "concurrent load: the other cores serve HTTP and the next request (8 clients on 2 cores: 187 text "
                   "searches/s with 1, 160 with 2)")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                   help="uvicorn's and clipdex's log level (info logs every request)")
    p.set_defaults(func=_serve)


def read_token(token_file: str | None) -> str:
    """The first line of ``token_file`` (empty when no file), refused if shorter than :data:`MIN_TOKEN`."""
    from clipdex.exceptions import ClipdexError

    if token_file is None:
        return ""
    token = read_first_line(token_file, flag="--token-file").strip()
    if len(token) < MIN_TOKEN:
        raise ClipdexError(f"--token-file {token_file}: the token is {len(token)} characters; use at least "
                           f"{MIN_TOKEN} (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def _serve(args) -> int:
    import logging

    import uvicorn

    from clipdex.commands.app import is_loopback
    from clipdex.exceptions import ClipdexError
    from clipdex.server.api import create_app
    from clipdex.server.settings import ServeSettings
    from clipdex.server.state import ServerState

    token = read_token(args.token_file)
    if not token and not is_loopback(args.host):
        raise ClipdexError(f"--host {args.host} serves other machines: give --token-file FILE (every request must "
                           "then carry the token), or bind 127.0.0.1")
    for root in args.index_root or ():
        if not Path(root).expanduser().is_dir():
            raise ClipdexError(f"--index-root {root}: no such folder")
    names = tuple(n for n in (s.strip() for s in args.collections.split(",")) if n)
    settings = ServeSettings(db=args.db, host=args.host, port=args.port, collections=names, token=token,
                             index_roots=tuple(args.index_root or ()), cors_origins=tuple(args.cors_origin or ()),
                             max_upload_mb=args.max_upload_mb, device=args.device, runtime=args.runtime,
                             decoder=args.decoder,
                             **({"model": args.model} if args.model else {}))
    logging.getLogger("clipdex").setLevel(args.log_level.upper())
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    state = ServerState(settings)
    missing = [n for n in names if n not in state.db.collections()]
    if missing:
        raise ClipdexError(f"--collections: no collection {', '.join(missing)} in {args.db} (it has: "
                           f"{', '.join(state.db.collections()) or 'none'})")
    app = create_app(state)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=3, server_header=False, limit_concurrency=64,
                            timeout_keep_alive=5)
    auth = "token required" if token else "no token (loopback only)"
    print(f"clipdex serve: loading {Path(args.db).resolve()} ({', '.join(state.names()) or 'no collections yet'})",
          file=sys.stderr, flush=True)
    server = _Server(config, note=auth)
    server.run()
    return 0 if server.started else 1


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, saying where it listens once it does (port 0 picks a free port)."""

        def __init__(self, config, *, note: str):
            super().__init__(config)
            self.note = note

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                for server in self.servers:
                    for sock in server.sockets:
                        host, port = sock.getsockname()[:2]
                        print(f"clipdex serve: listening on http://{host}:{port} ({self.note}); docs at "
                              f"http://{host}:{port}/docs; Ctrl-C or SIGTERM stops it", file=sys.stderr, flush=True)

    return Server


def _Server(config, *, note: str):  # noqa: N802 - uvicorn is imported only when the command runs
    return _server_class()(config, note=note)
