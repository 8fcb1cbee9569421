"""Single-flight, self-batching loads of missing keys (DataLoader-style, paced by the database).

Every key being loaded has one future; every caller asking for it waits on that future. New
keys go to a pending set, which is sent as one query (up to ``max_batch`` keys) on the next loop
tick — but no sooner than half a typical lookup time after the previous query, and never with
``max_queries`` already running. So about two lookups are in flight at a time, staggered: a miss
waits at most half a lookup for its query, and everything that misses meanwhile rides along.
Light load costs one key per query and no added wait; a herd costs a few big queries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any

# Aim for about this many lookups in flight: a new one may start every typical_lookup / PACE.
PACE = 2
# However slow the database gets, a miss never waits longer than this for its query to start.
MAX_SPACING = 0.02

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
        self._typical: float | None = None  # moving average of lookup durations, seconds
        self._last_dispatch = float("-inf")
        self._timer: asyncio.Handle | None = None

    def observe(self, seconds: float) -> None:
        """Learn how long a lookup takes (from the pool warm-up at startup, then from every lookup)."""
        self._typical = seconds if self._typical is None else 0.8 * self._typical + 0.2 * seconds

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
        if self._timer is not None:
            self._timer.cancel()
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
        delay = self.window
        if self._typical is not None and len(self._pending) < self.max_batch:
            spacing = min(self._typical / PACE, MAX_SPACING)
            delay = max(delay, self._last_dispatch + spacing - loop.time())
        if delay > 0:
            self._timer = loop.call_later(delay, self._dispatch)
        else:
            self._timer = loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        pending = self._pending
        if pending and self._running < self.max_queries:
            batch: dict[Hashable, asyncio.Future[Any]] = {}
            for key in pending:
                batch[key] = pending[key]
                if len(batch) >= self.max_batch:
                    break
            for key in batch:
                del pending[key]
            self._running += 1
            loop = asyncio.get_running_loop()
            self._last_dispatch = loop.time()
            task = loop.create_task(self._run(batch))
            # Keep a hard reference: the loop keeps only weak ones.
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._schedule()

    async def _run(self, batch: dict[Hashable, asyncio.Future[Any]]) -> None:
        try:
            try:
                started = asyncio.get_running_loop().time()
                found = await self._fetch(list(batch))
                self.observe(asyncio.get_running_loop().time() - started)
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
