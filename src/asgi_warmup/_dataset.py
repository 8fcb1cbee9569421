"""PostgresDataset: read-through access to one table (or query), warmed at startup."""

from __future__ import annotations

import asyncio
import gc
import math
import random
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from time import monotonic as _monotonic
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from . import _sql
from ._cache import SharedCache
from ._errors import ALREADY_BOUND, LIFESPAN_NEVER_RAN, ConfigError, LookupFailedError, NotStartedError
from ._loader import Loader

if TYPE_CHECKING:
    from ._warmup import Runtime

Row = dict[str, Any]
State = Literal["idle", "pending", "warming", "retrying", "warm", "failed", "disabled"]

# Invalidation marks are kept only while a read that started before them may still store its
# result; past this many, every read in flight is treated as stale instead.
_MAX_INVALIDATION_MARKS = 100_000
_MIN_CAPACITY = 100_000
_FIRST_WARM_BATCH = 100
_BUSY_WARM_BATCH = 250
_BUSY_LAG = 0.001
_DUTY = 4
_MAX_BACKOFF = 0.05


class DatasetStatus(TypedDict):
    state: State
    rows: int
    target: int
    elapsed: float
    last_error: str | None
    queries: int


class PostgresDataset:
    """Rows of one table (or of your own queries), keyed by one column, cached and warmed.

    ``get`` answers from the in-process cache in microseconds; a miss goes to the cache you
    passed to the middleware (if any), then to PostgreSQL at once, joined with every other
    miss in flight: one query per key at light load, a few batched queries under a herd.
    """

    def __init__(
        self,
        name: str,
        *,
        table: str | None = None,
        key: str,
        columns: Sequence[str] | None = None,
        order_by: str | None = None,
        limit: int | None = None,
        ttl: float = 300,
        warm_query: str | None = None,
        lookup_query: str | None = None,
        negative_ttl: float = 30,
        ttl_jitter: float = 0.1,
        early_refresh: float = 1.0,
        max_batch: int = 1000,
        batch_window: float = 0.0,
        warm_batch_size: int = 1000,
        max_entries: int | None = None,
    ) -> None:
        if not isinstance(name, str) or not name or ":" in name:
            raise ConfigError(f"dataset name {name!r} is not valid: use a non-empty string without ':'")
        self.name = name
        key_sql = _sql.quote_ident(name, "key", key)
        self.key = key
        if table is None and lookup_query is None:
            raise ConfigError(f"dataset {name!r}: pass table= (or lookup_query= for joins and views)")
        if warm_query is not None and order_by is not None:
            raise ConfigError(
                f"dataset {name!r}: order_by= applies to the generated warm query; put ORDER BY in warm_query="
            )
        _positive(name, "ttl", ttl)
        _non_negative(name, "negative_ttl", negative_ttl)
        _non_negative(name, "early_refresh", early_refresh)
        _non_negative(name, "batch_window", batch_window)
        if not 0 <= ttl_jitter < 1:
            raise ConfigError(f"dataset {name!r}: ttl_jitter={ttl_jitter!r} is not valid: use a fraction in [0, 1)")
        for what, value in (("max_batch", max_batch), ("warm_batch_size", warm_batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"dataset {name!r}: {what}={value!r} is not valid: use a whole number >= 1")
        for what, optional in (("limit", limit), ("max_entries", max_entries)):
            if optional is not None and (not isinstance(optional, int) or isinstance(optional, bool) or optional < 0):
                raise ConfigError(f"dataset {name!r}: {what}={optional!r} is invalid: use a whole number >= 0, or None")

        table_sql = _sql.quote_table(name, table) if table is not None else None
        select = _sql.select_list(name, key, columns)
        order = _sql.order_clause(name, order_by) if order_by is not None else None
        if lookup_query is None:
            assert table_sql is not None
            lookup_query = _sql.lookup_sql(table_sql, select, key_sql)
        self.lookup_sql = lookup_query
        self.warm_sql: str | None = warm_query
        if warm_query is None and table_sql is not None:
            self.warm_sql = _sql.warm_sql(table_sql, select, order)
        self.table = table
        self.limit = limit
        self.ttl = float(ttl)
        self.negative_ttl = float(negative_ttl)
        self.ttl_jitter = float(ttl_jitter)
        self.early_refresh = float(early_refresh)
        self.max_batch = max_batch
        self.batch_window = float(batch_window)
        self.warm_batch_size = warm_batch_size
        self.max_entries = max_entries

        # The in-process tier: key -> (value, refresh_at, expires_at, born), all times monotonic.
        # value None is a cached absence. Oldest-written first, so eviction is popitem(last=False).
        self._entries: OrderedDict[Hashable, tuple[Row | None, float, float, int]] = OrderedDict()
        self._capacity = _MIN_CAPACITY
        self._runtime: Runtime | None = None
        self._loader: Loader | None = None
        # Versions against stale sets: every read takes a tick of the clock when it starts; an
        # invalidation takes one too and marks its key. A read stores only what nothing newer
        # (invalidation or read) has touched since it started.
        self._clock = 0
        self._invalidated: dict[Hashable, int] = {}
        self._floor = 0
        self._reads_in_flight = 0
        self._refreshing: set[Hashable] = set()
        self._status: DatasetStatus = _idle()
        self._warm_started: float | None = None
        self._queries = 0

    def __repr__(self) -> str:
        return f"PostgresDataset({self.name!r}, table={self.table!r}, key={self.key!r})"

    # -- the read path ---------------------------------------------------------------------

    async def get(self, key: Hashable) -> Row | None:
        """The row for ``key``, or None if the database has none. Never waits for the warmup."""
        entry = self._entries.get(key)
        if entry is not None:
            now = _monotonic()
            if now < entry[1]:
                return entry[0]
            if now < entry[2]:
                self._refresh(key)
                return entry[0]
        return await self._load(key)

    async def get_many(self, keys: Iterable[Hashable]) -> dict[Hashable, Row]:
        """``{key: row}`` for the keys that exist; the misses are read in batched queries."""
        found: dict[Hashable, Row] = {}
        missing: list[Hashable] = []
        now = _monotonic()
        for key in dict.fromkeys(keys):
            entry = self._entries.get(key)
            if entry is not None and now < entry[2]:
                if now >= entry[1]:
                    self._refresh(key)
                if entry[0] is not None:
                    found[key] = entry[0]
            else:
                missing.append(key)
        if missing:
            loader = self._bound_loader()
            futures = [loader.load(k) for k in missing]
            rows = await asyncio.shield(asyncio.gather(*futures))
            for key, row in zip(missing, rows, strict=True):
                if row is not None:
                    found[key] = row
        return found

    async def invalidate(self, key: Hashable) -> None:
        """Forget ``key`` here and in the shared cache; no read started before this call can store it again."""
        runtime = self._bound_runtime()
        # Only a read already in flight could store an older value: mark the key for those.
        if self._reads_in_flight:
            self._invalidated[key] = self._tick()
            if len(self._invalidated) > _MAX_INVALIDATION_MARKS:
                self._floor = self._clock
                self._invalidated.clear()
        self._entries.pop(key, None)
        self._bound_loader().forget(key)
        if runtime.shared is not None:
            await runtime.shared.delete(self.name, key)

    def status(self) -> DatasetStatus:
        status = self._status.copy()
        status["queries"] = self.queries
        if status["state"] in ("warming", "retrying") and self._warm_started is not None:
            status["elapsed"] = round(time.monotonic() - self._warm_started, 3)
        return status

    # -- misses ----------------------------------------------------------------------------

    async def _load(self, key: Hashable) -> Row | None:
        if key is None:
            raise TypeError(f"dataset {self.name!r}: key must not be None")
        fut = self._bound_loader().load(key)
        # shield: one caller giving up must not cancel the load the others wait on.
        result: Row | None = await asyncio.shield(fut)
        return result

    def _refresh(self, key: Hashable) -> None:
        loader = self._loader
        if loader is not None and not loader.loading(key):
            self._refreshing.add(key)
            loader.load(key)

    async def _fetch(self, keys: list[Hashable]) -> dict[Hashable, Any]:
        """The loader's batch: the shared cache first (if any), then one query for the rest."""
        runtime = self._bound_runtime()
        self._reads_in_flight += 1
        try:
            found: dict[Hashable, Any] = {}
            ask_db = keys
            if runtime.shared is not None:
                # A refresh must see the database, not the entry it is replacing.
                found = await self._from_shared(runtime.shared, [k for k in keys if k not in self._refreshing])
                ask_db = [k for k in keys if k not in found]
            self._refreshing.difference_update(keys)
            if ask_db:
                found.update(await self._from_db(runtime, ask_db))
            return found
        finally:
            self._end_read()

    async def _from_shared(self, shared: SharedCache, keys: list[Hashable]) -> dict[Hashable, Any]:
        if not keys:
            return {}
        started = self._tick()
        hits = await shared.get_many(self.name, keys)
        offset = _monotonic() - time.time()
        found: dict[Hashable, Any] = {}
        for key, (row, expires_at) in hits.items():
            found[key] = row
            self._store_shared(key, row, expires_at + offset, started)
        return found

    async def _from_db(self, runtime: Runtime, keys: list[Hashable]) -> dict[Hashable, Any]:
        started = self._tick()
        t0 = _monotonic()
        rows = await self._query(runtime, keys)
        cost = _monotonic() - t0
        read = [(key, rows.setdefault(key, None)) for key in keys]
        # A key that failed alone has an exception for a value: never cached.
        writes = self._store_read(
            [kv for kv in read if not isinstance(kv[1], BaseException)], cost, started, share=runtime.shared is not None
        )
        if runtime.shared is not None and writes:
            await runtime.shared.set_many(self.name, writes, self._backend_ttl())
        return rows

    async def _query(self, runtime: Runtime, keys: list[Hashable]) -> dict[Hashable, Any]:
        """Rows by key; a key the database rejects (say, not a valid uuid) fails alone."""
        self._queries += 1
        try:
            records = await runtime.fetch(self.lookup_sql, keys)
        except asyncpg.DataError as exc:
            if len(keys) == 1:
                failed = LookupFailedError(self.name, 1, exc)
                failed.__cause__ = exc
                return {keys[0]: failed}
            half = len(keys) // 2
            first = await self._query(runtime, keys[:half])
            first.update(await self._query(runtime, keys[half:]))
            return first
        except Exception as exc:
            raise LookupFailedError(self.name, len(keys), exc) from exc
        wanted = set(keys)
        rows: dict[Hashable, Any] = {}
        name = self.key
        for record in records:
            k = record[name]
            # A row only ever answers the key it carries.
            if k in wanted:
                rows[k] = dict(record)
        return rows

    # -- the in-process tier ---------------------------------------------------------------

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _end_read(self) -> None:
        self._reads_in_flight -= 1
        if not self._reads_in_flight and self._invalidated:
            self._invalidated.clear()

    def _store_read(
        self, rows: Iterable[tuple[Hashable, Row | None]], cost: float, started: int, *, share: bool
    ) -> list[tuple[Hashable, Row | None, float]]:
        """Store values just read from the database (a read that began at tick ``started`` and took
        ``cost`` seconds); with ``share``, return (key, row, wall-clock expiry) of those stored.

        One loop for a whole batch: the warmup's speed is this loop's speed.
        """
        stored: list[tuple[Hashable, Row | None, float]] = []
        if started <= self._floor:
            return stored
        entries, invalidated = self._entries, self._invalidated
        get, move_to_end = entries.get, entries.move_to_end
        capacity = self._capacity
        ttl, negative_ttl, jitter = self.ttl, self.negative_ttl, self.ttl_jitter
        # XFetch (Vattani et al., VLDB 2015), with the random draw made now rather than on every
        # hit: an entry is refreshed ahead of expiry by cost * beta * -ln(U).
        early = cost * self.early_refresh
        rand, log = random.random, math.log
        now, wall = _monotonic(), time.time()
        for key, row in rows:
            if invalidated and invalidated.get(key, 0) >= started:
                continue  # invalidated after this read began
            old = get(key)
            if old is not None:
                if old[3] > started:
                    continue  # a newer read is already stored
                if row is None and not negative_ttl:
                    del entries[key]  # gone from the database, and absences are not cached
                    continue
                move_to_end(key)
            elif row is None and not negative_ttl:
                continue
            elif len(entries) >= capacity:
                entries.popitem(last=False)
            if row is None:
                life = negative_ttl * (1.0 + jitter * (2.0 * rand() - 1.0)) if jitter else negative_ttl
                expires_at = now + life
                entries[key] = (None, expires_at, expires_at, started)
            else:
                life = ttl * (1.0 + jitter * (2.0 * rand() - 1.0)) if jitter else ttl
                expires_at = now + life
                refresh_at = expires_at + early * log(1.0 - rand()) if early else expires_at
                entries[key] = (row, refresh_at, expires_at, started)
            if share:
                stored.append((key, row, wall + life))
        return stored

    def _store_shared(self, key: Hashable, row: Row | None, expires_at: float, started: int) -> None:
        """Store an entry found in the shared cache (``expires_at`` on our monotonic clock)."""
        if started <= self._floor or self._invalidated.get(key, 0) >= started:
            return
        entries = self._entries
        old = entries.get(key)
        if old is not None:
            if old[3] > started:
                return
            entries.move_to_end(key)
        elif len(entries) >= self._capacity:
            entries.popitem(last=False)
        entries[key] = (row, expires_at, expires_at, started)

    def _backend_ttl(self) -> int:
        return math.ceil(max(self.ttl, self.negative_ttl) * (1.0 + self.ttl_jitter)) + 1

    # -- warmup ----------------------------------------------------------------------------

    async def _warm(self, runtime: Runtime, conn: PoolConnectionProxy[asyncpg.Record], limit: int) -> int:
        """Stream the hottest ``limit`` rows into the cache; return how many were read."""
        assert self.warm_sql is not None
        done = 0
        shared = runtime.shared
        async with conn.transaction(readonly=True):
            # The cursor's snapshot is taken when it opens: that is when these rows were read.
            self._reads_in_flight += 1
            started = self._tick()
            try:
                cursor = await conn.cursor(self.warm_sql, limit)
                # A small first batch lands the very hottest rows one round trip after startup.
                batch = min(_FIRST_WARM_BATCH, self.warm_batch_size)
                while done < limit:
                    t0 = _monotonic()
                    records = await cursor.fetch(min(batch, limit - done))
                    if not records:
                        break
                    cost = _monotonic() - t0
                    name = self.key
                    # The cyclic GC would run several times inside this synchronous loop, each time
                    # scanning the ever larger set of entries already stored: 30% of the warmup's time
                    # at 100k rows. Paused for one batch (a millisecond or two), then as it was.
                    paused = gc.isenabled()
                    gc.disable()
                    stored_at = _monotonic()
                    try:
                        writes = self._store_read(
                            ((r[name], dict(r)) for r in records), cost, started, share=shared is not None
                        )
                    finally:
                        if paused:
                            gc.enable()
                    if shared is not None:
                        await shared.set_many(self.name, writes, self._backend_ttl())
                    done += len(records)
                    self._status["rows"] = done
                    busy = await _yield_to_requests(_monotonic() - stored_at)
                    # While requests wait, smaller fetches keep each turn of the loop short.
                    batch = min(_BUSY_WARM_BATCH, self.warm_batch_size) if busy else self.warm_batch_size
            finally:
                self._end_read()
        return done

    # -- binding to a running middleware ---------------------------------------------------

    def _bind(self, runtime: Runtime, max_queries: int, warm_limit: int) -> None:
        if self._runtime is not None:
            raise ConfigError(ALREADY_BOUND.format(name=self.name))
        self._runtime = runtime
        self._loader = Loader(
            self._fetch, max_batch=self.max_batch, max_queries=max_queries, window=self.batch_window
        )
        capacity = self.max_entries if self.max_entries is not None else max(_MIN_CAPACITY, 2 * warm_limit)
        self._capacity = max(capacity, 1)
        self._status = _idle()
        self._warm_started = None
        self._queries = 0

    async def _unbind(self) -> None:
        loader, self._loader = self._loader, None
        if loader is not None:
            await loader.aclose()
        self._runtime = None
        self._entries.clear()
        self._invalidated.clear()
        self._refreshing.clear()
        self._reads_in_flight = 0

    def _bound_runtime(self) -> Runtime:
        if self._runtime is None:
            raise NotStartedError(LIFESPAN_NEVER_RAN.format(name=self.name))
        return self._runtime

    def _bound_loader(self) -> Loader:
        if self._loader is None:
            raise NotStartedError(LIFESPAN_NEVER_RAN.format(name=self.name))
        return self._loader

    @property
    def queries(self) -> int:
        """Lookup queries this dataset has sent to PostgreSQL since its lifespan started."""
        return self._queries


async def _yield_to_requests(work: float) -> bool:
    """Between warm batches: let requests run first whenever the server is serving.

    Decoding and storing a batch holds the one event loop for a few milliseconds. If requests
    are waiting (a turn of the loop takes over _BUSY_LAG), the warmup pauses a few times as long
    as the batch's work took (_DUTY), so it uses at most about a fifth of the loop while the
    server is busy; misses, one batched query each, stay cheap meanwhile. An idle server warms
    at full speed.
    """
    loop = asyncio.get_running_loop()
    before = loop.time()
    await asyncio.sleep(0)
    if loop.time() - before < _BUSY_LAG:
        return False
    await asyncio.sleep(min(work * _DUTY, _MAX_BACKOFF))
    return True


def _idle() -> DatasetStatus:
    return {"state": "idle", "rows": 0, "target": 0, "elapsed": 0.0, "last_error": None, "queries": 0}


def _positive(name: str, what: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isinf(value):
        raise ConfigError(f"dataset {name!r}: {what}={value!r} is not valid: use a number of seconds > 0")


def _non_negative(name: str, what: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or math.isinf(value):
        raise ConfigError(f"dataset {name!r}: {what}={value!r} is not valid: use a number >= 0")

