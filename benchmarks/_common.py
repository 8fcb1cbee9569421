"""What every benchmark here needs: a PostgreSQL to run against, and a few output helpers."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import asyncpg


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


async def create_api_key_table(dsn: str, rows: int, prefix: str) -> str:
    """A fresh table of ``rows`` API-key-like rows, ``hits`` falling with the insertion order; returns its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f"""
            CREATE TABLE "{name}" (
                token text PRIMARY KEY,
                account_id bigint NOT NULL,
                hits integer NOT NULL,
                rpm_limit integer NOT NULL,
                created_at timestamptz NOT NULL,
                spend numeric(12, 4) NOT NULL,
                user_id uuid NOT NULL,
                metadata jsonb NOT NULL
            )
            """
        )
        try:
            await conn.execute(
                f"""
                INSERT INTO "{name}"
                SELECT 'sk-' || md5(i::text),
                       1 + i % 5000,
                       {rows} - i,
                       (ARRAY[60, 600, 6000])[1 + i % 3],
                       timestamptz '2024-01-01 00:00:00+00' + i * interval '1 second',
                       round((i % 100000) / 7.0, 4),
                       md5('user' || i)::uuid,
                       jsonb_build_object(
                           'tier', (ARRAY['free', 'pro', 'team'])[1 + i % 3],
                           'models', jsonb_build_array('gpt-4o', 'claude-sonnet'),
                           'team_id', 'team-' || i % 500
                       )
                FROM generate_series(1, {rows}) AS i;
                CREATE INDEX ON "{name}" (hits DESC);
                """
            )
            await conn.execute(f'VACUUM ANALYZE "{name}"')
            # Read every row once, so no variant pays for pulling the table into memory.
            await conn.fetchval(f'SELECT count(*) FROM (SELECT * FROM "{name}" ORDER BY hits DESC) AS t')
        except BaseException:
            await conn.execute(f'DROP TABLE IF EXISTS "{name}"')
            raise
    finally:
        await conn.close()
    return name


async def drop_table(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP TABLE IF EXISTS "{name}"')
    finally:
        await conn.close()


def dump_json(path: str, data: object) -> None:
    make_parent(path)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    print(f"wrote {path}")


def pyplot(path: str) -> Any:
    """matplotlib.pyplot on a file-only backend, or None (and a line saying so) without matplotlib."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        print(f"no plot written to {path}: matplotlib is not installed (pip install matplotlib)")
        return None
    return plt


def save_figure(fig: Any, path: str, dpi: int = 120) -> None:
    fig.tight_layout()
    make_parent(path)
    fig.savefig(path, dpi=dpi)
    print(f"wrote {path}")
