"""``clipdex app``: start the Streamlit UI on a database as a child process, with safe server settings."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import subprocess
import sys
from importlib import resources
from pathlib import Path

from clipdex.app.settings import AppSettings
from clipdex.commands.argtypes import DEVICE_HELP
from clipdex.retrieval.store.record import DEFAULT_COLLECTION, DEFAULT_DB

logger = logging.getLogger(__name__)

ENTRY = Path(str(resources.files("clipdex.app") / "main.py"))


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``clipdex app`` to the ``clipdex`` parser."""
    p = sub.add_parser(
        "app", help="the web UI: search, ask, collections (Streamlit)",
        description="Serve the web UI on a database folder: search text->image, image->image and image->text, "
        "ask about an image, see the collections and index a folder. Binds to 127.0.0.1 unless --host says "
        "otherwise; XSRF protection is on; uploads are limited in size and type and decoded before use.",
        epilog="examples:\n"
        "  clipdex app                                   # clipdex-data/db on http://127.0.0.1:8501\n"
        "  clipdex app --db ~/clipdex-db --collection photos --index-root ~/Pictures\n"
        "  clipdex app --host 0.0.0.0 --port 8080        # reachable from other machines: mind who can")
    p.add_argument("--db", default=DEFAULT_DB, metavar="DIR", help="database folder")
    p.add_argument("--collection", default=DEFAULT_COLLECTION, metavar="NAME", help="collection shown first")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 0.0.0.0 serves every network (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8501, help="TCP port to serve on")
    p.add_argument("--index-root", action="append", default=None, metavar="DIR",
                   help="a folder under which the UI may index images (repeatable; default: your home folder)")
    p.add_argument("--max-upload-mb", type=int, default=AppSettings.max_upload_mb, metavar="MB",
                   help="largest image upload, in megabytes")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--decoder", default="", metavar="FILE",
                   help="answering decoder checkpoint for the Ask page (default: the shipped one)")
    p.set_defaults(func=_app)


def streamlit_command(*, host: str, port: int, max_upload_mb: int) -> list[str]:
    """The ``streamlit run`` command line for the app, with its server settings."""
    flags = {
        "server.address": host, "server.port": port, "server.headless": "true",
        "server.enableXsrfProtection": "true", "server.enableCORS": "true",
        "server.maxUploadSize": max_upload_mb, "server.enableStaticServing": "false",
        "server.fileWatcherType": "none", "server.runOnSave": "false",
        "browser.gatherUsageStats": "false", "client.toolbarMode": "viewer", "client.showErrorDetails": "type",
        "global.developmentMode": "false",
    }
    return [sys.executable, "-m", "streamlit", "run", str(ENTRY),
            *(a for k, v in flags.items() for a in (f"--{k}", str(v)))]


def _app(args) -> int:
    from clipdex.exceptions import ClipdexError

    if args.max_upload_mb < 1:
        raise ClipdexError(f"--max-upload-mb must be at least 1 (got {args.max_upload_mb})")
    try:
        if not ipaddress.ip_address(args.host).is_loopback:
            logger.warning("binding to %s: anyone who can reach this machine can use the app", args.host)
    except ValueError:  # a host name
        if args.host != "localhost":
            logger.warning("binding to %s: anyone who can reach it can use the app", args.host)
    settings = AppSettings(db=args.db, collection=args.collection, index_roots=tuple(args.index_root or ()),
                           max_upload_mb=args.max_upload_mb, device=args.device, decoder=args.decoder)
    env = {**os.environ, **settings.as_env()}
    cmd = streamlit_command(host=args.host, port=args.port, max_upload_mb=args.max_upload_mb)
    print(f"clipdex app: serving {Path(args.db).resolve()} on http://{args.host}:{args.port} (Ctrl-C stops it)",
          file=sys.stderr)
    proc = subprocess.Popen(cmd, env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))  # stop it with us
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the child got the same Ctrl-C: let it shut down
        proc.wait(timeout=30)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
