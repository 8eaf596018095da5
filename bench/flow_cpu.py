"""What one whole inbound call costs our process and PostgreSQL, without Asterisk: CPU milliseconds per call.

`bench/e2e_ratio.py` shows that where every process shares the 2 cores, what our process and PostgreSQL
spend per call is taken from Asterisk; its figures carry Asterisk's noise (±3 ms per call between rounds).
Here a generator plays Asterisk's part of the same call to a real `shopcall serve --only agi` (the bench
number 710 of bench/pbx_service.py: greeting, office hours, group sales, "connecting", Dial, the calls row):
one FastAGI connection per call, the agi_* header block, and to each command the reply Asterisk gives on
the normal path (STREAM FILE played to the end, Dial answered by agent1 after 1 s of talk), so every call
runs the flow's whole path: the same commands and statements as a real call. The generator runs in its own
process and is not counted; shopcall's and PostgreSQL's CPU are read from /proc.

    .venv/bin/python bench/flow_cpu.py [--calls 3000] [--rate 200] [--rounds 3] [--compare-group-cache]
                                       [--holds 0,5]

Prints, for each round, CPU ms per call of shopcall and PostgreSQL, and commands and statements per call.
--compare-group-cache runs a second service with database.cache_groups = false (its own PostgreSQL) and
alternates the rounds between the two (A B, B A, ...), so the saving of the group cache is read side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
    "agi_network: yes\nagi_network_script: inbound?number={n}&dp=2\nagi_request: agi://127.0.0.1/inbound?number={n}&dp=2\n"
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
        return b"200 result=1 (ANSWER|PJSIP/agent1-00000002|9|1796300000.500|1796300001.500)\n"
    return b"200 result=0\n"


async def generate(port: int, calls: int, rate: float, hold: float = 0.0) -> tuple[int, int, float]:
    """Place `calls` calls at `rate` per second; returns (calls completed, commands seen, wall seconds).

    `hold` seconds are split between the prompts and the Dial before they are answered, so that as many
    sessions are open at once as in a real call of that length (rate × hold)."""
    commands = done = 0

    async def one(i: int) -> None:
        nonlocal commands, done
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(ENV.format(n=NUMBER, i=i).encode())
        while line := await r.readline():
            if line.strip():
                commands += 1
                if hold and line.startswith((b"EXEC Playback", b"EXEC Dial")):
                    await asyncio.sleep(hold / 3)
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


def run_generator(port: int, calls: int, rate: float, hold: float, out: multiprocessing.Queue) -> None:
    out.put(asyncio.run(generate(port, calls, rate, hold)))


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
    ap.add_argument("--compare-group-cache", action="store_true",
                    help="also a service without the group cache, rounds alternating")
    ap.add_argument("--holds", default="0",
                    help="seconds each call is held open (prompts and Dial answered late), comma-separated: "
                         "each round runs every hold, so many live sessions are compared with few side by side")
    args = ap.parse_args()
    holds = [float(h) for h in args.holds.split(",")]

    with contextlib.ExitStack() as stack:
        sides = {"cache on": stack.enter_context(shopcall_service("shopcall-flow-cpu-"))}
        if args.compare_group_cache:
            sides["cache off"] = stack.enter_context(
                shopcall_service("shopcall-flow-cpu-nocache-", database="cache_groups = false"))
        for svc in sides.values():
            run_calls(svc.app.port, 200, args.rate)  # a warm-up: prompts, pool connections, prepared statements
        runs = [(side, svc, hold) for side, svc in sides.items() for hold in holds]
        labels = {(side, hold): " ".join(filter(None, [side if len(sides) > 1 else "",
                                                       f"hold {hold:g} s" if len(holds) > 1 else ""]))
                  for side, _, hold in runs}
        per_call = {key: {"shopcall": [], "postgres": []} for key in labels}
        for rnd in range(1, args.rounds + 1):
            order = list(runs)
            if rnd % 2 == 0:  # ABBA: a machine that speeds up or slows down over the run favours neither
                order.reverse()
            for side, svc, hold in order:
                before, s0 = procstat.snapshot(), transactions(svc.url)
                done, commands, wall = run_calls(svc.app.port, args.calls, args.rate, hold)
                after, s1 = procstat.snapshot(), transactions(svc.url)
                cpu = procstat.used(before, after)
                got = per_call[side, hold]
                for k in got:
                    got[k].append(1000 * cpu[k] / max(done, 1))
                label = f" [{labels[side, hold]}]" if labels[side, hold] else ""
                print(f"round {rnd}{label}: {done} calls in {wall:.1f} s ({done / wall:.0f}/s) | CPU per call: "
                      f"shopcall {got['shopcall'][-1]:.2f} ms, PostgreSQL {got['postgres'][-1]:.2f} ms | "
                      f"{commands / max(done, 1):.1f} AGI commands, {(s1 - s0 - 1) / max(done, 1):.1f} "
                      f"transactions per call", flush=True)
                if done != args.calls:
                    print(f"FAIL: {args.calls - done} calls did not complete")
                    return 1
        med = {key: {k: statistics.median(v) for k, v in got.items()} for key, got in per_call.items()}
        for key, m in med.items():
            label = f" [{labels[key]}]" if labels[key] else ""
            print(f"median CPU per call{label}: shopcall {m['shopcall']:.2f} ms, PostgreSQL {m['postgres']:.2f} ms, "
                  f"together {m['shopcall'] + m['postgres']:.2f} ms")

        def ratio(a: dict[str, float], b: dict[str, float]) -> str:
            return ", ".join(f"{k} {a[k] / b[k]:.2f}" for k in ("shopcall", "postgres")) + \
                f", together {(a['shopcall'] + a['postgres']) / (b['shopcall'] + b['postgres']):.2f}"

        if len(sides) > 1:
            for hold in holds:
                print(f"cache on / cache off{f' (hold {hold:g} s)' if len(holds) > 1 else ''}: "
                      + ratio(med["cache on", hold], med["cache off", hold]))
        if len(holds) > 1:
            for side in sides:
                for hold in holds[1:]:
                    print(f"hold {hold:g} s / hold {holds[0]:g} s{f' ({side})' if len(sides) > 1 else ''}: "
                          + ratio(med[side, hold], med[side, holds[0]]))
    return 0


def run_calls(port: int, calls: int, rate: float, hold: float = 0.0) -> tuple[int, int, float]:
    """The generator in its own process, so its CPU is not counted as ours."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    gen = ctx.Process(target=run_generator, args=(port, calls, rate, hold, out))
    gen.start()
    result = out.get()
    gen.join()
    return result


if __name__ == "__main__":
    sys.exit(main())
