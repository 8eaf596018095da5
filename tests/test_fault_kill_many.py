"""Fault drill (issue 6): the FastAGI server is killed in the middle of 20 live calls. Every call still
reaches the default group through the dialplan fallback; when the server comes back, new calls use it,
and the fallback calls are reported to it when they hang up (each has its row).

Real SIP calls from SIPp into Debian's Asterisk 22 (its own instance, free ports), the rendered dialplan
include, `shopcall serve --only agi` as a process that gets SIGKILL, PostgreSQL.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.pbx import DEFAULT_ROOT, AsteriskPbx, require_asterisk_root
from tests.pbx.service import free_tcp_port, prepare_shopcall, running
from tests.pbx.sipp import SippAgent, free_sip_port, place_call

pytestmark = pytest.mark.slow

CALLS = 20
TALK = 8.0  # seconds an agent talks on each fallback call
# the rendered fallback's Verbose, as Asterisk logs executing it (once per channel that falls back)
FALLBACK = re.compile(r'Executing \[[^]]*@shopcall-inbound(?:-run)?:\d+\] Verbose\("(PJSIP/[^"]+)", "1,shopcall: flow')


@pytest.fixture(scope="module")
def kill_stack(pg_url: str, tmp_path_factory) -> Iterator[dict]:
    require_asterisk_root()
    work = tmp_path_factory.mktemp("fault-kill-many")
    # fallback: sales = agent1
    app, data, include = prepare_shopcall(work, pg_url, free_tcp_port(), "[inbound]\nring_timeout = 10")
    dialplan = f"""
[test-in]
exten => _X.,1,Goto(shopcall-inbound,${{EXTEN}},1)

#include "{include}"
"""
    # its own ports and RTP range, so it runs beside the other suites' Asterisk instances
    pbx = AsteriskPbx(DEFAULT_ROOT, work, sip_port=None, ami_port=None, binds=[data],
                      agents={"agent1": free_sip_port()}, dialplan=dialplan, rtp_ports=(22000, 23999))
    with running(app, pbx):
        yield {"pbx": pbx, "app": app, "url": pg_url, "work": work, "sip": f"127.0.0.1:{pbx.sip_port}"}


async def fallback_rows(url: str, callers: str, want: int, timeout: float = 30) -> list[dict]:
    """The calls rows of callers LIKE `callers` once `want` of them are there (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        while True:
            rows = conn.execute("SELECT c.*, e.endpoint AS agent, g.name AS group_name FROM calls c "
                                "LEFT JOIN employees e ON e.id = c.answered_by "
                                "LEFT JOIN groups g ON g.id = c.group_id "
                                "WHERE c.caller_number LIKE %s", (callers,)).fetchall()
            if len(rows) >= want or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(0.2)


def channels_in_agi(pbx: AsteriskPbx) -> int:
    """Callers' channels whose current application is our FastAGI (greeting, menu), not a Dial."""
    out = pbx.rx("core show channels concise")
    return sum(1 for line in out.splitlines()
               if line.startswith("PJSIP/sipp-") and line.split("!")[5:6] == ["AGI"])


def log_since(pbx: AsteriskPbx, offset: int) -> str:
    with open(pbx.full_log, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def fell_back(pbx: AsteriskPbx, offset: int) -> set[str]:
    return set(FALLBACK.findall(log_since(pbx, offset)))


def explain(stack: dict, *agents: SippAgent) -> str:
    return "\n".join(["--- shopcall log", stack["app"].log_tail(40), "--- asterisk log",
                      stack["pbx"].log_tail(60), *[a.log_tail(20) for a in agents]])


async def test_server_killed_mid_20_calls_all_reach_the_fallback_then_it_serves_again(kill_stack):
    pbx, app, work, sip = kill_stack["pbx"], kill_stack["app"], kill_stack["work"], kill_stack["sip"]
    log_start = pbx.full_log.stat().st_size
    # the agent talks long enough for the server to be back before the fallback calls end
    agent = SippAgent("agent1", pbx.agents["agent1"], work_dir=work, answer_after=0.5, hangup_after=TALK)
    await agent.start()
    try:
        # number 100: greeting + notice (~7.5 s), then the menu twice with no key (~16 s) before the flow
        # would ring anyone, so every call is still inside the AGI when all 20 have arrived
        calls = [asyncio.create_task(place_call("100", from_user=f"7495200{i:04d}", pbx=sip, work_dir=work,
                                                wait_bye=90))
                 for i in range(CALLS)]
        deadline = time.monotonic() + 60
        in_agi = 0
        while time.monotonic() < deadline and not any(c.done() for c in calls):
            in_agi = await asyncio.to_thread(channels_in_agi, pbx)
            if in_agi >= CALLS:
                break
            await asyncio.sleep(0.2)
        assert in_agi == CALLS, f"only {in_agi} of {CALLS} calls reached the AGI\n" + explain(kill_stack, agent)
        assert agent.invites_received() == 0, "a call left the menu before the kill\n" + explain(kill_stack)
        app.kill()  # SIGKILL: no goodbye on any of the 20 FastAGI sockets
        killed = time.monotonic()
        await asyncio.to_thread(app.start)  # back while the fallback calls still talk
        back_after = time.monotonic() - killed
        results = await asyncio.gather(*calls)
        # each call went on in the dialplan: SHOPCALL_DONE unset, the fallback Dial rang sales (agent1)
        failed = [(i, r.returncode, r.answered, r.hung_up_by) for i, r in enumerate(results)
                  if not (r.answered and r.hung_up_by == "pbx")]
        assert not failed, f"calls that did not end normally: {failed}\n" + explain(kill_stack, agent)
        assert await agent.wait_for("ANSWERED", CALLS, timeout=60) == CALLS, explain(kill_stack, agent)
        assert agent.invites_received() == CALLS, explain(kill_stack, agent)  # one ring per call, no more
        assert len(fell_back(pbx, log_start)) == CALLS, explain(kill_stack)
    finally:
        await agent.stop()

    # each fallback call was reported at its hangup (the rendered hangup handler) and has its row: who
    # answered, the fallback group, and why the flow stopped
    assert back_after < TALK, f"shopcall took {back_after:.1f} s to come back: the calls ended before it"
    rows = await fallback_rows(kill_stack["url"], "7495200____", CALLS)
    assert len(rows) == CALLS and len({r["uniqueid"] for r in rows}) == CALLS, explain(kill_stack)
    for r in rows:
        assert (r["outcome"], r["missed"], r["agent"], r["group_name"]) == ("answered", False, "agent1", "sales"), r
        step = r["route_log"][-1]
        assert step["step"] == "fallback" and step["dial"] == "ANSWER" and step["agistatus"], step
        assert TALK - 2 <= (r["ended_at"] - r["answered_at"]).total_seconds() <= TALK + 2, r

    # the server is back: a new call is the flow's again (key 1: sales), with its row
    log_start = pbx.full_log.stat().st_size
    agent = SippAgent("agent1", pbx.agents["agent1"], work_dir=work, answer_after=0.5, hangup_after=1.0)
    await agent.start()
    try:
        call = await place_call("100", digits="1", from_user="74952009999", pbx=sip, work_dir=work)
        assert call.answered and call.hung_up_by == "pbx", explain(kill_stack, agent) + call.log_tail
        assert agent.answered() == 1, explain(kill_stack, agent)
    finally:
        await agent.stop()
    deadline = time.monotonic() + 30
    with psycopg.connect(kill_stack["url"], autocommit=True, row_factory=dict_row) as conn:
        while True:  # the flow writes the row just after the PBX hangs up
            rows = conn.execute("SELECT c.outcome, c.menu_choice, e.endpoint AS agent FROM calls c "
                                "LEFT JOIN employees e ON e.id = c.answered_by "
                                "WHERE c.caller_number = '74952009999'").fetchall()
            if rows or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    assert rows == [{"outcome": "answered", "menu_choice": "1", "agent": "agent1"}], explain(kill_stack)
    assert not fell_back(pbx, log_start), explain(kill_stack)
