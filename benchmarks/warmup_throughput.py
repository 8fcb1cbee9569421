"""Warmup throughput: rows/s and peak RSS of asgi-warmup's startup warmup against a raw asyncpg read, same run.

Each (rows, variant) pair runs ``--repeat`` times, every run in a fresh subprocess (so peak RSS is its own),
variants taking turns within every repeat, over one table of API-key-like rows (text key, ints, timestamptz,
numeric, uuid, jsonb) in PostgreSQL (``DATABASE_URL``, else an embedded server from ``pgserver``):

- ``baseline``: ``asyncpg.connect``, then in a read-only transaction a server-side cursor over the same warm
  query (``conn.cursor(sql, N)``), ``cursor.fetch(batch)`` until done, ``d[row["token"]] = dict(row)``;
- ``asgi-warmup``: ``PostgresDataset(limit=N)`` in ``WarmupMiddleware`` under ``asgi_lifespan.LifespanManager``,
  timed from lifespan startup until ``status()["state"] == "warm"`` (polled every 1 ms);
- ``asgi-warmup + Redis``: the same with ``cache=aiocache.RedisCache`` (``REDIS_URL``): every batch is also
  written to Redis. Skipped, with the reason, when Redis does not answer; its keys are deleted after each run.

``seconds`` is end to end: the baseline from ``connect``, asgi-warmup from lifespan startup (pool, query checks,
the pool's connections opened, then the warm). ``warm s`` leaves connecting out: the baseline from its
transaction's start, asgi-warmup its own timer (``status()["elapsed"]``). Peak RSS is ``ru_maxrss`` at the end
of the load minus the subprocess's RSS just before it. Medians throughout. The program prints a table and never
fails on a timing; it exits non-zero only when setup fails.

    python benchmarks/warmup_throughput.py                 # 100k and 1M rows, 3 repeats: a few minutes
    python benchmarks/warmup_throughput.py --quick         # a smoke run for CI: 20k rows, once
    python benchmarks/warmup_throughput.py --json benchmarks/results/warmup.json --plot benchmarks/results/warmup.png
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import asyncpg
from _common import (
    SetupError,
    create_api_key_table,
    display_url,
    drop_table,
    dump_json,
    load_average,
    postgres_server,
    pyplot,
    save_figure,
)
from aiocache import RedisCache  # type: ignore[import-untyped]
from asgi_lifespan import LifespanManager
from starlette.types import Receive, Scope, Send

import asgi_warmup
from asgi_warmup import PostgresDataset, WarmupMiddleware
from asgi_warmup._cache import KEY_PREFIX

REDIS_DEFAULT = "redis://127.0.0.1:6379"
BASELINE = "baseline"
WARMUP = "asgi-warmup"
WARMUP_REDIS = "asgi-warmup-redis"
VARIANTS = (BASELINE, WARMUP, WARMUP_REDIS)
LABELS = {
    BASELINE: "baseline: asyncpg cursor + dict",
    WARMUP: "asgi-warmup (in-process)",
    WARMUP_REDIS: "asgi-warmup + Redis L2",
}
TARGET = 0.70  # the target: asgi-warmup warms at >= 70% of the baseline's rows/s
WARM_TIMEOUT = 600.0
CHILD_TIMEOUT = 900.0
POLL = 0.001


@dataclass
class Sample:
    seconds: float  # end to end
    warm_seconds: float  # connecting left out
    cpu_seconds: float  # the process's CPU time over the end-to-end span: robust to a busy machine
    rows: int
    rss_delta_mb: float


@dataclass
class Cell:
    rows: int
    variant: str
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        values: list[float] = [getattr(s, attr) for s in self.samples]
        return statistics.median(values)

    @property
    def rate(self) -> float:
        return self.rows / self.median("seconds")

    @property
    def warm_rate(self) -> float:
        return self.rows / self.median("warm_seconds")


@dataclass
class Setup:
    postgres: str
    table_rows: int
    batch_size: int
    seed_seconds: float = 0.0
    load_average: str = field(default_factory=lambda: load_average())
    redis: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)


# -- the child: one variant, one load, in a fresh process ------------------------------------


def current_rss_mb() -> float:
    """This process's resident set now (Linux /proc), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


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


def dataset(name: str, table: str, rows: int, batch_size: int) -> PostgresDataset:
    return PostgresDataset(
        name, table=table, key="token", order_by="hits DESC", limit=rows, warm_batch_size=batch_size, ttl=3600
    )


async def load_baseline(dsn: str, sql: str, rows: int, batch_size: int) -> tuple[Sample, dict[str, Any]]:
    before = current_rss_mb()
    t0, cpu0 = time.perf_counter(), time.process_time()
    conn = await asyncpg.connect(dsn)
    try:
        t1 = time.perf_counter()
        d: dict[str, dict[str, Any]] = {}
        done = 0
        async with conn.transaction(readonly=True):
            cursor = await conn.cursor(sql, rows)
            while done < rows:
                records = await cursor.fetch(min(batch_size, rows - done))
                if not records:
                    break
                for row in records:
                    d[row["token"]] = dict(row)
                done += len(records)
        t2, cpu = time.perf_counter(), time.process_time() - cpu0
        peak = peak_rss_mb()
    finally:
        await conn.close()
    return Sample(t2 - t0, t2 - t1, cpu, len(d), peak - before), {}


async def load_warmup(
    dsn: str, ds: PostgresDataset, cache: RedisCache | None, rows: int
) -> tuple[Sample, dict[str, Any]]:
    app = WarmupMiddleware(trivial_app, datasets=[ds], dsn=dsn, cache=cache)
    before = current_rss_mb()
    t0, cpu0 = time.perf_counter(), time.process_time()
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        while (status := ds.status())["state"] != "warm":
            if status["state"] in ("failed", "disabled") or time.perf_counter() - t0 > WARM_TIMEOUT:
                raise SetupError(f"dataset {ds.name!r} did not warm: {status}")
            await asyncio.sleep(POLL)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        peak = peak_rss_mb()
        if ds.queries:
            raise SetupError(f"dataset {ds.name!r} sent {ds.queries} lookup queries during a warmup-only run")
    return Sample(seconds, status["elapsed"], cpu, status["rows"], peak - before), dict(status)


class Problems(logging.Handler):
    """asgi-warmup's warnings during a run (a failed Redis write would make the timing a lie)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def child(variant: str, rows: int, table: str, batch_size: int) -> dict[str, Any]:
    dsn = os.environ["DATABASE_URL"]
    problems = Problems()
    logging.getLogger("asgi_warmup").addHandler(problems)
    ds = dataset(f"{table}_{variant.replace('-', '_')}", table, rows, batch_size)
    assert ds.warm_sql is not None
    cache: RedisCache | None = None
    if variant == WARMUP_REDIS:
        cache = redis_cache(os.environ.get("REDIS_URL", REDIS_DEFAULT))
    try:
        gc.collect()
        if variant == BASELINE:
            sample, status = await load_baseline(dsn, ds.warm_sql, rows, batch_size)
        else:
            sample, status = await load_warmup(dsn, ds, cache, rows)
    finally:
        if cache is not None:
            try:
                await forget_redis_keys(cache, ds.name)
            finally:
                await cache.client.aclose()
    if sample.rows != rows:
        raise SetupError(f"{variant} loaded {sample.rows} rows, expected {rows}: is the table big enough?")
    return {"sample": sample.__dict__, "status": status, "problems": problems.messages}


def run_child(variant: str, rows: int, table: str, batch_size: int, dsn: str) -> Sample:
    env = dict(os.environ, DATABASE_URL=dsn)
    for var in ("ASGI_WARMUP_LIMIT", "ASGI_WARMUP_ENABLED"):  # the datasets set their own limit; never disabled
        env.pop(var, None)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--rows", str(rows), "--table", table]
    cmd += ["--batch-size", str(batch_size)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SetupError(f"{variant} at {rows:,} rows did not finish in {CHILD_TIMEOUT:.0f} s") from exc
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SetupError(f"{variant} at {rows:,} rows failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1])
    for message in result["problems"]:
        print(f"warning: {variant} at {rows:,} rows: asgi-warmup logged: {message}", file=sys.stderr)
    return Sample(**result["sample"])


# -- setup: PostgreSQL, a table, Redis -------------------------------------------------------


def redis_cache(url: str) -> RedisCache:
    parsed = urlparse(url)
    db = int((parsed.path or "/0").lstrip("/") or 0)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    return RedisCache(endpoint=host, port=port, db=db, password=parsed.password)


async def redis_unavailable(url: str) -> str | None:
    """None when Redis answers at ``url``, else why not."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        writer.close()
        await writer.wait_closed()
    except (OSError, asyncio.TimeoutError) as exc:
        return f"no Redis reachable at {display_url(url)} ({type(exc).__name__}: {exc}); set REDIS_URL"
    cache = redis_cache(url)
    try:
        await cache.exists(f"{KEY_PREFIX}:warmup-bench-probe")
    except Exception as exc:
        return f"Redis at {display_url(url)} does not answer ({type(exc).__name__}: {exc})"
    finally:
        # aiocache 0.12's close() calls redis-py's deprecated close(): close the client directly.
        await cache.client.aclose()
    return None


async def forget_redis_keys(cache: RedisCache, dataset: str) -> None:
    # aiocache's clear() with no namespace is FLUSHDB: always pass this dataset's own prefix.
    assert dataset and ":" not in dataset
    # No timeout: a million keys take longer than aiocache's default 5 s.
    await cache.clear(namespace=f"{KEY_PREFIX}:{dataset}", timeout=None)


async def forget_all_redis_keys(url: str, table: str) -> None:
    """Belt and braces after the run: a child that crashed may have left its keys."""
    cache = redis_cache(url)
    try:
        await forget_redis_keys(cache, f"{table}_{WARMUP_REDIS.replace('-', '_')}")
    finally:
        await cache.client.aclose()


# -- the run ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[Setup, list[Cell]]:
    redis_url = os.environ.get("REDIS_URL", REDIS_DEFAULT)
    with postgres_server("warmup") as (dsn, pg_description):
        setup = Setup(postgres=pg_description, table_rows=max(args.rows), batch_size=args.batch_size)
        t0 = time.perf_counter()
        table = asyncio.run(create_api_key_table(dsn, setup.table_rows, "warmup_bench"))
        setup.seed_seconds = time.perf_counter() - t0
        variants = list(VARIANTS)
        try:
            why_not = asyncio.run(redis_unavailable(redis_url))
            if why_not is not None:
                setup.skipped[LABELS[WARMUP_REDIS]] = why_not
                variants.remove(WARMUP_REDIS)
            else:
                setup.redis = display_url(redis_url)
            cells = {(n, v): Cell(n, v) for n in args.rows for v in variants}
            for r in range(args.repeat):
                for n in args.rows:
                    # Rotate the order every repeat: each variant runs first, last and in between alike.
                    shift = r % len(variants)
                    for v in [*variants[shift:], *variants[:shift]]:
                        sample = run_child(v, n, table, args.batch_size, dsn)
                        cells[n, v].samples.append(sample)
                        print(
                            f"  repeat {r + 1}/{args.repeat}  {n:>9,} rows  {LABELS[v]:<32} {sample.seconds:7.3f} s"
                            f"  {sample.rss_delta_mb:7.1f} MB",
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            asyncio.run(drop_table(dsn, table))
            if setup.redis is not None:
                asyncio.run(forget_all_redis_keys(redis_url, table))
    return setup, list(cells.values())


# -- output ----------------------------------------------------------------------------------


def report(args: argparse.Namespace, setup: Setup, cells: Sequence[Cell]) -> None:
    print(
        f"asgi-warmup {asgi_warmup.__version__} warmup throughput · {platform.python_implementation()} "
        f"{platform.python_version()} · {platform.system()} {platform.machine()} · {os.cpu_count()} CPUs"
    )
    print(
        f"PostgreSQL: {setup.postgres}; table of {setup.table_rows:,} API-key-like rows (8 columns) "
        f"seeded in {setup.seed_seconds:.1f} s"
    )
    print(f"Redis: {setup.redis or 'not used'}; load average at start {setup.load_average}")
    print(
        f"batches of {setup.batch_size:,} rows; {args.repeat} run(s) per cell, each in a fresh process, variants "
        "interleaved; medians"
    )
    print("seconds: end to end (baseline from connect, asgi-warmup from lifespan startup)")
    print("warm s: connecting left out (baseline from its transaction, asgi-warmup status()['elapsed'])")
    print("CPU s: the process's CPU time over the end-to-end span; a busy machine disturbs it less than seconds")
    print("vs base: rows per second (per CPU second) as a share of the baseline's")
    print("peak RSS: ru_maxrss at the end of the load minus the process's RSS just before it")
    print()
    head = (
        f"{'rows':>9}  {'variant':<32}{'seconds':>9}{'rows/s':>10}{'vs base':>8}{'warm s':>9}{'vs base':>8}"
        f"{'CPU s':>8}{'vs base':>8}{'peak RSS MB':>12}{'vs base':>8}"
    )
    print(head)
    print("-" * len(head))
    by_key = {(c.rows, c.variant): c for c in cells}
    for n in args.rows:
        base = by_key[n, BASELINE]
        for v in VARIANTS:
            c = by_key.get((n, v))
            if c is None:
                continue
            rss, base_rss = c.median("rss_delta_mb"), base.median("rss_delta_mb")
            rss_ratio = f"{rss / base_rss:>7.2f}x" if base_rss > 0 else f"{'-':>8}"
            print(
                f"{n:>9,}  {LABELS[v]:<32}{c.median('seconds'):>9.3f}{c.rate:>10,.0f}{c.rate / base.rate:>8.0%}"
                f"{c.median('warm_seconds'):>9.3f}{c.warm_rate / base.warm_rate:>8.0%}"
                f"{c.median('cpu_seconds'):>8.2f}{base.median('cpu_seconds') / c.median('cpu_seconds'):>8.0%}"
                f"{rss:>12.1f}{rss_ratio}"
            )
    for name, reason in setup.skipped.items():
        print(f"{'':>9}  {name:<32}{'skipped':>9}  {reason}")
    print()
    for n in args.rows:
        base, ours = by_key[n, BASELINE], by_key[n, WARMUP]
        ratio = ours.rate / base.rate
        verdict = "meets" if ratio >= TARGET else "misses"
        print(
            f"{n:,} rows: asgi-warmup (in-process) warms at {ratio:.0%} of the baseline's rows/s end to end "
            f"({ours.warm_rate / base.warm_rate:.0%} on its own timer, "
            f"{base.median('cpu_seconds') / ours.median('cpu_seconds'):.0%} per CPU second): "
            f"{verdict} the >= {TARGET:.0%} target"
        )
    if args.quick:
        print("\n--quick is a smoke run: one small run per cell, the numbers mean little")


def write_json(path: str, args: argparse.Namespace, setup: Setup, cells: Sequence[Cell]) -> None:
    base = {c.rows: c for c in cells if c.variant == BASELINE}
    data = {
        "benchmark": "warmup_throughput",
        "asgi_warmup": asgi_warmup.__version__,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "postgres": setup.postgres,
        "redis": setup.redis,
        "table_rows": setup.table_rows,
        "batch_size": setup.batch_size,
        "repeat": args.repeat,
        "target_ratio": TARGET,
        "results": [
            {
                "rows": c.rows,
                "variant": c.variant,
                "label": LABELS[c.variant],
                "median_seconds": c.median("seconds"),
                "rows_per_second": c.rate,
                "ratio_vs_baseline": c.rate / base[c.rows].rate,
                "median_warm_seconds": c.median("warm_seconds"),
                "median_cpu_seconds": c.median("cpu_seconds"),
                "warm_rows_per_second": c.warm_rate,
                "warm_ratio_vs_baseline": c.warm_rate / base[c.rows].warm_rate,
                "median_rss_delta_mb": c.median("rss_delta_mb"),
                "samples": [s.__dict__ for s in c.samples],
            }
            for c in cells
        ],
        "skipped": setup.skipped,
    }
    dump_json(path, data)


def write_plot(path: str, args: argparse.Namespace, cells: Sequence[Cell]) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    variants = [v for v in VARIANTS if any(c.variant == v for c in cells)]
    by_key = {(c.rows, c.variant): c for c in cells}
    fig, (ax_rate, ax_rss) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(variants)
    xs = range(len(args.rows))
    for i, v in enumerate(variants):
        offsets = [x + (i - (len(variants) - 1) / 2) * width for x in xs]
        ax_rate.bar(offsets, [by_key[n, v].rate for n in args.rows], width, label=LABELS[v])
        ax_rss.bar(offsets, [by_key[n, v].median("rss_delta_mb") for n in args.rows], width, label=LABELS[v])
    for ax, label in ((ax_rate, "rows/s, end to end (median)"), (ax_rss, "peak RSS over start, MB (median)")):
        ax.set_xticks(list(xs), [f"{n:,} rows" for n in args.rows])
        ax.set_ylabel(label)
    ax_rate.set_title("Warmup throughput")
    ax_rss.set_title("Peak memory")
    ax_rate.legend(fontsize="small")
    save_figure(fig, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI: 20k rows, one run per cell")
    parser.add_argument("--rows", help="comma-separated row counts (default 100000,1000000; 20000 with --quick)")
    parser.add_argument("--repeat", "--repeats", dest="repeat", type=int, help="runs per cell (default 3; 1 --quick)")
    parser.add_argument(
        "--batch-size", type=int, default=1000, help="rows per cursor fetch, all variants (default 1000)"
    )
    parser.add_argument("--json", metavar="PATH", help="write the raw samples here")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart here (needs matplotlib)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--table", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    raw = args.rows or ("20000" if args.quick else "100000,1000000")
    try:
        args.rows = [int(part.replace("_", "")) for part in raw.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--rows {raw!r}: use comma-separated whole numbers, e.g. 100000,1000000")
    if not args.rows or min(args.rows) < 1:
        parser.error("--rows must list numbers >= 1")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1 or args.batch_size < 1:
        parser.error("--repeat and --batch-size must be >= 1")
    if args.child and (len(args.rows) != 1 or not args.table):
        parser.error("--child takes one --rows value and --table")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        result = asyncio.run(child(args.child, args.rows[0], args.table, args.batch_size))
        print(json.dumps(result))
        return 0
    try:
        setup, cells = run(args)
    except (SetupError, OSError, asyncpg.PostgresError) as exc:
        print(f"warmup_throughput: setup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print()
    report(args, setup, cells)
    if args.json or args.plot:
        print()
    if args.json:
        write_json(args.json, args, setup, cells)
    if args.plot:
        write_plot(args.plot, args, cells)
    return 0


if __name__ == "__main__":
    sys.exit(main())
