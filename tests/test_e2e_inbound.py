"""End to end: real SIP calls from SIPp into Debian's Asterisk 22 and into FreeSWITCH 1.10 (every test runs
on both), through the rendered dialplan, to `shopcall serve` (a real process: FastAGI, or the event socket
server) and PostgreSQL; agents are SIPp UAS phones that answer or not.
"""

from __future__ import annotations

import asyncio
import email.header
import hashlib
import hmac
import http.server
import json
import os
import threading
import time
import wave
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import quote as urlquote
from zoneinfo import ZoneInfo

import aiohttp
import psycopg
import pytest
from psycopg.rows import dict_row

from shopcall.api import LivePhones, start_api
from shopcall.cli import _live_view
from shopcall.config import ApiConfig
from shopcall.db import open_pool, stop_embedded
from tests.pbx.service import REPO, free_tcp_port
from tests.pbx.sipp import SippAgent, place_call
from tests.pbx.stack import PBXES, Stack, pbx_stack

pytestmark = pytest.mark.slow

AGENTS = ("agent1", "agent2", "agent3", "agent4")
CRM_SECRET = "crm-secret"


class Crm:
    """The shop's CRM endpoint for finished calls and ringing phones (a screen pop): a stdlib HTTP server
    in a thread, answering 200."""

    def __init__(self) -> None:
        posts = self.posts = []  # (headers, body bytes, when it arrived)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                posts.append((dict(self.headers), raw, time.time()))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/calls"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def call(self, uniqueid: str, timeout: float = 10.0, event: str = "call_ended") -> list[dict]:
        """The signed bodies of `event` posted for one call, once at least one has arrived (with the time
        each arrived as "_received")."""
        deadline = time.monotonic() + timeout
        while True:
            found = []
            for headers, raw, at in list(self.posts):
                body = json.loads(raw)
                if body["uniqueid"] == uniqueid and body["event"] == event:
                    want = "sha256=" + hmac.new(CRM_SECRET.encode(), raw, hashlib.sha256).hexdigest()
                    assert headers["X-Shopcall-Signature"] == want
                    found.append({**body, "_received": at})
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module", params=PBXES)
def stack(request, pg_url: str, tmp_path_factory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp(f"e2e-{request.param}")
    smtp_port = free_tcp_port()
    crm = Crm()  # a real HTTP server receives every finished call (webhooks.calls_url)
    # a real SMTP server receives the voicemail notices
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message as _Message

    class Inbox(_Message):
        def __init__(self) -> None:
            super().__init__()
            self.messages: list = []

        def handle_message(self, message) -> None:
            self.messages.append(message)

    inbox = Inbox()
    smtp = Controller(inbox, hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    try:
        with pbx_stack(request.param, work, pg_url, agents=AGENTS, directories=(REPO / "tests" / "data" / "routing_e2e.toml",),
                       sections=f"""
[inbound]
ring_timeout = 6
[callbacks]
enabled = false                # missed calls leave requests; nobody is to call them back here
[webhooks]
calls_url = "{crm.url}"
ringing_url = "{crm.url}"
secret = "{CRM_SECRET}"
poll_seconds = 0.2
[mail]
smtp_port = {smtp_port}
retry_seconds = 1
[voicemail]
min_seconds = 1.0
""") as s:
            s.inbox, s.crm = inbox, crm
            yield s
    finally:
        smtp.stop()
        crm.close()


@pytest.fixture
def db(stack) -> Iterator[psycopg.Connection]:
    with psycopg.connect(stack.url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("TRUNCATE callback_requests, calls, voicemails, outbox RESTART IDENTITY CASCADE")
        yield conn


@pytest.fixture
async def agents(stack):
    """Start SIPp phones for agents: await agents(agent1=dict(answer_after=1, hangup_after=2), ...)."""
    started: list[SippAgent] = []

    async def start(**behaviour: dict) -> dict[str, SippAgent]:
        out = {}
        for name, kw in behaviour.items():
            agent = SippAgent(name, stack.pbx.agents[name], work_dir=stack.work, **kw)
            await agent.start()
            started.append(agent)
            out[name] = agent
        return out

    yield start
    for agent in started:
        await agent.stop()


def wait_row(db: psycopg.Connection, count: int = 1, timeout: float = 10.0) -> list[dict]:
    """The flow writes the row after the PBX hangs up on the caller: wait for it briefly."""
    deadline = time.monotonic() + timeout
    while True:
        rows = db.execute(
            "SELECT c.*, e.endpoint AS agent, g.name AS group_name FROM calls c "
            "LEFT JOIN employees e ON e.id = c.answered_by LEFT JOIN groups g ON g.id = c.group_id "
            "ORDER BY c.id").fetchall()
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def recorded_seconds(path: Path, timeout: float = 10.0) -> float:
    """MixMonitor completes the WAV header when it lets go of the file, just after the hangup."""
    deadline = time.monotonic() + timeout
    while True:
        with wave.open(str(path)) as w:
            seconds = w.getnframes() / w.getframerate()
        if seconds > 0 or time.monotonic() > deadline:
            return seconds
        time.sleep(0.2)


def explain(stack: Stack, *agents: SippAgent) -> str:
    return stack.explain(*agents)


async def test_key_2_rings_the_whole_delivery_group_and_logs_who_answered(stack, db, agents):
    a = await agents(agent2=dict(answer_after=1.0, hangup_after=2.5, says="Hello, delivery department."),
                     agent3=dict(answer_after=None))
    call = await place_call("100", digits="2", pbx=stack.sip, work_dir=stack.work)
    assert call.answered and call.hung_up_by == "pbx", explain(stack, *a.values()) + call.log_tail
    await a["agent3"].wait_for("CANCELLED")
    assert (a["agent2"].invites_received(), a["agent2"].answered()) == (1, 1)
    assert (a["agent3"].invites_received(), a["agent3"].cancelled()) == (1, 1)  # rang at the same time, lost
    [row] = wait_row(db)
    assert (row["outcome"], row["missed"], row["agent"], row["group_name"], row["menu_choice"]) == (
        "answered", False, "agent2", "delivery", "2"), explain(stack)
    assert row["caller_e164"] == "+79161234567" and row["dialled_number"] == "100"
    assert row["answered_at"] and row["ended_at"] > row["answered_at"]
    # agents record "always" by default: MixMonitor wrote the bridged conversation where the row says
    recorded = Path(row["recording_path"])
    assert recorded.is_relative_to(stack.work / "shopcall" / "recordings"), row["recording_path"]
    assert recorded_seconds(recorded) > 1.0  # the agent's greeting, 2.5 s of conversation
    # the shop's CRM was told, with Asterisk's uniqueid and the agent who answered
    [crm] = stack.crm.call(row["uniqueid"])
    assert (crm["call_id"], crm["outcome"], crm["agent_endpoint"], crm["group"], crm["caller_e164"]) == (
        row["id"], "answered", "agent2", "delivery", "+79161234567"), explain(stack)
    assert crm["talk_seconds"] >= 2 and crm["recording_path"] == row["recording_path"]
    # counted from agent2's answer (the include's answered routine), not from the greeting's
    assert crm["talk_seconds"] < 4.5 and crm["wait_seconds"] >= 1.0, crm
    # while the phones rang, the CRM was told whose they were (its screen pop), before the call ended
    [pop] = stack.crm.call(row["uniqueid"], event="call_ringing")
    assert ([a["endpoint"] for a in pop["agents"]], pop["group"], pop["reason"], pop["caller_e164"]) == (
        ["agent2", "agent3"], "delivery", "menu", "+79161234567")
    assert pop["_received"] < row["ended_at"].timestamp()
    # ... and fetches the recording MixMonitor wrote through the API's link
    assert crm["recording_url"] == f"/api/v1/calls/{row['id']}/recording"
    config = stack.config(api=ApiConfig(port=0, tokens=("e2e-token",)))
    async with open_pool(stack.url, min_size=1, max_size=2) as pool:
        api = await start_api(config, pool)
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{api.port}") as client:
                resp = await client.get(crm["recording_url"], headers={"Authorization": "Bearer e2e-token"})
                assert resp.status == 200 and resp.headers["Content-Type"] == "audio/wav"
                assert await resp.read() == recorded.read_bytes()
        finally:
            await api.stop()


async def test_no_input_goes_to_sales(stack, db, agents):
    a = await agents(agent1=dict(answer_after=0.5, hangup_after=1.0))
    call = await place_call("100", pbx=stack.sip, work_dir=stack.work, wait_bye=60)
    assert call.answered and call.hung_up_by == "pbx", explain(stack, *a.values())
    [row] = wait_row(db)
    assert (row["outcome"], row["agent"], row["group_name"], row["menu_choice"]) == (
        "answered", "agent1", "sales", "1"), explain(stack)
    assert next(s for s in row["route_log"] if s["step"] == "menu")["how"] == "default_no_input"


async def test_nobody_answers_missed_row_and_callback(stack, db, agents):
    a = await agents(agent1=dict(answer_after=None))
    call = await place_call("100", digits="1", pbx=stack.sip, work_dir=stack.work)
    assert call.answered and call.hung_up_by == "pbx", explain(stack, *a.values())
    await a["agent1"].wait_for("CANCELLED")
    assert a["agent1"].invites_received() == 1 and a["agent1"].answered() == 0
    [row] = wait_row(db)
    assert (row["outcome"], row["missed"], row["answered_by"]) == ("missed_no_answer", True, None)
    [cb] = db.execute("SELECT * FROM callback_requests").fetchall()
    assert (cb["phone"], cb["status"], cb["call_id"]) == ("+79161234567", "pending", row["id"])
    [crm] = stack.crm.call(row["uniqueid"])  # a CRM makes its "call back" task from this
    assert (crm["outcome"], crm["missed"], crm["callback_requested"], crm["agent_endpoint"]) == (
        "missed_no_answer", True, True, None)


# how each PBX refuses a blocked caller: Asterisk's Hangup(21) is a 403, FreeSWITCH's CALL_REJECTED a 603 Decline
REFUSED = {"asterisk": 403, "freeswitch": 603}


async def test_a_blocked_caller_is_refused_unanswered_and_nobody_rings(stack, db, agents):
    a = await agents(agent1=dict(answer_after=0.5, hangup_after=1.0))
    db.execute("INSERT INTO blocked_callers (phone, reason) VALUES ('+74951230000', 'spam')")
    try:
        call = await place_call("100", from_user="84951230000", digits="1", pbx=stack.sip,
                                work_dir=stack.work, wait_bye=5)
    finally:
        db.execute("DELETE FROM blocked_callers")
    assert not call.answered and call.final_status == REFUSED[stack.kind], explain(stack, *a.values()) + call.log_tail
    assert a["agent1"].invites_received() == 0
    [row] = wait_row(db)
    assert (row["outcome"], row["missed"], row["caller_e164"]) == ("blocked", False, "+74951230000")
    assert db.execute("SELECT count(*) AS n FROM callback_requests").fetchone()["n"] == 0


SILENT_VOICEMAIL_ENDED_BY = {"asterisk": "caller", "freeswitch": "pbx"}


async def test_out_of_hours_plays_the_message_and_logs_a_missed_call(stack, db, agents):
    a = await agents(agent1=dict(answer_after=0.5, hangup_after=1.0))
    # this caller says nothing at the voicemail tone. SIPp sends no audio at all: Asterisk's silence
    # detection has nothing to measure, so only the caller's hangup ends the recording; FreeSWITCH counts
    # the missing audio as silence and ends it after voicemail's 5 s, then hangs up itself
    call = await place_call("200", pbx=stack.sip, work_dir=stack.work, wait_bye=22)
    assert call.answered and call.hung_up_by == SILENT_VOICEMAIL_ENDED_BY[stack.kind], explain(stack)
    [row] = wait_row(db)
    assert (row["outcome"], row["missed"]) == ("after_hours", True)
    assert a["agent1"].invites_received() == 0
    steps = [s["step"] for s in row["route_log"]]
    assert steps[-2:] == ["voicemail", "caller_hung_up"] or steps[-1] == "voicemail", steps
    assert db.execute("SELECT count(*) AS n FROM voicemails").fetchone()["n"] == 0  # nothing said: dropped


async def test_holiday_closes_the_line(stack, db, agents):
    today = datetime.now(ZoneInfo("Europe/Moscow")).date()
    db.execute("UPDATE schedules SET closed_dates = %s WHERE name = 'always'", ([today],))
    try:
        # closed: the holiday message, then voicemail; this caller hangs up at the tone without a word
        call = await place_call("100", digits="1", pbx=stack.sip, work_dir=stack.work, wait_bye=22)
    finally:
        db.execute("UPDATE schedules SET closed_dates = '{}' WHERE name = 'always'")
    assert call.answered, explain(stack)
    [row] = wait_row(db)
    assert (row["outcome"], row["missed"]) == ("holiday", True)
    log = stack.log()
    assert "/sounds/ru/holiday_closed" in log


async def test_cyrillic_name_with_quotes_and_newline_is_stored_intact(stack, db, agents):
    await agents(agent1=dict(answer_after=0.5, hangup_after=1.0))
    name = 'Иван "Ваня"\nПетров'
    call = await place_call("100", digits="1", pbx=stack.sip, work_dir=stack.work,
                            extra_headers={"X-Shopcall-Test-Name": urlquote(name, safe="")})
    assert call.answered, explain(stack)
    [row] = wait_row(db)
    assert row["caller_name"] == name, explain(stack)
    assert row["outcome"] == "answered"


@pytest.mark.parametrize("name", ['Мария "Маша" Иванова', 'Ivan "Test" Petrov'])
async def test_a_display_name_with_quotes_reaches_the_agent_and_is_stored_intact(stack, db, agents, name):
    a = await agents(agent1=dict(answer_after=0.5, hangup_after=1.0))
    call = await place_call("100", digits="1", display_name=name, pbx=stack.sip,
                            work_dir=stack.work)
    assert call.answered and a["agent1"].answered() == 1, explain(stack, *a.values())
    [row] = wait_row(db)
    assert (row["caller_name"], row["agent"]) == (name, "agent1"), explain(stack)
    # what the agent's phone shows: PJSIP escapes the quotes; sofia cannot (it writes the name between
    # quotes as it is, and a quote in it failed every leg on FreeSWITCH), so they become apostrophes there
    shown = {"asterisk": name.replace('"', '\\"'), "freeswitch": name.replace('"', "'")}[stack.kind]
    assert f'From: "{shown}"' in messages(a["agent1"]), messages(a["agent1"])[-2000:]


async def test_server_down_the_dialplan_still_rings_the_default_group(stack, db, agents):
    app = stack.app
    app.kill()
    try:
        a = await agents(agent1=dict(answer_after=0.5, hangup_after=1.0))
        # a name with quotes: the fallback's own ring must reach the agent too
        call = await place_call("100", display_name='Иван "Тест" Петров', pbx=stack.sip, work_dir=stack.work)
        assert call.answered, explain(stack, *a.values())
        assert (a["agent1"].invites_received(), a["agent1"].answered()) == (1, 1), explain(stack, *a.values())
        assert "shopcall: flow unavailable" in stack.log()  # the rendered fallback's own log line
    finally:
        app.start()
    # and once it is back, calls use it again
    a2 = await agents(agent4=dict(answer_after=0.5, hangup_after=1.0))
    call = await place_call("100", digits="3", pbx=stack.sip, work_dir=stack.work)
    assert call.answered and a2["agent4"].answered() == 1, explain(stack)
    rows = wait_row(db)
    assert [r["agent"] for r in rows] == ["agent4"]


async def test_caller_hangs_up_while_talking_the_row_still_names_the_agent(stack, db, agents):
    a = await agents(agent1=dict(answer_after=0.5, hangup_after=None))
    # the caller waits at most 8 s for the PBX's BYE, then hangs up itself, mid-conversation
    call = await place_call("100", digits="1", pbx=stack.sip, work_dir=stack.work, wait_bye=8)
    assert call.answered and call.hung_up_by == "caller", explain(stack, *a.values())
    assert a["agent1"].answered() == 1
    [row] = wait_row(db)
    assert (row["outcome"], row["missed"], row["agent"]) == ("answered", False, "agent1"), explain(stack)
    assert db.execute("SELECT count(*) AS n FROM callback_requests").fetchone()["n"] == 0


# --- routing (issue 3) -------------------------------------------------------------------------------


def messages(agent: SippAgent) -> str:
    return agent.messages_file.read_text(encoding="utf-8", errors="replace")


async def test_tracking_number_hunts_its_category_group_and_agents_see_the_source(stack, db, agents):
    a = await agents(agent2=dict(answer_after=None), agent3=dict(answer_after=0.5, hangup_after=1.0))
    call = await place_call("400", display_name="Пётр", from_user="74957778899", pbx=stack.sip,
                            work_dir=stack.work)
    assert call.answered and call.hung_up_by == "pbx", explain(stack, *a.values())
    assert (a["agent2"].invites_received(), a["agent2"].cancelled()) == (1, 1)  # hunt: agent2 first, alone
    assert a["agent3"].answered() == 1
    assert '"[Встраиваемая] Пётр"' in messages(a["agent3"])  # the From display name the agent's phone shows
    [row] = wait_row(db)
    assert (row["outcome"], row["agent"], row["group_name"]) == ("answered", "agent3", "builtin"), explain(stack)


async def test_customer_rings_their_manager_first_then_what_they_bought_last(stack, db, agents):
    a = await agents(agent4=dict(answer_after=None), agent3=dict(answer_after=0.5, hangup_after=1.0))
    call = await place_call("400", from_user="79165550001", pbx=stack.sip, work_dir=stack.work)
    assert call.answered, explain(stack, *a.values())
    assert (a["agent4"].invites_received(), a["agent4"].cancelled()) == (1, 1)
    assert a["agent3"].answered() == 1
    [row] = wait_row(db)
    rings = [(s["reason"], s["target"]) for s in row["route_log"] if s["step"] == "ring"]
    assert rings[:2] == [("sticky", "agent4"), ("last_category", "kitchen")], explain(stack)
    assert row["agent"] == "agent3"
    manager = db.execute("SELECT e.endpoint FROM customers c JOIN employees e ON e.id = c.last_manager_id "
                         "WHERE c.phone = '+79165550001'").fetchone()
    assert manager["endpoint"] == "agent3"  # who talked to her last is her manager now


async def test_a_skip_busy_group_passes_over_the_agent_already_talking(stack, db, agents):
    a = await agents(agent2=dict(answer_after=0.3, hangup_after=8.0), agent3=dict(answer_after=0.5, hangup_after=1.0))
    # agent2, first in the hunt group, answers one call and is still talking when the second arrives
    first = asyncio.create_task(place_call("410", pbx=stack.sip, work_dir=stack.work))
    assert await a["agent2"].wait_for("ANSWERED", timeout=20) == 1, explain(stack, *a.values())
    second = await place_call("410", from_user="79165550009", pbx=stack.sip, work_dir=stack.work)
    assert second.answered, explain(stack, *a.values()) + second.log_tail
    assert a["agent2"].invites_received() == 1  # Asterisk's DEVICE_STATE said INUSE: not rung again
    assert a["agent3"].answered() == 1
    assert (await first).answered
    rows = wait_row(db, 2)
    by_caller = {r["caller_e164"]: r for r in rows}
    assert by_caller["+79161234567"]["agent"] == "agent2"
    row = by_caller["+79165550009"]
    assert (row["outcome"], row["agent"], row["group_name"]) == ("answered", "agent3", "desk"), explain(stack)
    skips = [(s["skipped"], s["agents"]) for s in row["route_log"] if s["step"] == "skip"]
    assert skips == [("busy", ["agent2"])]
    assert [s["endpoints"] for s in row["route_log"] if s["step"] == "ring"] == [["agent3"]]


async def test_a_caller_waits_in_line_for_the_agent_on_a_call(stack, db, agents):
    a = await agents(agent2=dict(answer_after=0.3, hangup_after=5.0))
    first = asyncio.create_task(place_call("420", pbx=stack.sip, work_dir=stack.work))
    assert await a["agent2"].wait_for("ANSWERED", timeout=20) == 1, explain(stack, *a.values())
    # the group's only agent is talking: the second caller hears the notice and the hold music, and is
    # put through once agent2 has hung up on the first
    waiting = asyncio.create_task(place_call("420", from_user="79165550008", pbx=stack.sip,
                                             work_dir=stack.work))
    # meanwhile a supervisor's live view (GET /api/v1/live) shows them in line and agent2 on a call,
    # agent2's phone asked of the real PBX (AMI on Asterisk, the event socket on FreeSWITCH)
    config = stack.config(api=ApiConfig(port=0, tokens=("e2e-token",)))
    async with stack.agent_phones(config) as phones, open_pool(stack.url, min_size=1, max_size=2) as pool:
        api = await start_api(config, pool, LivePhones(phones))
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{api.port}") as client:
                deadline = time.monotonic() + 15
                while True:
                    resp = await client.get("/api/v1/live", headers={"Authorization": "Bearer e2e-token"})
                    view = await resp.json()
                    if view["waiting"] or time.monotonic() > deadline or waiting.done():
                        break
                    await asyncio.sleep(0.3)
            cli_view = await _live_view(config, pool, ask_pbx=True)  # `shopcall live`: a link of its own
        finally:
            await api.stop()
    assert [w["caller_number"] for w in cli_view["waiting"]] == ["79165550008"], cli_view
    assert {ag["endpoint"]: ag["phone"] for ag in cli_view["agents"]}["agent2"] == "on_call", cli_view
    assert [(w["group"], w["position"], w["caller_number"]) for w in view["waiting"]] == [
        ("line", 1, "79165550008")], view
    phones = {ag["endpoint"]: ag["phone"] for ag in view["agents"]}
    assert phones["agent2"] == "on_call" and view["pbx_error"] is None, view
    second = await waiting
    assert second.answered and (await first).answered, explain(stack, *a.values()) + second.log_tail
    assert await a["agent2"].wait_for("ANSWERED", count=2, timeout=5) == 2
    rows = {r["caller_e164"]: r for r in wait_row(db, 2)}
    row = rows["+79165550008"]
    assert (row["outcome"], row["agent"], row["group_name"]) == ("answered", "agent2", "line"), explain(stack)
    [ended] = [s for s in row["route_log"] if s["step"] == "hold_end"]
    assert ended["how"] == "rang" and ended["waited"] >= 5, row["route_log"]
    assert (row["answered_at"] - row["started_at"]).total_seconds() >= 5  # the wait counts as waiting
    assert "could not play" not in stack.app.log_tail(200)  # Asterisk found the hold music we made


async def test_overflow_robot_tells_the_order_status(stack, db, agents):
    a = await agents(agent1=dict(answer_after=None))
    # the robot's menu starts after greeting + "connecting" + 3 s of ringing: press 1 a few times around it
    call = await place_call("600", from_user="79165550002", digits="111", digit_delay=9.0, digit_gap=2.5,
                            pbx=stack.sip, work_dir=stack.work, wait_bye=60)
    assert call.answered and call.hung_up_by == "pbx", explain(stack, *a.values())
    assert a["agent1"].invites_received() == 1 and a["agent1"].answered() == 0
    [row] = wait_row(db)
    said = [(s["order"], s["status"]) for s in row["route_log"] if s["step"] == "robot_said"]
    assert said == [("10578", "at_pickup_point")], explain(stack)
    assert (row["outcome"], row["robot_choice"]) == ("robot", "1")
    log = stack.log()
    assert "order_status_at_pickup_point" in log and "order_delivery_date" in log


async def test_overflow_robot_silence_means_a_callback(stack, db, agents):
    await agents(agent1=dict(answer_after=None))
    call = await place_call("600", from_user="74951112233", pbx=stack.sip, work_dir=stack.work, wait_bye=60)
    assert call.answered and call.hung_up_by == "pbx", explain(stack)
    [row] = wait_row(db)
    assert (row["outcome"], row["robot_choice"]) == ("robot", "2")
    [cb] = db.execute("SELECT * FROM callback_requests").fetchall()
    assert (cb["phone"], cb["reason"]) == ("+74951112233", "robot")


async def test_language_menu_english_is_remembered(stack, db, agents):
    await agents(agent1=dict(answer_after=0.5, hangup_after=1.0))
    call = await place_call("500", from_user="74953334455", digits="2", pbx=stack.sip, work_dir=stack.work)
    assert call.answered, explain(stack)
    [row] = wait_row(db)
    assert (row["language"], row["agent"]) == ("en", "agent1"), explain(stack)
    assert "/sounds/en/main_menu" in stack.log()
    lang = db.execute("SELECT language FROM customers WHERE phone = '+74953334455'").fetchone()["language"]
    assert lang == "en"


async def test_logged_out_agent_is_not_rung(stack, db, agents):
    stack.app.cli("agent", "logout", "agent2")
    try:
        a = await agents(agent2=dict(answer_after=0.5), agent3=dict(answer_after=0.5, hangup_after=1.0))
        call = await place_call("100", digits="2", from_user="74956667788", pbx=stack.sip,
                                work_dir=stack.work)
        assert call.answered, explain(stack)
        assert a["agent2"].invites_received() == 0 and a["agent3"].answered() == 1
    finally:
        stack.app.cli("agent", "login", "agent2")


async def test_survey_answer_after_the_agent_hangs_up(stack, db, agents):
    db.execute("UPDATE groups SET survey_enabled = true WHERE name = 'delivery'")
    try:
        a = await agents(agent2=dict(answer_after=0.5, hangup_after=1.0), agent3=dict(answer_after=None))
        # "2" for delivery during the greeting, then "1" while the survey question plays
        call = await place_call("100", digits="21", digit_gap=6.0, from_user="74950001122", pbx=stack.sip,
                                work_dir=stack.work)
    finally:
        db.execute("UPDATE groups SET survey_enabled = false WHERE name = 'delivery'")
    assert call.answered and call.hung_up_by == "pbx", explain(stack, *a.values())
    [row] = wait_row(db)
    survey = db.execute("SELECT s.answer, e.endpoint FROM survey_answers s JOIN employees e "
                        "ON e.id = s.employee_id WHERE s.call_id = %s", (row["id"],)).fetchone()
    assert survey == {"answer": 1, "endpoint": "agent2"}, explain(stack)


async def test_after_hours_voicemail_is_recorded_transcribed_and_mailed(stack, db, agents):
    inbox = stack.inbox
    inbox.messages.clear()
    # the caller starts talking just after the tone (~15 s in: greeting, notice, after-hours message,
    # prompt, beep), then hangs up, which is how most messages end on Asterisk (SIPp sends no audio after
    # its speech, so Asterisk's silence detection has no frames to measure); FreeSWITCH counts the missing
    # audio as silence and ends the message 5 s after the speech, before the caller would hang up
    call = await place_call("200", from_user="79165551234", pbx=stack.sip, work_dir=stack.work,
                            speech="Hello. Please call me back about my order. " * 5, speech_delay=16.0,
                            wait_bye=30)
    assert call.answered and call.hung_up_by == SILENT_VOICEMAIL_ENDED_BY[stack.kind], explain(stack)
    deadline = time.monotonic() + 60
    while not inbox.messages and time.monotonic() < deadline:  # the outbox is polled every few seconds
        await asyncio.sleep(0.5)
    [row] = wait_row(db)
    assert row["outcome"] == "after_hours"
    # the mail reaches the SMTP server a moment before the mailer commits "notified"
    deadline = time.monotonic() + 10
    while True:
        vm = db.execute("SELECT * FROM voicemails").fetchone()
        if (vm is not None and vm["status"] == "notified") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert vm is not None, explain(stack)
    assert vm["seconds"] > 5 and vm["call_id"] == row["id"] and vm["status"] == "notified", vm
    assert vm["path"].endswith(".wav") and Path(vm["path"]).is_file()
    # transcription ran on the real recording without error; what pocketsphinx makes of espeak's voice after
    # a G.711 round trip is often nothing (accuracy is checked on clean audio in test_transcribe.py)
    assert vm["transcript_engine"] == "pocketsphinx" and vm["transcript_error"] is None
    [mail] = inbox.messages
    assert mail["To"] == "anna@example.test" and "+7 916 555-12-34" in str(
        email.header.make_header(email.header.decode_header(mail["Subject"])))
    assert [p.get_content_type() for p in mail.walk() if p.get_filename()] == ["audio/wav"]


async def test_server_killed_mid_conversation_cuts_no_call_and_the_calls_get_their_rows(stack, db, agents):
    """kill -9 while three callers talk to three agents: no conversation is cut (a Dial on Asterisk, a bridge
    on FreeSWITCH, goes on without us), nobody is rung again, and once we are back each call, ending,
    gets its row naming the agent."""
    app = stack.app
    talk = 8.0
    a = await agents(agent1=dict(answer_after=0.5, hangup_after=talk), agent2=dict(answer_after=0.5, hangup_after=talk),
                     agent3=dict(answer_after=None), agent4=dict(answer_after=0.5, hangup_after=talk))
    callers = {"1": "74959990011", "2": "74959990012", "3": "74959990013"}
    tasks = [asyncio.create_task(place_call("100", digits=key, from_user=who, pbx=stack.sip, work_dir=stack.work))
             for key, who in callers.items()]
    try:
        for name in ("agent1", "agent2", "agent4"):
            assert await a[name].wait_for("ANSWERED", timeout=30) == 1, explain(stack, *a.values())
        app.kill()  # mid-conversation, all three
        killed = time.monotonic()
        app.start()
        back_after = time.monotonic() - killed
        results = await asyncio.gather(*tasks)
    finally:
        if not app.proc or app.proc.poll() is not None:
            app.start()
    assert back_after < talk - 2, f"shopcall took {back_after:.1f} s to come back"
    for key, call in zip(callers, results, strict=True):
        # the agent hung up after `talk` s: the conversation went on to its end, then the caller was hung up
        assert call.answered and call.hung_up_by == "pbx", (key, explain(stack, *a.values()) + call.log_tail)
    for name in ("agent1", "agent2", "agent4"):
        ends = [line.split()[1] for line in a[name].events() if line.startswith("HANGUP ")]
        assert ends == ["agent"], (name, ends, explain(stack, *a.values()))  # not cut by the PBX's BYE
    # nobody was rung a second time by the fallback
    assert [a[n].invites_received() for n in ("agent1", "agent2", "agent4")] == [1, 1, 1], explain(stack, *a.values())
    rows = {r["caller_number"]: r for r in wait_row(db, 3, timeout=20)}
    assert {r["caller_number"]: r["agent"] for r in rows.values()} == {
        "74959990011": "agent1", "74959990012": "agent2", "74959990013": "agent4"}, explain(stack)
    for r in rows.values():
        assert (r["outcome"], r["missed"]) == ("answered", False), r
        assert r["route_log"][-1]["step"] == "fallback", r["route_log"]  # told by the dialplan's report


async def test_database_down_the_call_falls_back_and_its_row_arrives_later(stack, agents, pg_server):
    if pg_server["server"] is None:
        pytest.skip("SHOPCALL_TEST_DATABASE_URL points at a server these tests must not stop")
    with psycopg.connect(stack.url, autocommit=True) as conn:
        conn.execute("TRUNCATE callback_requests, calls, voicemails, outbox RESTART IDENTITY CASCADE")
    stop_embedded(pg_server["pgdata"])  # PostgreSQL goes away
    try:
        a = await agents(agent1=dict(answer_after=0.5, hangup_after=1.0))
        call = await place_call("100", digits="1", from_user="74957770001", pbx=stack.sip,
                                work_dir=stack.work)
        # the flow could not read the directory: the dialplan rang the fallback group itself
        assert call.answered and a["agent1"].answered() == 1, explain(stack, *a.values())
    finally:
        pg_server["server"].ensure_postgres_running()  # it comes back
    # the flow's row waited in the local spool and is replayed (every 30 s) once the database is back; the
    # fallback's report at hangup (spooled too, or written if the database was back by then) completes it
    deadline = time.monotonic() + 75
    rows: list = []
    steps: list = []
    while steps[-2:] != ["error", "fallback"] and time.monotonic() < deadline:
        await asyncio.sleep(1)
        try:
            with psycopg.connect(stack.url, autocommit=True, row_factory=dict_row) as conn:
                rows = conn.execute("SELECT c.*, e.endpoint AS agent FROM calls c LEFT JOIN employees e "
                                    "ON e.id = c.answered_by WHERE caller_number = '74957770001'").fetchall()
        except psycopg.OperationalError:
            continue
        steps = [st["step"] for st in rows[0]["route_log"]] if rows else []
    assert len(rows) == 1, explain(stack)
    assert steps[-2:] == ["error", "fallback"], (rows[0]["route_log"], explain(stack))
    assert (rows[0]["outcome"], rows[0]["missed"], rows[0]["agent"]) == ("answered", False, "agent1"), rows[0]
    # the CRM hears of it once the row is in: the post saved last carries both reports' merged row
    deadline = time.monotonic() + 15
    while True:
        posts = stack.crm.call(rows[0]["uniqueid"], timeout=1)
        last = max(posts, key=lambda b: b["saved_at"]) if posts else {}
        if last.get("agent_endpoint") == "agent1" or time.monotonic() > deadline:
            break
    assert (last.get("outcome"), last.get("agent_endpoint"), last.get("call_id")) == (
        "answered", "agent1", rows[0]["id"]), (posts, explain(stack))


async def test_feature_code_from_the_agents_phone_logs_them_out(stack, db, agents):
    try:
        # a call From agent2 is agent2's phone (PJSIP identifies it by user name): *72 logs it out
        call = await place_call("*72", from_user="agent2", pbx=stack.sip, work_dir=stack.work)
        assert call.answered and call.hung_up_by == "pbx", explain(stack)
        state = db.execute("SELECT logged_in FROM employees WHERE endpoint = 'agent2'").fetchone()
        assert state["logged_in"] is False, explain(stack)
        a = await agents(agent2=dict(answer_after=0.5), agent3=dict(answer_after=0.5, hangup_after=1.0))
        call = await place_call("100", digits="2", from_user="74956660001", pbx=stack.sip,
                                work_dir=stack.work)
        assert call.answered and a["agent2"].invites_received() == 0 and a["agent3"].answered() == 1
        call = await place_call("*71", from_user="agent2", pbx=stack.sip, work_dir=stack.work)
        assert db.execute("SELECT logged_in FROM employees WHERE endpoint = 'agent2'").fetchone()["logged_in"]
    finally:
        stack.app.cli("agent", "login", "agent2")


async def test_round_robin_and_least_recent_through_real_calls(stack, db, agents):
    try:
        for strategy in ("roundrobin", "leastrecent"):
            db.execute("UPDATE groups SET strategy = %s WHERE name = 'delivery'", (strategy,))
            answered = []
            for i in range(3):
                a = await agents(agent2=dict(answer_after=0.3, hangup_after=0.5),
                                 agent3=dict(answer_after=0.3, hangup_after=0.5))
                call = await place_call("100", digits="2", from_user=f"7495666100{i}", pbx=stack.sip,
                                        work_dir=stack.work)
                assert call.answered, explain(stack, *a.values())
                answered.append("agent2" if a["agent2"].answered() else "agent3")
                for agent in a.values():
                    await agent.stop()
            # both take turns: the one offered the last call (round robin) or who waited longer (least recent)
            assert answered in (["agent2", "agent3", "agent2"], ["agent3", "agent2", "agent3"]), (strategy, answered)
    finally:
        db.execute("UPDATE groups SET strategy = 'ringall' WHERE name = 'delivery'")


async def test_caller_hanging_up_in_the_greeting_leaves_a_callback_request(stack, db, agents):
    call = await place_call("100", from_user="74956662233", pbx=stack.sip, work_dir=stack.work,
                            wait_bye=1.5)
    assert call.answered and call.hung_up_by == "caller"
    [row] = wait_row(db)
    assert (row["outcome"], row["missed"]) == ("abandoned", True), explain(stack)
    [cb] = db.execute("SELECT * FROM callback_requests").fetchall()
    assert (cb["phone"], cb["reason"], cb["call_id"]) == ("+74956662233", "abandoned", row["id"])


async def test_injection_in_caller_name_and_number_changes_nothing(stack, db, agents):
    a = await agents(agent2=dict(answer_after=0.5, hangup_after=1.0), agent3=dict(answer_after=None),
                     agent4=dict(answer_after=0.5))
    # (no backslash: on a PJSIP channel CALLERID(name) is read as a SIP display name, \\x -> x)
    name = 'Ann" , PJSIP/agent4&${EXTEN}|$(SHELL)\nSET VARIABLE SHOPCALL_DONE 1'
    number = "79161234567,PJSIP&agent4$CHANNEL"  # what a SIP user part carries (a ";" starts URI parameters)
    call = await place_call("100", digits="2", from_user=number, pbx=stack.sip, work_dir=stack.work,
                            extra_headers={"X-Shopcall-Test-Name": urlquote(name, safe="")})
    assert call.answered and call.hung_up_by == "pbx", explain(stack, *a.values())
    assert a["agent4"].invites_received() == 0  # nothing in the name or number reached a dial string
    assert a["agent2"].answered() == 1
    [row] = wait_row(db)
    assert row["caller_name"] == name and row["caller_number"] == number
    assert row["caller_e164"] is None  # not a phone number: no callback to it either
    assert (row["outcome"], row["agent"]) == ("answered", "agent2")
    invite = messages(a["agent2"])
    assert "SET VARIABLE" in invite and "\nSET VARIABLE" not in invite  # the newline did not split a header


async def test_load_every_call_one_row_none_lost(stack, db, agents):
    """Issue 6's load drill, bounded for CI (SHOPCALL_LOAD_CALLS / SHOPCALL_LOAD_RATE raise it)."""
    from tests.pbx.sipp import SIPP, free_media_port, free_sip_port, render_caller_scenario

    calls = int(os.environ.get("SHOPCALL_LOAD_CALLS", "150"))
    rate = int(os.environ.get("SHOPCALL_LOAD_RATE", "10"))
    db.execute("""INSERT INTO numbers (number, title, schedule_id, group_id, recording_notice, sticky,
                                       by_last_category)
                  SELECT '700', 'load', s.id, g.id, false, false, false FROM schedules s, groups g
                   WHERE s.name = 'always' AND g.name = 'sales' ON CONFLICT (number) DO NOTHING""")
    a = await agents(agent1=dict(answer_after=0.2, hangup_after=0.5))
    base = stack.work / "load"
    scenario = base.with_suffix(".xml")
    scenario.write_text(render_caller_scenario(
        from_user="79160001122", display_name=None, digits="", digit_delay=0, digit_gap=0,
        pai_display_name=None, extra_headers={}, wait_bye=60), encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        SIPP, stack.sip, "-sf", str(scenario), "-s", "700", "-i", "127.0.0.1", "-p", str(free_sip_port()),
        "-mp", str(free_media_port()), "-m", str(calls), "-r", str(rate), "-l", str(calls), "-nostdin", "-aa",
        "-trace_err", "-error_file", f"{base}_errors.log",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    started = time.monotonic()
    rc = await asyncio.wait_for(proc.wait(), calls / rate + 120)
    elapsed = time.monotonic() - started
    assert rc == 0, f"SIPp: some calls failed (rc={rc})\n" + explain(stack, *a.values())
    assert a["agent1"].answered() == calls
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = db.execute("SELECT count(*) AS n, count(DISTINCT uniqueid) AS u, count(*) FILTER "
                         "(WHERE outcome = 'answered' AND answered_endpoint = 'agent1') AS ok "
                         "FROM calls WHERE dialled_number = '700'").fetchone()
        if row["n"] >= calls:
            break
        await asyncio.sleep(0.5)
    assert row == {"n": calls, "u": calls, "ok": calls}, row  # none lost, none twice
    print(f"load: {calls} calls at {rate}/s took {elapsed:.1f} s, every one answered and logged once")
