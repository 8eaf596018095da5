"""Dialler throughput: N due jobs, W `shopcall serve --only dialler` processes, Originates to a real AMI.

Debian's Asterisk 22 runs from the test harness's debootstrap root (build it with
scripts/build-asterisk-root.sh, as ./tests/run.sh does). Each Originate dials `Local/<number>@bench-callee`,
which answers and hangs up at once; the robot context just hangs up, so what is measured is the dialler:
claim (SKIP LOCKED, campaign row lock, every rule), commit the attempt, AMI Originate, OriginateResponse,
mark answered. A settler in this process stands in for the robot flows ending (it marks answered jobs
done), so the campaign's live-call cap keeps being freed as it would be.

Prints attempts dispatched per second for 1 worker and for W workers (the same jobs count, one run after
the other), the scaling ratio, and checks that every job was originated exactly once (attempt rows per
job, distinct ActionIDs, OriginateResponses counted on a separate AMI connection).

    .venv/bin/python bench/dialler_throughput.py [--jobs 10000] [--workers 4] [--cps 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
from psycopg.rows import dict_row  # noqa: E402

from agi.ami import AmiClient  # noqa: E402
from shopcall import db  # noqa: E402
from tests.pbx import DEFAULT_ROOT, AsteriskPbx, root_is_ready  # noqa: E402

DIALPLAN = """
[bench-callee]
exten => _X.,1,Answer()
 same => n,Hangup()
exten => _+X.,1,Answer()
 same => n,Hangup()

[shopcall-robot]
exten => s,1,Hangup()
"""
ALWAYS = ('{"mon":[["00:00","24:00"]],"tue":[["00:00","24:00"]],"wed":[["00:00","24:00"]],"thu":[["00:00","24:00"]],'
          '"fri":[["00:00","24:00"]],"sat":[["00:00","24:00"]],"sun":[["00:00","24:00"]]}')


def write_config(work: Path, url: str, pbx: AsteriskPbx) -> Path:
    config = work / "shopcall.toml"
    config.write_text(f"""
[paths]
data_dir = "{work / 'data'}"
[database]
url = "{url}"
pool_max = 4
[asterisk]
ami_port = {pbx.ami_port}
ami_user = "{pbx.ami_user}"
ami_secret = "{pbx.ami_secret}"
trunk_template = "Local/{{number}}@bench-callee"
[dialler]
poll_seconds = 0.2
batch = 200
lost_grace_seconds = 3600
[log]
level = "WARNING"
""", encoding="utf-8")
    return config


def seed(url: str, jobs: int, cps: float) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE dial_attempts, dial_jobs RESTART IDENTITY CASCADE")
        conn.execute("UPDATE campaigns SET calling_window = %s, calls_per_second = %s, max_concurrent = 1000, "
                     "max_attempts = 1, retry_minutes = '{}', next_dial_at = NULL, ring_seconds = 30 "
                     "WHERE name = 'order_confirmation'", (ALWAYS, cps))
        with conn.cursor().copy("COPY dial_jobs (campaign, phone, order_number, dedupe_key) FROM STDIN") as copy:
            for i in range(jobs):
                copy.write_row(("order_confirmation", f"+7916{i:07d}", f"b{i}", f"bench:{i}"))


async def settle_answered(url: str, stop: asyncio.Event) -> None:
    """The robot flows' part: an answered job is done, so its live-call slot frees."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            await conn.execute("""UPDATE dial_jobs j SET status = 'done', result = 'bench', finished_at = now()
                                    FROM dial_attempts a WHERE a.job_id = j.id AND j.status = 'dialling'
                                     AND a.answered_at IS NOT NULL""")
            await asyncio.sleep(0.2)


def start_workers(config: Path, workers: int) -> list[subprocess.Popen]:
    procs = []
    for n in range(workers):
        with open(config.parent / f"dialler-{n}.log", "ab") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "shopcall", "-c", str(config), "serve", "--only", "dialler"],
                cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=log))
    return procs


async def run(url: str, config: Path, pbx: AsteriskPbx, jobs: int, workers: int, cps: float) -> dict:
    seed(url, jobs, cps)
    responses: dict[str, int] = {}
    ami = AmiClient("127.0.0.1", pbx.ami_port, pbx.ami_user, pbx.ami_secret)
    await ami.connect()
    ami.add_listener(lambda m: responses.__setitem__(m.get("ActionID", ""), responses.get(m.get("ActionID", ""), 0) + 1),
                     "OriginateResponse")
    stop = asyncio.Event()
    settler = asyncio.create_task(settle_answered(url, stop))
    procs = start_workers(config, workers)
    started = time.monotonic()
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row) as conn:
            while True:
                row = await (await conn.execute(
                    "SELECT count(*) FILTER (WHERE answered_at IS NOT NULL OR outcome IS NOT NULL) AS n, "
                    "min(started_at) AS first, max(COALESCE(answered_at, ended_at)) AS last FROM dial_attempts")).fetchone()
                if row["n"] >= jobs or time.monotonic() - started > 600:
                    break
                await asyncio.sleep(0.2)
            elapsed = time.monotonic() - started
            check = await (await conn.execute(
                """SELECT count(*) AS attempts, count(DISTINCT job_id) AS jobs, count(DISTINCT action_id) AS ids,
                          count(DISTINCT worker) AS workers, max(n) AS most FROM dial_attempts
                          JOIN (SELECT job_id AS j, count(*) AS n FROM dial_attempts GROUP BY 1) c ON c.j = job_id"""
            )).fetchone()
            outcomes = {r["outcome"] or "answered": r["n"] for r in await (await conn.execute(
                "SELECT outcome, count(*) AS n FROM dial_attempts GROUP BY 1")).fetchall()}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        stop.set()
        await settler
        await asyncio.sleep(1.0)  # late OriginateResponses
        await ami.close()
    span = (row["last"] - row["first"]).total_seconds() if row["first"] and row["last"] else elapsed
    ours = {k: v for k, v in responses.items() if k.startswith("shopcall-dial-")}
    return {"workers": workers, "done": row["n"], "seconds": span, "rate": row["n"] / span if span else 0.0,
            "attempts": check["attempts"], "jobs": check["jobs"], "action_ids": check["ids"],
            "most_per_job": check["most"], "worker_names": check["workers"], "outcomes": outcomes,
            "responses": len(ours), "double_responses": sum(1 for v in ours.values() if v > 1)}


def report(r: dict, jobs: int) -> None:
    ok = (r["attempts"] == r["jobs"] == r["action_ids"] == jobs and r["most_per_job"] == 1
          and r["double_responses"] == 0)
    print(f"  {r['workers']} worker(s): {r['done']:,} attempts in {r['seconds']:.1f} s = {r['rate']:,.0f}/s; "
          f"outcomes {r['outcomes']}; OriginateResponses {r['responses']:,}; "
          f"exactly once: {'yes' if ok else 'NO'} (attempt rows {r['attempts']:,}, jobs {r['jobs']:,}, "
          f"ActionIDs {r['action_ids']:,}, most per job {r['most_per_job']}, workers seen {r['worker_names']})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--cps", type=float, default=500.0, help="the campaign's calls per second cap")
    args = ap.parse_args()
    if not root_is_ready(DEFAULT_ROOT) or os.geteuid() != 0:
        print(f"needs root and the Asterisk root at {DEFAULT_ROOT} (scripts/build-asterisk-root.sh)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="shopcall-dialler-bench-"))
    pgdata = work / "pg"
    url = db.start_embedded(pgdata)
    asyncio.run(db.migrate_url(url))
    pbx = AsteriskPbx(DEFAULT_ROOT, work, sip_port=None, ami_port=None, dialplan=DIALPLAN)
    pbx.start()
    try:
        config = write_config(work, url, pbx)
        print(f"dialler throughput: {args.jobs:,} due jobs, cps cap {args.cps:g}, Asterisk 22 (Local channels)")
        one = asyncio.run(run(url, config, pbx, args.jobs, 1, args.cps))
        report(one, args.jobs)
        many = asyncio.run(run(url, config, pbx, args.jobs, args.workers, args.cps))
        report(many, args.jobs)
        if one["rate"]:
            print(f"  scaling {args.workers} workers / 1: {many['rate'] / one['rate']:.2f}x")
    finally:
        pbx.stop()
        db.stop_embedded(pgdata)
    return 0


if __name__ == "__main__":
    sys.exit(main())
