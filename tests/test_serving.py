"""A real uvicorn on loopback serving the example proxy: lifespan on and auto, a burst, a clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from helpers import wait_for

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.litellm_proxy import create_schema, seed  # noqa: E402


def _with_search_path(dsn: str, schema: str) -> str:
    # asyncpg sends URL parameters it does not know to the server as settings.
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(query=urlencode([*parse_qsl(parts.query), ("search_path", schema)])))


@pytest.fixture
async def proxy_db(database_url) -> AsyncIterator[tuple[str, list[str]]]:
    """A fresh schema with 500 seeded API keys; yields its DSN and the bearer keys, most active first."""
    schema = f"serve_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    dsn = _with_search_path(database_url, schema)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await create_schema(conn)
            keys = await seed(conn, 500)
        finally:
            await conn.close()
        yield dsn, keys
    finally:
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()


class Uvicorn:
    def __init__(self, dsn: str, lifespan: str, app: str = "examples.litellm_proxy:app") -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.dsn, self.lifespan, self.app = dsn, lifespan, app
        self.proc: asyncio.subprocess.Process | None = None
        self.output = ""

    async def __aenter__(self) -> Uvicorn:
        env = {**os.environ, "DATABASE_URL": self.dsn, "ASGI_WARMUP_LIMIT": "200"}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "uvicorn", self.app, "--host", "127.0.0.1", "--port", str(self.port),
            "--lifespan", self.lifespan, "--no-access-log", cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip

        async def listening() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise AssertionError(f"uvicorn exited: {(await self.proc.stdout.read()).decode()}")  # type: ignore[union-attr]
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.close()
            await writer.wait_closed()
            return True

        await wait_for(listening, timeout=60)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(self.proc.communicate(), 30)
        self.output += out.decode()
        return self.proc.returncode  # type: ignore[return-value]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.mark.parametrize("lifespan", ["on", "auto"])
async def test_uvicorn_serves_the_example_proxy_at_once_and_stops_cleanly(proxy_db, lifespan) -> None:
    dsn, keys = proxy_db
    async with Uvicorn(dsn, lifespan) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            # A burst right away: hot keys (warming or warm), cold keys (misses), unknown keys.
            burst = keys[:50] + keys[-50:] + [f"sk-unknown-{i}" for i in range(20)]
            replies = await asyncio.gather(
                *(client.get("/v1/models", headers={"authorization": f"Bearer {k}"}) for k in burst)
            )
            assert [r.status_code for r in replies] == [200] * 100 + [401] * 20
            assert replies[0].json()["caller"]["key_alias"].startswith("key-")
            assert (await client.get("/v1/models")).status_code == 401
            status = (await client.get("/_warmup")).json()
            while not status["ready"]:
                await asyncio.sleep(0.01)
                status = (await client.get("/_warmup")).json()
            assert status["datasets"]["api_keys"]["rows"] == 200
        returncode = await server.stop()
    assert returncode in (0, -signal.SIGTERM), server.output  # uvicorn re-raises the signal it stopped on
    assert "Application startup complete" in server.output
    assert "Application shutdown complete" in server.output
    assert "Traceback" not in server.output and "ERROR" not in server.output, server.output


async def test_lifespan_off_says_why_the_dataset_cannot_be_used(proxy_db) -> None:
    dsn, keys = proxy_db
    async with Uvicorn(dsn, "off") as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            reply = await client.get("/v1/models", headers={"authorization": f"Bearer {keys[0]}"})
            assert reply.status_code == 500
        await server.stop()
    assert "is not started: the lifespan of the app wrapped by WarmupMiddleware never ran" in server.output
    assert "--lifespan off" in server.output


async def test_a_bad_environment_value_stops_uvicorn_with_its_name(proxy_db, monkeypatch) -> None:
    dsn, _ = proxy_db
    monkeypatch.setenv("ASGI_WARMUP_ENABLED", "perhaps")
    server = Uvicorn(dsn, "on")
    with pytest.raises(AssertionError, match="uvicorn exited") as info:
        await server.__aenter__()
    assert "ASGI_WARMUP_ENABLED='perhaps' is not valid" in str(info.value)
    await server.stop()
