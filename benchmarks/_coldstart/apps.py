"""The apps ``coldstart.py`` serves, one per variant, all answering like ``examples/litellm_proxy.py``.

uvicorn imports this module with ``--factory``; the variant and its settings come in ``COLDSTART_*``
variables. Every variant serves ``GET /v1/models`` with the example's own handler, auth check and
401 answer (``request.app.state.api_keys.get(sha256(key))``); only the object behind ``api_keys``
differs. Every variant reads through one asyncpg pool of ``COLDSTART_POOL`` connections, and every
statement it sends carries the simulated round trip (see ``with_rtt``). ``GET /stats`` answers the
variant's own counts (lookup statements sent, preload state), polled by the load generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import examples.litellm_proxy as example
from examples.litellm_proxy import (
    _KEY_VIEW,
    LOOKUP_QUERY,
    WARM_QUERY,
    AuthError,
    auth_error,
    client_gone,
    list_models,
)
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

Row = dict[str, Any]

# The hand-written variants look one key up per statement, as a typical proxy does.
LOOKUP_ONE = _KEY_VIEW + "WHERE k.token = $1"
# The seed pull request's preload: the most recently created keys.
RECENT_QUERY = _KEY_VIEW + "ORDER BY k.created_at DESC LIMIT $1"
ALL_QUERY = _KEY_VIEW


def with_rtt(query: str, function: str, rtt: float) -> str:
    """``query`` delayed by one simulated network round trip, once per statement, whatever it returns.

    The uncorrelated subquery becomes an InitPlan behind a one-time filter: it runs once, before the
    first row, even when no row matches. ``function`` wraps ``pg_sleep`` (PL/pgSQL, so never inlined)
    and is one per variant and repeat, so ``pg_stat_user_functions`` counts each variant's statements.
    """
    return f"SELECT q.* FROM ({query}) AS q WHERE (SELECT {function}({rtt!r}::float8))"


@dataclass(frozen=True)
class Settings:
    variant: str
    dsn: str
    rtt: float
    rtt_function: str
    pool_size: int
    ttl: int
    cache_size: int

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            variant=env["COLDSTART_VARIANT"],
            dsn=env["COLDSTART_DSN"],
            rtt=float(env["COLDSTART_RTT"]),
            rtt_function=env["COLDSTART_RTT_FUNCTION"],
            pool_size=int(env["COLDSTART_POOL"]),
            ttl=int(env.get("COLDSTART_TTL", "300")),
            cache_size=int(env.get("COLDSTART_CACHE_SIZE", "1000000")),
        )

    def sql(self, query: str) -> str:
        return with_rtt(query, self.rtt_function, self.rtt)


@dataclass
class Stats:
    lookups: int = 0  # lookup statements sent
    preload: str = "none"  # none | running | done | failed
    preload_rows: int = 0
    preload_seconds: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "lookups": self.lookups,
            "preload": self.preload,
            "preload_rows": self.preload_rows,
            "preload_seconds": self.preload_seconds,
            "error": self.error,
            **self.extra,
        }


class StatsRoute:
    """Answers ``GET /stats`` from ``stats()``; everything else, lifespan included, goes to ``app``."""

    def __init__(self, app: ASGIApp, stats: Callable[[], dict[str, Any]]) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/stats":
            await self.app(scope, receive, send)
            return
        body = json.dumps(self.stats()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# -- the variants' read paths ----------------------------------------------------------------


class Database:
    """The pool and the statements of the hand-written variants, each counted."""

    def __init__(self, settings: Settings, stats: Stats) -> None:
        self.settings = settings
        self.stats = stats
        self.pool: asyncpg.Pool | None = None
        self.lookup_sql = settings.sql(LOOKUP_ONE)

    async def open(self) -> None:
        # asyncpg's defaults but max_size: the pool connects min_size=10 before startup completes.
        self.pool = await asyncpg.create_pool(self.settings.dsn, max_size=self.settings.pool_size)

    async def close(self) -> None:
        if self.pool is not None:
            await asyncio.wait_for(self.pool.close(), 10)

    async def one(self, token: str) -> Row | None:
        assert self.pool is not None
        self.stats.lookups += 1
        record = await self.pool.fetchrow(self.lookup_sql, token)
        return None if record is None else dict(record)

    async def many(self, query: str, *args: Any) -> list[Row]:
        assert self.pool is not None
        records = await self.pool.fetch(self.settings.sql(query), *args)
        return [dict(r) for r in records]


class NoCache:
    """(a) every request asks the database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, token: str) -> Row | None:
        return await self.db.one(token)


class ReadThrough:
    """(b) the typical proxy: a dict in front of one-key lookups; no coalescing, no negative entries."""

    def __init__(self, db: Database, ttl: float) -> None:
        self.db = db
        self.ttl = ttl
        self.entries: dict[str, tuple[Row, float]] = {}

    async def get(self, token: str) -> Row | None:
        entry = self.entries.get(token)
        if entry is not None and time.monotonic() < entry[1]:
            return entry[0]
        row = await self.db.one(token)
        if row is not None:
            self.entries[token] = (row, time.monotonic() + self.ttl)
        return row

    async def preload(self, query: str, limit: int, stats: Stats) -> None:
        """(c), (d): fill the dict in the background; never replace an entry a request already read."""
        started = time.monotonic()
        stats.preload = "running"
        try:
            rows = await self.db.many(query, limit)
        except Exception as exc:
            stats.preload, stats.error = "failed", f"{type(exc).__name__}: {exc}"
            return
        expires = time.monotonic() + self.ttl
        for row in rows:
            self.entries.setdefault(row["token"], (row, expires))
        stats.preload_rows = len(rows)
        stats.preload_seconds = round(time.monotonic() - started, 3)
        stats.preload = "done"


class Decorated:
    """(e) a peer's decorator around the one-key lookup."""

    def __init__(self, get: Callable[[str], Awaitable[Row | None]]) -> None:
        self.get = get


class Oracle:
    """(g) every row in a dict before startup completes: the floor."""

    def __init__(self) -> None:
        self.entries: dict[str, Row] = {}

    async def get(self, token: str) -> Row | None:
        return self.entries.get(token)


# -- the apps --------------------------------------------------------------------------------

Lifespan = Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]


def proxy(api_keys: object, stats: Stats, lifespan: Lifespan) -> ASGIApp:
    """The example proxy's ``/v1/models``, handler and error answers included, over ``api_keys``."""
    app = Starlette(
        routes=[Route("/v1/models", list_models, methods=["GET"])],
        exception_handlers={AuthError: auth_error, ClientDisconnect: client_gone},
        lifespan=lifespan,
    )
    app.state.api_keys = api_keys
    return StatsRoute(app, stats.as_dict)


def hand_written(settings: Settings) -> ASGIApp:
    stats = Stats()
    db = Database(settings, stats)
    variant = settings.variant
    api_keys: object
    preload: tuple[str, int] | None = None
    if variant == "no-cache":
        api_keys = NoCache(db)
    elif variant in ("read-through", "preload-recent-100", "preload-active-10k"):
        api_keys = ReadThrough(db, settings.ttl)
        if variant == "preload-recent-100":
            preload = (RECENT_QUERY, 100)
        elif variant == "preload-active-10k":
            preload = (WARM_QUERY, 10_000)
    elif variant == "cashews":
        from cashews import cache as cashews_cache

        # The memory backend keeps 1000 entries by default; sized here to hold every key, so the
        # comparison is about the herd, not about eviction.
        cashews_cache.setup("mem://", size=settings.cache_size)

        @cashews_cache(ttl=settings.ttl)
        async def lookup_cashews(token: str) -> Row | None:
            return await db.one(token)

        api_keys = Decorated(lookup_cashews)
    elif variant == "aiocache-stampede":
        from aiocache import cached_stampede  # type: ignore[import-untyped]

        @cached_stampede(ttl=settings.ttl, lease=2)  # type: ignore[untyped-decorator, misc, unused-ignore]
        async def lookup_aiocache(token: str) -> Row | None:
            return await db.one(token)

        api_keys = Decorated(lookup_aiocache)
    else:
        raise ValueError(f"unknown COLDSTART_VARIANT {variant!r}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await db.open()
        tasks: set[asyncio.Task[None]] = set()
        if variant == "cashews":
            from cashews import cache as cashews_cache

            await cashews_cache.init()
        if preload is not None:
            assert isinstance(api_keys, ReadThrough)
            # As the seed pull request does: a task that does not hold up startup.
            tasks.add(asyncio.create_task(api_keys.preload(preload[0], preload[1], stats)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if variant == "cashews":
                from cashews import cache as cashews_cache

                await cashews_cache.close()
            await db.close()

    return proxy(api_keys, stats, lifespan)


def oracle(settings: Settings) -> ASGIApp:
    stats = Stats()
    db = Database(settings, stats)
    api_keys = Oracle()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await db.open()
        started = time.monotonic()
        stats.preload = "running"
        rows = await db.many(ALL_QUERY)
        api_keys.entries = {row["token"]: row for row in rows}
        stats.preload_rows = len(rows)
        stats.preload_seconds = round(time.monotonic() - started, 3)
        stats.preload = "done"
        try:
            yield
        finally:
            await db.close()

    return proxy(api_keys, stats, lifespan)


def asgi_warmup(settings: Settings) -> ASGIApp:
    """(f) the example proxy itself, defaults but the pool size and the round trip in its two queries."""
    app = example.create_app(
        dsn=settings.dsn,
        pool_size=settings.pool_size,
        lookup_query=settings.sql(LOOKUP_QUERY),
        warm_query=settings.sql(WARM_QUERY),
    )
    (dataset,) = app.datasets
    assert dataset.lookup_sql == settings.sql(LOOKUP_QUERY) and dataset.warm_sql == settings.sql(WARM_QUERY)

    def stats() -> dict[str, Any]:
        status = app.status()
        ds = status["datasets"]["api_keys"]
        state = "done" if status["ready"] else ("running" if ds["state"] != "failed" else "failed")
        return {
            "lookups": ds["queries"],
            "preload": state,
            "preload_rows": ds["rows"],
            "preload_seconds": ds["elapsed"] if status["ready"] else None,
            "error": ds["last_error"],
            "warmup": status,
        }

    return StatsRoute(app, stats)


def create_app() -> ASGIApp:
    settings = Settings.from_env()
    if settings.variant == "asgi-warmup":
        return asgi_warmup(settings)
    if settings.variant == "oracle":
        return oracle(settings)
    return hand_written(settings)
