"""The background warmup: what it loads, in which order, how it is sized, and how it survives the database."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_warmup import ConfigError, LookupFailedError, PostgresDataset, WarmupMiddleware
from asgi_warmup import _warmup as warmup_module
from helpers import Gate, LifespanDriver, TcpProxy, wait_for

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def database_without(table) -> AsyncIterator[None]:
    """While inside, the table is gone from the database: only the cache can answer."""
    await table.execute(f'ALTER TABLE "{table.name}" RENAME TO "{table.name}_away"')
    try:
        yield
    finally:
        await table.execute(f'ALTER TABLE "{table.name}_away" RENAME TO "{table.name}"')


async def cached_keys(ds: PostgresDataset, table, candidates: list[str]) -> list[str]:
    """The candidates answered with the table hidden, i.e. from the cache alone."""
    answered = []
    async with database_without(table):
        for key in candidates:
            try:
                row = await ds.get(key)
            except LookupFailedError:
                continue
            assert row is not None and row["token"] == key
            answered.append(key)
    return answered


@pytest.mark.rows(300)
async def test_warmup_loads_the_hottest_rows_up_to_the_limit(table) -> None:
    ds = table.dataset(order_by="hits DESC", limit=20)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds])):
        await wait_for(lambda: ds.status()["state"] == "warm")
        status = ds.status()
        assert (status["rows"], status["target"], status["queries"]) == (20, 20, 0)
        # hits = 300 - i: k1..k20 are the hottest; nothing else was loaded.
        assert await cached_keys(ds, table, [f"k{i}" for i in range(1, 41)]) == [f"k{i}" for i in range(1, 21)]


async def test_order_by_ascending_warms_the_other_end(table) -> None:
    ds = table.dataset(order_by="hits ASC, token", limit=5)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds])):
        await wait_for(lambda: ds.status()["state"] == "warm")
        expected = [f"k{i}" for i in range(196, 201)]
        assert await cached_keys(ds, table, [f"k{i}" for i in range(190, 201)]) == expected


async def test_warmed_rows_are_served_without_a_query(table) -> None:
    ds = table.dataset(limit=200)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds])):
        await wait_for(lambda: ds.status()["state"] == "warm")
        rows = [await ds.get(f"k{i}") for i in range(1, 201)]
        assert [r["n"] for r in rows] == list(range(1, 201))
        assert ds.status()["queries"] == 0


async def test_limit_comes_from_the_environment(table, monkeypatch) -> None:
    monkeypatch.setenv("ASGI_WARMUP_LIMIT", "7")
    ds = table.dataset()
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds])):
        await wait_for(lambda: ds.status()["state"] == "warm")
        assert (ds.status()["rows"], ds.status()["target"]) == (7, 7)


async def test_default_limit_is_ten_thousand(table) -> None:
    ds = table.dataset()
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds])):
        await wait_for(lambda: ds.status()["state"] == "warm")
        # The table has 200 rows: all are read, against a target of the default 10000.
        assert (ds.status()["rows"], ds.status()["target"]) == (200, 10_000)


async def test_limit_zero_disables_warmup_for_that_dataset(table) -> None:
    ds = table.dataset(limit=0)
    app = WarmupMiddleware(Starlette(), datasets=[ds])
    async with LifespanManager(app):
        assert ds.status()["state"] == "disabled"
        assert app.status()["ready"] is True
        assert (await ds.get("k1"))["n"] == 1
        assert ds.status()["queries"] == 1


@pytest.mark.parametrize("value", ["0", "false", "off", "no", " FALSE "])
async def test_warmup_can_be_turned_off_and_reads_still_work(table, monkeypatch, value) -> None:
    monkeypatch.setenv("ASGI_WARMUP_ENABLED", value)
    ds = table.dataset()
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds])):
        assert ds.status()["state"] == "disabled"
        assert (await ds.get("k9"))["n"] == 9
        assert ds.status()["rows"] == 0


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("ASGI_WARMUP_LIMIT", "lots"),
        ("ASGI_WARMUP_LIMIT", "-1"),
        ("ASGI_WARMUP_LIMIT", "1.5"),
        ("ASGI_WARMUP_ENABLED", "maybe"),
    ],
)
async def test_bad_environment_value_fails_startup_naming_it(table, monkeypatch, var, value) -> None:
    monkeypatch.setenv(var, value)
    app_started = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app_started.append(True)
        yield

    driver = LifespanDriver(WarmupMiddleware(Starlette(lifespan=lifespan), datasets=[table.dataset()]))
    reply = await driver.startup()
    await driver.finished()
    assert reply["type"] == "lifespan.startup.failed"
    assert reply["message"].startswith(f"{var}={value!r} is not valid")
    assert f"Fix or unset {var}" in reply["message"]
    assert app_started == []


async def test_no_database_configured_fails_startup(table, monkeypatch) -> None:
    monkeypatch.delenv("DATABASE_URL")
    driver = LifespanDriver(WarmupMiddleware(Starlette(), datasets=[table.dataset()]))
    reply = await driver.startup()
    await driver.finished()
    assert reply["type"] == "lifespan.startup.failed"
    assert "set the DATABASE_URL environment variable" in reply["message"]


async def test_malformed_database_url_fails_startup_naming_it(table, monkeypatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://root@127.0.0.1/test")
    driver = LifespanDriver(WarmupMiddleware(Starlette(), datasets=[table.dataset()]))
    reply = await driver.startup()
    await driver.finished()
    assert reply["type"] == "lifespan.startup.failed"
    assert reply["message"].startswith("cannot use the database URL (DATABASE_URL)")


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"table": "no_such_table"}, ["the lookup query does not run", "UndefinedTableError"]),
        ({"columns": ["n", "no_such_column"]}, ["UndefinedColumnError", "no_such_column"]),
        ({"order_by": "no_such_column DESC"}, ["the warm query does not run", "UndefinedColumnError"]),
        (
            {"lookup_query": "SELECT n FROM {t} WHERE token = ANY($1)"},
            ["the lookup query returns no column named 'token'"],
        ),
        ({"warm_query": "SELECT * FROM {t} LIMIT 10", "order_by": None}, ["must take exactly one parameter, $1"]),
    ],
    ids=["table", "column", "order_by", "lookup-without-key", "warm-without-limit"],
)
async def test_a_query_that_fails_at_startup_fails_startup_naming_the_dataset(table, options, words) -> None:
    options = {k: v.format(t=f'"{table.name}"') if isinstance(v, str) else v for k, v in options.items()}
    options.setdefault("table", table.name)
    ds = PostgresDataset("api_keys", key="token", **options)
    driver = LifespanDriver(WarmupMiddleware(Starlette(), datasets=[ds]))
    reply = await driver.startup()
    await driver.finished()
    assert reply["type"] == "lifespan.startup.failed"
    assert reply["message"].startswith("dataset 'api_keys': ")
    for word in words:
        assert word in reply["message"]


async def test_database_down_at_startup_serves_then_warms_when_it_returns(
    table, database_url, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(warmup_module, "RETRY_BASE", 0.02)
    proxy = TcpProxy(database_url)  # not started: connections are refused
    ds = table.dataset(limit=50)

    async def hello(request):
        return PlainTextResponse("still serving")

    app = WarmupMiddleware(Starlette(routes=[Route("/", hello)]), datasets=[ds], dsn=proxy.dsn)
    with caplog.at_level(logging.WARNING, logger="asgi_warmup"):
        async with LifespanManager(app) as manager:
            assert "Database unreachable at startup" in caplog.text
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                assert (await client.get("/")).text == "still serving"
            with pytest.raises(LookupFailedError, match=f"dataset '{table.name}': database lookup of 1 key"):
                await ds.get("k1")
            await wait_for(lambda: ds.status()["last_error"] is not None)
            assert ds.status()["state"] == "pending"
            await proxy.start()
            await wait_for(lambda: ds.status()["state"] == "warm")
            assert ds.status()["rows"] == 50
            # The failed read was not cached: the same key now answers.
            assert (await ds.get("k1"))["n"] == 1
        await proxy.stop()


async def test_database_outage_while_serving_fails_reads_cleanly_and_recovers(table, database_url) -> None:
    proxy = TcpProxy(database_url)
    await proxy.start()
    ds = table.dataset(limit=0)
    async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds], dsn=proxy.dsn)):
        assert (await ds.get("k1"))["n"] == 1
        await proxy.stop()
        for _ in range(3):
            with pytest.raises(LookupFailedError):
                await ds.get("k2")
        # What was cached before the outage is still served.
        assert (await ds.get("k1"))["n"] == 1
        await proxy.start()
        assert (await ds.get("k2"))["n"] == 2
    await proxy.stop()


async def test_status_route_reports_progress_and_readiness(table, database_url) -> None:
    gate = Gate(database_url)
    await gate.close_gate()
    ds = table.gated_dataset(gate, limit=100)
    app = WarmupMiddleware(Starlette(), datasets=[ds], status_path="/_warmup", status_503_until_warm=True)
    try:
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                await wait_for(gate.waiting)
                response = await client.get("/_warmup")
                assert response.status_code == 503
                assert response.headers["content-type"] == "application/json"
                body = response.json()
                assert body["ready"] is False
                assert body["datasets"][table.name]["state"] == "warming"
                assert body["datasets"][table.name]["target"] == 100
                await gate.open()
                await wait_for(lambda: ds.status()["state"] == "warm")
                response = await client.get("/_warmup")
                assert response.status_code == 200
                assert response.json()["datasets"][table.name]["rows"] == 100
                # Other paths reach the app.
                assert (await client.get("/elsewhere")).status_code == 404
    finally:
        await gate.open()


async def test_status_route_is_off_by_default_and_200_when_not_gated(table) -> None:
    ds = table.dataset()
    for app, path, code in [
        (WarmupMiddleware(Starlette(), datasets=[ds]), "/_warmup", 404),
        (WarmupMiddleware(Starlette(), datasets=[ds], status_path="/ready"), "/ready", 200),
    ]:
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                assert (await client.get(path)).status_code == code


async def test_lifecycle_is_logged_in_short_lines(table, caplog) -> None:
    ds = table.dataset(limit=30)
    with caplog.at_level(logging.INFO, logger="asgi_warmup"):
        async with LifespanManager(WarmupMiddleware(Starlette(), datasets=[ds])):
            await wait_for(lambda: ds.status()["state"] == "warm")
    messages = [r.getMessage() for r in caplog.records if r.name == "asgi_warmup"]
    assert messages[0] == f"Cache warmup started: {table.name}, 30 rows"
    assert messages[1].startswith(f"Cache warmup complete: {table.name}, 30 rows in ")


@pytest.mark.parametrize(("warm_connections", "warming_at_once"), [(1, 1), (2, 2)])
async def test_warmup_holds_at_most_warm_connections(table, database_url, warm_connections, warming_at_once) -> None:
    gate = Gate(database_url)
    await gate.close_gate()
    first = table.gated_dataset(gate)
    second = PostgresDataset("second", key="token", warm_query=first.warm_sql, lookup_query=first.lookup_sql)
    app = WarmupMiddleware(Starlette(), datasets=[first, second], warm_connections=warm_connections, pool_size=3)
    try:
        async with LifespanManager(app):
            await wait_for(gate.waiting)
            await wait_for(lambda: sum(ds.status()["state"] == "warming" for ds in (first, second)) == warming_at_once)
            states = sorted(ds.status()["state"] for ds in (first, second))
            assert states == (["warming", "warming"] if warming_at_once == 2 else ["pending", "warming"])
            # Misses still have a connection the warmup does not hold.
            assert (await first.get("k42"))["n"] == 42
            await gate.open()
            await wait_for(lambda: app.status()["ready"])
    finally:
        await gate.open()


def test_pool_must_leave_room_for_misses() -> None:
    ds = PostgresDataset("users", table="users", key="id")
    with pytest.raises(ConfigError, match=r"pool_size=2 is not valid: use a whole number > warm_connections \(2\)"):
        WarmupMiddleware(Starlette(), datasets=[ds], pool_size=2, warm_connections=2)
