"""What every benchmark here needs: a PostgreSQL to run against, and a few output helpers."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from urllib.parse import urlparse


class SetupError(Exception):
    """The benchmark could not start (no database, no server): exit non-zero, no numbers."""


@contextlib.contextmanager
def postgres_server(name: str) -> Iterator[tuple[str, str]]:
    """(dsn, description): DATABASE_URL if set, else an embedded server that is stopped at the end."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url, f"DATABASE_URL ({display_url(url)})"
        return
    try:
        with warnings.catch_warnings():
            # pgserver asks platformdirs for a runtime dir at import; a missing XDG_RUNTIME_DIR warns.
            warnings.simplefilter("ignore")
            from pgserver.postgres_server import get_server
    except ImportError as exc:
        raise SetupError("DATABASE_URL is not set and pgserver is not installed: pip install -e '.[embedded]'") from exc
    with tempfile.TemporaryDirectory(prefix=f"{name}-pg-") as datadir:
        print("Starting an embedded PostgreSQL (pgserver) ...", flush=True)
        server = get_server(datadir, cleanup_mode="stop")
        try:
            yield server.get_uri(), "embedded (pgserver)"
        finally:
            server.cleanup()


def display_url(url: str) -> str:
    """``url`` without its password, fit to print."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@")).geturl()


def make_parent(path: str) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"
