"""FastAGI decision requests per second: shopcall's server against the classic thread-per-connection model.

A load generator speaks FastAGI exactly as Asterisk does: one TCP connection per request, the agi_* header
block, `200 result=1` to every command, until the server closes. Each request is a routing decision:
look the dialled number up in PostgreSQL (the real shopcall.directory code for (a)), set two variables.

  (a) shopcall: agi.server.FastAgiServer, asyncio, one psycopg pool
  (b) baseline: socketserver.ThreadingTCPServer opening a psycopg connection per request (the model of the
      best-known Python AGI daemons)

Both run in this process's machine at the same time of day, one after the other, so the ratio is what
counts (the machine is shared and noisy). Prints requests/s, p50/p99 latency and the ratio. The generator
and PostgreSQL share the machine's cores with the server, so "on one core" is read from the server
process's own CPU time: requests per CPU-second of the server (user + system, from /proc/PID/stat).
(a) runs on the event loop `shopcall serve` runs on (uvloop when installed; SHOPCALL_EVENT_LOOP=asyncio
for asyncio's own).

    .venv/bin/python bench/agi_decisions.py [--requests 3000] [--concurrency 50] [--pin] [--unbatched]

Route lookups that arrive while one is at the database go together as the next query (shopcall/batch.py);
--unbatched sends each as its own query, to show what that is worth.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socketserver
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402
from psycopg.rows import dict_row  # noqa: E402

from agi.server import FastAgiServer  # noqa: E402
from bench.procstat import cpu_seconds  # noqa: E402
from shopcall import db  # noqa: E402
from shopcall.batch import Batcher  # noqa: E402
from shopcall.cli import run_loop  # noqa: E402
from shopcall.directory import Directory, Menu  # noqa: E402
from shopcall.loader import load, read  # noqa: E402

DIRECTORY = Path(__file__).resolve().parent.parent / "tests" / "data" / "directory.toml"
ENV = (
    "agi_network: yes\nagi_network_script: route?number={n}\nagi_request: agi://127.0.0.1/route?number={n}\n"
    "agi_channel: PJSIP/sipp-00000001\nagi_language: ru\nagi_uniqueid: 1732540000.{i}\n"
    "agi_callerid: 79161234567\nagi_calleridname: Иван Петров\nagi_extension: {n}\n\n"
)


async def load_generator(port: int, requests: int, concurrency: int) -> list[float]:
    latencies: list[float] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(ENV.format(n=100 if i % 2 else 300, i=i).encode())
            while line := await r.readline():
                if line.strip():
                    w.write(b"200 result=1\n")
            w.close()
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


SERVER_CORE: set[int] = set()  # --pin: {0}


def pin(server: bool) -> None:
    """--pin: the server alone on one core; this process, the generator and PostgreSQL on the others."""
    if SERVER_CORE:
        others = set(range(os.cpu_count() or 1)) - SERVER_CORE
        os.sched_setaffinity(0, SERVER_CORE if server else others)


def run_load(port: int, requests: int, concurrency: int, out: multiprocessing.Queue) -> None:
    pin(server=False)
    # the generator shares a core with PostgreSQL: on uvloop it takes less of it (a third, measured)
    out.put(run_loop(load_generator(port, requests, concurrency)))


def measure(port: int, requests: int, concurrency: int) -> tuple[float, list[float]]:
    """The generator runs in its own process so it does not share the server's core."""
    q: multiprocessing.Queue = multiprocessing.Queue()
    p = multiprocessing.Process(target=run_load, args=(port, requests, concurrency, q))
    t0 = time.perf_counter()
    p.start()
    lat = q.get()
    elapsed = time.perf_counter() - t0
    p.join()
    return elapsed, lat


UNBATCHED: list[bool] = []  # --unbatched: every request its own query (what the batching is worth)


def shopcall_server(url: str, ready: multiprocessing.Event, port_out: multiprocessing.Value) -> None:
    pin(server=True)
    async def main() -> None:
        async with db.open_pool(url, min_size=4, max_size=8) as pool:
            directory = Directory(pool, timezone="Europe/Moscow", default_menu=Menu())
            if UNBATCHED:
                directory._lookups = Batcher(directory._lookup_rows, max_batch=1)

            async def route(session, env, script):
                r = await directory.route(script.args.get("number", ""))
                await session.send(f'SET VARIABLE SHOPCALL_GROUP "{r.group_name or "menu"}"\n'.encode())
                await session.send(f'SET VARIABLE SHOPCALL_LANG "{r.language}"\n'.encode())

            srv = FastAgiServer({"route": route}, port=0)
            await srv.start()
            port_out.value = srv.port
            ready.set()
            await asyncio.Event().wait()
        return 0

    run_loop(main())


def baseline_server(url: str, ready: multiprocessing.Event, port_out: multiprocessing.Value) -> None:
    pin(server=True)
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            env = {}
            while (line := self.rfile.readline()) not in (b"\n", b""):
                k, _, v = line.decode().partition(": ")
                env[k] = v.strip()
            number = env.get("agi_extension", "")
            with psycopg.connect(url) as conn:  # a connection per request, as the classic daemons do
                row = conn.execute("SELECT language FROM numbers WHERE number = %s", (number,)).fetchone()
            for cmd in (b'SET VARIABLE SHOPCALL_GROUP "menu"\n', f'SET VARIABLE SHOPCALL_LANG "{row[0]}"\n'.encode()):
                self.wfile.write(cmd)
                self.rfile.readline()

    socketserver.ThreadingTCPServer.daemon_threads = True
    socketserver.ThreadingTCPServer.request_queue_size = 1024
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler) as srv:
        port_out.value = srv.server_address[1]
        ready.set()
        srv.serve_forever()


def bench(name: str, target, url: str, requests: int, concurrency: int) -> tuple[float, float]:
    ready, port = multiprocessing.Event(), multiprocessing.Value("i", 0)
    proc = multiprocessing.Process(target=target, args=(url, ready, port), daemon=True)
    proc.start()
    ready.wait(30)
    measure(port.value, min(200, requests), concurrency)  # warm-up
    cpu0 = cpu_seconds(proc.pid)
    elapsed, lat = measure(port.value, requests, concurrency)
    cpu = cpu_seconds(proc.pid) - cpu0
    proc.terminate()
    proc.join()
    lat.sort()
    rps = requests / elapsed
    per_core = requests / cpu if cpu else float("inf")
    print(f"{name:10s} {rps:8.0f} req/s   {per_core:8.0f} req per server CPU-second   "
          f"p50 {statistics.median(lat) * 1000:6.1f} ms   p99 {lat[int(len(lat) * 0.99) - 1] * 1000:6.1f} ms   "
          f"({requests} requests, {concurrency} at once)")
    return rps, per_core


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--database-url", default=os.environ.get("SHOPCALL_BENCH_DATABASE_URL", ""))
    ap.add_argument("--pin", action="store_true",
                    help="the server alone on core 0, everything else on the other cores (needs 2+)")
    ap.add_argument("--unbatched", action="store_true",
                    help="shopcall sends every route lookup as its own query (no batching)")
    args = ap.parse_args()
    if args.unbatched:
        UNBATCHED.append(True)
    if args.pin and (os.cpu_count() or 1) >= 2:
        SERVER_CORE.add(0)
        pin(server=False)  # before PostgreSQL starts, so its processes inherit the other cores
    url = args.database_url
    pgdata = None
    if not url:
        pgdata = Path(tempfile.mkdtemp(prefix="shopcall-bench-")) / "data"
        url = db.start_embedded(pgdata)

    async def prepare() -> None:
        await db.migrate_url(url)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row) as conn:
            await load(conn, read(DIRECTORY))

    asyncio.run(prepare())
    try:
        print(f"cores: {os.cpu_count()}; server and load generator in separate processes")
        ours, ours_core = bench("shopcall", shopcall_server, url, args.requests, args.concurrency)
        base, base_core = bench("baseline", baseline_server, url, args.requests, args.concurrency)
        print(f"ratio shopcall/baseline: {ours / base:.1f}x in requests/s, "
              f"{ours_core / base_core:.1f}x in requests per server CPU-second")
        print(f"target >= 3000 req/s on one core: {'PASS' if ours_core >= 3000 else 'MISS'} ({ours_core:.0f}); "
              f"target >= 10x the baseline: {'PASS' if ours / base >= 10 else 'MISS'} ({ours / base:.1f}x)")
    finally:
        if pgdata:
            db.stop_embedded(pgdata)
    return 0


if __name__ == "__main__":
    sys.exit(main())
