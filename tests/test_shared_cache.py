"""A cache outside the process (Redis): values survive it with their types, replicas share it, outages fall through."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest
from aiocache import RedisCache, SimpleMemoryCache
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette

from asgi_warmup import WarmupMiddleware
from asgi_warmup._codec import decode, encode
from conftest import redis_cache
from helpers import wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture
async def redis(redis_url) -> AsyncIterator[RedisCache]:
    cache = redis_cache(redis_url)
    try:
        yield cache
    finally:
        await cache.clear(namespace="test")
        await cache.close()


ROW = {
    "token": "sk-1",
    "created_at": dt.datetime(2026, 12, 4, 19, 50, 1, 123456, tzinfo=dt.timezone.utc),
    "naive": dt.datetime(2026, 1, 2, 3, 4, 5),
    "day": dt.date(2026, 2, 29 - 1),
    "at": dt.time(23, 59, 58, 1),
    "interval": dt.timedelta(days=3, seconds=7, microseconds=9),
    "spend": Decimal("1234.5600"),
    "user_id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "metadata": {"tier": "pro", "limits": {"rpm": 60}, "$dt": "not a tag", "tags": ["a", {"$m": 1}]},
    "raw_json": '{"a": 1}',
    "blob": b"\x00\xffbytes",
    "ip": ipaddress.ip_interface("10.0.0.1/24"),
    "net": ipaddress.ip_network("10.0.0.0/8"),
    "addr": ipaddress.ip_address("::1"),
    "scores": [1.5, None, float("inf")],
    "uuids": [uuid.UUID(int=1), uuid.UUID(int=2)],
    "none": None,
    "flag": True,
    "big": 2**70,
}


def test_codec_round_trips_every_common_column_type() -> None:
    row, expires_at = decode(encode(ROW, 1234.5))
    assert row == ROW and expires_at == 1234.5
    assert type(row["created_at"]) is dt.datetime and row["created_at"].tzinfo is not None
    assert type(row["day"]) is dt.date
    assert decode(encode(None, 9.0)) == (None, 9.0)


def test_codec_refuses_unknown_types_with_a_fix() -> None:
    with pytest.raises(TypeError, match=r"cannot store a value of type object .* cast the column to text"):
        encode({"x": object()}, 1.0)


async def test_values_survive_a_real_redis_round_trip(redis) -> None:
    from asgi_warmup._cache import SharedCache

    shared = SharedCache(redis)
    await shared.set_many("types", [("sk-1", ROW, 4e9), ("absent", None, 4e9)], ttl=60)
    found = await shared.get_many("types", ["sk-1", "absent", "unknown"])
    assert found == {"sk-1": (ROW, 4e9), "absent": (None, 4e9)}


async def test_a_second_replica_reads_what_the_first_warmed_without_a_query(table, redis, counted) -> None:
    pool, cls = counted
    first = table.dataset(limit=50)
    second = table.dataset(limit=0)  # same name: the same keys in the shared cache
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[first], cache=redis)):
        await wait_for(lambda: first.status()["state"] == "warm")
        from_db = await first.get("k10")
        async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[second], pool=pool, cache=redis)):
            from_redis = await second.get("k10")
            # datetime, Decimal, UUID and the jsonb column (a str, as asyncpg returns it) came back equal.
            assert from_redis == from_db
            assert isinstance(from_redis["created_at"], dt.datetime)
            assert isinstance(from_redis["spend"], Decimal)
            assert isinstance(from_redis["user_id"], uuid.UUID)
            assert from_redis["metadata"] == from_db["metadata"]
            assert [a for s, a in cls.fetches if s == second.lookup_sql and a[0]] == []
            # A key nobody warmed goes to the database once, then is shared too.
            assert (await second.get("k150"))["n"] == 150
            assert (await first.get("k150"))["n"] == 150
            assert first.status()["queries"] == 0


async def test_jsonb_decoded_by_a_codec_survives_too(table, redis, database_url) -> None:
    import json

    async def init(conn: asyncpg.Connection) -> None:
        await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")

    pool = await asyncpg.create_pool(database_url, min_size=0, max_size=3, init=init)
    try:
        writer, reader = table.dataset(limit=0), table.dataset(limit=0)
        async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[writer], pool=pool, cache=redis)):
            assert (await writer.get("k3"))["metadata"] == {"tier": "pro", "tags": ["a", "b"]}
        async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[reader], pool=pool, cache=redis)):
            assert (await reader.get("k3"))["metadata"] == {"tier": "pro", "tags": ["a", "b"]}
            assert reader.status()["queries"] == 0
    finally:
        await pool.close()


async def test_absences_are_shared_and_invalidate_clears_them_everywhere(table, redis) -> None:
    first, second, third = table.dataset(limit=0), table.dataset(limit=0), table.dataset(limit=0)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[first], cache=redis)):
        assert await first.get("k999") is None
        async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[second], cache=redis)):
            assert await second.get("k999") is None
            assert second.status()["queries"] == 0
            await table.execute(f"INSERT INTO \"{table.name}\" (token, n, hits) VALUES ('k999', 999, 0)")
            await first.invalidate("k999")
        async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[third], cache=redis)):
            assert (await third.get("k999"))["n"] == 999
            assert third.status()["queries"] == 1


async def test_redis_down_falls_through_to_the_database(table, caplog) -> None:
    dead = RedisCache(endpoint="127.0.0.1", port=1, namespace="test")  # nothing listens on port 1
    ds = table.dataset(limit=20)
    try:
        with caplog.at_level(logging.WARNING, logger="asgi_warmup"):
            async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], cache=dead)):
                await wait_for(lambda: ds.status()["state"] == "warm")
                assert (await ds.get("k1"))["n"] == 1
                assert (await ds.get("k150"))["n"] == 150
        warnings = [r.getMessage() for r in caplog.records if "Cache backend" in r.getMessage()]
        # Logged, but not at request rate.
        assert len(warnings) == 1 and "reading through to the database" in warnings[0]
    finally:
        await dead.close()


async def test_an_aiocache_memory_cache_is_filled_too(table) -> None:
    cache = SimpleMemoryCache()
    ds = table.dataset(limit=5)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], cache=cache)):
        await wait_for(lambda: ds.status()["state"] == "warm")
        stored = await cache.get(f"asgi_warmup:{table.name}:'k1'")
        assert decode(stored)[0]["n"] == 1
