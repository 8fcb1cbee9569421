"""The lifespan protocol in every case, asserting the exact messages the server sees."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from asgi_warmup import NotStartedError, WarmupMiddleware
from asgi_warmup._errors import LIFESPAN_NEVER_RAN
from helpers import Gate, LifespanDriver, wait_for

pytestmark = pytest.mark.anyio


def _other_tasks() -> set[asyncio.Task[object]]:
    """Tasks left behind by the code under test (the test runner's own task does not count)."""
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and "TestRunner" not in repr(t)}


async def test_inner_starlette_lifespan_runs_inside_ours(table) -> None:
    ds = table.dataset()
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The app's own startup can already read through the dataset...
        events.append(f"app startup, k1 n={(await ds.get('k1'))['n']}")
        yield
        # ...and so can its shutdown: the middleware closes the pool only after it.
        events.append(f"app shutdown, k2 n={(await ds.get('k2'))['n']}")

    driver = LifespanDriver(WarmupMiddleware(Starlette(lifespan=lifespan), datasets=[ds]))
    assert await driver.startup() == {"type": "lifespan.startup.complete"}
    assert events == ["app startup, k1 n=1"]
    assert await driver.shutdown() == {"type": "lifespan.shutdown.complete"}
    assert driver.types == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert events == ["app startup, k1 n=1", "app shutdown, k2 n=2"]
    assert not _other_tasks()


async def _no_lifespan_app(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"  # a raw ASGI app that raises on lifespan


async def _returns_app(scope: Scope, receive: Receive, send: Send) -> None:
    return  # ignores every scope it does not know


@pytest.mark.parametrize("inner", [_no_lifespan_app, _returns_app], ids=["raises", "returns"])
async def test_inner_app_without_lifespan(table, inner) -> None:
    ds = table.dataset()
    driver = LifespanDriver(WarmupMiddleware(inner, datasets=[ds]))
    assert await driver.startup() == {"type": "lifespan.startup.complete"}
    assert (await ds.get("k3"))["n"] == 3
    assert await driver.shutdown() == {"type": "lifespan.shutdown.complete"}
    assert driver.types == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert not _other_tasks()


async def test_inner_startup_raises_forwards_failed_and_releases(table) -> None:
    ds = table.dataset()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("cannot reach the model provider")
        yield

    driver = LifespanDriver(WarmupMiddleware(Starlette(lifespan=lifespan), datasets=[ds]))
    reply = await driver.startup()
    await driver.finished()
    assert driver.types == ["lifespan.startup.failed"]
    assert "cannot reach the model provider" in reply["message"]
    with pytest.raises(NotStartedError):
        await ds.get("k1")
    assert not _other_tasks()


async def test_inner_startup_failed_message_forwarded_verbatim(table) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no license key"})

    driver = LifespanDriver(WarmupMiddleware(app, datasets=[table.dataset()]))
    assert await driver.startup() == {"type": "lifespan.startup.failed", "message": "no license key"}
    await driver.finished()
    assert driver.types == ["lifespan.startup.failed"]


async def test_inner_shutdown_failure_forwarded(table) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.failed", "message": "flush failed"})

    driver = LifespanDriver(WarmupMiddleware(app, datasets=[table.dataset()]))
    await driver.startup()
    assert await driver.shutdown() == {"type": "lifespan.shutdown.failed", "message": "flush failed"}
    assert driver.types == ["lifespan.startup.complete", "lifespan.shutdown.failed"]


async def test_startup_complete_is_sent_before_the_warmup_finishes(table, database_url) -> None:
    gate = Gate(database_url)
    await gate.close_gate()
    ds = table.gated_dataset(gate)
    driver = LifespanDriver(WarmupMiddleware(Starlette(), datasets=[ds]))
    try:
        assert await driver.startup() == {"type": "lifespan.startup.complete"}
        # The warmup is provably still running: it is blocked in PostgreSQL on the gate.
        await wait_for(gate.waiting)
        assert ds.status()["state"] == "warming"
        # A miss is answered from the database at once, without waiting for the warmup.
        assert (await ds.get("k150"))["n"] == 150
        assert ds.status()["state"] == "warming"
    finally:
        await gate.open()
    await wait_for(lambda: ds.status()["state"] == "warm")
    assert ds.status()["rows"] == 200
    await driver.shutdown()
    assert driver.types == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_shutdown_while_warmup_runs_cancels_cleanly(table, database_url) -> None:
    gate = Gate(database_url)
    await gate.close_gate()
    ds = table.gated_dataset(gate)
    driver = LifespanDriver(WarmupMiddleware(Starlette(), datasets=[ds]))
    try:
        await driver.startup()
        await wait_for(gate.waiting)
        assert await driver.shutdown() == {"type": "lifespan.shutdown.complete"}
        assert driver.types == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert not _other_tasks()
        # The blocked warm query was cancelled on the server too, not left running.
        conn = await asyncpg.connect(database_url)
        try:
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 AND pid <> pg_backend_pid()",
                f"%pg_advisory_xact_lock_shared({gate.key})%",
            )
        finally:
            await conn.close()
        assert waiting == 0
    finally:
        await gate.open()
    with pytest.raises(NotStartedError):
        await ds.get("k1")


async def test_startup_wait_holds_startup_until_warm(table) -> None:
    ds = table.dataset()
    mw = WarmupMiddleware(Starlette(), datasets=[ds], startup_wait=30)
    driver = LifespanDriver(mw)
    seen: list[str] = []
    original = driver._send

    async def send(message):  # record the dataset's state at the moment startup.complete is sent
        seen.append(ds.status()["state"])
        await original(message)

    driver._send = send  # type: ignore[method-assign]
    assert await driver.startup() == {"type": "lifespan.startup.complete"}
    assert seen == ["warm"]
    await driver.shutdown()


async def test_startup_wait_gives_up_after_its_timeout(table, database_url) -> None:
    gate = Gate(database_url)
    await gate.close_gate()
    ds = table.gated_dataset(gate)
    driver = LifespanDriver(WarmupMiddleware(Starlette(), datasets=[ds], startup_wait=0.2))
    try:
        assert await driver.startup() == {"type": "lifespan.startup.complete"}
        assert ds.status()["state"] == "warming"
    finally:
        await gate.open()
    await driver.shutdown()


async def test_dataset_used_before_lifespan_says_why(table) -> None:
    ds = table.dataset()
    WarmupMiddleware(Starlette(), datasets=[ds])
    with pytest.raises(NotStartedError) as info:
        await ds.get("k1")
    assert str(info.value) == LIFESPAN_NEVER_RAN.format(name=table.name)
    assert "--lifespan off" in str(info.value) and "mounted sub-app" in str(info.value)
    for call in (ds.get_many(["k1"]), ds.invalidate("k1")):
        with pytest.raises(NotStartedError):
            await call


async def test_a_second_lifespan_starts_clean(table) -> None:
    ds = table.dataset()
    mw = WarmupMiddleware(Starlette(), datasets=[ds])
    for _ in range(2):
        driver = LifespanDriver(mw)
        await driver.startup()
        await wait_for(lambda: ds.status()["state"] == "warm")
        assert (await ds.get("k1"))["n"] == 1
        await driver.shutdown()
        assert driver.types == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_one_dataset_in_two_running_apps_is_refused(table) -> None:
    ds = table.dataset()
    first = LifespanDriver(WarmupMiddleware(Starlette(), datasets=[ds]))
    second = LifespanDriver(WarmupMiddleware(Starlette(), datasets=[ds]))
    await first.startup()
    reply = await second.startup()
    await second.finished()
    assert reply["type"] == "lifespan.startup.failed"
    assert "already started by another running WarmupMiddleware" in reply["message"]
    # The refused app did not unbind the running one's dataset.
    assert (await ds.get("k1"))["n"] == 1
    await first.shutdown()


async def test_runtime_is_published_in_lifespan_state_and_removed(table) -> None:
    ds = table.dataset()
    mw = WarmupMiddleware(Starlette(), datasets=[ds])
    driver = LifespanDriver(mw)
    await driver.startup()
    assert driver.state["asgi_warmup"].status()["datasets"][table.name]["target"] == 10_000
    await driver.shutdown()
    assert "asgi_warmup" not in driver.state
