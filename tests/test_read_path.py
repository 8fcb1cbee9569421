"""The read path: hits, misses that go straight to the database, single-flight, batching, safety."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator

import asyncpg
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from asgi_warmup import ConfigError, LookupFailedError, PostgresDataset, WarmupMiddleware
from helpers import Gate, LifespanDriver, wait_for

pytestmark = pytest.mark.anyio


def lookups(cls: type, ds: PostgresDataset) -> list[tuple]:
    """The lookup queries actually sent to PostgreSQL (the pool warm-up's empty-array ones excluded)."""
    return [args for sql, args in cls.fetches if sql == ds.lookup_sql and args[0]]


@pytest.fixture
async def started(table, counted) -> AsyncIterator[tuple[PostgresDataset, type]]:
    pool, cls = counted
    ds = table.dataset(limit=0)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], pool=pool)):
        yield ds, cls


async def test_miss_reads_the_database_then_hits_the_cache(started) -> None:
    ds, cls = started
    row = await ds.get("k5")
    assert row is not None
    assert (row["token"], row["n"], row["hits"]) == ("k5", 5, 195)
    assert await ds.get("k5") is row
    assert lookups(cls, ds) == [(["k5"],)]


async def test_absent_key_returns_none(started) -> None:
    ds, _cls = started
    assert await ds.get("nope") is None
    assert await ds.get_many(["nope", "k1"]) == {"k1": await ds.get("k1")}


async def test_fifty_concurrent_gets_of_a_cold_key_run_one_query(started) -> None:
    ds, cls = started
    rows = await asyncio.gather(*(ds.get("k7") for _ in range(50)))
    assert all(r is rows[0] for r in rows) and rows[0]["n"] == 7
    assert lookups(cls, ds) == [(["k7"],)]


async def test_get_many_batches_and_returns_only_existing(started) -> None:
    ds, cls = started
    await ds.get("k1")
    found = await ds.get_many(["k1", "k2", "k3", "missing", "k2"])
    assert {k: r["n"] for k, r in found.items()} == {"k1": 1, "k2": 2, "k3": 3}
    assert lookups(cls, ds) == [(["k1"],), (["k2", "k3", "missing"],)]


async def test_many_concurrent_misses_are_batched(table, counted) -> None:
    pool, cls = counted
    ds = table.dataset(limit=0, max_batch=50)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], pool=pool)):
        keys = [f"k{1 + i % 200}" for i in range(500)]
        rows = await asyncio.gather(*(ds.get(k) for k in keys))
        # Every caller got its own key's row.
        assert [r["token"] for r in rows] == keys
        sent = lookups(cls, ds)
        assert sorted(k for (batch,) in sent for k in batch) == sorted({*keys})
        assert len(sent) <= math.ceil(200 / 50) + 1
        assert ds.status()["queries"] == len(sent)


async def test_a_row_only_answers_its_own_key(table, counted) -> None:
    pool, _cls = counted
    # A lookup that returns rows for keys nobody asked for (here: every row) must not mix them up.
    everything = f'SELECT * FROM "{table.name}" WHERE $1::text[] IS NOT NULL'
    ds = PostgresDataset("loose", key="token", lookup_query=everything)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], pool=pool)):
        rows = await asyncio.gather(*(ds.get(f"k{i}") for i in (3, 4, 5)), ds.get("zzz"))
        assert [r and r["token"] for r in rows] == ["k3", "k4", "k5", None]


async def test_values_are_bound_never_spliced(started, table) -> None:
    ds, _cls = started
    assert await ds.get("k1' OR '1'='1") is None
    assert await ds.get("k1'; DROP TABLE \"" + table.name + '"; --') is None
    assert (await ds.get("k2"))["n"] == 2


@pytest.mark.parametrize(
    "options",
    [
        {"table": "users; DROP TABLE users"},
        {"table": 'users"--'},
        {"table": "a.b.c"},
        {"key": "token OR 1=1"},
        {"columns": ["n", "n); DROP TABLE x; --"]},
        {"columns": "n, hits"},
        {"order_by": "hits DESC; DROP TABLE x"},
        {"order_by": "random()"},
        {"order_by": "hits SIDEWAYS"},
        {"table": "1users"},
    ],
)
def test_identifier_injection_is_rejected_naming_the_dataset(options) -> None:
    options = {"table": "users", "key": "token", **options}
    with pytest.raises(ConfigError, match=r"^dataset 'api_keys': \w+=.* is not valid: "):
        PostgresDataset("api_keys", **options)


def test_identifiers_are_quoted() -> None:
    ds = PostgresDataset(
        "d", table="public.Api_Keys", key="token", columns=["spend", "user_id"], order_by="last_used_at desc nulls last"
    )
    assert ds.lookup_sql == 'SELECT "token", "spend", "user_id" FROM "public"."Api_Keys" WHERE "token" = ANY($1)'
    assert ds.warm_sql == (
        'SELECT "token", "spend", "user_id" FROM "public"."Api_Keys" ORDER BY "last_used_at" DESC NULLS LAST LIMIT $1'
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ttl": 0}, "ttl=0 is not valid"),
        ({"ttl_jitter": 1.5}, "ttl_jitter=1.5 is not valid"),
        ({"limit": -3}, "limit=-3 is invalid"),
        ({"max_batch": 0}, "max_batch=0 is not valid"),
        ({"table": None}, "pass table= (or lookup_query="),
        ({"warm_query": "SELECT 1", "order_by": "n"}, "order_by= applies to the generated warm query"),
    ],
)
def test_bad_dataset_options_are_refused(options, message) -> None:
    options = {"table": "users", "key": "token", **options}
    with pytest.raises(ConfigError) as info:
        PostgresDataset("users", **options)
    assert message in str(info.value)


def test_bad_middleware_options_are_refused() -> None:
    ds = PostgresDataset("users", table="users", key="id")
    with pytest.raises(ConfigError, match="non-empty list of PostgresDataset"):
        WarmupMiddleware(Starlette(), datasets=[])
    with pytest.raises(ConfigError, match="dataset names must be unique"):
        WarmupMiddleware(Starlette(), datasets=[ds, PostgresDataset("users", table="u2", key="id")])
    with pytest.raises(ConfigError, match="status_path="):
        WarmupMiddleware(Starlette(), datasets=[ds], status_path="ready")


async def test_database_error_reaches_every_waiter_and_is_never_cached(table, counted) -> None:
    pool, cls = counted
    ds = table.dataset(limit=0)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], pool=pool)):
        await table.execute(f'ALTER TABLE "{table.name}" RENAME TO "{table.name}_away"')
        try:
            results = await asyncio.gather(*(ds.get("k1") for _ in range(5)), return_exceptions=True)
        finally:
            await table.execute(f'ALTER TABLE "{table.name}_away" RENAME TO "{table.name}"')
        assert all(isinstance(r, LookupFailedError) for r in results)
        assert isinstance(results[0].__cause__, asyncpg.UndefinedTableError)
        assert "database lookup of 1 key(s) failed: UndefinedTableError" in str(results[0])
        assert len(lookups(cls, ds)) == 1
        # Nothing was cached: the next get asks again, and succeeds.
        assert (await ds.get("k1"))["n"] == 1
        assert len(lookups(cls, ds)) == 2


async def test_a_key_the_database_rejects_fails_alone(table, counted) -> None:
    pool, _cls = counted
    # user_id is a uuid column: "not-a-uuid" cannot even be sent as one.
    ds = PostgresDataset("by_user", table=table.name, key="user_id", limit=0)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], pool=pool)):
        good = await asyncpg.connect(table.dsn)
        try:
            ids = [r["user_id"] for r in await good.fetch(f'SELECT user_id FROM "{table.name}" ORDER BY n LIMIT 3')]
        finally:
            await good.close()
        results = await asyncio.gather(*(ds.get(i) for i in ids), ds.get("not-a-uuid"), return_exceptions=True)
        assert [r["n"] for r in results[:3]] == [1, 2, 3]
        assert isinstance(results[3], LookupFailedError)
        assert isinstance(results[3].__cause__, asyncpg.DataError)


async def test_a_load_nobody_waits_for_any_more_still_completes(started) -> None:
    ds, cls = started
    task = asyncio.ensure_future(ds.get("k8"))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: lookups(cls, ds))
    # The other callers of that key are not hurt by one caller giving up.
    assert (await ds.get("k8"))["n"] == 8


async def test_misses_are_answered_while_the_warmup_holds_its_connection(table, database_url) -> None:
    gate = Gate(database_url)
    await gate.close_gate()
    ds = table.gated_dataset(gate)
    # Two connections: the warmup holds one (blocked on the gate), misses get the other.
    try:
        async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], pool_size=2)):
            await wait_for(gate.waiting)
            rows = await asyncio.gather(*(ds.get(f"k{i}") for i in range(1, 101)))
            assert [r["n"] for r in rows] == list(range(1, 101))
            assert ds.status()["state"] == "warming"
    finally:
        await gate.open()


async def test_pool_is_opened_before_the_first_request(table, database_url) -> None:
    name = f"warm-{table.name}"
    dsn = database_url + ("&" if "?" in database_url else "?") + f"application_name={name}"
    ds = table.dataset(limit=10)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], dsn=dsn, pool_size=4)):
        # Right after startup.complete, before any request: all four connections are open.
        conn = await asyncpg.connect(database_url)
        try:
            opened = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name)
        finally:
            await conn.close()
        assert opened == 4
        assert ds.status()["queries"] == 0


async def test_own_connections_are_named_for_operators(table) -> None:
    driver = LifespanDriver(WarmupMiddleware(Starlette(), datasets=[table.dataset(limit=0)]))
    await driver.startup()
    async with driver.state["asgi_warmup"].pool.acquire() as conn:
        assert await conn.fetchval("SELECT current_setting('application_name')") == "asgi-warmup"
    await driver.shutdown()


@pytest.mark.parametrize("factory", ["sync", "async"])
async def test_pool_factory_adopts_the_pool_the_app_opened_in_its_own_startup(
    table, database_url, factory, monkeypatch
) -> None:
    # No DATABASE_URL: the middleware must not try to open a pool of its own.
    monkeypatch.delenv("DATABASE_URL")
    opened: dict[str, asyncpg.Pool] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with asyncpg.create_pool(database_url, min_size=1, max_size=3) as pool:
            opened["pool"] = pool
            yield

    async def async_factory() -> asyncpg.Pool:
        return opened["pool"]

    ds = table.dataset(limit=20)
    source = (lambda: opened["pool"]) if factory == "sync" else async_factory
    async with LifespanManager(WarmupMiddleware(Starlette(lifespan=lifespan), datasets=[ds], pool=source)):
        await wait_for(lambda: ds.status()["state"] == "warm")
        assert (await ds.get("k150"))["n"] == 150


async def test_an_adopted_pool_is_never_closed(table, counted) -> None:
    pool, _ = counted
    ds = table.dataset(limit=5)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], pool=pool)):
        await wait_for(lambda: ds.status()["state"] == "warm")
    assert not pool.is_closing()
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT 1") == 1


async def test_a_batch_window_collects_misses_across_ticks(table, counted) -> None:
    pool, cls = counted
    ds = table.dataset(limit=0, batch_window=0.05)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], pool=pool)):
        tasks = []
        for i in range(1, 6):
            tasks.append(asyncio.ensure_future(ds.get(f"k{i}")))
            await asyncio.sleep(0)  # each miss in its own loop tick
        rows = await asyncio.gather(*tasks)
        assert [r["n"] for r in rows] == [1, 2, 3, 4, 5]
        assert lookups(cls, ds) == [(["k1", "k2", "k3", "k4", "k5"],)]


async def test_max_entries_bounds_the_cache_and_the_warmup(table, counted) -> None:
    pool, cls = counted
    ds = table.dataset(limit=100, max_entries=30)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], pool=pool)):
        await wait_for(lambda: ds.status()["state"] == "warm")
        # The warmup stops at the bound instead of evicting its own hottest rows.
        assert (ds.status()["rows"], ds.status()["target"]) == (30, 30)
        assert [(await ds.get(f"k{i}"))["n"] for i in range(1, 31)] == list(range(1, 31))
        assert lookups(cls, ds) == []
        # Past the bound, the oldest-written entry makes room.
        await ds.get("k31")
        await ds.get("k2")
        await ds.get("k1")
        assert lookups(cls, ds) == [(["k31"],), (["k1"],)]
