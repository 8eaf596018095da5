"""Fault drill (issue 6): `shopcall serve` is killed in the middle of 20 live calls. Every call still
reaches the default group through the dialplan fallback; when the server comes back, new calls use it,
and the fallback calls are reported to it when they hang up (each has its row).

Real SIP calls from SIPp into Debian's Asterisk 22 and into FreeSWITCH 1.10 (each its own instance, free
ports), the rendered dialplan, `shopcall serve --only agi` (or `--only esl`) as a process that gets
SIGKILL, PostgreSQL.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.rows import dict_row

from esl.channels import channels
from tests.pbx.sipp import SippAgent, place_call
from tests.pbx.stack import PBXES, Stack, pbx_stack

pytestmark = pytest.mark.slow

CALLS = 20
TALK = 8.0  # seconds an agent talks on each fallback call
# the rendered fallback's Verbose, as Asterisk logs executing it (once per channel that falls back)
FALLBACK = re.compile(r'Executing \[[^]]*@shopcall-inbound(?:-run)?:\d+\] Verbose\("(PJSIP/[^"]+)", "1,shopcall: flow')
# FreeSWITCH: the fallback extension's log application, each line prefixed with the channel's uuid
FS_FALLBACK = re.compile(r"^([0-9a-f-]{36}) .*\[WARNING\] mod_dptools\.c:\d+ shopcall: flow unavailable", re.M)


@pytest.fixture(scope="module", params=PBXES)
def kill_stack(request, pg_url: str, tmp_path_factory) -> Iterator[Stack]:
    # fallback: sales = agent1; its own ports and RTP range, so it runs beside the other suites' PBXes
    with pbx_stack(request.param, tmp_path_factory.mktemp(f"fault-kill-many-{request.param}"), pg_url,
                   agents=("agent1",), sections="[inbound]\nring_timeout = 10\n[callbacks]\nenabled = false\n",
                   rtp_ports=(22000, 23999), sip_debug=False) as stack:
        yield stack


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


def channels_in_flow(stack: Stack) -> int:
    """Callers' channels our flow holds (greeting, menu), not a Dial or bridge."""
    if stack.kind == "asterisk":  # the channel's current application is our FastAGI
        out = stack.pbx.rx("core show channels concise")
        return sum(1 for line in out.splitlines()
                   if line.startswith("PJSIP/sipp-") and line.split("!")[5:6] == ["AGI"])
    # the callers' answered legs (the agent's phone has rung for none of them, the test checks)
    rows = channels(stack.pbx.api("show channels as json"))
    return sum(1 for r in rows if r.get("name", "").startswith("sofia/test/7495200") and r.get("callstate") == "ACTIVE")


def log_since(stack: Stack, offset: int) -> str:
    with open(stack.pbx.full_log, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def fell_back(stack: Stack, offset: int) -> set[str]:
    """The channels that ran the rendered fallback: its Verbose (Asterisk) or log line (FreeSWITCH)."""
    found = (FALLBACK if stack.kind == "asterisk" else FS_FALLBACK).findall(log_since(stack, offset))
    return set(found)


def explain(stack: Stack, *agents: SippAgent) -> str:
    return stack.explain(*agents, lines=60)


async def test_server_killed_mid_20_calls_all_reach_the_fallback_then_it_serves_again(kill_stack):
    stack = kill_stack
    pbx, app, work, sip = stack.pbx, stack.app, stack.work, stack.sip
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
            in_agi = await asyncio.to_thread(channels_in_flow, stack)
            if in_agi >= CALLS:
                break
            await asyncio.sleep(0.2)
        assert in_agi == CALLS, f"only {in_agi} of {CALLS} calls reached our flow\n" + explain(kill_stack, agent)
        assert agent.invites_received() == 0, "a call left the menu before the kill\n" + explain(kill_stack)
        app.kill()  # SIGKILL: no goodbye on any of the 20 FastAGI (event) sockets
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
        assert len(fell_back(stack, log_start)) == CALLS, explain(kill_stack)
    finally:
        await agent.stop()

    # each fallback call was reported at its hangup (the rendered hangup handler) and has its row: who
    # answered, the fallback group, and why the flow stopped
    assert back_after < TALK, f"shopcall took {back_after:.1f} s to come back: the calls ended before it"
    rows = await fallback_rows(stack.url, "7495200____", CALLS)
    assert len(rows) == CALLS and len({r["uniqueid"] for r in rows}) == CALLS, explain(kill_stack)
    for r in rows:
        assert (r["outcome"], r["missed"], r["agent"], r["group_name"]) == ("answered", False, "agent1", "sales"), r
        step = r["route_log"][-1]
        # the PBX's own word for an answered ring; Asterisk also says why the AGI stopped (AGISTATUS)
        if stack.kind == "asterisk":
            assert step["step"] == "fallback" and step["dial"] == "ANSWER" and step["agistatus"], step
        else:
            assert step["step"] == "fallback" and step["dial"] == "SUCCESS", step
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
    with psycopg.connect(stack.url, autocommit=True, row_factory=dict_row) as conn:
        while True:  # the flow writes the row just after the PBX hangs up
            rows = conn.execute("SELECT c.outcome, c.menu_choice, e.endpoint AS agent FROM calls c "
                                "LEFT JOIN employees e ON e.id = c.answered_by "
                                "WHERE c.caller_number = '74952009999'").fetchall()
            if rows or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    assert rows == [{"outcome": "answered", "menu_choice": "1", "agent": "agent1"}], explain(kill_stack)
    assert not fell_back(stack, log_start), explain(kill_stack)
