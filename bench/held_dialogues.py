"""Robot dialogues held at once by one shopcall process, and what they cost in memory.

A real `shopcall serve --only agi` process (its own config, a throw-away embedded PostgreSQL) gets N
concurrent FastAGI sessions for the `robot` flow (or `inbound`) from a load generator that speaks the
protocol as Asterisk does: the agi_* header block, `200 result=0` to ANSWER/STREAM FILE/SET VARIABLE/EXEC,
and no reply at all to the command that waits for a key (GET DATA, WAIT FOR DIGIT): a silent caller.
Once all N sessions sit in that command, the server's VmRSS is read from /proc/PID/status; then every
caller presses 2 ("call me back") and every session must end with SHOPCALL_DONE=1 and one calls row.
Number 600 has the overflow robot: with --flow inbound the greeting plays, the group's Dial returns at once
(the generator's Asterisk has no agents) and the robot's menu is where the caller is held.

Target (issue 6): 1,000 held with RSS < 150 MB.

    .venv/bin/python bench/held_dialogues.py [--sessions 1000] [--flow robot|inbound] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
from psycopg.rows import dict_row  # noqa: E402

from shopcall import db  # noqa: E402
from shopcall.loader import load, read  # noqa: E402

DIRECTORIES = [REPO / "tests" / "data" / n for n in ("directory.toml", "routing_e2e.toml")]  # 600: robot
TARGET_SESSIONS, TARGET_RSS_MB = 1000, 150.0
WAITS_FOR_KEY = (b"GET DATA", b"WAIT FOR DIGIT")


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    return int(proc_status(pid)[key].split()[0]) / 1024


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Caller:
    """One silent caller: answers every command, but not the one that waits for a key, until released."""

    i: int
    flow: str
    held: asyncio.Event = field(default_factory=asyncio.Event)
    commands: list[str] = field(default_factory=list)
    done_set: bool = False
    ended: bool = False
    error: str = ""

    def header(self) -> bytes:
        # what Asterisk sends for AGI(agi://127.0.0.1:PORT/robot?number=600)
        return (
            f"agi_network: yes\nagi_network_script: {self.flow}?number=600\n"
            f"agi_request: agi://127.0.0.1/{self.flow}?number=600\nagi_channel: PJSIP/sipp-{self.i:08x}\n"
            f"agi_language: ru\nagi_type: PJSIP\nagi_uniqueid: 1764000000.{self.i}\n"
            f"agi_version: 22.0.0\nagi_callerid: 7916{self.i:07d}\nagi_calleridname: Caller {self.i}\n"
            f"agi_callingpres: 0\nagi_dnid: 600\nagi_context: shopcall-inbound-run\nagi_extension: s\n"
            f"agi_priority: 3\nagi_enhanced: 0.0\nagi_accountcode: \nagi_threadid: {140000000 + self.i}\n\n"
        ).encode()

    async def run(self, port: int, release: asyncio.Event) -> None:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            self.error = f"connect: {exc}"
            return
        try:
            w.write(self.header())
            while line := await r.readline():
                cmd = line.strip()
                if not cmd:
                    continue
                self.commands.append(cmd.decode(errors="replace"))
                if cmd.startswith(b"SET VARIABLE SHOPCALL_DONE"):
                    self.done_set = b'"1"' in cmd
                if cmd.startswith(WAITS_FOR_KEY):
                    if not release.is_set():
                        self.held.set()
                        await release.wait()  # the caller is silent this long
                    # then presses 2: GET DATA answers with the digits, WAIT FOR DIGIT with the key's code
                    w.write(b"200 result=2\n" if cmd.startswith(b"GET DATA") else b"200 result=50\n")
                elif cmd.startswith(b"GET VARIABLE"):
                    w.write(b"200 result=0\n")  # not set
                else:
                    w.write(b"200 result=0\n")
                await w.drain()
            self.ended = True  # the server closed the session
        except OSError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            w.close()


def write_config(work: Path, data_dir: Path, url: str, port: int, hold: float) -> Path:
    config = work / "shopcall.toml"
    config.write_text(
        f"""
[shop]
name = "Bench"
[paths]
data_dir = "{data_dir}"
[database]
url = "{url}"
pool_min = 2
pool_max = 10
[agi]
port = {port}
command_timeout = 10.0
backlog = 4096
[inbound]
menu_timeout = {hold}      # the silent caller's key wait must outlast the hold
ring_timeout = 1
[log]
level = "WARNING"
""",
        encoding="utf-8",
    )
    return config


def start_server(config: Path, port: int, log: Path, timeout: float = 600) -> subprocess.Popen:
    """The real `shopcall serve --only agi`; the first start synthesises the prompts (espeak-ng)."""
    proc = subprocess.Popen([sys.executable, "-m", "shopcall", "-c", str(config), "serve", "--only", "agi"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"shopcall serve exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"shopcall serve did not listen on {port} within {timeout:.0f} s")


async def drill(pid: int, port: int, n: int, flow: str, hold_timeout: float, hold: float, ramp: int) -> dict:
    release = asyncio.Event()
    callers = [Caller(i, flow) for i in range(n)]
    tasks: list[asyncio.Task] = []
    t0 = time.perf_counter()
    for k in range(0, n, ramp):  # calls arrive in bursts of `ramp`, as a busy trunk would deliver them
        tasks += [asyncio.create_task(c.run(port, release)) for c in callers[k:k + ramp]]
        await asyncio.sleep(0.05)
    waiting = [asyncio.create_task(c.held.wait()) for c in callers]
    _, pending = await asyncio.wait(waiting, timeout=hold_timeout)
    for t in pending:
        t.cancel()
    held_after = time.perf_counter() - t0
    # the callers stay silent a while: a session that leaks or times out would show here, not only at once
    await asyncio.sleep(hold)
    held = sum(c.held.is_set() and not c.ended for c in callers)
    out = {"held": held, "held_after": held_after, "rss": rss_mb(pid), "hwm": rss_mb(pid, "VmHWM"),
           "fds": open_fds(pid)}
    t1 = time.perf_counter()
    release.set()
    _, still = await asyncio.wait(tasks, timeout=max(60.0, n / 10))
    out["release_s"] = time.perf_counter() - t1
    out["unfinished"] = len(still)
    for t in still:
        t.cancel()
    out["ended"] = sum(c.ended for c in callers)
    out["done"] = sum(c.done_set for c in callers)
    out["errors"] = [c.error for c in callers if c.error][:5]
    out["sample"] = next((c.commands for c in callers if c.ended), [])
    return out


async def count_rows(url: str, n: int, timeout: float = 30.0) -> int:
    """The flow saves the row after the session's last command: wait for the stragglers briefly."""
    deadline = time.monotonic() + timeout
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row) as conn:
        while True:
            cur = await conn.execute("SELECT count(DISTINCT uniqueid) AS n FROM calls "
                                     "WHERE uniqueid LIKE '1764000000.%'")
            rows = (await cur.fetchone())["n"]
            if rows >= n or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(0.5)


async def prepare(url: str) -> None:
    await db.migrate_url(url)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row) as conn:
        await conn.execute("TRUNCATE callback_requests, calls RESTART IDENTITY CASCADE")
        for directory in DIRECTORIES:
            await load(conn, read(directory))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=TARGET_SESSIONS)
    ap.add_argument("--flow", choices=("robot", "inbound"), default="robot")
    ap.add_argument("--hold-timeout", type=float, default=180.0, help="seconds for all sessions to be held")
    ap.add_argument("--hold", type=float, default=30.0, help="seconds all stay silent before RSS is read")
    ap.add_argument("--ramp", type=int, default=50, help="sessions opened per 50 ms burst")
    ap.add_argument("--data-dir", default="", help="keep shopcall's data (prompt cache) here between runs")
    ap.add_argument("--database-url", default=os.environ.get("SHOPCALL_BENCH_DATABASE_URL", ""))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="shopcall-held-"))
    data_dir = Path(args.data_dir) if args.data_dir else work / "data"
    url, pgdata = args.database_url, None
    if not url:
        pgdata = work / "pg" / "data"
        url = db.start_embedded(pgdata)
    proc = None
    try:
        asyncio.run(prepare(url))
        port = free_tcp_port()
        # the server's key wait (menu_timeout) outlasts the whole drill, so no session times out on its own
        config = write_config(work, data_dir, url, port, hold=args.hold_timeout + args.hold + 600)
        log = work / "shopcall.log"
        proc = start_server(config, port, log)
        time.sleep(1.0)
        idle = rss_mb(proc.pid)
        r = asyncio.run(drill(proc.pid, port, args.sessions, args.flow, args.hold_timeout, args.hold,
                            args.ramp))
        rows = asyncio.run(count_rows(url, args.sessions))
        after = rss_mb(proc.pid)
        alive = proc.poll() is None
    finally:
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if pgdata:
            db.stop_embedded(pgdata)

    n = args.sessions
    per_session = (r["rss"] - idle) * 1024 / max(1, r["held"])
    print(f"cores: {os.cpu_count()}; one `shopcall serve --only agi` process, flow {args.flow!r}")
    print(f"idle RSS                {idle:7.1f} MB")
    print(f"held at once            {r['held']:7d} / {n}  (all in the key wait {r['held_after']:.1f} s after the "
          f"first, then silent {args.hold:.0f} s)")
    print(f"RSS with all held       {r['rss']:7.1f} MB  (peak VmHWM {r['hwm']:.1f} MB, {r['fds']} fds, "
          f"~{per_session:.0f} KB per dialogue)")
    print(f"released: ended {r['ended']} / {n} in {r['release_s']:.1f} s, SHOPCALL_DONE=1 on {r['done']}, "
          f"calls rows {rows}, unfinished {r['unfinished']}; RSS after {after:.1f} MB; server alive: {alive}")
    if r["errors"]:
        print("client errors (first 5):", *r["errors"], sep="\n  ")
    ok = (r["held"] >= TARGET_SESSIONS and r["rss"] < TARGET_RSS_MB and r["ended"] == n and r["done"] == n
          and rows == n and alive)
    print(f"target: {TARGET_SESSIONS:,} held with RSS < {TARGET_RSS_MB:.0f} MB, every session ended and logged")
    print(f"{'PASS' if ok else 'MISS'}: {r['held']} held, {r['rss']:.1f} MB")
    if not ok:
        print(f"(a session's commands: {r['sample']}; server log: {log})")
    else:
        shutil.rmtree(work, ignore_errors=True)  # --data-dir, if given, lives elsewhere and is kept
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
