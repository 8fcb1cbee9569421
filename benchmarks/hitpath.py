"""What a cache hit costs: ``await dataset.get(key)`` against the floor for any async get, same run, same loop.

Rows, each timed as ``for k in keys: await get(k)`` over the same shuffled key list:

- ``dict[k]``: a plain dict lookup, no await (for reference);
- ``async def get(k): return d[k]``: the floor for any awaited get, and the 1.00 of the ratio column;
- aiocache ``SimpleMemoryCache.get`` with its default 5 s per-call timeout, and with ``timeout=None``;
- ``PostgresDataset.get`` on a warm key and on a cached absence (in-process tier, ``cache=None``);
- ``PostgresDataset.get`` on a warm key with Redis configured as the shared tier (still an in-process hit).

The datasets are bound by a real lifespan (``WarmupMiddleware`` under ``asgi_lifespan.LifespanManager``)
over a fresh table in PostgreSQL (``DATABASE_URL``, else an embedded server from ``pgserver``), and
timed only once warm. Variants take turns within every repeat, so drift hits them all alike.
The program prints a table and never fails on a timing; it exits non-zero only when setup fails.

    python benchmarks/hitpath.py                  # about half a minute
    python benchmarks/hitpath.py --quick          # a smoke run for CI, a few seconds
    python benchmarks/hitpath.py --json benchmarks/results/hitpath.json --plot benchmarks/results/hitpath.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import random
import statistics
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import asyncpg
from _common import SetupError, display_url, dump_json, postgres_server, pyplot, save_figure
from aiocache import RedisCache, SimpleMemoryCache  # type: ignore[import-untyped]
from asgi_lifespan import LifespanManager
from starlette.types import Receive, Scope, Send

import asgi_warmup
from asgi_warmup import PostgresDataset, WarmupMiddleware
from asgi_warmup._cache import KEY_PREFIX

REDIS_DEFAULT = "redis://127.0.0.1:6379"
FLOOR = "async def get(k): return d[k]"
WARM_TIMEOUT = 60.0

Row = dict[str, Any]
Get = Callable[[str], Awaitable[object]]
Runner = Callable[[list[str]], Awaitable[None]]


@dataclass
class Variant:
    name: str
    keys: list[str]
    run: Runner  # the timed loop over keys
    get: Get  # one op, awaited: to check the answer before timing
    samples: list[float] = field(default_factory=list)  # ns/op, one per repeat

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)


@dataclass
class Setup:
    postgres: str
    rows: int
    warm_seconds: dict[str, float] = field(default_factory=dict)
    redis: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)


# -- what is timed ---------------------------------------------------------------------------


def awaited(name: str, get: Get, keys: list[str]) -> Variant:
    async def run(keys: list[str]) -> None:
        for k in keys:
            await get(k)

    return Variant(name, keys, run, get)


def plain_lookup(name: str, d: dict[str, Row], keys: list[str]) -> Variant:
    async def run(keys: list[str]) -> None:
        for k in keys:
            _ = d[k]

    return Variant(name, keys, run, async_dict_get(d))


def async_dict_get(d: dict[str, Row]) -> Get:
    async def get(k: str) -> Row:
        return d[k]

    return get


async def empty_loop(keys: list[str]) -> None:
    for _ in keys:
        pass


async def time_once(run: Runner, keys: list[str]) -> float:
    """ns per key for one pass over ``keys``, with the collector off so no pass pays for a collection."""
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        await run(keys)
        elapsed = time.perf_counter_ns() - t0
    finally:
        gc.enable()
    return elapsed / len(keys)


async def measure(variants: Sequence[Variant], repeats: int) -> float:
    """Fill each variant's samples; return the median per-key cost of the bare loop, included in every row."""
    for v in variants:  # one untimed pass each: caches, specialised bytecode, lazily built state
        await v.run(v.keys[: max(1, len(v.keys) // 10)])
    keys = variants[0].keys
    overhead: list[float] = []
    for r in range(repeats):
        # Rotate the order every repeat: each variant runs first, last and in between equally often.
        shift = r % len(variants)
        for v in [*variants[shift:], *variants[:shift]]:
            v.samples.append(await time_once(v.run, v.keys))
        overhead.append(await time_once(empty_loop, keys))
    return statistics.median(overhead)


def cycled(pool: Sequence[str], n: int, rng: random.Random) -> list[str]:
    order = list(pool)
    rng.shuffle(order)
    return [order[i % len(order)] for i in range(n)]


# -- setup: PostgreSQL, a table, Redis, a lifespan -------------------------------------------


@contextlib.asynccontextmanager
async def seeded_table(dsn: str, rows: int) -> AsyncIterator[tuple[str, list[Row]]]:
    """A fresh table of ``rows`` API-key-like rows, ``k1``..``kN``; dropped on the way out."""
    name = f"hitpath_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f"""
            CREATE TABLE "{name}" (
                token text PRIMARY KEY,
                n integer NOT NULL,
                hits integer NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now(),
                spend numeric(12, 4) NOT NULL DEFAULT 1.2500,
                user_id uuid NOT NULL DEFAULT gen_random_uuid(),
                metadata jsonb NOT NULL DEFAULT '{{"tier": "pro", "tags": ["a", "b"]}}'
            );
            INSERT INTO "{name}" (token, n, hits)
                SELECT 'k' || i, i, {rows} - i FROM generate_series(1, {rows}) AS i;
            """
        )
        records = await conn.fetch(f'SELECT * FROM "{name}"')
        yield name, [dict(r) for r in records]
    finally:
        await conn.execute(f'DROP TABLE IF EXISTS "{name}"')
        await conn.close()


async def redis_cache(url: str) -> tuple[RedisCache | None, str]:
    """(cache, "") when Redis answers at ``url``, else (None, why not)."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        writer.close()
        await writer.wait_closed()
    except (OSError, asyncio.TimeoutError) as exc:
        return None, f"no Redis reachable at {display_url(url)} ({type(exc).__name__}: {exc}); set REDIS_URL"
    db = int((parsed.path or "/0").lstrip("/") or 0)
    cache = RedisCache(endpoint=host, port=port, db=db, password=parsed.password)
    try:
        await cache.exists(f"{KEY_PREFIX}:hitpath-probe")
    except Exception as exc:
        await close_redis(cache)
        return None, f"Redis at {display_url(url)} does not answer ({type(exc).__name__}: {exc})"
    return cache, ""


async def close_redis(cache: RedisCache) -> None:
    # aiocache 0.12's close() calls redis-py's deprecated close(); nothing for us to fix.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Call to deprecated close", DeprecationWarning)
        await cache.close()


async def forget_redis_keys(cache: RedisCache, dataset: str) -> None:
    # aiocache's clear() with no namespace is FLUSHDB: always pass this dataset's own prefix.
    namespace = f"{KEY_PREFIX}:{dataset}"
    assert dataset and ":" not in dataset
    await cache.clear(namespace=namespace)


async def trivial_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def dataset(name: str, table: str, rows: int) -> PostgresDataset:
    # TTLs far beyond the run: an entry expiring mid-run would time a database read, not a hit.
    return PostgresDataset(
        name, table=table, key="token", order_by="hits DESC", limit=rows, ttl=3600, negative_ttl=3600
    )


@contextlib.asynccontextmanager
async def warm(ds: PostgresDataset, dsn: str, cache: RedisCache | None, setup: Setup) -> AsyncIterator[None]:
    """``ds`` bound by a real lifespan and fully warm; unbound on the way out."""
    app = WarmupMiddleware(trivial_app, datasets=[ds], dsn=dsn, cache=cache)
    started = time.perf_counter()
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30):
        deadline = started + WARM_TIMEOUT
        while (status := ds.status())["state"] != "warm":
            if status["state"] in ("failed", "disabled") or time.perf_counter() > deadline:
                raise SetupError(f"dataset {ds.name!r} did not warm: {status}")
            await asyncio.sleep(0.005)
        setup.warm_seconds[ds.name] = time.perf_counter() - started
        yield


# -- the run ---------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> tuple[Setup, list[Variant], float]:
    rng = random.Random(20240611)
    with postgres_server("hitpath") as (dsn, pg_description):
        async with seeded_table(dsn, args.rows) as (table, rows), contextlib.AsyncExitStack() as stack:
            setup = Setup(postgres=pg_description, rows=args.rows)
            by_key = {row["token"]: row for row in rows}
            # Fresh str objects, as a request would carry: equal to the stored keys, never identical.
            warm_keys = cycled([f"k{i}" for i in range(1, args.rows + 1)], args.iterations, rng)
            # As many absent keys as present ones: a smaller set would sit in the CPU cache and look cheaper.
            absent_pool = [f"absent{i}" for i in range(1, args.rows + 1)]
            absent_keys = cycled(absent_pool, args.iterations, rng)

            in_memory = dataset(f"{table}_mem", table, args.rows)
            await stack.enter_async_context(warm(in_memory, dsn, None, setup))
            await in_memory.get_many(absent_pool)  # caches the absences

            redis_url = os.environ.get("REDIS_URL", REDIS_DEFAULT)
            redis, why_not = await redis_cache(redis_url)
            with_redis: PostgresDataset | None = None
            if redis is not None:
                setup.redis = display_url(redis_url)
                stack.push_async_callback(close_redis, redis)
                with_redis = dataset(f"{table}_redis", table, args.rows)
                stack.push_async_callback(forget_redis_keys, redis, with_redis.name)
                await stack.enter_async_context(warm(with_redis, dsn, redis, setup))

            mem_default = SimpleMemoryCache()
            mem_no_timeout = SimpleMemoryCache(timeout=None)
            for cache in (mem_default, mem_no_timeout):
                await cache.multi_set(list(by_key.items()))

            variants = [
                plain_lookup("dict[k], no await", by_key, warm_keys),
                awaited(FLOOR, async_dict_get(by_key), warm_keys),
                awaited("aiocache SimpleMemoryCache.get, timeout=5 (default)", mem_default.get, warm_keys),
                awaited("aiocache SimpleMemoryCache.get, timeout=None", mem_no_timeout.get, warm_keys),
                awaited("asgi-warmup get, warm key", in_memory.get, warm_keys),
                awaited("asgi-warmup get, cached absent key", in_memory.get, absent_keys),
            ]
            redis_row = "asgi-warmup get, warm key, Redis L2 configured"
            if with_redis is not None:
                variants.append(awaited(redis_row, with_redis.get, warm_keys))
            else:
                setup.skipped[redis_row] = why_not

            # Every variant must answer what a dict answers, or the table would time a broken path.
            for v in variants:
                answer, expected = await v.get(v.keys[0]), by_key.get(v.keys[0])
                if answer != expected:
                    raise SetupError(f"{v.name!r} answered {answer!r} for {v.keys[0]!r}, expected {expected!r}")

            datasets = [ds for ds in (in_memory, with_redis) if ds is not None]
            queries_before = {ds.name: ds.queries for ds in datasets}
            overhead = await measure(variants, args.repeats)
            for ds in datasets:
                if ds.queries != queries_before[ds.name]:
                    print(
                        f"warning: {ds.name} sent {ds.queries - queries_before[ds.name]} lookup queries while timed: "
                        "some gets were misses, not hits",
                        file=sys.stderr,
                    )
    return setup, variants, overhead


# -- output ----------------------------------------------------------------------------------


def report(args: argparse.Namespace, setup: Setup, variants: Sequence[Variant], overhead: float) -> None:
    floor = next(v for v in variants if v.name == FLOOR).median
    print(
        f"asgi-warmup {asgi_warmup.__version__} hit path · {platform.python_implementation()} "
        f"{platform.python_version()} · {platform.system()} {platform.machine()}"
    )
    warmed = ", ".join(f"{name} {secs:.2f} s" for name, secs in setup.warm_seconds.items())
    print(f"PostgreSQL: {setup.postgres}; {setup.rows:,} rows; bound and warm in: {warmed}")
    print(f"Redis: {setup.redis or 'not used'}")
    print(
        f"{args.iterations:,} gets per pass, {args.repeats} passes per variant, interleaved; GC off while timing; "
        f"bare loop {overhead:.1f} ns/key (included in every row)"
    )
    print()
    width = max(len(v.name) for v in variants) + 2
    print(f"{'variant':<{width}}{'ns/op (median)':>16}{'min':>10}{'vs floor':>10}")
    print("-" * (width + 36))
    for v in variants:
        print(f"{v.name:<{width}}{v.median:>16,.1f}{v.best:>10,.1f}{v.median / floor:>9.2f}x")
    for name, reason in setup.skipped.items():
        print(f"{name:<{width}}{'skipped':>16}  {reason}")
    if args.quick:
        print("\n--quick is a smoke run: too few gets per pass for the numbers to mean much")


def write_json(path: str, args: argparse.Namespace, setup: Setup, variants: Sequence[Variant], overhead: float) -> None:
    floor = next(v for v in variants if v.name == FLOOR).median
    data = {
        "benchmark": "hitpath",
        "asgi_warmup": asgi_warmup.__version__,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "iterations": args.iterations,
        "repeats": args.repeats,
        "rows": setup.rows,
        "postgres": setup.postgres,
        "redis": setup.redis,
        "warm_seconds": setup.warm_seconds,
        "loop_overhead_ns": overhead,
        "floor": FLOOR,
        "results": [
            {
                "variant": v.name,
                "median_ns": v.median,
                "min_ns": v.best,
                "ratio_vs_floor": v.median / floor,
                "samples_ns": v.samples,
            }
            for v in variants
        ],
        "skipped": setup.skipped,
    }
    dump_json(path, data)


def write_plot(path: str, variants: Sequence[Variant]) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    names = [v.name for v in reversed(variants)]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.2))
    ax.barh(names, [v.median for v in reversed(variants)], color="tab:blue", label="median")
    ax.scatter([v.best for v in reversed(variants)], names, color="black", marker="|", s=120, label="min", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("ns per get (log scale)")
    ax.set_title("Cache hit cost, same run, same event loop")
    ax.legend(loc="lower right")
    save_figure(fig, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI: few iterations and repeats")
    parser.add_argument("--iterations", type=int, help="gets per timed pass (default 50000; 2000 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed passes per variant (default 15; 3 with --quick)")
    parser.add_argument("--rows", type=int, default=10_000, help="rows in the table, all warmed (default 10000)")
    parser.add_argument("--json", metavar="PATH", help="write the raw samples here")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart here (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.iterations is None:
        args.iterations = 2_000 if args.quick else 50_000
    if args.repeats is None:
        args.repeats = 3 if args.quick else 15
    for name in ("iterations", "repeats", "rows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        setup, variants, overhead = asyncio.run(run(args))
    except (SetupError, OSError, asyncpg.PostgresError) as exc:
        print(f"hitpath: setup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    report(args, setup, variants, overhead)
    if args.json or args.plot:
        print()
    if args.json:
        write_json(args.json, args, setup, variants, overhead)
    if args.plot:
        write_plot(args.plot, variants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
