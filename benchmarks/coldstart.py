"""Cold start under an open-loop load: the first seconds of a freshly started proxy, per cache design, same run.

Closed-loop clients that all fire at t = 0 measure a synchronized burst, not the cache. Here requests
arrive as a Poisson process at a fixed rate over keep-alive connections, and each request's latency
runs from its *scheduled* start (no coordinated omission). One seeded schema (``examples/litellm_proxy``'s
tables: N API keys, activity Zipf-ranked and unrelated to creation time) serves every variant; each
variant is the example proxy's ``GET /v1/models`` (bearer key -> 200/401) started fresh under uvicorn
(1 worker, an asyncpg pool of 10), and loaded from the moment it first accepts a TCP connection ("ready"):

- ``no-cache``            (a) every request looks its key up;
- ``read-through``        (b) the typical proxy: a dict in front of one-key lookups, no coalescing, no warmup;
- ``preload-recent-100``  (c) the seed pull request: (b) plus a background preload of the 100 newest keys;
- ``preload-active-10k``  (d) a careful hand-written preload: (b) plus the 10k most active keys, in the background;
- ``cashews``             (e) cashews ``@cache(ttl=...)`` on the lookup, in-memory backend;
- ``aiocache-stampede``   (e) aiocache ``@cached_stampede(ttl=..., lease=2)`` on the lookup;
- ``asgi-warmup``         (f) ``examples.litellm_proxy.create_app`` with defaults (pool of 10, 10k rows warmed);
- ``oracle``              (g) every row in a dict before startup completes: the floor. If it is not flat from
                              the first window, the harness is wrong, not the product.

Every statement any variant sends (lookups, preloads, asgi-warmup's own queries) waits one simulated
database round trip (``pg_sleep`` in an InitPlan, once per statement), so the pool, not the CPU, is what
a herd exhausts. DB statements are counted by PostgreSQL itself (``pg_stat_user_functions`` on that
sleep function, one per variant and repeat), or by the apps when ``track_functions`` cannot be set.

Reported per variant: p50/p99/max per window of scheduled start (0-0.5 s, 0.5-1 s, 1-2 s, 2-4 s, 4 s-end),
errors, DB statements; then the targets as ratios, PASS/MISS, printed, never asserted. Raw samples go to
JSON, latency over time to a PNG. With ``--repeat K`` variants take turns in each repeat (rotated order)
and the tables show medians of the K per-repeat values. Exit status is non-zero only when setup fails.

    python benchmarks/coldstart.py                 # 100k keys, 2000 req/s for 8 s, 8 variants: ~1.5 minutes
    python benchmarks/coldstart.py --repeat 3      # the numbers to quote, medians of 3: ~5 minutes
    python benchmarks/coldstart.py --quick         # a smoke run for CI: 5k keys, 300 req/s for 2 s: ~25 s
    python benchmarks/coldstart.py --png docs/coldstart.png

Choices made, and why:

- The load generator is this process (``_coldstart/loadgen.py``, asyncio protocols, no httpx); uvicorn is a
  child process. Arrivals, keys and unknown keys are drawn before the server starts, the same plan for
  every variant of a repeat. Its GC is collected, frozen and off from before the server starts.
- Connections are keep-alive, one request in flight each. Not all ``--connections`` are opened at ready:
  opening 256 at once makes the server spend its first ~40 ms accepting them, and the oracle's first
  window showed exactly that (p99 ~35 ms, then 3 ms). So 8 are opened at ready and one more whenever a
  request waits with no connection free or being opened, up to the cap. A request waits in line for a
  connection, and that wait counts. The cap is also the most requests the server ever holds at once:
  a variant that falls behind makes the rest wait in the client's line, where they ask nothing of the
  database (``--connections 4000`` lets the herd reach the server instead).
- Latency includes everything after the scheduled start: dispatcher lateness (at most ~1 ms, the event
  loop's timer resolution), the wait for a connection, the server. A request still unanswered
  ``--drain`` seconds after the last arrival counts as an error with the time it had waited so far as
  its latency (a lower bound), so a collapsed variant cannot look better by dropping its slowest requests.
- Windows are by scheduled start, relative to ready. "Steady state" is the last window.
- Each run also reports the CPU time uvicorn and the load generator used, as a share of one core, and how
  busy the whole machine was: the herd should exhaust the pool, not the CPU. If uvicorn nears 100%, or
  other work keeps the machine busy, variants fall behind for CPU reasons, and a run that looked fine
  on a quiet machine collapses; the targets section flags it.
- (f) is ``examples.litellm_proxy.create_app(dsn=..., pool_size=10, lookup_query=..., warm_query=...)``,
  nothing else changed: its two queries are the example's own, with the simulated round trip added.
- The simulated round trip is once per statement: asgi-warmup's warm query is one statement whose
  server-side cursor is read in batches; like (d)'s single fetch it pays one round trip, not one per batch.
- cashews' memory backend keeps 1000 entries by default; it is sized to hold every key here, so the
  comparison is about the herd, not about eviction. No peer gets a lock or option beyond the decorator.
- The apps live in ``benchmarks/_coldstart/`` (a package, not ``benchmarks/_*.py``): CI runs every
  ``benchmarks/*.py`` with ``--quick``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
from _common import SetupError, postgres_server

ROOT = Path(__file__).resolve().parent.parent
# examples/ is not installed: import it from the checkout, as uvicorn (started in ROOT) does.
sys.path.insert(0, str(ROOT))

from _coldstart import loadgen  # noqa: E402
from _coldstart.loadgen import CONNECTION_ERROR, NO_ANSWER, Outcome, Plan  # noqa: E402
from examples.litellm_proxy import create_schema, seed  # noqa: E402

import asgi_warmup  # noqa: E402

VARIANTS: dict[str, str] = {
    "no-cache": "(a) no cache",
    "read-through": "(b) read-through dict, no warmup",
    "preload-recent-100": "(c) + preload 100 newest (seed PR)",
    "preload-active-10k": "(d) + preload 10k most active",
    "cashews": "(e) cashews @cache",
    "aiocache-stampede": "(e) aiocache @cached_stampede",
    "asgi-warmup": "(f) asgi-warmup, defaults",
    "oracle": "(g) oracle: all rows before ready",
}
PEERS = ("read-through", "cashews", "aiocache-stampede")
WINDOWS: tuple[tuple[float, float], ...] = ((0.0, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, math.inf))
APP = "benchmarks._coldstart.apps:create_app"
BUCKET = 0.1  # seconds per point of the chart


# -- statistics ------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def window_label(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g} s" if hi != math.inf else f"{lo:g} s-end"


@dataclass
class Window:
    label: str
    n: int
    p50: float  # ms
    p99: float
    max: float


@dataclass
class Run:
    variant: str
    repeat: int
    plan: Plan
    outcome: Outcome
    launch_to_ready: float
    duration: float
    statements: int | None = None  # DB statements, counted by PostgreSQL
    final_stats: dict[str, Any] | None = None
    log: list[str] = field(default_factory=list)
    server_cpu: float | None = None  # uvicorn's CPU time over the load, as a share of one core
    client_cpu: float | None = None  # this process's, likewise
    machine_busy: float | None = None  # the whole machine's CPU over the load, as a share of all its cores

    def latencies(self, lo: float, hi: float) -> list[float]:
        offsets, latency = self.plan.offsets, self.outcome.latency
        return sorted(latency[i] * 1000 for i in range(len(offsets)) if lo <= offsets[i] < hi)

    def windows(self) -> list[Window]:
        out = []
        for lo, hi in WINDOWS:
            if lo >= self.duration:
                break
            values = self.latencies(lo, hi)
            top = values[-1] if values else math.nan
            p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
            out.append(Window(window_label(lo, hi), len(values), p50, p99, top))
        return out

    def p99(self, lo: float, hi: float) -> float:
        return percentile(self.latencies(lo, hi), 0.99)

    def steady(self) -> tuple[float, float]:
        """The last window: steady state."""
        lo, hi = [w for w in WINDOWS if w[0] < self.duration][-1]
        return lo, hi

    def errors(self) -> Counter[str]:
        """What went wrong, by kind: anything but 200 for a valid key and 401 for an unknown one."""
        errors: Counter[str] = Counter()
        for code, valid in zip(self.outcome.status, self.plan.valid, strict=True):
            if code == NO_ANSWER:
                errors["no answer"] += 1
            elif code == CONNECTION_ERROR:
                errors["connection error"] += 1
            elif code == 401 and valid:
                errors["valid key refused"] += 1
            elif code == 200 and not valid:
                errors["unknown key accepted"] += 1
            elif code not in (200, 401):
                errors[str(code)] += 1
        return errors

    def lookups(self) -> int | None:
        stats = self.final_stats or self.outcome.stats
        return None if stats is None else int(stats["lookups"])

    def db_statements(self) -> int | None:
        """Counted by PostgreSQL when possible; else the app's lookups plus its preload statement."""
        if self.statements is not None:
            return self.statements
        lookups = self.lookups()
        if lookups is None:
            return None
        stats = self.final_stats or self.outcome.stats or {}
        return lookups + (1 if stats.get("preload", "none") != "none" else 0)


def median(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else math.nan


# -- PostgreSQL ------------------------------------------------------------------------------


def with_params(dsn: str, **params: str) -> str:
    # asyncpg sends the URL parameters it does not know to the server as settings.
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in params] + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def rtt_function(variant: str, repeat: int) -> str:
    return f"rtt_{variant.replace('-', '_')}_r{repeat}"


@dataclass
class Database:
    dsn: str  # with search_path set to the schema
    schema: str
    keys: list[str]  # bearer keys, most active first
    counts: bool  # whether PostgreSQL counts the round-trip function's calls (track_functions)


@contextlib.asynccontextmanager
async def seeded(dsn: str, args: argparse.Namespace) -> AsyncIterator[tuple[Database, asyncpg.Connection]]:
    """A fresh schema with the example's tables, seeded, and one round-trip function per run; dropped at the end."""
    schema = f"coldstart_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        scoped = with_params(dsn, search_path=schema)
        t0 = time.perf_counter()
        conn = await asyncpg.connect(scoped)
        try:
            await create_schema(conn)
            keys = await seed(conn, args.keys, zipf_s=args.zipf, seed=args.seed)
            for variant in args.variants:
                for repeat in range(1, args.repeat + 1):
                    await conn.execute(
                        f"CREATE FUNCTION {rtt_function(variant, repeat)}(d float8) RETURNS boolean "
                        "LANGUAGE plpgsql VOLATILE AS $$ BEGIN PERFORM pg_sleep(d); RETURN true; END $$"
                    )
        finally:
            await conn.close()
        print(f"Seeded {args.keys:,} API keys in schema {schema} in {time.perf_counter() - t0:.1f} s")
        counts = True
        try:
            probe = await asyncpg.connect(with_params(scoped, track_functions="all"))
            await probe.close()
        except asyncpg.PostgresError as exc:
            counts = False
            print(f"note: cannot set track_functions ({exc}); DB statements are the apps' own counts")
        if counts:
            scoped = with_params(scoped, track_functions="all")
        yield Database(scoped, schema, keys, counts), admin
    finally:
        with contextlib.suppress(Exception):
            await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


async def count_statements(admin: asyncpg.Connection, db: Database, function: str, app_name: str) -> int | None:
    """Calls of the run's round-trip function, once its backends have exited (they report as they exit)."""
    if not db.counts:
        return None
    for _ in range(100):
        alive = await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name)
        if not alive:
            break
        await asyncio.sleep(0.05)
    last: int | None = None
    for _ in range(40):
        calls = await admin.fetchval(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE schemaname = $1 AND funcname = $2",
            db.schema,
            function,
        )
        if calls == last:
            return int(calls)
        last = calls
        await asyncio.sleep(0.1)
    return last


# -- one run: a fresh uvicorn, the load, the counts ------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux), or None where /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine so far (Linux), or None."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(db: Database, variant: str, repeat: int, port: int, args: argparse.Namespace, log: Path) -> Any:
    app_name = f"coldstart-{variant}-r{repeat}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASGI_WARMUP_", "COLDSTART_"))}
    env.update(
        COLDSTART_VARIANT=variant,
        COLDSTART_DSN=with_params(db.dsn, application_name=app_name),
        COLDSTART_RTT=repr(args.rtt_ms / 1000),
        COLDSTART_RTT_FUNCTION=rtt_function(variant, repeat),
        COLDSTART_POOL=str(args.pool),
    )
    env.pop("DATABASE_URL", None)  # the apps get their DSN explicitly
    with open(log, "w") as out:
        return subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", APP, "--factory", "--host", "127.0.0.1", "--port", str(port),
                "--workers", "1", "--lifespan", "on", "--log-level", "warning", "--no-access-log",
                # Keep-alive connections idle between requests must not be closed under the load generator.
                "--timeout-keep-alive", "300", "--timeout-graceful-shutdown", "3",
            ],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            # Its own session: Ctrl-C reaches only this program, which stops uvicorn before the database.
            start_new_session=True,
        )  # fmt: skip


async def stop_server(proc: Any) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        for _ in range(150):
            if proc.poll() is not None:
                return
            await asyncio.sleep(0.1)
        proc.kill()
        proc.wait()


async def run_one(
    db: Database,
    admin: asyncpg.Connection,
    variant: str,
    repeat: int,
    plan: Plan,
    args: argparse.Namespace,
    logdir: str,
) -> Run:
    port = free_port()
    log_path = Path(logdir) / f"{variant}-r{repeat}.log"
    started = time.perf_counter()
    proc = start_server(db, variant, repeat, port, args, log_path)
    try:
        loop = asyncio.get_running_loop()
        launched = loop.time()
        # The generator must not pause for a collection once the server is up: collect now, then no more.
        with loadgen.no_gc():
            try:
                ready_at = await loadgen.open_when_ready(port, lambda: proc.poll() is None, timeout=120)
            except TimeoutError:
                tail = log_path.read_text().splitlines()[-30:]
                raise SetupError(
                    f"{variant}: uvicorn did not start serving (exit code {proc.poll()}):\n  " + "\n  ".join(tail)
                ) from None
            print(f"    ready {ready_at - launched:.2f} s after launch; open-loop load for {args.duration:g} s")
            cpu0 = cpu_seconds(proc.pid), time.process_time(), loop.time()
            machine0 = machine_ticks()
            outcome = await loadgen.run(
                port, plan, ready_at=ready_at, connections=args.connections, drain=args.drain,
                progress=lambda line: print("    " + line, flush=True),
            )  # fmt: skip
            cpu1 = cpu_seconds(proc.pid), time.process_time(), loop.time()
            machine1 = machine_ticks()
        final = await loadgen.get_stats(port)
    finally:
        await stop_server(proc)
    run = Run(variant, repeat, plan, outcome, ready_at - launched, args.duration, final_stats=final)
    wall = cpu1[2] - cpu0[2]
    if cpu0[0] is not None and cpu1[0] is not None:
        run.server_cpu = (cpu1[0] - cpu0[0]) / wall
    run.client_cpu = (cpu1[1] - cpu0[1]) / wall
    if machine0 is not None and machine1 is not None and machine1[1] > machine0[1]:
        run.machine_busy = (machine1[0] - machine0[0]) / (machine1[1] - machine0[1])
    run.statements = await count_statements(
        admin, db, rtt_function(variant, repeat), f"coldstart-{variant}-r{repeat}"
    )
    lines = log_path.read_text().splitlines()
    run.log = lines[-20:]
    errors = sum(run.errors().values())
    lo, hi = run.steady()
    preload = f"; preload done {outcome.preload_done:.2f} s after ready" if outcome.preload_done is not None else ""
    print(
        f"    done in {time.perf_counter() - started:.1f} s: p99 first second {run.p99(0, 1):,.1f} ms, "
        f"{window_label(lo, hi)} {run.p99(lo, hi):,.1f} ms; errors {errors}; DB statements {_int(run.db_statements())}"
        f"; {outcome.connections} connections{preload}; CPU: uvicorn {_pct(run.server_cpu)}, "
        f"load generator {_pct(run.client_cpu)}, machine {_pct(run.machine_busy)} of {os.cpu_count()} cores"
    )
    if lines:
        print(f"    uvicorn said ({len(lines)} lines, last {len(run.log)}):")
        for line in run.log:
            print(f"      {line}")
    return run


async def run_all(args: argparse.Namespace, dsn: str, where: str) -> list[Run]:
    runs: list[Run] = []
    async with seeded(dsn, args) as (db, admin):
        plans = [
            loadgen.make_plan(
                db.keys, rate=args.rate, duration=args.duration, zipf=args.zipf, invalid=args.invalid, seed=r
            )
            for r in range(1, args.repeat + 1)
        ]
        total = len(args.variants) * args.repeat
        done = 0
        with tempfile.TemporaryDirectory(prefix="coldstart-logs-") as logdir:
            for r, plan in enumerate(plans, start=1):
                shift = (r - 1) % len(args.variants)
                order = [*args.variants[shift:], *args.variants[:shift]]
                for variant in order:
                    done += 1
                    print(
                        f"[{done}/{total}] repeat {r}/{args.repeat}: {VARIANTS[variant]} -- {len(plan.offsets):,} "
                        f"requests over {plan.distinct_keys:,} keys",
                        flush=True,
                    )
                    runs.append(await run_one(db, admin, variant, r, plan, args, logdir))
    return runs


# -- report ----------------------------------------------------------------------------------


@dataclass
class Summary:
    variant: str
    windows: list[Window]  # medians over repeats
    first_second_p99: float
    steady_p99: float
    steady_label: str
    errors: dict[str, float]
    statements: float
    lookups: float
    requests: int
    preload_done: float
    launch_to_ready: float
    server_cpu: float
    client_cpu: float
    machine_busy: float


def summarize(runs: Sequence[Run], variants: Sequence[str]) -> dict[str, Summary]:
    out = {}
    for variant in variants:
        mine = [r for r in runs if r.variant == variant]
        per_run = [r.windows() for r in mine]
        windows = [
            Window(
                ws[0].label,
                round(median([w.n for w in ws])),
                median([w.p50 for w in ws]),
                median([w.p99 for w in ws]),
                median([w.max for w in ws]),
            )
            for ws in zip(*per_run, strict=True)
        ]
        lo, hi = mine[0].steady()
        kinds = sorted({k for r in mine for k in r.errors()})
        out[variant] = Summary(
            variant=variant,
            windows=windows,
            first_second_p99=median([r.p99(0, 1) for r in mine]),
            steady_p99=median([r.p99(lo, hi) for r in mine]),
            steady_label=window_label(lo, hi),
            errors={k: median([r.errors()[k] for r in mine]) for k in kinds},
            statements=median([r.db_statements() for r in mine]),
            lookups=median([r.lookups() for r in mine]),
            requests=round(median([len(r.plan.offsets) for r in mine])),
            preload_done=median([r.outcome.preload_done for r in mine]),
            launch_to_ready=median([r.launch_to_ready for r in mine]),
            server_cpu=median([r.server_cpu for r in mine]),
            client_cpu=median([r.client_cpu for r in mine]),
            machine_busy=median([r.machine_busy for r in mine]),
        )
    return out


def print_tables(args: argparse.Namespace, where: str, summaries: dict[str, Summary], runs: Sequence[Run]) -> None:
    print()
    print(
        f"asgi-warmup {asgi_warmup.__version__} cold start · {platform.python_implementation()} "
        f"{platform.python_version()} · {platform.system()} {platform.machine()} · {os.cpu_count()} CPUs · "
        f"uvicorn http={_http_impl()}"
    )
    print(
        f"PostgreSQL: {where}; {args.keys:,} keys, Zipf s={args.zipf:g}, {args.invalid:.0%} unknown keys; "
        f"{args.rate:g} req/s for {args.duration:g} s over {args.connections} connections; "
        f"DB round trip {args.rtt_ms:g} ms; pool {args.pool}; "
        f"{'median of ' + str(args.repeat) + ' repeats' if args.repeat > 1 else '1 repeat'}"
    )
    print("Latency in ms from each request's scheduled start; windows by scheduled start, after ready.")
    for variant, s in summaries.items():
        print()
        preload = f"; preload/warmup done {s.preload_done:.2f} s after ready" if not math.isnan(s.preload_done) else ""
        errors = ", ".join(f"{k}: {v:g}" for k, v in s.errors.items() if v) or "none"
        print(f"{VARIANTS[variant]}  [{variant}]")
        print(
            f"  ready {s.launch_to_ready:.2f} s after launch{preload}; {s.requests:,} requests; errors: {errors}; "
            f"DB statements {_num(s.statements)} (lookups {_num(s.lookups)}); "
            f"CPU: uvicorn {_pct(s.server_cpu)}, load generator {_pct(s.client_cpu)}, "
            f"machine {_pct(s.machine_busy)} of {os.cpu_count()} cores"
        )
        print(f"  {'window':<10}{'n':>7}{'p50':>11}{'p99':>11}{'max':>11}")
        for w in s.windows:
            print(f"  {w.label:<10}{w.n:>7}{w.p50:>11,.1f}{w.p99:>11,.1f}{w.max:>11,.1f}")
    print()
    width = max(len(v) for v in VARIANTS.values()) + 2
    print(
        f"{'variant':<{width}}{'p99 0-1 s':>12}{'p99 last':>12}{'max':>12}{'errors':>9}{'DB stmts':>10}"
        f"{'uvicorn CPU':>13}{'machine CPU':>13}"
    )
    print("-" * (width + 81))
    for variant, s in summaries.items():
        top = max(w.max for w in s.windows)
        print(
            f"{VARIANTS[variant]:<{width}}{s.first_second_p99:>12,.1f}{s.steady_p99:>12,.1f}{top:>12,.1f}"
            f"{sum(s.errors.values()):>9g}{_num(s.statements):>10}{_pct(s.server_cpu):>13}{_pct(s.machine_busy):>13}"
        )


@dataclass
class Target:
    name: str
    value: float
    limit: float
    detail: str

    @property
    def ok(self) -> bool:
        return self.value <= self.limit


def targets(args: argparse.Namespace, summaries: dict[str, Summary]) -> list[Target]:
    out: list[Target] = []
    me = summaries.get("asgi-warmup")
    if me is None:
        return out
    out.append(
        Target(
            "first-second p99 <= 2x its own steady-state p99",
            me.first_second_p99,
            2 * me.steady_p99,
            f"{me.first_second_p99:,.1f} ms vs 2 x {me.steady_p99:,.1f} ms ({me.steady_label})",
        )
    )
    for peer in PEERS:
        if peer in summaries:
            theirs = summaries[peer].first_second_p99
            out.append(
                Target(
                    f"first-second p99 <= 1/10 of {peer}'s",
                    me.first_second_p99,
                    theirs / 10,
                    f"{me.first_second_p99:,.1f} ms vs {theirs:,.1f} ms / 10 "
                    f"(asgi-warmup's is {_fraction(me.first_second_p99, theirs)} theirs)",
                )
            )
    if "oracle" in summaries:
        floor = summaries["oracle"].steady_p99
        out.append(
            Target(
                "last-window p99 <= 3x the oracle's + one DB round trip",
                me.steady_p99,
                3 * floor + args.rtt_ms,
                f"{me.steady_p99:,.1f} ms vs 3 x {floor:,.1f} + {args.rtt_ms:g} ms ({me.steady_label})",
            )
        )
    if "read-through" in summaries:
        theirs = summaries["read-through"].statements
        out.append(
            Target(
                "DB statements <= 1/5 of read-through's",
                me.statements,
                theirs / 5,
                f"{_num(me.statements)} vs {_num(theirs)} / 5 "
                f"(asgi-warmup's is {_fraction(me.statements, theirs)} theirs)",
            )
        )
    return out


def print_targets(args: argparse.Namespace, summaries: dict[str, Summary], found: list[Target]) -> None:
    print()
    basis = f"medians of {args.repeat} repeats" if args.repeat > 1 else "one run"
    print(f"Targets (asgi-warmup, {basis}; printed, never asserted):")
    if not found:
        print("  asgi-warmup was not among the variants run")
    for t in found:
        print(f"  {'PASS' if t.ok else 'MISS'}  {t.name}: {t.detail}")
    if "oracle" in summaries:
        o = summaries["oracle"]
        p99s = [w.p99 for w in o.windows]
        typical = statistics.median(p99s)
        worst = max(o.windows, key=lambda w: w.p99)
        flat = worst.p99 <= 2 * typical
        print(
            f"  {'ok  ' if flat else 'WARN'}  harness check, the oracle is flat in every window, the first included: "
            f"p99 by window {' / '.join(f'{p:,.1f}' for p in p99s)} ms; worst {worst.label} {worst.p99:,.1f} ms "
            f"vs 2 x median {typical:,.1f} ms"
            + ("" if flat else ": distrust every number above (client, connection opening, a busy machine?)")
        )
    busy = [s.machine_busy for s in summaries.values() if not math.isnan(s.machine_busy)]
    if busy:
        cores = os.cpu_count() or 1
        # Ours: uvicorn, the generator and PostgreSQL; what is left of the machine is someone else's.
        ours = max((s.server_cpu + s.client_cpu) / cores for s in summaries.values())
        quiet = max(busy) <= min(0.85, ours + 0.3)
        print(
            f"  {'ok  ' if quiet else 'WARN'}  machine CPU during the load: {min(busy):.0%} to {max(busy):.0%} of "
            f"{cores} cores"
            + ("" if quiet else ": something else was running; these numbers measure CPU contention too")
        )
    if args.quick:
        print("  --quick is a smoke run: too short and too light for these numbers to mean anything")


# -- output files ----------------------------------------------------------------------------


def write_json(path: Path, args: argparse.Namespace, where: str, runs: Sequence[Run], found: list[Target]) -> None:
    settings = {
        k: getattr(args, k)
        for k in ("keys", "zipf", "invalid", "rate", "duration", "connections", "rtt_ms", "pool", "repeat", "drain")
    }
    data = {
        "benchmark": "coldstart",
        "asgi_warmup": asgi_warmup.__version__,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "uvicorn_http": _http_impl(),
        "postgres": where,
        "settings": settings,
        "windows": [window_label(lo, hi) for lo, hi in WINDOWS],
        "targets": [{"target": t.name, "value": t.value, "limit": t.limit, "pass": t.ok} for t in found],
        "runs": [
            {
                "variant": r.variant,
                "label": VARIANTS[r.variant],
                "repeat": r.repeat,
                "launch_to_ready_s": round(r.launch_to_ready, 4),
                "connections_opened": r.outcome.connections,
                "server_cpu_share": r.server_cpu,
                "load_generator_cpu_share": r.client_cpu,
                "machine_cpu_busy_share": r.machine_busy,
                "connect_failures": r.outcome.connect_failures,
                "preload_done_s": r.outcome.preload_done,
                "db_statements": r.db_statements(),
                "db_statements_counted_by": "postgresql" if r.statements is not None else "app",
                "lookups": r.lookups(),
                "errors": dict(r.errors()),
                "windows": [w.__dict__ for w in r.windows()],
                "stats": r.final_stats,
                "stats_polls": r.outcome.polls,
                "uvicorn_log_tail": r.log,
                # One entry per request, in scheduled order; status 0: no answer in time, -1: connection error.
                "scheduled_s": [round(x, 6) for x in r.plan.offsets],
                "latency_ms": [round(x * 1000, 3) for x in r.outcome.latency],
                "status": r.outcome.status,
                "valid_key": r.plan.valid,
            }
            for r in runs
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    print(f"wrote {path}")


def write_png(path: Path, args: argparse.Namespace, summaries: dict[str, Summary], runs: Sequence[Run]) -> None:
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        print(f"no chart written to {path}: matplotlib is not installed (pip install matplotlib)")
        return
    variants = list(summaries)
    buckets = max(1, math.ceil(args.duration / BUCKET))
    fig, axes = plt.subplots(len(variants), 1, figsize=(10, 1.7 * len(variants) + 1), sharex=True, sharey=True)
    axes = list(axes) if len(variants) > 1 else [axes]
    for ax, variant in zip(axes, variants, strict=True):
        per_bucket: list[list[float]] = [[] for _ in range(buckets)]
        for r in runs:
            if r.variant != variant:
                continue
            for off, lat in zip(r.plan.offsets, r.outcome.latency, strict=True):
                per_bucket[min(buckets - 1, int(off / BUCKET))].append(lat * 1000)
        xs = [(b + 0.5) * BUCKET for b in range(buckets)]
        for q, color, name in ((0.5, "tab:blue", "p50"), (0.99, "tab:red", "p99")):
            ys = [percentile(sorted(v), q) if v else math.nan for v in per_bucket]
            ax.plot(xs, ys, color=color, label=name, linewidth=1.4)
        ax.axhline(args.rtt_ms, color="grey", linestyle=":", linewidth=0.8, label="one DB round trip")
        s = summaries[variant]
        if not math.isnan(s.preload_done) and s.preload_done > 0:
            ax.axvline(s.preload_done, color="tab:green", linestyle="--", linewidth=1)
            ax.text(s.preload_done, 0.92, " warm", color="tab:green", transform=ax.get_xaxis_transform(), va="top")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5)
        ax.set_title(
            f"{VARIANTS[variant]}: p99 first second {s.first_second_p99:,.0f} ms, last {s.steady_p99:,.0f} ms, "
            f"{_num(s.statements)} DB statements",
            fontsize=9,
            loc="left",
        )
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[-1].set_xlabel("seconds after the server first accepted (scheduled start, 100 ms buckets)")
    fig.supylabel("latency, ms (log)")
    repeats = f", {args.repeat} repeats pooled" if args.repeat > 1 else ""
    fig.suptitle(
        f"Cold start, open loop: {args.rate:g} req/s, {args.keys:,} keys Zipf {args.zipf:g}, "
        f"DB round trip {args.rtt_ms:g} ms, pool {args.pool}{repeats}",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


# -- helpers ---------------------------------------------------------------------------------


def _http_impl() -> str:
    import importlib.util

    return "httptools" if importlib.util.find_spec("httptools") else "h11"


def _int(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def _fraction(mine: float, theirs: float) -> str:
    if not mine > 0 or math.isnan(theirs):
        return "n/a of"
    ratio = theirs / mine
    return f"1/{ratio:,.1f} of" if ratio >= 1 else f"{1 / ratio:,.1f}x"


def _pct(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.0%}"


def _num(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="variants: " + ", ".join(VARIANTS),
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI: 5k keys, 300 req/s for 2 s")
    parser.add_argument("--keys", type=int, help="API keys to seed (default 100000; 5000 with --quick)")
    parser.add_argument("--rate", type=float, help="requests per second, Poisson (default 2000; 300 with --quick)")
    parser.add_argument("--duration", type=float, help="seconds of load after ready (default 8; 2 with --quick)")
    parser.add_argument("--connections", type=int, help="keep-alive connections (default 256; 32 with --quick)")
    parser.add_argument("--rtt-ms", type=float, default=10.0, help="simulated DB round trip per statement (10)")
    parser.add_argument("--pool", type=int, default=10, help="asyncpg pool size of every variant (default 10)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of key activity (default 1.0)")
    parser.add_argument("--invalid", type=float, default=0.02, help="share of unknown keys (default 0.02)")
    parser.add_argument("--drain", type=float, help="seconds to wait for answers after the last arrival (10; 5)")
    parser.add_argument("--repeat", type=int, default=1, help="run every variant K times, report medians (1)")
    parser.add_argument("--variants", help="comma-separated subset of the variants (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the seeded keys (default 0)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the outputs")
    parser.add_argument("--png", help="write the chart here instead of OUT/coldstart.png")
    parser.add_argument("--json", help="write the raw samples here instead of OUT/coldstart.json")
    args = parser.parse_args(argv)
    quick = args.quick
    for name, full, short in (
        ("keys", 100_000, 5_000),
        ("rate", 2000.0, 300.0),
        ("duration", 8.0, 2.0),
        ("connections", 256, 32),
        ("drain", 10.0, 5.0),
    ):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    args.variants = list(VARIANTS) if not args.variants else [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: pick from {', '.join(VARIANTS)}")
    for name in ("keys", "connections", "repeat", "pool"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    for name in ("rate", "duration"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0")
    if not 0 <= args.invalid < 1:
        parser.error("--invalid must be a share in [0, 1)")
    args.json = Path(args.json) if args.json else Path(args.out) / "coldstart.json"
    args.png = Path(args.png) if args.png else Path(args.out) / "coldstart.png"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress shows up in CI logs too
    try:
        with postgres_server("coldstart") as (dsn, where):
            print(
                f"coldstart: {len(args.variants)} variants x {args.repeat}; {args.keys:,} keys; {args.rate:g} req/s "
                f"for {args.duration:g} s; {args.connections} connections; DB round trip {args.rtt_ms:g} ms; "
                f"pool {args.pool}; PostgreSQL: {where}"
            )
            runs = asyncio.run(run_all(args, dsn, where))
    except (SetupError, OSError, asyncpg.PostgresError) as exc:
        print(f"coldstart: setup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("coldstart: interrupted; stopped what it started", file=sys.stderr)
        return 130
    summaries = summarize(runs, args.variants)
    print_tables(args, where, summaries, runs)
    found = targets(args, summaries)
    print_targets(args, summaries, found)
    print()
    write_json(args.json, args, where, runs, found)
    write_png(args.png, args, summaries, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
