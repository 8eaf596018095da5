"""SIPp calls per second through a real PBX: routing by our flow against plain dialplan, on Asterisk
(FastAGI) or FreeSWITCH (the outbound event socket).

Both contexts run in one Asterisk 22 (the test harness's chroot), side by side at each rate, with the same
caller (SIPp UAC, hangs up when the PBX does), the same agent (one SIPp UAS: answers after 0.2 s, hangs
up after 0.5 s) and the same prompts:

  (a) shopcall: `Goto(shopcall-inbound,710,1)` → the rendered include → AGI(inbound) on a real
      `shopcall serve --only agi` (number 710: greeting, office hours, group sales, "connecting", Dial,
      a calls row per call; recording off so both sides do the same media work)
  (b) plain: Answer, Playback(greeting), Playback(connecting), Dial(PJSIP/agent1)

At each offered rate N = rate × --seconds calls are placed; a side's figure is the rate it sustained: 99 %
of its calls over the time they took to complete, less one call's own length (~6 s, the same on both
sides; read from SIPp's once-a-second statistics). Any failed call fails the rate. The sweep stops at the
first rate where the plain dialplan loses calls or falls below 90 % of the offered rate: where Asterisk
itself saturates here.
Target (issue 6): ratio ≥ 0.9 there, read as the capacity ratio (the best rate each side sustained in the
sweep; see the end of main for why). CPU seconds per call of every process are printed beside it.

    .venv/bin/python bench/e2e_ratio.py [--pbx asterisk] [--rates 20,40,60,80,100,120] [--seconds 10] [--repeat 3]
                                        [--pin] [--stub]
    (root: the chroot)

--repeat N runs each side N times at each rate, taking turns, and reads each side's best run, so a slow
minute of the shared machine hits every side. (Until stop 24 a run also fell off a "cliff" by chance: the
test agent's SIPp aborted calls on an INVITE Asterisk retransmitted when busy, and each such call stayed
up until the caller's 60 s BYE timeout, so one run per side read as a ratio anywhere from 0.2 to 5. The
agent now absorbs those; the sweep prints any call SIPp still aborts.)

--stub adds a third side: the same call through bench/agi_stub.py, a FastAGI server in its own process
that sends our commands with no logic and no database, behind the include's three priorities. Its ratio
is the most any FastAGI server could reach here, so it tells what of shopcall's gap is the protocol's.

--pin gives Asterisk a core of its own and puts everything else on the others: then "where Asterisk itself
saturates" is Asterisk's own limit, and the ratio is what our AGI costs Asterisk, not what our process and
PostgreSQL take from a core Asterisk would otherwise have (in production they may well be on another host).

--pbx freeswitch runs the same sweep through FreeSWITCH 1.10 (/opt/freeswitch, configured from scratch by
tests/pbx/freeswitch.py; no root needed), the call being number 711 (bench/pbx_service.py), which has a menu:

  (a) shopcall: the trunk's extension of the rendered XML's instructions (`transfer 711 XML shopcall`) →
      the rendered extension → `socket ... async full` to a real `shopcall serve --only esl`: answer,
      greeting, play_and_get_digits (menu "bench": 1 s, nothing pressed, default 1 = sales), "connecting",
      call_timeout set on the channel, bridge to agent1, a calls row; recording off
  (b) plain XML: answer, playback greeting, the same play_and_get_digits (same prompt, timeout and
      arguments), playback connecting, ringback and call_timeout set, bridge user/agent1, hangup
  (c) --stub: the rendered extension once more (context benchstub) with its socket on bench/esl_stub.py, a
      minimal outbound-socket server in its own process sending the applications `shopcall serve` sends
      on that path, one at a time, with no logic and no database

The same SIPp caller (presses nothing) and agent, the same reading of the runs; --pin puts FreeSWITCH
alone on core 0 (its threads are pinned again at each rate: those it starts later inherit their creator's
core anyway). The call lasts ~13.5 s (its prompts are ~11 s; menu_call_seconds), so --seconds defaults to 30
there: a run of 10 s would end before the rate's full number of calls is up at once, and FreeSWITCH could
look unsaturated at a rate it cannot hold. The shopcall side's calls also take ~0.3 s longer than plain
XML's (each application sent over the socket starts at the channel's next 20 ms frame, ~13 of them), which
a short run reads as a lower sustained rate even far below saturation.

CPU per call is printed per process kind (freeswitch, shopcall, postgres, sipp: the agent's SIPp; the
callers' SIPp exit before the run's CPU is read, as on Asterisk). On either PBX only the bench's own
processes and its PostgreSQL are counted and pinned (procstat.only_under): other sessions' PBXes, SIPp and
PostgreSQL on the machine are neither counted nor moved.

    .venv/bin/python bench/e2e_ratio.py --pbx freeswitch [--rates ...] [--seconds 30] [--repeat 3] [--pin] [--stub]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from bench import procstat  # noqa: E402
from bench.pbx_service import (  # noqa: E402
    MENU_NUMBER,
    MENU_TIMEOUT,
    NUMBER,
    Service,
    postmaster_pid,
    root_missing,
    shopcall_service,
)
from shopcall import dialplan  # noqa: E402
from shopcall.config import load_config  # noqa: E402
from shopcall.prompts import sound_seconds  # noqa: E402
from tests.pbx import DEFAULT_ROOT, AsteriskPbx  # noqa: E402
from tests.pbx.freeswitch import FreeswitchPbx  # noqa: E402
from tests.pbx.service import free_tcp_port  # noqa: E402
from tests.pbx.sipp import SIPP, SippAgent, free_media_port, free_sip_port, render_caller_scenario  # noqa: E402

TARGET_RATIO = 0.9
PBX_CORE = {0}  # --pin: the PBX's core, either PBX
RTP_PORTS = (24000, 29999)  # the PBX's: below SIPp's 30000-39999 and the harness's other instances' ranges


@dataclass(frozen=True)
class Pbx:
    """What the sweep and its lines say of the PBX under test."""

    kind: str  # procstat's kind of its process
    title: str
    number: str  # the shopcall side's number; plain<number> and stub<number> the other sides'
    call_seconds: float  # a call's own length (prompts, menu wait, ringing, talk) when nothing is behind
    stub: str  # the stub side's server


ASTERISK = Pbx("asterisk", "Asterisk 22", NUMBER, 6.5, "FastAGI")
FREESWITCH = Pbx("freeswitch", "FreeSWITCH 1.10", MENU_NUMBER, 13.5, "outbound socket")  # see menu_call_seconds


def menu_call_seconds(sounds: Path) -> float:
    """Number 711's call length with nothing behind: its three prompts (~11 s), the menu's wait and its
    250 ms of silence after it, ringing and talk (0.7 s), and 0.6 s of set-up as on Asterisk (6.5 s there
    for greeting and "connecting")."""
    prompts = sum(sound_seconds(sounds / name) for name in ("greeting", "main_menu", "connecting"))
    return prompts + MENU_TIMEOUT + 0.25 + 0.7 + 0.6


SHARE = 0.99  # a run's pace is read at the moment this share of its calls had completed


@dataclass
class Run:
    ok: int
    failed: int
    wall: float
    cpu: dict[str, float]  # CPU seconds by process kind (asterisk, shopcall, postgres, sipp) during the run
    t_share: float  # seconds from the start until SHARE of the calls had completed successfully
    calls: int = -1  # with --repeat, the completed calls of all this side's runs at the rate (else ok)
    failed_all: int = -1

    def __post_init__(self) -> None:
        self.calls = self.ok if self.calls < 0 else self.calls
        self.failed_all = self.failed if self.failed_all < 0 else self.failed_all

    def cpu_per_call(self) -> str:
        n = max(self.calls, 1)
        return " ".join(f"{k} {1000 * v / n:.1f}" for k, v in self.cpu.items() if v > 0.005) + " ms/call"

    def sustained(self, length: float, n: int) -> float:
        """Calls started per second the PBX kept up with: SHARE of the calls over the time they took to
        complete, less one call's own length. Read at SHARE rather than at the last call: a handful of calls
        can still wait out SIPp's 60 s BYE timeout (a message the PBX dropped when overloaded), and the
        last call's time would then say nothing about the other 99 %."""
        return SHARE * n / max(self.t_share - length, 1e-9)


def saturated(run: Run, n: int, rate: int, length: float = ASTERISK.call_seconds) -> bool:
    """Calls lost, or SHARE of them finished well behind the offered rate (`length`: a call's own length,
    prompts and talk; 6.5 s on Asterisk)."""
    return run.failed > 0 or run.ok < n or run.t_share > 1.1 * (SHARE * n / rate + length)


def sipp_stats(path: Path) -> list[dict[str, str]]:
    """The lines of SIPp's -trace_stat CSV (one a second with -fd 1), by column name."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    head = lines[0].split(";")
    return [dict(zip(head, line.split(";"), strict=False)) for line in lines[1:]]


def _epoch(stamp: str) -> float:
    """SIPp's time columns read "date<TAB>time<TAB>epoch seconds"."""
    return float(stamp.split()[-1])


def time_to_share(stats: list[dict[str, str]], n: int, wall: float) -> float:
    """When SHARE of n calls had completed successfully, interpolated between the once-a-second lines."""
    want = SHARE * n
    t0, done0 = 0.0, 0
    for row in stats:
        t = _epoch(row["CurrentTime"]) - _epoch(row["StartTime"])
        done = int(row.get("SuccessfulCall(C)", 0) or 0)
        if done >= want:
            return t0 + (t - t0) * (want - done0) / max(done - done0, 1)
        t0, done0 = t, done
    return wall


async def run_calls(sip: str, context_exten: str, work: Path, n: int, rate: int, tag: str) -> Run:
    scenario = work / f"caller-{tag}.xml"
    scenario.write_text(render_caller_scenario(
        from_user="79160001122", display_name=None, digits="", digit_delay=0, digit_gap=0,
        pai_display_name=None, extra_headers={}, wait_bye=60), encoding="utf-8")
    stats = work / f"caller-{tag}.csv"
    proc = await asyncio.create_subprocess_exec(
        SIPP, sip, "-sf", str(scenario), "-s", context_exten, "-i", "127.0.0.1", "-p", str(free_sip_port()),
        "-mp", str(free_media_port()), "-m", str(n), "-r", str(rate), "-l", str(n), "-nostdin", "-aa",
        "-trace_stat", "-stf", str(stats), "-fd", "1",
        "-trace_err", "-error_file", str(work / f"caller-{tag}_errors.log"),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    t0 = time.perf_counter()
    cpu0 = procstat.snapshot()
    try:
        await asyncio.wait_for(proc.wait(), n / rate + 180)  # bounded: a stuck run is killed
    except TimeoutError:
        proc.kill()
        await proc.wait()
    wall = time.perf_counter() - t0
    cpu = procstat.used(cpu0, procstat.snapshot())
    lines = sipp_stats(stats)
    last = lines[-1] if lines else {}
    return Run(int(last.get("SuccessfulCall(C)", 0)), int(last.get("FailedCall(C)", 0)), wall, cpu,
               time_to_share(lines, n, wall))


def count_rows(url: str, since_id: int, number: str = NUMBER) -> tuple[int, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        n, top = conn.execute("SELECT count(DISTINCT uniqueid), coalesce(max(id), 0) FROM calls "
                              "WHERE dialled_number = %s AND id > %s", (number, since_id)).fetchone()
    return n, top


def best_of(runs: list[Run], n: int) -> Run:
    """The run of a side that did best at one rate (fewest lost, then soonest to SHARE), carrying the CPU
    and calls of all its runs so CPU per call is still an average: one slow run says little of what the
    PBX sustains, the best of several does."""
    best = min(runs, key=lambda r: (r.failed > 0 or r.ok < n, r.t_share))
    cpu: dict[str, float] = {}
    for r in runs:
        for k, v in r.cpu.items():
            cpu[k] = cpu.get(k, 0.0) + v
    return Run(best.ok, best.failed, best.wall, cpu, best.t_share, calls=sum(r.ok for r in runs),
               failed_all=sum(r.failed for r in runs))


async def sweep(pbx: AsteriskPbx | FreeswitchPbx, work: Path, url: str, rates: list[int], seconds: float,
                stub: bool = False, repeat: int = 1, kind: Pbx = ASTERISK,
                pin: set[int] | None = None) -> tuple[list[tuple], int]:
    sip = f"127.0.0.1:{pbx.sip_port}"
    number = kind.number
    agent = SippAgent("agent1", pbx.agents["agent1"], work_dir=work, answer_after=0.2, hangup_after=0.5)
    await agent.start()
    out: list[tuple] = []
    last_id = 0
    length = 0.0
    sides = [("plain", f"plain{number}"), ("agi", number)] + ([("stub", f"stub{number}")] if stub else [])
    try:
        for rate in rates:
            n = max(10, int(rate * seconds))
            runs: dict[str, list[Run]] = {side: [] for side, _ in sides}
            aborted0 = agent.aborted()
            if pin:  # threads the PBX started since (FreeSWITCH's per-call threads inherit their creator's)
                procstat.pin(kind.kind, pin)
            for round_ in range(repeat):  # the sides take turns, so a slow minute of the machine hits each
                for side, exten in sides:
                    runs[side].append(await run_calls(sip, exten, work, n, rate, f"{side}-{rate}-{round_}"))
                    await asyncio.sleep(3)  # the previous run's last channels go away before the next starts
            plain, ours = best_of(runs["plain"], n), best_of(runs["agi"], n)
            bare = best_of(runs["stub"], n) if stub else None
            deadline = time.monotonic() + 30
            while True:  # rows are written just after each call's hangup
                rows, top = count_rows(url, last_id, number)
                if rows >= ours.calls or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            last_id = top
            out.append((rate, n, plain, ours, rows, length, bare))
            # a call's own length (prompts, ringing, talk): what the first run took beyond the offer, read
            # from the side that kept up (one side of the first run may already be past the cliff)
            length = length if out[1:] else max(0.0, min(plain.t_share, ours.t_share) - SHARE * n / rate)
            out[-1] = (*out[-1][:5], length, bare)
            ps, os_ = plain.sustained(length, n), ours.sustained(length, n)
            best = f"best of {repeat}: " if repeat > 1 else ""
            print(f"{rate:4d}/s {n:5d} calls | {best}plain {plain.ok:5d} ok {plain.failed:4d} failed, 99 % in "
                  f"{plain.t_share:5.1f} s, all in {plain.wall:5.1f} s: sustained {ps:5.1f}/s | shopcall "
                  f"{ours.ok:5d} ok {ours.failed:4d} failed, 99 % in {ours.t_share:5.1f} s, all in "
                  f"{ours.wall:5.1f} s: sustained {os_:5.1f}/s, {rows} rows | ratio {os_ / max(ps, 1e-9):.2f}",
                  flush=True)
            if bare is not None:
                bs = bare.sustained(length, n)
                print(f"        stub {kind.stub} (no logic, no database): {bare.ok:5d} ok {bare.failed:4d} failed, 99 % in "
                      f"{bare.t_share:5.1f} s: sustained {bs:5.1f}/s | ratio {bs / max(ps, 1e-9):.2f}", flush=True)
            if repeat > 1:
                print("        every run's 99 % time: " + " | ".join(
                    f"{side} " + " ".join(f"{r.t_share:.1f}" for r in rs) for side, rs in runs.items()), flush=True)
            print(f"        CPU per call: plain {plain.cpu_per_call()} | shopcall {ours.cpu_per_call()}"
                  + (f" | stub {bare.cpu_per_call()}" if bare is not None else ""), flush=True)
            if n_aborted := agent.aborted() - aborted0:
                print(f"        the agent's SIPp aborted {n_aborted} calls at this rate (a harness fault: each "
                      "such call stays up until the caller's 60 s BYE timeout)", flush=True)
            if saturated(plain, n, rate, kind.call_seconds):
                if not out[1:]:
                    print(f"the first rate, {rate}/s, is already past saturation: no call length to read and "
                          "nothing to compare; start the sweep lower")
                break  # the PBX itself saturates here
    finally:
        await agent.stop()
    return out, agent.aborted()  # its error log outlives it: every call SIPp gave up on, all rates


@contextlib.contextmanager
def stub_server(*argv: str) -> Iterator[int]:
    """A stub server (bench/agi_stub.py, bench/esl_stub.py) in its own process; yields its port."""
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True)
    try:
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def asterisk_bench(stub: bool) -> Iterator[tuple[AsteriskPbx, Service]]:
    """shopcall serve --only agi, and Asterisk with the plain, shopcall (and stub) extensions, started."""
    with shopcall_service("shopcall-e2e-ratio-", sections="[inbound]\nring_timeout = 20") as svc, \
            contextlib.ExitStack() as stack:
        work = svc.work
        sounds = svc.data / "sounds" / "ru"  # serve built them before it listened
        stub_plan = ""
        if stub:
            stub_port = stack.enter_context(stub_server(str(REPO / "bench" / "agi_stub.py"), str(sounds)))
            # the include's three priorities on the normal path, around the stub instead of shopcall
            stub_plan = (f"exten => stub{NUMBER},1,Set(SHOPCALL_DONE=)\n"
                         f" same => n,AGI(agi://127.0.0.1:{stub_port}/inbound?number=${{URIENCODE({NUMBER})}})\n"
                         f' same => n,ExecIf($["${{SHOPCALL_DONE}}" = "1"]?Hangup())\n same => n,Hangup()\n')
        plan = f"""
[test-in]
exten => {NUMBER},1,Goto(shopcall-inbound,${{EXTEN}},1)
; the same call with the routing in plain dialplan: the group is written here, nothing is looked up
exten => plain{NUMBER},1,Answer()
 same => n,Playback({sounds}/greeting)
 same => n,Playback({sounds}/connecting)
 same => n,Dial(PJSIP/agent1,20)
 same => n,Hangup()
{stub_plan}
#include "{svc.include}"
"""
        pbx = AsteriskPbx(DEFAULT_ROOT, work, sip_port=None, ami_port=None, binds=[svc.data],
                          agents={"agent1": free_sip_port()}, dialplan=plan, rtp_ports=RTP_PORTS)
        pbx.start()
        try:
            yield pbx, svc
        finally:
            pbx.stop()


def ring_seconds(url: str) -> int:
    """Group sales' ring timeout: the call_timeout our flow sets before its bridge."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT ring_timeout FROM groups WHERE name = 'sales'").fetchone()[0]


@contextlib.contextmanager
def freeswitch_bench(stub: bool) -> Iterator[tuple[FreeswitchPbx, Service]]:
    """shopcall serve --only esl, and FreeSWITCH with the plain, shopcall (and stub) extensions, started."""
    esl_port, password, context = free_tcp_port(), "shopcall-bench-esl", "shopcall"
    # the callback worker stays off, as on Asterisk (no AMI there): the sides differ by the calls' path only
    sections = f"""[inbound]
ring_timeout = 20
[freeswitch]
esl_port = {esl_port}
esl_password = "{password}"
context = "{context}"
[callbacks]
enabled = false
"""
    with shopcall_service("shopcall-e2e-ratio-fs-", sections=sections, pbx="freeswitch") as svc, \
            contextlib.ExitStack() as stack:
        sounds = svc.data / "sounds" / "ru"  # serve built them before it listened
        ring = ring_seconds(svc.url)
        menu_ms = max(1000, int(MENU_TIMEOUT * 1000))  # as esl/call.py's collect
        includes = [svc.include]
        n = MENU_NUMBER
        stub_plan = ""
        if stub:
            port = stack.enter_context(stub_server(str(REPO / "bench" / "esl_stub.py"), str(sounds), str(menu_ms),
                                                   str(ring)))
            # the rendered XML once more, its socket on the stub: the same extensions around another server
            config = load_config(svc.config)
            config = dataclasses.replace(config, freeswitch=dataclasses.replace(
                config.freeswitch, context="benchstub", socket_port=port))
            path = svc.data / "freeswitch-stub.xml"
            path.write_text(dialplan.render(config, "freeswitch", ["agent1"], str(path)), encoding="utf-8")
            includes.append(path)
            stub_plan = f"""
  <extension name="stub">
    <condition field="destination_number" expression="^stub({n})$">
      <action application="transfer" data="$1 XML benchstub"/>
    </condition>
  </extension>"""
        plan = f"""
<context name="public">
  <!-- the trunk's extension the rendered XML asks for, for the one number -->
  <extension name="shopcall">
    <condition field="destination_number" expression="^({n})$">
      <action application="transfer" data="$1 XML {context}"/>
    </condition>
  </extension>{stub_plan}
  <!-- the same call in plain XML: the menu's one option and its default are both sales, nothing is looked up -->
  <extension name="plain">
    <condition field="destination_number" expression="^plain{n}$">
      <action application="answer"/>
      <action application="playback" data="{sounds}/greeting.wav"/>
      <action application="play_and_get_digits" data="1 1 1 {menu_ms} # {sounds}/main_menu.wav silence_stream://250 menu_choice ^[0-9*]+$ {menu_ms}"/>
      <action application="playback" data="{sounds}/connecting.wav"/>
      <action application="set" data="ringback=%(1000,4000,425)"/>
      <action application="set" data="call_timeout={ring}"/>
      <action application="bridge" data="user/agent1"/>
      <action application="hangup"/>
    </condition>
  </extension>
</context>
"""
        pbx = FreeswitchPbx(svc.work, esl_port=esl_port, esl_password=password, agents={"agent1": free_sip_port()},
                            context="public", dialplan=plan, includes=includes, rtp_ports=RTP_PORTS)
        pbx.start()
        try:
            yield pbx, svc
        finally:
            pbx.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pbx", choices=("asterisk", "freeswitch"), default="asterisk",
                    help="the PBX: Asterisk 22 (FastAGI, number 710) or FreeSWITCH 1.10 (outbound socket, 711)")
    ap.add_argument("--rates", default=None,
                    help="offered calls/s, ascending (default 20,40,60,80,100,120; 6,9,12,15,18,21,24 on "
                         "FreeSWITCH, whose longer call costs it ~2.5 times Asterisk's CPU in the smoke runs)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="seconds of calls at each rate (default 10; 30 on FreeSWITCH, whose call lasts ~13.5 s: "
                         "a run must outlast several calls to hold the rate's full number of calls at once)")
    ap.add_argument("--stub", action="store_true",
                    help="a third side: the same call through a stub server with no logic and no database "
                         "(bench/agi_stub.py, bench/esl_stub.py), what any FastAGI / outbound-socket server "
                         "costs here")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each side at each rate, taking turns; a side's figure is its best run "
                         "(a slow minute of the shared machine hits one run, not all)")
    ap.add_argument("--pin", action="store_true",
                    help="the PBX alone on core 0; SIPp, shopcall and PostgreSQL on the other cores (needs 2+)")
    args = ap.parse_args()
    kind = FREESWITCH if args.pbx == "freeswitch" else ASTERISK
    rates = [int(r) for r in (args.rates or ("6,9,12,15,18,21,24" if kind is FREESWITCH else
                                             "20,40,60,80,100,120")).split(",")]
    seconds = args.seconds or (30.0 if kind is FREESWITCH else 10.0)
    if why := root_missing(args.pbx):
        print(why)
        return 2
    pinned = args.pin and (os.cpu_count() or 1) >= 2
    if pinned:  # before anything starts, so every process this bench starts inherits the other cores
        procstat.run_off(PBX_CORE)
    results: list[tuple] = []
    aborted = 0
    bench = freeswitch_bench(args.stub) if kind is FREESWITCH else asterisk_bench(args.stub)
    with bench as (pbx, svc):
        work = svc.work
        if kind is FREESWITCH:
            kind = dataclasses.replace(kind, call_seconds=menu_call_seconds(svc.data / "sounds" / "ru"))
        procstat.only_under(os.getpid(), postmaster_pid(svc.pgdata))  # our processes, not other sessions'
        if pinned:
            threads = procstat.pin(kind.kind, PBX_CORE)
            print(f"cores: {os.cpu_count()}; {kind.title} alone on core 0 ({threads} threads moved), "
                  "shopcall serve, PostgreSQL and SIPp on the others")
        else:
            print(f"cores: {os.cpu_count()}; {kind.title}, shopcall serve, PostgreSQL and SIPp on the same machine")
        results, aborted = asyncio.run(sweep(pbx, work, svc.url, rates, seconds, stub=args.stub,
                                             repeat=max(1, args.repeat), kind=kind,
                                             pin=PBX_CORE if pinned else None))
    if not results:
        return 1
    rate, n, plain = results[-1][:3]
    best = {}
    sides = (("plain", 2), ("shopcall", 3)) + ((("stub", 6),) if args.stub else ())
    for name, k in sides:  # where each side stopped keeping up with the offer
        best[name] = max(r[k].sustained(r[5], r[1]) for r in results)
        print(f"highest sustained rate, {name}: {best[name]:.1f} calls/s")
    if args.stub:
        print(f"capacity ratio of the stub {kind.stub} server (no logic, no database): "
              f"{best['stub'] / max(best['plain'], 1e-9):.2f}")
    # Past saturation the pace of either side swings from run to run, so the ratio at that one rate says
    # little. The figure is the capacity ratio: the best rate each side sustained anywhere in the sweep.
    ratio = best["shopcall"] / max(best["plain"], 1e-9)
    cpu = {name: sum(sum(r[k].cpu.values()) for r in results) / max(sum(r[k].calls for r in results), 1)
           for name, k in sides}
    print(f"CPU per call, all processes: plain {1000 * cpu['plain']:.1f} ms, shopcall {1000 * cpu['shopcall']:.1f}"
          f" ms: where every process shares the cores, a CPU-bound capacity ratio of "
          f"{cpu['plain'] / max(cpu['shopcall'], 1e-9):.2f}")
    if args.stub:
        print(f"CPU per call, all processes, stub: {1000 * cpu['stub']:.1f} ms, a CPU-bound ratio of "
              f"{cpu['plain'] / max(cpu['stub'], 1e-9):.2f}")
    reached = saturated(plain, n, rate, kind.call_seconds)
    print(f"target: capacity ratio >= {TARGET_RATIO} once {kind.title.split()[0]} saturates "
          f"({'reached' if reached else 'not reached, highest rate tried'}: {rate}/s)")
    all_rows = all(r[4] == r[3].calls for r in results)  # every call we completed has its row
    ok = ratio >= TARGET_RATIO and all_rows
    if len(results) == 1 and reached:
        verdict = "INCONCLUSIVE (lower the first of --rates)"
    else:
        verdict = ("PASS" if ok else "MISS") if reached else "INCONCLUSIVE (raise --rates)"
    print(f"{verdict}: capacity ratio {ratio:.2f}, {sum(r[3].failed_all for r in results)} of our calls failed, "
          f"rows {'= calls' if all_rows else '!= calls'} at every rate, {aborted} agent calls aborted by SIPp "
          f"(work dir {work})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
