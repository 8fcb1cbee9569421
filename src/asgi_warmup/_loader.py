"""Single-flight, self-batching loads of missing keys (DataLoader-style, without a timer).

Every key being loaded has one future; every caller asking for it waits on that future. New
keys go to a pending set. While fewer than ``max_queries`` queries run, the pending set is
flushed on the next loop tick (or after ``window`` seconds), up to ``max_batch`` keys per query;
when the bound is reached, keys keep collecting and each finishing query takes the next batch
with it. Light load costs one key per query and no added wait; a herd costs a few big queries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any

Fetch = Callable[[list[Hashable]], Awaitable[Mapping[Hashable, Any]]]
# Per-key failure inside an otherwise good batch: fetch maps the key to an exception instance.


def _mark_retrieved(fut: asyncio.Future[Any]) -> None:
    # A refresh nobody waits for may fail: that must not log "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


class Loader:
    def __init__(self, fetch: Fetch, *, max_batch: int, max_queries: int, window: float = 0.0) -> None:
        self._fetch = fetch
        self.max_batch = max_batch
        self.max_queries = max_queries
        self.window = window
        self._futures: dict[Hashable, asyncio.Future[Any]] = {}
        self._pending: dict[Hashable, asyncio.Future[Any]] = {}
        self._running = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def load(self, key: Hashable) -> asyncio.Future[Any]:
        """The future of ``key``'s value, joining a load already pending or running."""
        fut = self._futures.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_mark_retrieved)
            self._futures[key] = fut
            self._pending[key] = fut
            self._schedule()
        return fut

    def loading(self, key: Hashable) -> bool:
        return key in self._futures

    def forget(self, key: Hashable) -> None:
        """Let the next ``load(key)`` start a new query instead of joining one already running.

        A key still pending has not been read yet, so joining it stays correct.
        """
        if key not in self._pending:
            self._futures.pop(key, None)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for fut in self._futures.values():
            fut.cancel()
        self._futures.clear()
        self._pending.clear()

    def _schedule(self) -> None:
        if self._scheduled or self._running >= self.max_queries or not self._pending:
            return
        self._scheduled = True
        loop = asyncio.get_running_loop()
        if self.window > 0:
            loop.call_later(self.window, self._dispatch)
        else:
            loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        while self._pending and self._running < self.max_queries:
            batch: dict[Hashable, asyncio.Future[Any]] = {}
            pending = self._pending
            for key in pending:
                batch[key] = pending[key]
                if len(batch) >= self.max_batch:
                    break
            for key in batch:
                del pending[key]
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            # Keep a hard reference: the loop keeps only weak ones.
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: dict[Hashable, asyncio.Future[Any]]) -> None:
        try:
            try:
                found = await self._fetch(list(batch))
            except asyncio.CancelledError:
                for fut in batch.values():
                    fut.cancel()
                raise
            except Exception as exc:
                for fut in batch.values():
                    if not fut.done():
                        fut.set_exception(exc)
                return
            for key, fut in batch.items():
                if fut.done():
                    continue
                value = found.get(key)
                if isinstance(value, BaseException):
                    fut.set_exception(value)
                else:
                    fut.set_result(value)
        finally:
            for key, fut in batch.items():
                if self._futures.get(key) is fut:
                    del self._futures[key]
            self._running -= 1
            self._schedule()
