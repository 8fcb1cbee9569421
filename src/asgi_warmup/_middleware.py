"""WarmupMiddleware: the ASGI lifespan protocol, and the optional status route. Nothing else."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._config import read_settings
from ._dataset import PostgresDataset
from ._errors import ConfigError
from ._warmup import PoolSource, Runtime, WarmupStatus

logger = logging.getLogger("asgi_warmup")

STATE_KEY = "asgi_warmup"


class WarmupMiddleware:
    """Warm ``datasets`` from PostgreSQL in the background at startup; serve at once.

    Wrap the outermost app: mounted sub-apps never see the lifespan.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        datasets: Sequence[PostgresDataset],
        dsn: str | None = None,
        pool: PoolSource | None = None,
        cache: Any = None,
        pool_size: int = 10,
        warm_connections: int = 1,
        startup_wait: float | None = None,
        status_path: str | None = None,
        status_503_until_warm: bool = False,
    ) -> None:
        datasets = list(datasets)
        if not datasets or not all(isinstance(ds, PostgresDataset) for ds in datasets):
            raise ConfigError("datasets= must be a non-empty list of PostgresDataset")
        names = [ds.name for ds in datasets]
        if len(set(names)) != len(names):
            raise ConfigError(f"dataset names must be unique, got {names}")
        if dsn is not None and pool is not None:
            raise ConfigError("pass dsn= or pool=, not both: with pool= the middleware opens no connection of its own")
        if not isinstance(warm_connections, int) or warm_connections < 1:
            raise ConfigError(f"warm_connections={warm_connections!r} is not valid: use a whole number >= 1")
        if not isinstance(pool_size, int) or pool_size <= warm_connections:
            raise ConfigError(
                f"pool_size={pool_size!r} is not valid: use a whole number > warm_connections ({warm_connections}), "
                "so that misses always have a connection the warmup does not hold"
            )
        if startup_wait is not None and not startup_wait >= 0:
            raise ConfigError(f"startup_wait={startup_wait!r} is not valid: use seconds >= 0, or None not to wait")
        if status_path is not None and not status_path.startswith("/"):
            raise ConfigError(f"status_path={status_path!r} is not valid: it must start with '/'")
        self.app = app
        self.datasets = datasets
        self.dsn = dsn
        self.pool = pool
        self.cache = cache
        self.pool_size = pool_size
        self.warm_connections = warm_connections
        self.startup_wait = startup_wait
        self.status_path = status_path
        self.status_503_until_warm = status_503_until_warm
        self._runtime: Runtime | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if self.status_path is not None and scope["type"] == "http" and scope["path"] == self.status_path:
            await self._send_status(send)
            return
        await self.app(scope, receive, send)

    def status(self) -> WarmupStatus:
        """Each dataset's warmup state and progress, and whether all are warm."""
        if self._runtime is not None:
            return self._runtime.status()
        return {"ready": False, "datasets": {ds.name: ds.status() for ds in self.datasets}}

    # -- lifespan --------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":  # pragma: no cover - the spec's first message
            raise RuntimeError(f"expected lifespan.startup, got {message['type']!r}")
        try:
            runtime = Runtime(
                self.datasets, read_settings(), dsn=self.dsn, pool=self.pool,
                pool_size=self.pool_size, warm_connections=self.warm_connections, cache=self.cache,
            )
        except ConfigError as exc:
            await _fail_startup(send, exc)
            return
        inner = _InnerLifespan(self.app, scope)
        try:
            try:
                await runtime.open()
            except Exception as exc:
                await _fail_startup(send, exc)
                return
            failure = await inner.startup()
            if failure is not None:
                logger.error("Application startup failed: %s", failure)
                await send({"type": "lifespan.startup.failed", "message": failure})
                return
            try:
                await runtime.ready()
            except Exception as exc:
                await inner.shutdown()
                await _fail_startup(send, exc)
                return
            runtime.start_warmup()
            if self.startup_wait:
                await runtime.wait_warm(self.startup_wait)
            self._runtime = runtime
            state = scope.get("state")
            if state is not None:
                state[STATE_KEY] = runtime
            await send({"type": "lifespan.startup.complete"})

            message = await receive()
            # Stop the warmup first; the app's shutdown may still read through the datasets.
            await runtime.stop_warmup()
            failure = await inner.shutdown()
            await runtime.aclose()
            if failure is not None:
                await send({"type": "lifespan.shutdown.failed", "message": failure})
            else:
                await send({"type": "lifespan.shutdown.complete"})
        finally:
            self._runtime = None
            if scope.get("state") is not None:
                scope["state"].pop(STATE_KEY, None)
            # Idempotent: after a clean shutdown this has nothing left to do.
            await runtime.aclose()
            await inner.aclose()

    # -- status ----------------------------------------------------------------------------

    async def _send_status(self, send: Send) -> None:
        status = self.status()
        code = 503 if self.status_503_until_warm and not status["ready"] else 200
        body = json.dumps(status).encode()
        await send({
            "type": "http.response.start",
            "status": code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        })
        await send({"type": "http.response.body", "body": body})


async def _fail_startup(send: Send, exc: BaseException) -> None:
    message = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
    logger.error("asgi-warmup startup failed: %s", message)
    await send({"type": "lifespan.startup.failed", "message": message})


_DONE: Message = {"type": "asgi_warmup.app_returned"}


class _InnerLifespan:
    """Runs the wrapped app's lifespan as a task we drive, since we answer the server ourselves.

    An app that raises or returns before its first ``receive()`` does not support lifespan
    (raw ASGI apps often ``assert scope["type"] == "http"``): we then run the protocol alone.
    """

    def __init__(self, app: ASGIApp, scope: Scope) -> None:
        self._app = app
        self._scope = scope
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._received = False
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self.supported = True

    async def _receive(self) -> Message:
        self._received = True
        return await self._to_app.get()

    async def _send(self, message: Message) -> None:
        await self._from_app.put(message)

    async def _run(self) -> None:
        try:
            await self._app(self._scope, self._receive, self._send)
        except Exception as exc:
            self._error = exc
        finally:
            self._from_app.put_nowait(_DONE)

    async def startup(self) -> str | None:
        """None when the app started (or has no lifespan); else the failure message."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="asgi-warmup-app-lifespan")
        await self._to_app.put({"type": "lifespan.startup"})
        reply = await self._from_app.get()
        if reply is _DONE:
            if self._error is not None and self._received:
                logger.error("Application startup raised", exc_info=self._error)
                return f"{type(self._error).__name__}: {self._error}"
            self.supported = False
            logger.debug(
                "The wrapped app does not support lifespan (%r): asgi-warmup runs the protocol for it", self._error
            )
            return None
        if reply["type"] == "lifespan.startup.complete":
            return None
        if reply["type"] == "lifespan.startup.failed":
            self.supported = False
            return str(reply.get("message", ""))
        return f"the wrapped app sent {reply['type']!r} during lifespan startup"

    async def shutdown(self) -> str | None:
        if not self.supported or self._task is None or self._task.done():
            return None
        self.supported = False
        await self._to_app.put({"type": "lifespan.shutdown"})
        reply = await self._from_app.get()
        if reply is _DONE:
            if self._error is not None:
                logger.error("Application shutdown raised", exc_info=self._error)
                return f"{type(self._error).__name__}: {self._error}"
            return None
        await self._task
        if reply["type"] == "lifespan.shutdown.failed":
            return str(reply.get("message", ""))
        return None

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
