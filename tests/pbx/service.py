"""`shopcall serve` as a real process for end-to-end tests, and the set-up every PBX test module shares:
its config file, a clean database with the test directory loaded, the rendered dialplan include."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent.parent
DIRECTORY = REPO / "tests" / "data" / "directory.toml"
TABLES = """callback_requests, calls, orders, customers, numbers, menus, group_members, groups, employees,
            schedules, dial_jobs, events, webhook_outbox, consents, do_not_call, stock_subscriptions, scripts,
            blocked_callers"""


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Shopcall:
    """`shopcall serve --only agi` (or `--only esl` for FreeSWITCH) as its own process, so a test can kill it
    like a crash would; `port` is where that part listens."""

    def __init__(self, config: Path, log: Path, port: int, part: str = "agi") -> None:
        self.config, self.log, self.port, self.part = config, log, port, part
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "shopcall", "-c", str(self.config), *args],
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        assert out.returncode == 0, f"shopcall {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shopcall", "-c", str(self.config), "serve", "--only", self.part],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, cwd=REPO,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"shopcall serve exited:\n{self.log_tail()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"shopcall serve did not listen on {self.port}:\n{self.log_tail()}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""


def prepare_shopcall(work: Path, pg_url: str, agi_port: int, sections: str = "",
                     directories: tuple[Path, ...] = (), pbx: str = "asterisk") -> tuple[Shopcall, Path, Path]:
    """Write WORK/shopcall.toml (shop "Тест", data in WORK/shopcall, the test database, DEBUG logs, plus
    `sections`), empty the tables, load the test directory (then `directories`) and render the include for
    `pbx`. Returns the service (not started; on FreeSWITCH `--only esl`, whose port `sections` sets to
    agi_port too), the data dir and the include's path."""
    data = work / "shopcall"
    data.mkdir(exist_ok=True)
    config = work / "shopcall.toml"
    config.write_text(f"""
[shop]
name = "Тест"
timezone = "Europe/Moscow"
[paths]
data_dir = "{data}"
[database]
url = "{pg_url}"
connect_timeout = 2.0
[agi]
port = {agi_port}
[log]
level = "DEBUG"
{sections}
""", encoding="utf-8")
    app = Shopcall(config, work / "shopcall.log", agi_port, "agi" if pbx == "asterisk" else "esl")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    for directory in (DIRECTORY, *directories):
        app.cli("db", "load", str(directory))
    include = data / ("asterisk-shopcall.conf" if pbx == "asterisk" else "freeswitch-shopcall.xml")
    app.cli("render-dialplan", "--pbx", pbx, "-o", str(include))
    return app, data, include


@contextlib.contextmanager
def running(app: Shopcall, pbx) -> Iterator[None]:
    """`shopcall serve`, then the PBX (AsteriskPbx, FreeswitchPbx); both stopped after, or if the PBX fails to
    start."""
    app.start()
    try:
        pbx.start()
        yield
    finally:
        pbx.stop()
        app.stop()
