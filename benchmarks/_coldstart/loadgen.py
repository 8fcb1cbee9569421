"""An open-loop HTTP/1.1 load generator on raw asyncio protocols, free of coordinated omission.

Arrivals are a Poisson process fixed in advance (``make_plan``); each request's latency runs from its
*scheduled* start to the last byte of its answer, so time spent waiting for a free connection, or
behind a late dispatcher, counts against the server, never silently disappears.

Connections are keep-alive, one request at a time each (no pipelining). A few are opened the moment
the server accepts; whenever requests wait in line and no connection is free or being opened, one
more is opened, up to a cap. Opening hundreds at once would be a burst of its own: the server spends
its first ~40 ms accepting them, and even the oracle's first window shows it.

httpx is far too slow for this (a shared ``AsyncClient`` manages a few hundred requests a second) and
even ``StreamReader`` loops cost a task wake-up and a few futures per request; here a request is a
``transport.write`` and a ``data_received`` callback, and the dispatcher hands it straight to an idle
connection.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import itertools
import json
import math
import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
POLL_INTERVAL = 0.05  # seconds between GET /stats while the load runs
INITIAL_CONNECTIONS = 8  # opened at ready; more on demand, up to the cap

# Status codes for what never got an HTTP answer.
NO_ANSWER = 0  # still unanswered at the deadline
CONNECTION_ERROR = -1  # the connection failed under the request


@dataclass
class Plan:
    """The requests of one run, fixed before it starts: the same for every variant of a repeat."""

    offsets: list[float]  # scheduled start, seconds after ready, ascending
    requests: list[bytes]
    valid: list[bool]
    distinct_keys: int


def make_plan(
    keys: Sequence[str], *, rate: float, duration: float, zipf: float, invalid: float, seed: int | str
) -> Plan:
    """Poisson arrivals at ``rate``/s for ``duration`` s; keys Zipf(``zipf``) by rank (``keys`` most
    active first), an ``invalid`` share of them unknown keys, each unknown key new."""
    rng = random.Random(f"coldstart traffic {seed}")
    offsets: list[float] = []
    t = rng.expovariate(rate)
    while t < duration:
        offsets.append(t)
        t += rng.expovariate(rate)
    weights = list(itertools.accumulate(1.0 / rank**zipf for rank in range(1, len(keys) + 1)))
    drawn = rng.choices(range(len(keys)), cum_weights=weights, k=len(offsets))
    requests, valid, seen = [], [], set()
    for index in drawn:
        if rng.random() < invalid:
            key, ok = f"sk-{rng.getrandbits(128):032x}", False
        else:
            key, ok = keys[index], True
            seen.add(index)
        requests.append(f"GET /v1/models HTTP/1.1\r\nhost: coldstart\r\nauthorization: Bearer {key}\r\n\r\n".encode())
        valid.append(ok)
    return Plan(offsets, requests, valid, len(seen))


@dataclass
class Outcome:
    latency: list[float]  # seconds from scheduled start to answer (to the deadline for NO_ANSWER)
    status: list[int]  # HTTP status, NO_ANSWER or CONNECTION_ERROR
    connections: int = 0  # connections opened over the run (at most the cap open at once)
    connect_failures: int = 0
    preload_done: float | None = None  # seconds after ready when /stats first said the preload is done
    stats: dict[str, Any] | None = None  # the last /stats answer
    polls: list[tuple[float, dict[str, Any]]] = field(default_factory=list)


def parse_answer(buf: bytearray) -> tuple[int, int, bool] | None:
    """(status, bytes taken, keep-alive) of the first complete answer in ``buf``, or None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        raise ValueError("answer without content-length")
    stop = head.find(b"\r\n", at + 2)
    length = int(head[at + 17 : stop if stop >= 0 else len(head)])
    size = end + 4 + length
    if len(buf) < size:
        return None
    return int(head[9:12]), size, b"\r\nconnection: close" not in head


class Client(asyncio.Protocol):
    """One keep-alive connection of a ``Load``; one request in flight at a time."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.current = -1  # index of the request in flight, -1 when idle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, i: int) -> None:
        assert self.transport is not None
        self.current = i
        self.transport.write(self.load.requests[i])

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            answer = parse_answer(self.buf)
        except ValueError:
            self.abort()
            return
        if answer is None:
            return
        status, size, keep = answer
        del self.buf[:size]
        i, self.current = self.current, -1
        self.load.answered(self, i, status, keep)

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.lost(self)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Load:
    """The state of one run: requests waiting for a connection, idle connections, results."""

    def __init__(self, port: int, plan: Plan, t0: float, cap: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.port = port
        self.offsets = plan.offsets
        self.requests = plan.requests
        self.t0 = t0
        self.cap = cap
        n = len(plan.offsets)
        self.out = Outcome([math.nan] * n, [NO_ANSWER] * n)
        self.finished: list[int] = []  # indices in order of completion
        self.all_done = asyncio.Event()
        self.waiting: deque[int] = deque()
        self.idle: list[Client] = []
        self.clients: set[Client] = set()
        self.slots = 0  # connections open or being opened: at most the cap
        self.connecting = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.retry: asyncio.TimerHandle | None = None
        self.closing = False

    # -- requests --

    def dispatch(self, i: int) -> None:
        if self.idle:
            self.idle.pop().send(i)
        else:
            self.waiting.append(i)
            self.grow()

    def answered(self, client: Client, i: int, status: int, keep: bool) -> None:
        self.record(i, status)
        if not keep:
            client.abort()
        elif self.waiting:
            client.send(self.waiting.popleft())
        else:
            self.idle.append(client)

    def record(self, i: int, status: int) -> None:
        out = self.out
        out.latency[i] = self.loop.time() - self.t0 - self.offsets[i]
        out.status[i] = status
        self.finished.append(i)
        if len(self.finished) == len(out.status):
            self.all_done.set()

    # -- connections --

    def grow(self, at_least: int = 0) -> None:
        """Open one more connection per waiting request that none being opened will take, up to the cap."""
        while not self.closing and self.slots < self.cap and (at_least > 0 or len(self.waiting) > self.connecting):
            at_least -= 1
            self.slots += 1
            self.connecting += 1
            task = self.loop.create_task(self.open())
            self.tasks.add(task)  # keep a hard reference: the loop keeps only weak ones
            task.add_done_callback(self.tasks.discard)

    async def open(self) -> None:
        try:
            _, client = await self.loop.create_connection(lambda: Client(self), HOST, self.port)
        except OSError:
            self.connecting -= 1
            self.slots -= 1
            self.out.connect_failures += 1
            if self.retry is None and not self.closing:
                self.retry = self.loop.call_later(0.01, self._retry)
            return
        self.connecting -= 1
        self.out.connections += 1
        self.clients.add(client)
        if self.closing:
            client.abort()
        elif self.waiting:
            client.send(self.waiting.popleft())
        else:
            self.idle.append(client)

    def _retry(self) -> None:
        self.retry = None
        self.grow()

    def lost(self, client: Client) -> None:
        self.clients.discard(client)
        with contextlib.suppress(ValueError):
            self.idle.remove(client)
        if self.closing:
            return
        self.slots -= 1
        if client.current >= 0:
            self.record(client.current, CONNECTION_ERROR)
            client.current = -1
        self.grow()

    async def aclose(self) -> None:
        self.closing = True
        if self.retry is not None:
            self.retry.cancel()
        if self.tasks:
            await _cancel(*self.tasks)
        for client in list(self.clients):
            client.abort()


async def open_when_ready(port: int, alive: Callable[[], bool], timeout: float) -> float:
    """The moment (loop clock) the server first accepts a TCP connection."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while alive() and loop.time() < deadline:
        try:
            transport, _ = await loop.create_connection(asyncio.Protocol, HOST, port)
        except OSError:
            await asyncio.sleep(0.001)
            continue
        ready = loop.time()
        transport.close()
        return ready
    raise TimeoutError("the server did not accept a connection")


async def run(
    port: int,
    plan: Plan,
    *,
    ready_at: float,
    connections: int,
    drain: float,
    progress: Callable[[str], None],
) -> Outcome:
    """Play ``plan`` against the server from ``ready_at`` (loop clock) on up to ``connections`` connections."""
    loop = asyncio.get_running_loop()
    load = Load(port, plan, ready_at, connections)
    out, offsets, t0 = load.out, plan.offsets, ready_at
    n = len(offsets)

    async def dispatch() -> None:
        i = 0
        while i < n:
            now = loop.time() - t0
            while i < n and offsets[i] <= now:
                load.dispatch(i)
                i += 1
            if i < n:
                await asyncio.sleep(offsets[i] - now)

    async def poll() -> None:
        while not load.closing:
            stats = await get_stats(port, timeout=5.0)
            now = loop.time() - t0
            if stats is not None:
                out.stats = stats
                out.polls.append((round(now, 4), {k: v for k, v in stats.items() if k != "warmup"}))
                if out.preload_done is None and stats.get("preload") == "done":
                    # Done at the first answer: done before ready (the oracle), not some time after it.
                    out.preload_done = now if out.polls[:-1] else 0.0
            await asyncio.sleep(POLL_INTERVAL)

    async def tick() -> None:
        seen = 0
        for second in itertools.count(1):
            await asyncio.sleep(t0 + second - loop.time())
            recent = sorted(out.latency[i] for i in load.finished[seen:])
            seen = len(load.finished)
            sent = bisect.bisect_right(offsets, second)
            p = f"p50 {_ms(recent, 0.5)}  p99 {_ms(recent, 0.99)}" if recent else "no answers"
            progress(
                f"{second:4d} s  {seen:6d}/{sent:<6d} answered, {sent - seen:5d} outstanding, "
                f"{out.connections:4d} connections; last second {p}"
            )

    load.grow(at_least=INITIAL_CONNECTIONS)
    tasks = [loop.create_task(dispatch()), loop.create_task(poll()), loop.create_task(tick())]
    waiter = loop.create_task(load.all_done.wait())
    try:
        deadline = t0 + (offsets[-1] if offsets else 0.0) + drain
        await asyncio.wait({waiter}, timeout=max(0.0, deadline - loop.time()))
        end = loop.time() - t0
        for i in range(n):
            if out.status[i] == NO_ANSWER:
                out.latency[i] = end - offsets[i]
    finally:
        await load.aclose()
        await _cancel(waiter, *tasks)
    return out


async def _cancel(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait for them, but never forever: a task that swallows its cancellation
    (see ``get_stats``) must not hang the run."""
    for task in tasks:
        task.cancel()
    _, pending = await asyncio.wait(tasks, timeout=5.0)
    if pending:
        names = ", ".join(t.get_coro().__qualname__ for t in pending)  # type: ignore[union-attr]
        print(f"    warning: {len(pending)} load generator task(s) did not stop: {names}", flush=True)


class _Collect(asyncio.Protocol):
    """Everything one connection receives, until the server closes it."""

    def __init__(self, done: asyncio.Future[bytes]) -> None:
        self.done = done
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(bytes(self.buf))


async def get_stats(port: int, timeout: float = 10.0) -> dict[str, Any] | None:
    """``GET /stats`` on a connection of its own, or None if the server does not answer in time.

    ``asyncio.wait``, not ``wait_for``: Python 3.11's ``wait_for`` swallows a cancellation that arrives
    as the inner call completes, and a poller that cannot be cancelled hangs the whole run.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    connecting = loop.create_task(loop.create_connection(lambda: _Collect(done), HOST, port))
    transport: asyncio.Transport | None = None
    try:
        connected, _ = await asyncio.wait({connecting}, timeout=timeout)
        if not connected:
            return None
        transport, _ = connecting.result()
        transport.write(b"GET /stats HTTP/1.1\r\nhost: coldstart\r\nconnection: close\r\n\r\n")
        answered, _ = await asyncio.wait({done}, timeout=timeout)
        if not answered:
            return None
        _, _, body = done.result().partition(b"\r\n\r\n")
        stats: dict[str, Any] = json.loads(body)
        return stats
    except (OSError, ValueError):
        return None
    finally:
        connecting.cancel()
        if transport is not None:
            transport.abort()


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """No collection in the generator while it runs: collect before the server starts, not after t = 0."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def _ms(sorted_values: Sequence[float], q: float) -> str:
    value = sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] * 1000
    return f"{value:7.1f} ms"
