"""Stampede protection: negative caching, TTL jitter, early refresh, and no stale sets."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from aiocache import SimpleMemoryCache
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette

from asgi_warmup import LookupFailedError, PostgresDataset, WarmupMiddleware
from asgi_warmup import _dataset as dataset_module
from asgi_warmup._codec import decode
from helpers import Gate, wait_for

pytestmark = pytest.mark.anyio


def looked_up(cls: type, ds: PostgresDataset) -> list[str]:
    """Every key sent to PostgreSQL by the dataset's lookups, in order."""
    return [k for sql, args in cls.fetches if sql == ds.lookup_sql for k in args[0]]


class Clock:
    """The read path's clock: real time until the test moves it, then stopped where it was put."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.stopped_at: float | None = None
        monkeypatch.setattr(dataset_module, "_monotonic", self.now)

    def now(self) -> float:
        return time.monotonic() if self.stopped_at is None else self.stopped_at

    def move_to(self, when: float) -> None:
        self.stopped_at = when


# -- negative caching ------------------------------------------------------------------------


async def test_a_flood_of_unknown_keys_costs_one_lookup_per_key(table, counted) -> None:
    pool, cls = counted
    ds = table.dataset(limit=0, max_batch=25)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], pool=pool)):
        bad = [f"sk-invalid-{i}" for i in range(100)]
        for _ in range(3):
            results = await asyncio.gather(*(ds.get(k) for k in bad * 10))
            assert results == [None] * 1000
        assert sorted(looked_up(cls, ds)) == sorted(bad)
        assert ds.status()["queries"] <= 4 + 1
        # Invalidating an absence lets the next get look again (the key may exist now).
        await ds.invalidate("sk-invalid-7")
        assert await ds.get("sk-invalid-7") is None
        assert looked_up(cls, ds).count("sk-invalid-7") == 2


async def test_absences_expire_after_negative_ttl(table, counted, monkeypatch) -> None:
    clock = Clock(monkeypatch)
    pool, cls = counted
    ds = table.dataset(limit=0, negative_ttl=30, ttl_jitter=0)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], pool=pool)):
        assert await ds.get("later") is None
        await table.execute(f"INSERT INTO \"{table.name}\" (token, n, hits) VALUES ('later', 7, 0)")
        assert await ds.get("later") is None
        clock.move_to(clock.now() + 31)
        assert (await ds.get("later"))["n"] == 7
        assert looked_up(cls, ds) == ["later", "later"]


async def test_negative_ttl_zero_disables_negative_caching(table, counted) -> None:
    pool, cls = counted
    ds = table.dataset(limit=0, negative_ttl=0)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], pool=pool)):
        for _ in range(3):
            assert await ds.get("nobody") is None
        assert looked_up(cls, ds) == ["nobody"] * 3


# -- TTL jitter ------------------------------------------------------------------------------


@pytest.mark.parametrize(("jitter", "low", "high"), [(0.1, 90, 110), (0.0, 100, 100)])
async def test_bulk_warm_expiries_are_spread(table, jitter, low, high) -> None:
    cache = SimpleMemoryCache()  # any aiocache cache: we read back what the warmup stored
    ds = table.dataset(ttl=100, ttl_jitter=jitter)
    before = time.time()
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], cache=cache)):
        await wait_for(lambda: ds.status()["state"] == "warm")
        after = time.time()
        ttls = []
        for i in range(1, 201):
            _, expires_at = decode(await cache.get(f"asgi_warmup:{table.name}:'k{i}'"))
            ttls.append(expires_at - before)
    assert low - 0.01 <= min(ttls) and max(ttls) <= high + (after - before) + 0.01
    if jitter:
        # 200 draws over +-10 s: never bunched into one instant.
        assert max(ttls) - min(ttls) > 10
        assert len({round(t, 3) for t in ttls}) > 150
    else:
        assert max(ttls) - min(ttls) <= after - before + 0.01


# -- early refresh ---------------------------------------------------------------------------


async def _in_refresh_window(ds: PostgresDataset, key: str, clock: Clock) -> None:
    _, refresh_at, expires_at, _ = ds._entries[key]
    assert refresh_at < expires_at
    clock.move_to((refresh_at + expires_at) / 2)


async def test_early_refresh_runs_once_and_serves_the_old_value_meanwhile(table, counted, monkeypatch) -> None:
    clock = Clock(monkeypatch)
    pool, cls = counted
    ds = table.dataset(limit=0, ttl=100, early_refresh=1.0)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], pool=pool)):
        assert (await ds.get("k1"))["n"] == 1
        await table.set_n("k1", 101)
        await _in_refresh_window(ds, "k1", clock)
        rows = await asyncio.gather(*(ds.get("k1") for _ in range(50)))
        assert [r["n"] for r in rows] == [1] * 50
        await wait_for(lambda: ds._entries["k1"][0]["n"] == 101)
        assert looked_up(cls, ds) == ["k1", "k1"]
        assert (await ds.get("k1"))["n"] == 101


async def test_a_failed_refresh_keeps_serving_until_expiry(table, counted, monkeypatch) -> None:
    clock = Clock(monkeypatch)
    pool, cls = counted
    ds = table.dataset(limit=0, ttl=100, early_refresh=1.0)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], pool=pool)):
        assert (await ds.get("k2"))["n"] == 2
        await table.execute(f'ALTER TABLE "{table.name}" RENAME TO "{table.name}_away"')
        try:
            await _in_refresh_window(ds, "k2", clock)
            assert (await ds.get("k2"))["n"] == 2
            await wait_for(lambda: len(looked_up(cls, ds)) == 2 and not ds._loader.loading("k2"))
            assert (await ds.get("k2"))["n"] == 2
            clock.move_to(ds._entries["k2"][2] + 1)
            with pytest.raises(LookupFailedError):
                await ds.get("k2")
        finally:
            await table.execute(f'ALTER TABLE "{table.name}_away" RENAME TO "{table.name}"')


# -- no stale sets ---------------------------------------------------------------------------


def _gated_lookup(table: str, gate: Gate, key: str) -> str:
    # Blocks in PostgreSQL only when `key` is asked for, after its snapshot is taken.
    return (
        f'SELECT t.* FROM "{table}" AS t CROSS JOIN '
        f"(SELECT CASE WHEN '{key}' = ANY($1::text[]) THEN pg_advisory_xact_lock_shared({gate.key}) END) AS g "
        "WHERE t.token = ANY($1)"
    )


async def _gate_waiters(gate: Gate) -> int:
    conn = await asyncpg.connect(gate.dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = $1", gate.key
        ))
    finally:
        await conn.close()


async def test_a_value_read_before_invalidate_is_not_stored_after_it(table, database_url, counted) -> None:
    pool, cls = counted
    gate = Gate(database_url)
    ds = PostgresDataset(table.name, key="token", lookup_query=_gated_lookup(table.name, gate, "k1"), limit=0)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], pool=pool)):
        await gate.close_gate()
        try:
            in_flight = asyncio.ensure_future(ds.get("k1"))
            await wait_for(gate.waiting)  # its snapshot (n=1) is taken; it waits on the gate
            await table.set_n("k1", 2)
            await ds.invalidate("k1")
        finally:
            await gate.open()
        # It started before the invalidation, so the old value is a fair answer for it...
        assert (await in_flight)["n"] == 1
        # ...but it was not stored: the next get reads the database again.
        assert (await ds.get("k1"))["n"] == 2
        assert looked_up(cls, ds) == ["k1", "k1"]


async def test_a_get_after_invalidate_does_not_join_an_older_load(table, database_url, counted) -> None:
    pool, cls = counted
    gate = Gate(database_url)
    ds = PostgresDataset(table.name, key="token", lookup_query=_gated_lookup(table.name, gate, "k1"), limit=0)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], pool=pool)):
        await gate.close_gate()
        try:
            old = asyncio.ensure_future(ds.get("k1"))
            await wait_for(gate.waiting)
            await table.set_n("k1", 2)
            await ds.invalidate("k1")
            new = asyncio.ensure_future(ds.get("k1"))
            await wait_for(_two_waiters(gate))
        finally:
            await gate.open()
        assert ((await old)["n"], (await new)["n"]) == (1, 2)
        assert (await ds.get("k1"))["n"] == 2
        assert looked_up(cls, ds) == ["k1", "k1"]


def _two_waiters(gate: Gate):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return await _gate_waiters(gate) >= 2

    return check


async def test_a_warm_read_before_invalidate_is_not_stored_after_it(table, database_url) -> None:
    gate = Gate(database_url)
    await gate.close_gate()
    ds = table.gated_dataset(gate)
    try:
        async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds])):
            await wait_for(gate.waiting)  # the warm cursor is open: its snapshot has k1 with n=1
            await table.set_n("k1", 2)
            await ds.invalidate("k1")
            await gate.open()
            await wait_for(lambda: ds.status()["state"] == "warm")
            assert ds.status()["rows"] == 200
            assert (await ds.get("k1"))["n"] == 2
            assert (await ds.get("k3"))["n"] == 3
            assert ds.status()["queries"] == 1
    finally:
        await gate.open()


async def test_an_older_read_does_not_overwrite_a_newer_one(table, database_url) -> None:
    gate = Gate(database_url)
    await gate.close_gate()
    ds = table.gated_dataset(gate)
    try:
        async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds])):
            await wait_for(gate.waiting)  # the warm read k5 as n=5
            await table.set_n("k5", 55)
            assert (await ds.get("k5"))["n"] == 55  # a newer read, stored
            await gate.open()
            await wait_for(lambda: ds.status()["state"] == "warm")
            assert (await ds.get("k5"))["n"] == 55
    finally:
        await gate.open()


# -- the property --------------------------------------------------------------------------

KEYS = ["k1", "k2", "k3"]
OPS = st.lists(
    st.tuples(st.sampled_from(["get", "get", "update", "invalidate", "yield"]), st.sampled_from(KEYS)),
    min_size=1,
    max_size=30,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
async def test_no_get_returns_a_value_older_than_an_invalidate_completed_before_it(table, ops) -> None:
    """Writers update the row, then invalidate: a get that starts after that must see the update."""
    ds = table.dataset(limit=0, ttl=3600, early_refresh=0)
    conn = await asyncpg.connect(table.dsn)
    try:
        async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds])):
            version = {k: await conn.fetchval(f'SELECT n FROM "{table.name}" WHERE token = $1', k) for k in KEYS}
            floor = dict.fromkeys(KEYS, 0)
            gets: list[tuple[str, int, asyncio.Future[dict | None]]] = []
            for op, key in ops:
                if op == "get":
                    gets.append((key, floor[key], asyncio.ensure_future(ds.get(key))))
                elif op == "update":
                    version[key] = await conn.fetchval(
                        f'UPDATE "{table.name}" SET n = n + 1 WHERE token = $1 RETURNING n', key
                    )
                elif op == "invalidate":
                    seen = version[key]
                    await ds.invalidate(key)
                    floor[key] = seen
                else:
                    await asyncio.sleep(0)
            for key, required, fut in gets:
                row = await fut
                assert row is not None and row["n"] >= required, (key, required, row)
            for key in KEYS:
                assert (await ds.get(key))["n"] >= floor[key]
    finally:
        await conn.close()


@pytest.mark.parametrize("negative_ttl", [30, 0])
async def test_a_refresh_that_finds_the_row_gone_stops_serving_it(table, counted, monkeypatch, negative_ttl) -> None:
    clock = Clock(monkeypatch)
    pool, cls = counted
    ds = table.dataset(limit=0, ttl=100, early_refresh=1.0, negative_ttl=negative_ttl)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], pool=pool)):
        assert (await ds.get("k4"))["n"] == 4
        await table.execute(f"DELETE FROM \"{table.name}\" WHERE token = 'k4'")
        await _in_refresh_window(ds, "k4", clock)
        assert (await ds.get("k4"))["n"] == 4  # served while the refresh runs
        await wait_for(lambda: len(looked_up(cls, ds)) == 2 and not ds._loader.loading("k4"))
        assert await ds.get("k4") is None
        assert len(looked_up(cls, ds)) == (2 if negative_ttl else 3)
