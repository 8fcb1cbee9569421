"""Shared test helpers: drive the lifespan by hand, poll for a condition, gate a warmup in the database."""

from __future__ import annotations

import asyncio
import inspect
import random
import socket
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message


async def wait_for(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    """Poll until ``predicate()`` (sync or async) is true. Fails only if it never happens, not on how long it took."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError("condition never became true")
        await asyncio.sleep(0.005)


class LifespanDriver:
    """Plays the server's side of the lifespan protocol and records what the app sends."""

    def __init__(self, app: ASGIApp, *, state: dict[str, Any] | None = None) -> None:
        self.app = app
        self.sent: list[Message] = []
        self.state: dict[str, Any] = {} if state is None else state
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def _receive(self) -> Message:
        return await self._inbox.get()

    async def _send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def types(self) -> list[str]:
        return [m["type"] for m in self.sent]

    async def startup(self) -> Message:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        self.task = asyncio.get_running_loop().create_task(self.app(scope, self._receive, self._send))
        await self._inbox.put({"type": "lifespan.startup"})
        await wait_for(lambda: self.sent or self.task.done())  # type: ignore[union-attr]
        assert self.sent, f"app returned without answering startup: {self.task.exception()!r}"  # type: ignore[union-attr]
        return self.sent[-1]

    async def shutdown(self) -> Message:
        count = len(self.sent)
        await self._inbox.put({"type": "lifespan.shutdown"})
        await wait_for(lambda: len(self.sent) > count)
        assert self.task is not None
        await asyncio.wait_for(self.task, 20)
        return self.sent[-1]

    async def finished(self) -> None:
        assert self.task is not None
        await asyncio.wait_for(self.task, 20)


class Gate:
    """A warm query that blocks in PostgreSQL until the test opens the gate (a transaction advisory lock).

    The lock is held by a separate connection; the warm query takes the same lock in shared mode,
    so it provably cannot finish before ``open()``, while lookups (which do not take it) run freely.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.key = random.randint(1, 2**31 - 1)
        self._conn: Any = None
        self._tx: Any = None

    def warm_query(self, table: str, order_by: str = "hits DESC") -> str:
        return (
            f'SELECT t.* FROM "{table}" AS t CROSS JOIN (SELECT pg_advisory_xact_lock_shared({self.key})) AS gate '
            f"ORDER BY t.{order_by} LIMIT $1"
        )

    async def close_gate(self) -> None:
        import asyncpg

        self._conn = await asyncpg.connect(self.dsn)
        self._tx = self._conn.transaction()
        await self._tx.start()
        await self._conn.execute("SELECT pg_advisory_xact_lock($1)", self.key)

    async def waiting(self) -> bool:
        """True once a session is blocked on the gate's lock."""
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            blocked = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = $1",
                self.key,
            )
            return bool(blocked)
        finally:
            await conn.close()

    async def open(self) -> None:
        if self._conn is not None:
            await self._tx.commit()
            await self._conn.close()
            self._conn = None


def counting_connection_class() -> type[Any]:
    """An asyncpg connection class that records every ``fetch`` (the lookups), for counting queries."""
    import asyncpg

    class CountingConnection(asyncpg.Connection):  # type: ignore[misc]
        fetches: list[tuple[str, tuple[Any, ...]]] = []

        async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
            type(self).fetches.append((query, args))
            return await super().fetch(query, *args, **kwargs)

    CountingConnection.fetches = []
    return CountingConnection


class TcpProxy:
    """A loopback TCP proxy in front of PostgreSQL that the test can take down and bring back."""

    def __init__(self, dsn: str) -> None:
        from urllib.parse import parse_qs, urlparse

        parsed = urlparse(dsn)
        query = parse_qs(parsed.query)
        self.user = parsed.username or "postgres"
        self.database = (parsed.path or "/").lstrip("/") or self.user
        if parsed.hostname:
            self._upstream: tuple[str, int] | str = (parsed.hostname, parsed.port or 5432)
        else:
            self._upstream = f"{query['host'][0]}/.s.PGSQL.{parsed.port or 5432}"
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def dsn(self) -> str:
        # sslmode=disable: the proxy cuts connections abruptly, which is the point.
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}?sslmode=disable"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Refuse new connections and cut every open one: the database is down."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if isinstance(self._upstream, str):
            up_reader, up_writer = await asyncio.open_unix_connection(self._upstream)
        else:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
