"""``clipdex app``: start the Streamlit UI on a database as a child process, with safe server settings.

Beyond this machine it serves only with a password (Streamlit has no authentication of its own: the app
asks for it before any page renders), and it indexes only the folders named with ``--index-root``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import subprocess
import sys
from importlib import resources
from pathlib import Path

from clipdex.app.settings import AppSettings
from clipdex.commands.argtypes import DEVICE_HELP, read_first_line
from clipdex.retrieval.store.record import DEFAULT_COLLECTION, DEFAULT_DB

ENTRY = Path(str(resources.files("clipdex.app") / "main.py"))
PASSWORD_ENV = "CLIPDEX_APP_PASSWORD"
MIN_PASSWORD = 8


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``clipdex app`` to the ``clipdex`` parser."""
    p = sub.add_parser(
        "app", help="the web UI: search, ask, collections (Streamlit)",
        description="Serve the web UI on a database folder: search text->image, image->image and image->text, "
        "ask about an image, see the collections and index a folder. Binds to 127.0.0.1 unless --host says "
        "otherwise; any other address needs a password (CLIPDEX_APP_PASSWORD or --password-file), which every "
        "browser session must give before a page shows. The Collection page indexes only folders under an "
        "--index-root (none by default), and the app opens files only under those and the folders its "
        "collections were indexed from, with every link resolved first. XSRF protection is on; uploads are "
        "limited in size and type and decoded before use; searches and answers of all sessions take turns.",
        epilog="examples:\n"
        "  clipdex app                                   # clipdex-data/db on http://127.0.0.1:8501\n"
        "  clipdex app --db ~/clipdex-db --collection photos --index-root ~/Pictures\n"
        "  CLIPDEX_APP_PASSWORD=... clipdex app --host 0.0.0.0 --port 8080   # other machines, with a password")
    p.add_argument("--db", default=DEFAULT_DB, metavar="DIR", help="database folder")
    p.add_argument("--collection", default=DEFAULT_COLLECTION, metavar="NAME", help="collection shown first")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 0.0.0.0 serves every network and needs a password (default: 127.0.0.1, "
                   "this machine only)")
    p.add_argument("--port", type=int, default=8501, help="TCP port to serve on")
    p.add_argument("--password-file", default=None, metavar="FILE",
                   help="a file whose first line is the password every browser session must give before any page "
                   f"shows (or set {PASSWORD_ENV}); a --host beyond this machine needs one of the two; at least "
                   f"{MIN_PASSWORD} characters")
    p.add_argument("--index-root", action="append", default=None, metavar="DIR",
                   help="a folder under which the UI may index images (repeatable; default: none, so the "
                   "Collection page indexes nothing)")
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
        "runner.fastReruns": "false",  # one script run per session: a new query replaces the pending one
        "runner.postScriptGC": "false",  # a full collection after every run holds the GIL ~0.1 s with torch loaded
        "browser.gatherUsageStats": "false", "client.toolbarMode": "viewer", "client.showErrorDetails": "type",
        "global.developmentMode": "false",
    }
    return [sys.executable, "-m", "streamlit", "run", str(ENTRY),
            *(a for k, v in flags.items() for a in (f"--{k}", str(v)))]


def is_loopback(host: str) -> bool:
    """Whether ``host`` serves this machine only (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return host == "localhost"


def read_password(password_file: str | None, *, env: dict[str, str]) -> str:
    """The app's password: the first line of ``password_file``, else ``CLIPDEX_APP_PASSWORD``, else empty."""
    if password_file is None:
        return env.get(PASSWORD_ENV, "")
    return read_first_line(password_file, flag="--password-file")


def check_exposure(host: str, *, password: str) -> None:
    """Refuse to serve beyond this machine without a password, and any password too short to be one."""
    from clipdex.exceptions import ClipdexError

    if password and len(password) < MIN_PASSWORD:
        raise ClipdexError(f"the app's password is {len(password)} characters; use at least {MIN_PASSWORD}")
    if not password and not is_loopback(host):
        raise ClipdexError(f"--host {host} serves other machines, and the app has no authentication of its own: "
                           f"set {PASSWORD_ENV} or --password-file FILE (each browser session must then give the "
                           "password), or bind 127.0.0.1")


def _app(args) -> int:
    from clipdex.exceptions import ClipdexError

    if args.max_upload_mb < 1:
        raise ClipdexError(f"--max-upload-mb must be at least 1 (got {args.max_upload_mb})")
    password = read_password(args.password_file, env=dict(os.environ))
    check_exposure(args.host, password=password)
    settings = AppSettings(db=args.db, collection=args.collection, index_roots=tuple(args.index_root or ()),
                           max_upload_mb=args.max_upload_mb, device=args.device, decoder=args.decoder,
                           password=password)
    env = {**os.environ, **settings.as_env()}
    cmd = streamlit_command(host=args.host, port=args.port, max_upload_mb=args.max_upload_mb)
    signin = ", password required" if password else ""
    print(f"clipdex app: serving {Path(args.db).resolve()} on http://{args.host}:{args.port}{signin} "
          "(Ctrl-C stops it)", file=sys.stderr)
    proc = subprocess.Popen(cmd, env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))  # stop it with us
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the child got the same Ctrl-C: let it shut down
        proc.wait(timeout=30)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
