"""The per-lifespan runtime: pool, shared cache, bound datasets, the background warmup, status."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, TypedDict, TypeVar, Union

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ._cache import SharedCache
from ._config import Settings
from ._dataset import DatasetStatus, PostgresDataset
from ._errors import BAD_DSN, NO_DSN, ConfigError, NotStartedError

logger = logging.getLogger("asgi_warmup")
T = TypeVar("T")

PoolSource = Union[asyncpg.Pool, Callable[[], Union[asyncpg.Pool, Awaitable[asyncpg.Pool]]]]  # noqa: UP007 (3.10 runtime)

# Errors that mean "the database is not reachable right now", as opposed to "this is wrong".
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
)
_CONFIG: tuple[type[BaseException], ...] = (
    asyncpg.ClientConfigurationError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)
PROBE_TIMEOUT = 3.0
APPLICATION_NAME = "asgi-warmup"
RETRY_BASE = 0.5
RETRY_CAP = 30.0


class WarmupStatus(TypedDict):
    ready: bool
    datasets: dict[str, DatasetStatus]


class Runtime:
    def __init__(
        self,
        datasets: Sequence[PostgresDataset],
        settings: Settings,
        *,
        dsn: str | None,
        pool: PoolSource | None,
        pool_size: int,
        warm_connections: int = 1,
        cache: Any,
    ) -> None:
        self.datasets = list(datasets)
        self.settings = settings
        self.pool: asyncpg.Pool | None = None
        self._pool_source = pool
        self._own_pool = pool is None
        self._dsn = dsn or settings.database_url
        self._dsn_source = "dsn=" if dsn else "DATABASE_URL"
        self._pool_size = pool_size
        self._warm_connections = warm_connections
        self.shared = SharedCache(cache) if cache is not None else None
        self._validated = False
        self._prepared = False
        self._task: asyncio.Task[None] | None = None
        self._warm_done = asyncio.Event()
        self._connecting: set[asyncio.Task[asyncpg.Connection]] = set()

    # -- startup ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Before the app's startup: open our pool (no connection yet) and bind the datasets."""
        if self._own_pool:
            if not self._dsn:
                raise ConfigError(NO_DSN)
            # min_size=0: creating the pool connects nothing, so a database that is down does
            # not stop the server; the background task opens the connections.
            # Named, so operators can tell our connections apart in pg_stat_activity.
            settings = {} if "application_name" in self._dsn else {"application_name": APPLICATION_NAME}
            self.pool = await asyncpg.create_pool(
                self._dsn, min_size=0, max_size=self._pool_size, connect=self._connect, server_settings=settings
            )
        bound: list[PostgresDataset] = []
        try:
            for ds in self.datasets:
                ds._bind(self, max_queries=self._max_queries(), warm_limit=self._limit(ds))
                bound.append(ds)
        except BaseException:
            for ds in bound:
                await ds._unbind()
            self.datasets = bound
            raise

    async def _connect(self, *args: Any, **kwargs: Any) -> asyncpg.Connection:
        """``asyncpg.connect``, except that a cancelled caller lets the attempt finish, then closes it.

        Cancelling asyncpg in the middle of a TLS handshake (sslmode=prefer, the default) leaves a
        future whose exception nobody retrieves: "unexpected connection_lost() call" in the log.
        Shutdown cancels whatever is in flight, so connection attempts are shielded from it.
        """
        attempt: asyncio.Task[asyncpg.Connection] = asyncio.ensure_future(asyncpg.connect(*args, **kwargs))
        self._connecting.add(attempt)
        attempt.add_done_callback(self._connecting.discard)
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            attempt.add_done_callback(_close_orphan)
            raise

    async def ready(self) -> None:
        """After the app's startup: adopt the app's pool if given as a factory, check the queries,
        open the pool's connections and prepare the lookups, all bounded by PROBE_TIMEOUT.

        This costs a few connection set-ups, whatever the warm size, and the first request then
        pays no connect or prepare; if the database is unreachable, the background task does it.
        """
        source = self._pool_source
        if source is not None and self.pool is None:
            pool = source if isinstance(source, asyncpg.Pool) else source()
            if inspect.isawaitable(pool):
                pool = await pool
            if not isinstance(pool, asyncpg.Pool):
                raise ConfigError(f"pool= must be an asyncpg.Pool or return one, got {type(pool).__name__}")
            self.pool = pool
            for ds in self.datasets:
                if ds._loader is not None:
                    ds._loader.max_queries = self._max_queries()
        try:
            await asyncio.wait_for(self._prepare(), PROBE_TIMEOUT)
        except TRANSIENT as exc:
            logger.warning(
                "Database unreachable at startup (%s: %s): serving anyway, warmup will retry",
                type(exc).__name__, exc,
            )

    async def _validate(self) -> None:
        pool = self._require_pool()
        try:
            async with pool.acquire() as conn:
                for ds in self.datasets:
                    await _check(conn, ds)
        except _CONFIG as exc:
            raise ConfigError(BAD_DSN.format(source=self._dsn_source, cause=exc)) from exc
        self._validated = True

    async def _prepare(self) -> None:
        if not self._validated:
            await self._validate()
        await self._warm_pool()
        self._prepared = True

    def start_warmup(self) -> None:
        for ds in self.datasets:
            if self._warms(ds):
                ds._status.update({"state": "pending", "target": self._limit(ds)})
            else:
                ds._status.update({"state": "disabled", "target": 0})
        # Keep a hard reference: the loop keeps only weak ones.
        self._task = asyncio.get_running_loop().create_task(self._background(), name="asgi-warmup")

    async def wait_warm(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._warm_done.wait(), timeout)

    # -- the background task ---------------------------------------------------------------

    async def _background(self) -> None:
        warming = [ds for ds in self.datasets if self._warms(ds)]
        try:
            try:
                if not self._prepared:
                    await self._retrying("Database", self._prepare, warming)
            except Exception as exc:
                for ds in warming:
                    _failed(ds, exc)
                logger.error("Cache warmup failed: %s: %s", type(exc).__name__, exc)
                return
            # At most warm_connections datasets warm at once: the rest of the pool serves misses.
            slots = asyncio.Semaphore(self._warm_connections)

            async def warm(ds: PostgresDataset) -> None:
                async with slots:
                    await self._warm_dataset(ds)

            await asyncio.gather(*(warm(ds) for ds in warming))
        finally:
            self._warm_done.set()

    async def _warm_pool(self) -> None:
        """Open the pool's connections and prepare the lookups, so the first request pays neither."""
        pool = self._require_pool()

        timings: dict[str, list[float]] = {ds.name: [] for ds in self.datasets}

        async def prepare() -> None:
            async with pool.acquire() as conn:
                for ds in self.datasets:
                    t0 = time.monotonic()
                    await conn.fetch(ds.lookup_sql, [])
                    timings[ds.name].append(time.monotonic() - t0)

        results = await asyncio.gather(*(prepare() for _ in range(pool.get_max_size())), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        for ds in self.datasets:
            # A first measure of a lookup's time, which paces the misses (see _loader): the fastest
            # of these, since they all parsed the statement and shared the database at once.
            if ds._loader is not None and timings[ds.name]:
                ds._loader.observe(min(timings[ds.name]))

    async def _warm_dataset(self, ds: PostgresDataset) -> None:
        limit = self._limit(ds)
        ds._warm_started = started = time.monotonic()
        logger.info("Cache warmup started: %s, %d rows", ds.name, limit)

        async def warm() -> int:
            ds._status["state"] = "warming"
            async with self._require_pool().acquire() as conn:
                return await ds._warm(self, conn, limit)

        try:
            rows = await self._retrying(f"Cache warmup of {ds.name}", warm, [ds])
        except Exception as exc:
            _failed(ds, exc)
            ds._status["elapsed"] = round(time.monotonic() - started, 3)
            logger.error("Cache warmup failed: %s: %s: %s", ds.name, type(exc).__name__, exc)
            return
        elapsed = time.monotonic() - started
        ds._status.update({"state": "warm", "rows": rows, "elapsed": round(elapsed, 3)})
        logger.info("Cache warmup complete: %s, %d rows in %.2f s", ds.name, rows, elapsed)

    async def _retrying(self, what: str, step: Callable[[], Awaitable[T]], datasets: list[PostgresDataset]) -> T:
        """Run ``step`` until it succeeds, backing off while the database is unreachable."""
        attempt = 0
        while True:
            try:
                return await step()
            except TRANSIENT as exc:
                attempt += 1
                delay = _backoff(attempt)
                for ds in datasets:
                    if ds._status["state"] == "warming":
                        ds._status["state"] = "retrying"
                    ds._status["last_error"] = f"{type(exc).__name__}: {exc}"
                logger.warning("%s unreachable (%s: %s): retrying in %.1f s", what, type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)

    # -- reads -----------------------------------------------------------------------------

    async def fetch(self, sql: str, keys: list[Hashable]) -> list[asyncpg.Record]:
        async with self._require_pool().acquire() as conn:
            records: list[asyncpg.Record] = await conn.fetch(sql, keys)
            return records

    # -- shutdown --------------------------------------------------------------------------

    async def stop_warmup(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def aclose(self) -> None:
        """Stop the warmup, unbind the datasets, close our own pool. Safe to call twice."""
        await self.stop_warmup()
        for ds in self.datasets:
            await ds._unbind()
        if self._own_pool and self.pool is not None:
            pool, self.pool = self.pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except (asyncio.TimeoutError, Exception):
                pool.terminate()
        if self._connecting:
            await asyncio.wait(self._connecting, timeout=PROBE_TIMEOUT)

    # -- status ----------------------------------------------------------------------------

    def status(self) -> WarmupStatus:
        datasets = {ds.name: ds.status() for ds in self.datasets}
        ready = all(s["state"] in ("warm", "disabled") for s in datasets.values())
        return {"ready": ready, "datasets": datasets}

    # -- helpers ---------------------------------------------------------------------------

    def _limit(self, ds: PostgresDataset) -> int:
        limit = ds.limit if ds.limit is not None else self.settings.limit
        # Warming past max_entries would evict the hottest rows to make room for colder ones.
        return limit if ds.max_entries is None else min(limit, ds.max_entries)

    def _warms(self, ds: PostgresDataset) -> bool:
        return self.settings.enabled and ds.warm_sql is not None and self._limit(ds) > 0

    def _max_queries(self) -> int:
        size = self.pool.get_max_size() if self.pool is not None else self._pool_size
        # The warmup's connections stay its own; the rest serve misses.
        return max(1, size - self._warm_connections)

    def _require_pool(self) -> asyncpg.Pool:
        if self.pool is None:
            raise NotStartedError("the pool= factory has not been called yet: it runs after the app's own startup")
        return self.pool


async def _check(conn: PoolConnectionProxy[asyncpg.Record], ds: PostgresDataset) -> None:
    """Prepare (not run) the dataset's queries: a wrong table, column or SQL fails here, by name."""
    for what, sql in (("lookup", ds.lookup_sql), ("warm", ds.warm_sql)):
        if sql is None:
            continue
        try:
            statement = await conn.prepare(sql)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, (*TRANSIENT, *_CONFIG)):
                raise
            raise ConfigError(
                f"dataset {ds.name!r}: the {what} query does not run: {type(exc).__name__}: {exc}. "
                f"Check table=, key=, columns= and order_by=, or {what}_query=. The query was: {sql}"
            ) from exc
        columns = [a.name for a in statement.get_attributes()]
        if ds.key not in columns:
            raise ConfigError(
                f"dataset {ds.name!r}: the {what} query returns no column named {ds.key!r} (it returns {columns}): "
                f"every row must carry its key. The query was: {sql}"
            )
        if len(statement.get_parameters()) != 1:
            what_is_1 = "the row limit" if what == "warm" else "the array of keys"
            raise ConfigError(
                f"dataset {ds.name!r}: the {what} query must take exactly one parameter, $1 ({what_is_1}). "
                f"The query was: {sql}"
            )


def _failed(ds: PostgresDataset, exc: BaseException) -> None:
    ds._status.update({"state": "failed", "last_error": f"{type(exc).__name__}: {exc}"})


def _close_orphan(attempt: asyncio.Task[asyncpg.Connection]) -> None:
    if attempt.cancelled() or attempt.exception() is not None:
        return
    attempt.result().terminate()


def _backoff(attempt: int) -> float:
    # Capped exponential backoff with full jitter, so replicas do not retry in step.
    return random.uniform(0, min(RETRY_CAP, RETRY_BASE * 2 ** min(attempt, 16)))
