"""The README's demo: restart a LiteLLM-style proxy and hit it with a burst of API keys at once.

    pip install -e '.[examples,embedded]'
    python examples/demo.py            # 20000 keys; 5000 requests, 200 concurrent
    python examples/demo.py --quick    # 2000 keys; 500 requests, 50 concurrent

Uses DATABASE_URL when set (in a fresh schema, dropped at the end), else an embedded PostgreSQL
(pgserver). Exits 1 if any request got a 5xx or a valid key was refused, so CI catches regressions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import signal
import socket
import ssl
import sys
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import httpx
from litellm_proxy import create_schema, seed  # run as a script: examples/ is on sys.path

ROOT = Path(__file__).resolve().parent.parent


class DemoError(Exception):
    pass


@contextlib.contextmanager
def postgres() -> Iterator[tuple[str, str]]:
    """(dsn, where): DATABASE_URL if set, else an embedded server, stopped and deleted on the way out."""
    if url := os.environ.get("DATABASE_URL"):
        yield url, "DATABASE_URL"
        return
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); pgserver copes.
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError:
        sys.exit("DATABASE_URL is not set and pgserver is not installed: pip install -e '.[examples,embedded]'")
    with tempfile.TemporaryDirectory(prefix="asgi-warmup-demo-") as tmp:
        print("Starting an embedded PostgreSQL (pgserver) ...", flush=True)
        server = pgserver.get_server(Path(tmp) / "pgdata", cleanup_mode="stop")
        try:
            yield server.get_uri(), "embedded PostgreSQL (pgserver)"
        finally:
            server.cleanup()


def with_search_path(dsn: str, schema: str) -> str:
    # asyncpg sends the URL parameters it does not know to the server as settings.
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"] + [("search_path", schema)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def start_proxy(dsn: str, port: int, warm_limit: int) -> asyncio.subprocess.Process:
    env = {**os.environ, "DATABASE_URL": dsn, "ASGI_WARMUP_LIMIT": str(warm_limit)}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "uvicorn", "examples.litellm_proxy:app", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--log-level", "warning", "--no-access-log",
        cwd=ROOT, env=env,
        # Its own session: Ctrl-C reaches only the demo, which stops uvicorn before the database.
        start_new_session=True,
    )  # fmt: skip


async def wait_listening(proc: asyncio.subprocess.Process, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while proc.returncode is None and time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.005)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise DemoError(f"uvicorn is not serving on port {port} (exit code {proc.returncode}); see its output above")


async def stop_proxy(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()  # graceful: the lifespan shutdown stops the warmup and closes the pool
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
    # uvicorn re-raises the signal it stopped on, so -SIGTERM is a clean exit.
    clean = proc.returncode in (0, -signal.SIGTERM)
    print("uvicorn stopped" if clean else f"uvicorn exited with code {proc.returncode}")


def make_traffic(keys: list[str], args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(path, bearer key, valid): Zipf-drawn keys (keys come most active first), some unknown ones."""
    # Not seeded like the keys: the same stream would draw the "unknown" keys from the real ones.
    rng = random.Random(f"traffic {args.seed}")
    weights = list(itertools.accumulate(1 / rank**args.zipf for rank in range(1, len(keys) + 1)))
    traffic = []
    for key in rng.choices(keys, cum_weights=weights, k=args.requests):
        path = "/v1/models" if rng.random() < 0.2 else "/v1/chat/completions"
        if rng.random() < args.invalid:
            traffic.append((path, f"sk-{rng.getrandbits(128):032x}", False))
        else:
            traffic.append((path, key, True))
    return traffic


class Burst:
    def __init__(self, traffic: list[tuple[str, str, bool]]) -> None:
        self.traffic = traffic
        self.results: list[tuple[int, float, bool]] = []  # status (0: no answer), latency, valid
        self.sent_before_warm = 0
        self.warm = False

    async def fire(self, clients: list[httpx.AsyncClient]) -> None:
        requests = iter(self.traffic)  # shared by the workers: each request is sent once
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

        async def worker(client: httpx.AsyncClient) -> None:
            for path, key, valid in requests:
                headers = {"authorization": f"Bearer {key}"}
                self.sent_before_warm += not self.warm
                t0 = time.perf_counter()
                try:
                    if path == "/v1/models":
                        status = (await client.get(path, headers=headers)).status_code
                    else:
                        status = (await client.post(path, headers=headers, json=body)).status_code
                except httpx.HTTPError as exc:
                    if not any(s == 0 for s, _, _ in self.results[-100:]):  # not one line per request
                        print(f"  request failed: {type(exc).__name__}: {exc!r}")
                    status = 0
                self.results.append((status, time.perf_counter() - t0, valid))

        await asyncio.gather(*(worker(client) for client in clients))

    async def watch(self, client: httpx.AsyncClient, started: float) -> None:
        last, warm = 0.0, False
        while True:
            try:
                status = (await client.get("/_warmup")).json()
            except httpx.HTTPError:
                return  # the burst reports what went wrong
            ds, now = status["datasets"]["api_keys"], time.perf_counter()
            if status["ready"] and not warm:
                warm = self.warm = True
                print(f"  {now - started:5.2f} s  warmup complete: {ds['rows']} rows; {len(self.results)} answered")
            elif now - last >= 0.5:
                last = now
                print(
                    f"  {now - started:5.2f} s  {len(self.results):5d}/{len(self.traffic)} answered,"
                    f" warmup {ds['state']} {ds['rows']}/{ds['target']} rows"
                )
            await asyncio.sleep(0.01)


async def run(args: argparse.Namespace, dsn: str) -> int:
    schema = f"asgi_warmup_demo_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    proc = None
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        dsn = with_search_path(dsn, schema)
        t0 = time.perf_counter()
        conn = await asyncpg.connect(dsn)
        try:
            await create_schema(conn)
            keys = await seed(conn, args.keys, zipf_s=args.zipf, seed=args.seed)
        finally:
            await conn.close()
        print(f"Seeded {args.keys} API keys in schema {schema} in {time.perf_counter() - t0:.2f} s")
        burst = Burst(make_traffic(keys, args))

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        async with contextlib.AsyncExitStack() as stack:
            # One client, so one connection, per worker: a single httpx pool with 200 requests in flight
            # spends more time managing itself than the server spends answering (encode/httpx#3215).
            # One SSL context for all: loading the CA bundle costs ~20 ms per client.
            tls = ssl.create_default_context()
            clients = [
                await stack.enter_async_context(httpx.AsyncClient(base_url=base, verify=tls, timeout=60))
                for _ in range(args.concurrency)
            ]
            side = await stack.enter_async_context(httpx.AsyncClient(base_url=base, verify=tls))
            t0 = time.perf_counter()
            proc = await start_proxy(dsn, port, args.warm_limit)
            await wait_listening(proc, port)
            started = time.perf_counter()
            print(f"uvicorn listening on {base} {started - t0:.2f} s after launch; firing the burst now")
            watcher = asyncio.create_task(burst.watch(side, started))
            try:
                await burst.fire(clients)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            took = time.perf_counter() - started
            warm: dict[str, Any] = (await side.get("/_warmup")).json()
        return report(burst, took, args.concurrency, warm)
    finally:
        if proc is not None:
            await stop_proxy(proc)
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def report(burst: Burst, took: float, concurrency: int, warm: dict[str, Any]) -> int:
    results = burst.results
    codes = Counter(status for status, _, _ in results)
    others = {code or "no answer": n for code, n in sorted(codes.items()) if code not in (200, 401)}
    latencies = sorted(latency * 1000 for _, latency, _ in results)
    ds = warm["datasets"]["api_keys"]
    rate = len(results) / took
    print(f"\nResults: {len(results)} requests in {took:.2f} s ({rate:.0f} req/s, {concurrency} in flight)")
    invalid_sent = sum(not valid for _, _, valid in results)
    print(
        f"  status codes   200: {codes[200]}   401: {codes[401]} ({invalid_sent} invalid keys sent)   other: {others}"
    )
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    print(f"  latency        p50 {p50:.1f} ms   p99 {p99:.1f} ms   max {latencies[-1]:.1f} ms")
    print(f"  during warmup  {burst.sent_before_warm} of {len(results)} requests were sent before the warmup finished")
    error = f"   last error: {ds['last_error']}" if ds["last_error"] else ""
    print(f"  warmup         {ds['state']}: {ds['rows']} of {ds['target']} rows in {ds['elapsed']:.2f} s{error}")
    distinct = len({key for _, key, _ in burst.traffic})
    print(
        f"  database       {len(results)} requests over {distinct} distinct keys ->"
        f" {ds['queries']} lookup queries to PostgreSQL"
    )
    problems = {
        "answered with a 5xx": sum(status >= 500 for status, _, _ in results),
        "got no answer": codes[0],
        "with a valid key refused (401)": sum(status == 401 and valid for status, _, valid in results),
        "with an invalid key accepted (200)": sum(status == 200 and not valid for status, _, valid in results),
    }
    failed = {what: n for what, n in problems.items() if n}
    for what, n in failed.items():
        print(f"FAIL: {n} requests {what}")
    if not failed:
        print("OK: no 5xx, every valid key accepted, every invalid key refused")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2000 keys; 500 requests, 50 concurrent (for CI)")
    parser.add_argument("--keys", type=int, help="API keys to seed (default 20000)")
    parser.add_argument("--requests", type=int, help="requests in the burst (default 5000)")
    parser.add_argument("--concurrency", type=int, help="requests in flight at once (default 200)")
    parser.add_argument("--invalid", type=float, default=0.05, help="share of unknown keys (default 0.05)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of key popularity (default 1.0)")
    parser.add_argument("--warm-limit", type=int, help="rows to warm (ASGI_WARMUP_LIMIT; default: all the keys)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress shows up in CI logs too
    quick = args.quick
    args.keys = args.keys or (2000 if quick else 20_000)
    args.requests = args.requests or (500 if quick else 5000)
    args.concurrency = args.concurrency or (50 if quick else 200)
    args.warm_limit = args.keys if args.warm_limit is None else args.warm_limit
    try:
        with postgres() as (dsn, where):
            print(
                f"asgi-warmup demo: {args.keys} keys, {args.requests} requests, {args.concurrency} concurrent; {where}"
            )
            return asyncio.run(run(args, dsn))
    except DemoError as exc:
        print(f"Demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted: stopped what the demo started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
