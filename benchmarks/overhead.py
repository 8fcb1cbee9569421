"""What the middleware costs per request: requests/s through a real uvicorn, with and without it, same run.

Each variant is a real ``uvicorn`` subprocess (1 worker, ``--no-access-log --log-level warning``, loopback, a free
port) serving the same Starlette app, whose route ``/k/{token}`` answers a tiny JSON body from a cache hit:

- ``A``: the baseline: the route looks the token up in a plain dict filled from PostgreSQL at startup
  (a Starlette lifespan);
- ``B``: the same app wrapped in ``WarmupMiddleware``, the route calling ``await ds.get(token)`` on warm keys;
- ``C``: ``B`` with ``status_path="/_warmup"`` set, so every request also pays the status-path check;
- ``A'``: ``A`` again, measured like the others: the gap between two identical servers is the noise floor.

The table of API-key-like rows lives in PostgreSQL (``DATABASE_URL``, else an embedded server from ``pgserver``);
every request asks for a warm key, cycling over a fixed sample of them. The load comes from ``wrk`` when it is on
the PATH (``apt-get install wrk``), else from a closed-loop ``httpx`` client with keep-alive connections in a
separate process. Every round starts a fresh server per variant (so no process's luck sticks to one variant) and
loads each for a warm-up; then the variants take turns in short slices (so a burst of background load hits them
alike), and the table reports medians over all slices, with the server's CPU time per request beside requests/s.
``--pin`` puts the server on CPU 1 and the load generator on CPU 0 (Linux): steadier on an idle machine, worse on a
shared one, where the scheduler had better move them. The program prints a table and never fails on a timing; it
exits non-zero only when setup fails.

    python benchmarks/overhead.py                  # 3 rounds of 5 s per variant: about two minutes
    python benchmarks/overhead.py --quick          # a smoke run for CI: 1 round of 1 s, no noise control
    python benchmarks/overhead.py --repeat 10      # when a few percent matter: the rounds scatter by several
    python benchmarks/overhead.py --json benchmarks/results/overhead.json --plot benchmarks/results/overhead.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import asyncpg
from _common import (
    SetupError,
    create_api_key_table,
    drop_table,
    dump_json,
    load_average,
    postgres_server,
    pyplot,
    save_figure,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

import asgi_warmup
from asgi_warmup import PostgresDataset, WarmupMiddleware

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.splitext(os.path.basename(__file__))[0]
ENV_TABLE = "OVERHEAD_BENCH_TABLE"
ENV_ROWS = "OVERHEAD_BENCH_ROWS"
STATUS_PATH = "/_warmup"
READY_PATH = "/_ready"
TARGET = 3.0  # the target: the middleware costs at most 3% of the baseline's requests/s
START_TIMEOUT = 60.0
KEY_SAMPLE = 1000
SERVER_CPU, LOAD_CPU = 1, 0  # with --pin

Row = dict[str, Any]
Lookup = Callable[[Hashable], Awaitable[Row | None]]


# -- the apps uvicorn serves (imported by the server processes as ``overhead:app_a`` etc.) -----


def _server_env() -> tuple[str, str, int]:
    try:
        return os.environ["DATABASE_URL"], os.environ[ENV_TABLE], int(os.environ[ENV_ROWS])
    except KeyError as exc:
        raise RuntimeError(f"{exc.args[0]} is not set: these apps are started by benchmarks/overhead.py") from exc


def _dataset(table: str, rows: int) -> PostgresDataset:
    # TTLs far beyond the run: an entry expiring mid-run would time a database read, not a hit.
    return PostgresDataset(
        "overhead", table=table, key="token", order_by="hits DESC", limit=rows, ttl=3600, negative_ttl=3600
    )


def _starlette(lookup: Lookup, probe: Callable[[], dict[str, Any]], lifespan: Any = None) -> Starlette:
    """The one app every variant serves; only ``lookup`` differs (and what ``/_ready`` reports)."""

    async def key(request: Request) -> Response:
        row = await lookup(request.path_params["token"])
        if row is None:
            return JSONResponse({"error": "unknown key"}, status_code=404)
        return JSONResponse({"user_id": str(row["user_id"]), "rpm_limit": row["rpm_limit"]})

    async def ready(request: Request) -> Response:
        return JSONResponse(probe())

    # /k first: the measured route matches on the first try in every variant.
    return Starlette(routes=[Route("/k/{token}", key), Route(READY_PATH, ready)], lifespan=lifespan)


def app_a() -> ASGIApp:
    """Baseline: a plain dict, filled from the same warm query in a Starlette lifespan."""
    dsn, table, rows = _server_env()
    sql = _dataset(table, rows).warm_sql
    assert sql is not None
    cache: dict[Hashable, Row] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        conn = await asyncpg.connect(dsn)
        try:
            for record in await conn.fetch(sql, rows):
                cache[record["token"]] = dict(record)
        finally:
            await conn.close()
        yield

    async def lookup(token: Hashable) -> Row | None:
        return cache.get(token)

    return _starlette(lookup, lambda: {"ready": len(cache) == rows, "queries": 0}, lifespan)


def app_b(status_path: str | None = None) -> ASGIApp:
    """The same app in ``WarmupMiddleware``; the route reads ``await ds.get(token)``."""
    dsn, table, rows = _server_env()
    ds = _dataset(table, rows)
    inner = _starlette(ds.get, lambda: {"ready": ds.status()["state"] == "warm", "queries": ds.queries})
    return WarmupMiddleware(inner, datasets=[ds], dsn=dsn, status_path=status_path)


def app_c() -> ASGIApp:
    """``B`` with the status route on, so every request pays its path check."""
    return app_b(status_path=STATUS_PATH)


@dataclass
class Variant:
    key: str
    factory: str
    label: str
    rps: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # server CPU time per request
    busy: list[float] = field(default_factory=list)  # server CPU time / wall time while loaded
    errors: int = 0
    misses: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.rps)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu_us) if self.cpu_us else float("nan")


CONTROL = "A'"


def variants(control: bool) -> list[Variant]:
    vs = [
        Variant("A", "app_a", "A  baseline: dict filled at startup"),
        Variant("B", "app_b", "B  WarmupMiddleware + await ds.get()"),
        Variant("C", "app_c", f'C  B + status_path="{STATUS_PATH}"'),
    ]
    if control:
        # A again, measured like the others: how far apart two identical servers land is the noise floor.
        vs.append(Variant(CONTROL, "app_a", "A' baseline again (noise control)"))
    return vs


# -- servers ---------------------------------------------------------------------------------


@dataclass
class Server:
    variant: Variant
    port: int
    proc: subprocess.Popen[bytes]
    log: IO[bytes]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def probe(self) -> dict[str, Any]:
        status, body = self.get(READY_PATH)
        if status != 200:
            raise SetupError(f"{self.variant.key}: GET {READY_PATH} answered {status}: {body[:200]!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    def log_tail(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return "\n".join(self.log.read().decode(errors="replace").strip().splitlines()[-15:])


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time (Linux /proc), NaN elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(variant: Variant, env: dict[str, str], pin: bool) -> Server:
    port = free_port()
    cmd = [
        sys.executable, "-m", "uvicorn", f"{MODULE}:{variant.factory}", "--factory", "--app-dir", HERE,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--lifespan", "on",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if pin:
        os.sched_setaffinity(proc.pid, {SERVER_CPU})
    server = Server(variant, port, proc, log)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise SetupError(f"server {variant.key} exited with {proc.returncode}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            stop_server(server)
            raise SetupError(f"server {variant.key} was not ready in {START_TIMEOUT:.0f} s:\n{server.log_tail()}")
        with contextlib.suppress(OSError):
            if server.probe()["ready"]:
                return server
        time.sleep(0.05)


def stop_server(server: Server) -> None:
    if server.log.closed:
        return
    if server.proc.poll() is None:
        server.proc.terminate()  # SIGTERM: uvicorn shuts down gracefully, lifespan included
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    server.log.close()


# -- load generators -------------------------------------------------------------------------


@dataclass
class Load:
    rps: float
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def run_pinned(cmd: list[str], pin: bool, timeout: float) -> subprocess.CompletedProcess[str]:
    """``subprocess.run``, on the load generator's CPU when ``pin``."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        if pin:
            with contextlib.suppress(OSError):  # it may already have exited
                os.sched_setaffinity(proc.pid, {LOAD_CPU})
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def wrk_load(base: str, script: str, seconds: float, connections: int, pin: bool) -> Load:
    duration = f"{max(1, round(seconds))}s"  # wrk takes whole seconds
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}", "--latency", "-s", script, base]
    proc = run_pinned(cmd, pin, seconds + 60)
    out = proc.stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if proc.returncode != 0 or match is None:
        raise SetupError(f"wrk failed (exit {proc.returncode}): {proc.stderr.strip() or out.strip()}")
    errors = sum(int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|connect|read|write|timeout):? (\d+)", out))

    def percentile(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)
        return float(m[1]) * _WRK_UNITS[m[2]] if m else float("nan")

    done = re.search(r"(\d+) requests in", out)
    return Load(float(match[1]), int(done[1]) if done else 0, errors, percentile("50"), percentile("99"))


def wrk_script(paths: Sequence[str], directory: str) -> str:
    path = os.path.join(directory, "paths.lua")
    with open(path, "w") as f:
        f.write("local paths = {\n")
        f.writelines(f"  {json.dumps(p)},\n" for p in paths)
        f.write("}\nlocal i = 0\nrequest = function()\n  i = i % #paths + 1\n")
        f.write('  return wrk.format("GET", paths[i])\nend\n')
    return path


def httpx_load(base: str, paths_file: str, seconds: float, connections: int, pin: bool) -> Load:
    cmd = [sys.executable, os.path.abspath(__file__), "--client", base, "--paths-file", paths_file]
    cmd += ["--seconds", str(seconds), "--connections", str(connections)]
    proc = run_pinned(cmd, pin, seconds + 60)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SetupError(f"the httpx load client failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return Load(**json.loads(lines[-1]))


async def client(base: str, paths: Sequence[str], seconds: float, connections: int) -> Load:
    """Closed loop: ``connections`` workers, each sending its next request as soon as the last one answers."""
    import httpx

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as http:
        # Open every connection before the clock starts.
        await asyncio.gather(*(http.get(paths[i % len(paths)]) for i in range(connections)))
        started = time.perf_counter()
        stop = started + seconds

        async def worker(i: int) -> None:
            nonlocal errors
            while (t0 := time.perf_counter()) < stop:
                response = await http.get(paths[i % len(paths)])
                latencies.append(time.perf_counter() - t0)
                if response.status_code != 200:
                    errors += 1
                i += connections

        await asyncio.gather(*(worker(i) for i in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    if not latencies:
        return Load(0.0, 0, errors, float("nan"), float("nan"))
    return Load(
        len(latencies) / elapsed,
        len(latencies),
        errors,
        latencies[len(latencies) // 2] * 1e3,
        latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3,
    )


# -- setup: PostgreSQL and a table ------------------------------------------------------------


async def create_table(dsn: str, rows: int) -> tuple[str, list[str]]:
    """A fresh table of ``rows`` API-key-like rows; returns its name and its tokens."""
    name = await create_api_key_table(dsn, rows, "overhead_bench")
    conn = await asyncpg.connect(dsn)
    try:
        tokens = [r["token"] for r in await conn.fetch(f'SELECT token FROM "{name}" ORDER BY token')]
    finally:
        await conn.close()
    return name, tokens


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Setup:
    postgres: str
    rows: int
    generator: str
    uvicorn: str
    load_average: str = field(default_factory=lambda: load_average())


def generator_name(choice: str) -> str:
    if choice == "wrk" or (choice == "auto" and shutil.which("wrk")):
        if not shutil.which("wrk"):
            raise SetupError("--load-generator wrk: wrk is not on the PATH (apt-get install wrk)")
        version = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False).stdout
        return (version.strip().splitlines() or ["wrk"])[0].split(" [")[0].replace("Copyright", "").strip()
    if importlib.util.find_spec("httpx") is None:
        raise SetupError("no wrk on the PATH and httpx is not installed: apt-get install wrk, or pip install httpx")
    return f"httpx {importlib.metadata.version('httpx')} closed-loop client"


def uvicorn_name() -> str:
    if importlib.util.find_spec("uvicorn") is None:
        raise SetupError("uvicorn is not installed: pip install -e '.[examples]'")
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"uvicorn {importlib.metadata.version('uvicorn')} (1 worker, loop {loop}, http {http})"


def run(args: argparse.Namespace) -> tuple[Setup, list[Variant]]:
    rng = random.Random(20240611)
    vs = variants(args.control)
    with postgres_server("overhead") as (dsn, pg_description), tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        setup = Setup(pg_description, args.rows, generator_name(args.load_generator), uvicorn_name())
        table, tokens = asyncio.run(create_table(dsn, args.rows))
        servers: list[Server] = []
        try:
            paths = [f"/k/{t}" for t in rng.sample(tokens, min(KEY_SAMPLE, len(tokens)))]
            paths_file = os.path.join(tmp, "paths.json")
            with open(paths_file, "w") as f:
                json.dump(paths, f)
            use_wrk = setup.generator.startswith("wrk")
            script = wrk_script(paths, tmp) if use_wrk else ""

            def load(server: Server, seconds: float) -> Load:
                if use_wrk:
                    return wrk_load(server.base, script, seconds, args.connections, args.pin)
                return httpx_load(server.base, paths_file, seconds, args.connections, args.pin)

            env = dict(os.environ, DATABASE_URL=dsn, **{ENV_TABLE: table, ENV_ROWS: str(args.rows)})
            for var in ("ASGI_WARMUP_LIMIT", "ASGI_WARMUP_ENABLED"):
                env.pop(var, None)
            slices = max(1, round(args.seconds / args.slice))
            for r in range(args.repeat):
                # Fresh servers every round, so no process's luck (hash seed, memory layout) sticks to a variant;
                # short slices taking turns, so a burst of background load hits every variant alike.
                for v in vs:  # started one at a time: no server warms while another is loaded
                    servers.append(start_server(v, env, args.pin))
                if r == 0:
                    check_answers(servers, paths)
                for s in servers if args.warmup > 0 else []:
                    load(s, args.warmup)
                for j in range(slices):
                    shift = (r + j) % len(servers)
                    for s in [*servers[shift:], *servers[:shift]]:
                        v = s.variant
                        queries = s.probe()["queries"]
                        cpu = cpu_seconds(s.proc.pid)
                        result = load(s, args.slice)
                        cpu = cpu_seconds(s.proc.pid) - cpu
                        v.rps.append(result.rps)
                        if result.requests and not math.isnan(cpu):
                            v.cpu_us.append(cpu / result.requests * 1e6)
                            v.busy.append(cpu * result.rps / result.requests)
                        v.p50_ms.append(result.p50_ms)
                        v.p99_ms.append(result.p99_ms)
                        v.errors += result.errors
                        v.misses += s.probe()["queries"] - queries
                while servers:
                    stop_server(servers.pop())
                print(
                    f"  round {r + 1}/{args.repeat}: "
                    + ", ".join(f"{v.key} {statistics.median(v.rps[-slices:]):,.0f}" for v in vs)
                    + " req/s",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            for s in servers:
                stop_server(s)
            asyncio.run(drop_table(dsn, table))
    return setup, vs


def check_answers(servers: Sequence[Server], paths: Sequence[str]) -> None:
    """Every variant must answer alike, or the table would compare different work."""
    for path in (paths[0], paths[-1]):
        answers = {s.variant.key: s.get(path) for s in servers}
        first = answers[servers[0].variant.key]
        if first[0] != 200 or any(a != first for a in answers.values()):
            raise SetupError(f"the servers answer GET {path} differently: {answers}")
    for s in servers:
        if s.variant.key == "C":
            status, body = s.get(STATUS_PATH)
            if status != 200 or not json.loads(body)["ready"]:
                raise SetupError(f"C: GET {STATUS_PATH} answered {status}: {body[:200]!r}")


# -- output ----------------------------------------------------------------------------------


def report(args: argparse.Namespace, setup: Setup, vs: Sequence[Variant]) -> None:
    base = vs[0].median
    print(
        f"asgi-warmup {asgi_warmup.__version__} per-request overhead · {platform.python_implementation()} "
        f"{platform.python_version()} · {platform.system()} {platform.machine()} · {os.cpu_count()} CPUs"
    )
    print(f"PostgreSQL: {setup.postgres}; {setup.rows:,} rows, all warm; requests cycle over {KEY_SAMPLE:,} warm keys")
    pinned = f"; pinned to CPU {SERVER_CPU}, load generator to CPU {LOAD_CPU}" if args.pin else "; not pinned"
    print(f"server: {setup.uvicorn}, a fresh process per variant and round{pinned}")
    print(f"load average at start: {setup.load_average}")
    print(
        f"load: {setup.generator}, {args.connections} keep-alive connections; {args.warmup:g} s warm-up per server, "
        f"then {args.repeat} round(s) of {args.seconds:g} s per variant in {args.slice:g} s slices taking turns; "
        "medians over all slices"
    )
    if (os.cpu_count() or 1) <= 2:
        print(
            f"note: {os.cpu_count()} CPUs: the load generator competes with the server for CPU, so absolute req/s are "
            "low and noisy; read the ratios"
        )
    if not setup.generator.startswith("wrk"):
        print("note: a Python client is much slower than wrk and may be the bottleneck: apt-get install wrk")
    print(
        "CPU us/req: the server's CPU time per request; busy: its CPU time over the wall time (near 100%: the server, "
        "not the load generator, was the bottleneck)"
    )
    print()
    head = (
        f"{'variant':<40}{'req/s':>9}{'min':>8}{'max':>8}{'vs A':>8}{'overhead':>9}"
        f"{'CPU us/req':>11}{'busy':>6}{'p50 ms':>8}{'p99 ms':>8}"
    )
    print(head)
    print("-" * len(head))
    base_cpu = vs[0].median_cpu
    for v in vs:
        overhead = (1 - v.median / base) * 100
        busy = statistics.median(v.busy) if v.busy else float("nan")
        print(
            f"{v.label:<40}{v.median:>9,.0f}{min(v.rps):>8,.0f}{max(v.rps):>8,.0f}{v.median / base:>7.3f}x"
            f"{overhead:>+8.1f}%{v.median_cpu:>11.1f}{busy:>6.0%}"
            f"{statistics.median(v.p50_ms):>8.2f}{statistics.median(v.p99_ms):>8.2f}"
        )
    print()
    for v in vs[1:]:
        overhead = (1 - v.median / base) * 100
        cpu_overhead = (v.median_cpu / base_cpu - 1) * 100
        if v.key == CONTROL:
            print(
                f"{v.key} vs A: {overhead:+.1f}% on requests/s between two identical servers: differences this size "
                "are noise"
            )
            continue
        verdict = "meets" if overhead <= TARGET else "misses"
        print(
            f"{v.key} vs A: overhead {overhead:+.1f}% on requests/s, {cpu_overhead:+.1f}% on server CPU per request "
            f"(negative: faster than A): {verdict} the <= {TARGET:g}% target on requests/s"
        )
    for v in vs:
        if v.errors:
            print(f"warning: {v.key}: {v.errors} requests failed or answered other than 2xx")
        if v.misses:
            print(f"warning: {v.key}: {v.misses} lookup queries while measured: some requests missed the cache")
    if args.quick:
        print("\n--quick is a smoke run: one short round, the numbers mean little")


def write_json(path: str, args: argparse.Namespace, setup: Setup, vs: Sequence[Variant]) -> None:
    base = vs[0].median
    data = {
        "benchmark": "overhead",
        "asgi_warmup": asgi_warmup.__version__,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "postgres": setup.postgres,
        "rows": setup.rows,
        "server": setup.uvicorn,
        "load_generator": setup.generator,
        "connections": args.connections,
        "seconds": args.seconds,
        "slice": args.slice,
        "repeat": args.repeat,
        "target_overhead_percent": TARGET,
        "results": [
            {
                "variant": v.key,
                "label": v.label,
                "median_rps": v.median,
                "ratio_vs_a": v.median / base,
                "overhead_percent": (1 - v.median / base) * 100,
                "rps": v.rps,
                "p50_ms": v.p50_ms,
                "p99_ms": v.p99_ms,
                "median_server_cpu_us_per_request": v.median_cpu,
                "server_cpu_us_per_request": v.cpu_us,
                "server_busy": v.busy,
                "errors": v.errors,
                "misses": v.misses,
            }
            for v in vs
        ],
    }
    dump_json(path, data)


def write_plot(path: str, vs: Sequence[Variant]) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    names = [v.label for v in reversed(vs)]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(names) + 1.2))
    ax.barh(names, [v.median for v in reversed(vs)], color="tab:blue", label="median")
    for v in vs:
        ax.scatter(v.rps, [v.label] * len(v.rps), color="black", marker="|", s=120, zorder=3)
    ax.set_xlabel("requests/s through uvicorn (median; ticks: each round)")
    ax.set_title("Per-request cost of WarmupMiddleware on a cache hit")
    save_figure(fig, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI: one round of 1 s per variant")
    parser.add_argument("--seconds", type=float, help="measured seconds per variant per round (default 5; 1 --quick)")
    parser.add_argument(
        "--slice", type=float, default=1.0, help="measure in slices this long, variants taking turns (default 1 s)"
    )
    parser.add_argument("--warmup", type=float, help="seconds of load per server before measuring (default 2; 1 quick)")
    parser.add_argument("--repeat", "--repeats", dest="repeat", type=int, help="rounds (default 3; 1 with --quick)")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections (default 16)")
    parser.add_argument("--rows", type=int, default=10_000, help="rows in the table, all warmed (default 10000)")
    parser.add_argument(
        "--load-generator", choices=("auto", "wrk", "httpx"), default="auto", help="default: wrk if on the PATH"
    )
    parser.add_argument(
        "--control",
        action=argparse.BooleanOptionalAction,
        help="also measure A a second time, to show the noise floor (default: on, off with --quick)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help=f"server on CPU {SERVER_CPU}, load generator on CPU {LOAD_CPU} (Linux; default: off)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the raw samples here")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart here (needs matplotlib)")
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--paths-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 1.0 if args.quick else 5.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.control is None:
        args.control = not args.quick
    can_pin = hasattr(os, "sched_setaffinity") and {SERVER_CPU, LOAD_CPU} <= os.sched_getaffinity(0)
    if args.pin and not can_pin:
        parser.error(f"--pin needs Linux and CPUs {SERVER_CPU} and {LOAD_CPU}")
    if min(args.seconds, args.slice, args.repeat, args.connections, args.rows) <= 0 or args.warmup < 0:
        parser.error("--seconds, --slice, --repeat, --connections and --rows must be positive, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client:
        with open(args.paths_file) as f:
            paths = json.load(f)
        result = asyncio.run(client(args.client, paths, args.seconds, args.connections))
        print(json.dumps(result.__dict__))
        return 0
    try:
        setup, vs = run(args)
    except (SetupError, OSError, asyncpg.PostgresError) as exc:
        print(f"overhead: setup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print()
    report(args, setup, vs)
    if args.json or args.plot:
        print()
    if args.json:
        write_json(args.json, args, setup, vs)
    if args.plot:
        write_plot(args.plot, vs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
