"""What one whole inbound call costs our process and PostgreSQL, without Asterisk: CPU milliseconds per call.

`bench/e2e_ratio.py` shows that where every process shares the 2 cores, what our process and PostgreSQL
spend per call is taken from Asterisk; its figures carry Asterisk's noise (±3 ms per call between rounds).
Here a generator plays Asterisk's part of the same call to a real `shopcall serve --only agi` (the bench
number 710 of bench/pbx_service.py: greeting, office hours, group sales, "connecting", Dial, the calls row):
one FastAGI connection per call, the agi_* header block, and to each command the reply Asterisk gives on
the normal path (STREAM FILE played to the end, Dial answered by agent1 after 1 s of talk), so every call
runs the flow's whole path: the same commands, the same four statements. The generator runs in its own
process and is not counted; shopcall's and PostgreSQL's CPU are read from /proc.

    .venv/bin/python bench/flow_cpu.py [--calls 3000] [--rate 200] [--rounds 3]

Prints, for each round, CPU ms per call of shopcall and PostgreSQL, and commands and statements per call.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from bench import procstat  # noqa: E402
from bench.pbx_service import NUMBER, shopcall_service  # noqa: E402

ENV = (
    "agi_network: yes\nagi_network_script: inbound?number={n}\nagi_request: agi://127.0.0.1/inbound?number={n}\n"
    "agi_channel: PJSIP/sipp-{i:08x}\nagi_language: ru\nagi_type: PJSIP\nagi_uniqueid: 1764650000.{i}\n"
    "agi_version: 22.0.0\nagi_callerid: 79160001122\nagi_calleridname: unknown\nagi_callingpres: 0\n"
    "agi_dnid: {n}\nagi_context: shopcall-inbound\nagi_extension: {n}\nagi_priority: 2\nagi_enhanced: 0.0\n"
    "agi_accountcode: \nagi_threadid: 140000000000000\n\n"
)


def reply(command: bytes) -> bytes:
    """Asterisk's answer on the normal path of the call."""
    if command.startswith(b"STREAM FILE"):
        return b"200 result=0 endpos=16000\n"
    if command.startswith(b"GET FULL VARIABLE"):
        return b"200 result=1 (ANSWER|PJSIP/agent1-00000002|1)\n"
    return b"200 result=0\n"


async def generate(port: int, calls: int, rate: float) -> tuple[int, int, float]:
    """Place `calls` calls at `rate` per second; returns (calls completed, commands seen, wall seconds)."""
    commands = done = 0

    async def one(i: int) -> None:
        nonlocal commands, done
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(ENV.format(n=NUMBER, i=i).encode())
        while line := await r.readline():
            if line.strip():
                commands += 1
                w.write(reply(line))
        w.close()
        done += 1

    start = time.perf_counter()
    tasks = []
    for i in range(calls):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return done, commands, time.perf_counter() - start


def run_generator(port: int, calls: int, rate: float, out: multiprocessing.Queue) -> None:
    out.put(asyncio.run(generate(port, calls, rate)))


def transactions(url: str) -> int:
    """Transactions committed so far (this query's own is counted by the next reading)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT sum(xact_commit)::bigint FROM pg_stat_database").fetchone()
    return int(row[0] or 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=200.0, help="calls started per second")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    with shopcall_service("shopcall-flow-cpu-") as svc:
        ctx = multiprocessing.get_context("spawn")
        warm = ctx.Queue()
        p = ctx.Process(target=run_generator, args=(svc.app.port, 200, args.rate, warm))
        p.start()  # a warm-up: prompts, pool connections, prepared statements
        warm.get()
        p.join()
        per_call: dict[str, list[float]] = {"shopcall": [], "postgres": []}
        for rnd in range(1, args.rounds + 1):
            out = ctx.Queue()
            gen = ctx.Process(target=run_generator, args=(svc.app.port, args.calls, args.rate, out))
            before, s0 = procstat.snapshot(), transactions(svc.url)
            gen.start()
            done, commands, wall = out.get()
            gen.join()
            after, s1 = procstat.snapshot(), transactions(svc.url)
            cpu = procstat.used(before, after)
            for k in per_call:
                per_call[k].append(1000 * cpu[k] / max(done, 1))
            print(f"round {rnd}: {done} calls in {wall:.1f} s ({done / wall:.0f}/s) | CPU per call: shopcall "
                  f"{per_call['shopcall'][-1]:.2f} ms, PostgreSQL {per_call['postgres'][-1]:.2f} ms | "
                  f"{commands / max(done, 1):.1f} AGI commands, {(s1 - s0 - 1) / max(done, 1):.1f} "
                  f"transactions per call", flush=True)
            if done != args.calls:
                print(f"FAIL: {args.calls - done} calls did not complete")
                return 1
        med = {k: statistics.median(v) for k, v in per_call.items()}
        print(f"median CPU per call: shopcall {med['shopcall']:.2f} ms, PostgreSQL {med['postgres']:.2f} ms, "
              f"together {med['shopcall'] + med['postgres']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
