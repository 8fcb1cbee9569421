"""Real servers only: PostgreSQL from DATABASE_URL (else an embedded one), Redis from REDIS_URL."""

from __future__ import annotations

import os
import socket
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlparse

import asyncpg
import pytest

from asgi_warmup import PostgresDataset
from helpers import Gate

pytest_plugins = ["anyio"]

REDIS_DEFAULT = "redis://127.0.0.1:6379"


def pytest_report_header(config: pytest.Config) -> list[str]:
    url = os.environ.get("DATABASE_URL")
    redis = os.environ.get("REDIS_URL", REDIS_DEFAULT)
    return [
        f"PostgreSQL: DATABASE_URL={url}" if url else
        "PostgreSQL: DATABASE_URL is not set: the tests start an embedded PostgreSQL (pgserver) for this run",
        f"Redis: {redis} (tests needing it are skipped, with the reason, if it is unreachable)",
    ]


@pytest.fixture
def anyio_backend() -> str:
    # asyncpg is asyncio-only.
    return "asyncio"


def _embedded_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        with warnings.catch_warnings():
            # pgserver asks platformdirs for a runtime dir at import; a missing XDG_RUNTIME_DIR warns.
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError:  # pragma: no cover - the test extra installs it
        pytest.exit("DATABASE_URL is not set and pgserver is not installed: pip install -e '.[test]'", returncode=2)
    datadir = tmp_path_factory.mktemp("pgdata")
    server = pgserver.get_server(datadir, cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
    else:
        yield from _embedded_postgres(tmp_path_factory)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, database_url: str) -> None:
    # Every test starts from the documented defaults, with DATABASE_URL pointing at the test server.
    for var in ("ASGI_WARMUP_LIMIT", "ASGI_WARMUP_ENABLED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DATABASE_URL", database_url)


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("REDIS_URL", REDIS_DEFAULT)
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6379), timeout=1).close()
    except OSError as exc:
        pytest.skip(f"no Redis reachable at {url} ({exc}): set REDIS_URL to run the Redis tests")
    return url


def redis_cache(url: str) -> object:
    from aiocache import RedisCache

    parsed = urlparse(url)
    db = int((parsed.path or "/0").lstrip("/") or 0)
    return RedisCache(endpoint=parsed.hostname or "127.0.0.1", port=parsed.port or 6379, db=db, namespace="test")


@pytest.fixture
async def counted(database_url: str) -> AsyncIterator[tuple[asyncpg.Pool, type]]:
    """A pool whose connections record every fetch (the lookups), passed to the middleware with pool=."""
    from helpers import counting_connection_class

    cls = counting_connection_class()
    pool = await asyncpg.create_pool(database_url, min_size=0, max_size=10, connection_class=cls)
    try:
        yield pool, cls
    finally:
        await pool.close()


class Table:
    """A fresh table of ``n`` keys, ``k1``..``kN``, with ``hits`` = N - i so that k1 is the hottest."""

    def __init__(self, name: str, dsn: str) -> None:
        self.name = name
        self.dsn = dsn

    async def execute(self, sql: str, *args: object) -> str:
        conn = await asyncpg.connect(self.dsn)
        try:
            return await conn.execute(sql, *args)
        finally:
            await conn.close()

    async def set_n(self, key: str, n: int) -> None:
        await self.execute(f'UPDATE "{self.name}" SET n = $2 WHERE token = $1', key, n)

    def dataset(self, **options: object) -> PostgresDataset:
        options.setdefault("order_by", "hits DESC")
        return PostgresDataset(self.name, table=self.name, key="token", **options)  # type: ignore[arg-type]

    def gated_dataset(self, gate: Gate, **options: object) -> PostgresDataset:
        """A dataset whose warmup blocks in PostgreSQL until ``gate.open()``; lookups run freely."""
        lookup = f'SELECT * FROM "{self.name}" WHERE token = ANY($1)'
        return PostgresDataset(
            self.name, key="token", warm_query=gate.warm_query(self.name), lookup_query=lookup, **options  # type: ignore[arg-type]
        )


@pytest.fixture
async def table(database_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Table]:
    marker = request.node.get_closest_marker("rows")
    n = marker.args[0] if marker else 200
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            f"""
            CREATE TABLE "{name}" (
                token text PRIMARY KEY,
                n integer NOT NULL,
                hits integer NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now(),
                spend numeric(12, 4) NOT NULL DEFAULT 1.2500,
                user_id uuid NOT NULL DEFAULT gen_random_uuid(),
                metadata jsonb NOT NULL DEFAULT '{{"tier": "pro", "tags": ["a", "b"]}}'
            );
            INSERT INTO "{name}" (token, n, hits)
                SELECT 'k' || i, i, {n} - i FROM generate_series(1, {n}) AS i;
            """
        )
        yield Table(name, database_url)
    finally:
        await conn.execute(f'DROP TABLE IF EXISTS "{name}"')
        await conn.close()
