"""The inbound flow, one suite over the Call implementations: the scripted call of the Asterisk-side flow
tests, AgiCall through our FastAGI server (a minimal Asterisk stand-in below), and EslCall through our
outbound-socket server, driven by a peer that speaks FreeSWITCH's wire format as captured
(tests/esl_peer.py). Same scenarios, same database checks (a throw-away PostgreSQL).

A real FreeSWITCH (tests/pbx/freeswitch.py) runs the primitives once more at the end: an originated call
whose answered leg connects to our outbound-socket server.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from esl.call import RINGBACK
from esl.client import EslClient
from esl.routes import esl_routes
from esl.server import EslServer
from esl.session import UNUSED_EVENTS
from shopcall.app import App
from shopcall.call import Call, CallEnded, CallInfo, DialResult, DialStatus
from shopcall.flows.inbound import inbound
from tests import test_inbound_flow
from tests.esl_peer import Caller, FsPeer, call_once
from tests.scripted import PromptNames, ScriptedCall, WireSafeNames
from tests.test_inbound_flow import call_row, callbacks

app = test_inbound_flow.app  # the same `app` fixture: the App built as the Asterisk-side flow tests build it

PBXES = ("scripted", "asterisk", "freeswitch")


@dataclass
class Scenario:
    """One call as the caller and the agents play it, whatever the PBX."""

    number: str = "100"
    caller: str = "89161234567"
    name: str = "Customer"
    keys: list[str | None] = field(default_factory=list)  # per menu prompt: the key, or silence
    greeting_key: str | None = None
    answers: list[tuple[str | None, float]] = field(default_factory=list)  # per dial: who answers, talk s
    hang_up_on: str | None = None  # "collect" (in the menu), "stream" (during a prompt), "dial" (ringing)
    on_a_call: set[str] = field(default_factory=set)  # agents talking on another call (a skip_busy group)
    ringing: set[str] = field(default_factory=set)  # agents whose phone rings for another caller


@dataclass
class Outcome:
    uid: str
    played: list[str]  # prompt names, in order
    languages: set[str]
    collects: int
    dials: list[tuple[list[str], str, int]]  # endpoints, strategy, ring timeout
    vars: dict[str, str]  # variables the flow set for the dialplan
    agent_name: str | None  # the caller name the agents' phones are given, when the flow changed it
    peer: FsPeer | None = None
    answered: bool = True  # the flow answered the channel
    hangup: str | None = None  # the cause the flow hung up with, in the PBX's own terms


async def run_scripted(app: App, s: Scenario) -> Outcome:
    info = CallInfo(uniqueid="1.1", pbx="asterisk", caller_number=s.caller, caller_name=s.name,
                    dialled_number=s.number)
    results = [DialResult(DialStatus.ANSWERED, who, talk, "ANSWER") if who else DialResult(DialStatus.NOANSWER)
               for who, talk in s.answers]
    if s.hang_up_on == "dial":
        results = [DialResult(DialStatus.CALLER_GONE, detail="CANCEL")]
    call = ScriptedCall(info, keys=s.keys, greeting_key=s.greeting_key, dial=results,
                        hang_up_on=s.hang_up_on if s.hang_up_on != "dial" else None, on_a_call=[s.on_a_call] * 5)
    await _run(call, app)
    dials = [(a[1], a[2], a[3]) for a in call.actions if a[0] == "dial"]
    languages = {call.language}  # the scripted call names prompts without their language folder
    hangups = [a[1] for a in call.actions if a[0] == "hangup"]
    return Outcome("1.1", [Path(p).name for p in call.played], languages,
                   sum(a[0] == "collect" for a in call.actions), dials,
                   {k: v for k, v in call.vars.items() if k.startswith("SHOPCALL_")},
                   call.vars.get("CALLERID(name)"), answered=bool(call.played or dials or call.vars),
                   hangup=hangups[0] if hangups else None)


PEER_APPS = {"collect": "play_and_get_digits", "stream": "playback", "dial": "bridge"}


async def run_freeswitch(app: App, s: Scenario) -> Outcome:
    caller = Caller(keys=list(s.keys), greeting_key=s.greeting_key, answers=[who for who, _ in s.answers],
                    talk_seconds=s.answers[0][1] if s.answers else 0.0,
                    hang_up_on=PEER_APPS.get(s.hang_up_on or ""), on_a_call=s.on_a_call, ringing=s.ringing)
    peer = await call_once(esl_routes(app, {"inbound": inbound}), caller, number=s.caller, name=s.name,
                           destination=s.number)
    prompts = [arg if app_ == "playback" else arg.split(" ")[5] for app_, arg in peer.apps
               if app_ in ("playback", "play_and_get_digits")]
    prompts = [p for p in prompts if p.endswith(".wav")]
    dials = []
    for b in peer.bridges:
        endpoints = [target.rsplit("/", 1)[-1] for _, target in b.legs]
        if b.separator == ",":
            dials.append((endpoints, "ringall", int(b.call_timeout or 0)))
        else:
            dials.append((endpoints, "hunt", int(b.data.split("leg_timeout=")[1].split("]")[0])))
    return Outcome(peer.uuid, [Path(p).stem for p in prompts], {Path(p).parent.name for p in prompts},
                   sum(a == "play_and_get_digits" for a, _ in peer.apps), dials,
                   {k: v for k, v in peer.vars.items() if k.startswith("SHOPCALL_")},
                   peer.vars.get("effective_caller_id_name"), peer, answered=peer.answered,
                   hangup=peer.hangup_cause if peer.hung_up else None)


_ARG = re.compile(r'"((?:\\.|[^"\\])*)"|(\S+)')


def _agi_args(line: str) -> list[str]:
    return [re.sub(r"\\(.)", r"\1", q) if q or not bare else bare for q, bare in _ARG.findall(line)]


class AgiPeer:
    """Asterisk's side of one FastAGI session, just enough for the inbound flow: the agi_* block (a PJSIP
    display name escaped as PJSIP leaves it), 200 replies, HANGUP then dead-channel 511s."""

    def __init__(self, port: int, s: Scenario, uid: str) -> None:
        self.port, self.s, self.uid = port, s, uid
        self.keys, self.answers = list(s.keys), list(s.answers)
        self.greeting_key = s.greeting_key
        self.vars: dict[str, str] = {}
        self.streams: list[str] = []
        self.dials: list[str] = []
        self.collects = 0
        self.dead = False
        self.answered = False
        self.hangup: str | None = None

    def env(self) -> bytes:
        name = self.s.name.replace("\\", "\\\\").replace('"', '\\"')  # PJSIP's quoted-pair escapes
        return (f"agi_network: yes\nagi_network_script: inbound?number={self.s.number}\n"
                f"agi_channel: PJSIP/trunk-00000001\nagi_language: ru\nagi_uniqueid: {self.uid}\n"
                f"agi_callerid: {self.s.caller}\nagi_calleridname: {name}\nagi_extension: s\n\n").encode()

    def device_state(self, m: re.Match) -> str:
        return "INUSE" if m[1] in self.s.on_a_call else "RINGING" if m[1] in self.s.ringing else "NOT_INUSE"

    async def run(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(self.env())
        try:
            while line := (await reader.readline()).decode().strip():
                writer.write(self.reply(line).encode())
                await writer.drain()
        finally:
            writer.close()

    def reply(self, line: str) -> str:
        if self.dead and not line.startswith(("GET VARIABLE", "GET FULL VARIABLE")):  # both work dead
            return "511 result=-1 Command Not Permitted on a dead channel\n"
        verb, args = line.split(" ", 2)[:2], _agi_args(line)
        hang_up = self.s.hang_up_on
        if line.startswith("STREAM FILE"):
            self.streams.append(args[2])
            if hang_up == "stream":
                self.dead = True
                return "HANGUP\n200 result=-1 endpos=0\n"
            if args[3] and self.greeting_key and self.greeting_key in args[3]:
                key, self.greeting_key = self.greeting_key, None
                return f"200 result={ord(key)} endpos=1000\n"
            return "200 result=0 endpos=16000\n"
        if verb == ["EXEC", "Playback"]:  # the files joined by "&", as Asterisk's Playback splits them
            if hang_up == "stream":
                self.streams.append(args[2].split("&")[0])
                self.dead = True
                return "HANGUP\n200 result=-1\n"
            self.streams.extend(args[2].split("&"))
            return "200 result=0\n"
        if line.startswith("GET DATA"):
            self.streams.append(args[2])
            self.collects += 1
            if hang_up == "collect":
                self.dead = True
                return "HANGUP\n200 result=-1\n"
            key = self.keys.pop(0) if self.keys else None
            return f"200 result={key}\n" if key else "200 result= (timeout)\n"
        if line.startswith("SET VARIABLE"):
            self.vars[args[2]] = args[3]
            return "200 result=1\n"
        if line.startswith("GET VARIABLE"):
            value = self.vars.get(args[2])
            return f"200 result=1 ({value})\n" if value is not None else "200 result=0\n"
        if line.startswith("GET FULL VARIABLE"):  # an expression: ${NAME}s substituted, unset ones empty
            value = re.sub(r"\$\{DEVICE_STATE\(PJSIP/(\w+)\)\}", self.device_state, args[3])
            value = re.sub(r"\$\{(\w+)\}", lambda m: self.vars.get(m[1], ""), value)
            return f"200 result=1 ({value})\n"
        if verb == ["EXEC", "Dial"]:
            self.dials.append(args[2])
            who, talk = self.answers.pop(0) if self.answers else (None, 0.0)
            if hang_up == "dial":
                self.dead = True
                self.vars.update(DIALSTATUS="CANCEL")
                return "HANGUP\n200 result=-1\n"
            self.vars.update(DIALSTATUS="ANSWER" if who else "NOANSWER", ANSWEREDTIME=str(int(talk)),
                             DIALEDPEERNAME=f"PJSIP/{who}-00000002" if who else "")
            return "200 result=0\n"
        if verb == ["EXEC", "MSet"]:  # name=value pairs split on commas, as Asterisk's MSet does
            self.vars.update(pair.split("=", 1) for pair in args[2].split(","))
            return "200 result=0\n"
        if verb == ["EXEC", "Hangup"]:
            self.dead, self.hangup = True, args[2]
        if line == "ANSWER":
            self.answered = True
        return "200 result=0\n"


async def run_asterisk(app: App, s: Scenario) -> Outcome:
    from agi.routes import agi_routes
    from agi.server import FastAgiServer

    server = FastAgiServer(agi_routes(app, {"inbound": inbound}), port=0, command_timeout=3)
    await server.start()
    peer = AgiPeer(server.port, s, f"1732540000.{uuid.uuid4().int % 100000}")
    try:
        await asyncio.wait_for(peer.run(), 15)
        await asyncio.wait_for(asyncio.gather(*server.active), 5)
    finally:
        await server.stop()
    dials = []
    for data in peer.dials:
        target, timeout, _ = data.split(",")
        endpoints = [t.split("/", 1)[1] for t in target.split("&")]
        dials.append((endpoints, "ringall", int(timeout)))
    prompts = [p for p in peer.streams if p.startswith("/sounds/")]
    return Outcome(peer.uid, [Path(p).name for p in prompts], {Path(p).parent.name for p in prompts},
                   peer.collects, dials, {k: v for k, v in peer.vars.items() if k.startswith("SHOPCALL_")},
                   peer.vars.get("CALLERID(name)"), answered=peer.answered, hangup=peer.hangup)


async def _run(call: Call, app: App) -> None:
    try:
        await inbound(call, app)
    except CallEnded:
        pass


@pytest.fixture(params=PBXES)
def pbx(request) -> str:
    return request.param


@pytest.fixture
def place(app, pbx, caplog):
    if pbx != "scripted":  # the flow's TTS texts ("we open again ...") go over the wire as file names
        app.prompts = WireSafeNames()

    async def place(s: Scenario) -> Outcome:
        caplog.set_level(logging.INFO, logger="shopcall")
        out = await {"scripted": run_scripted, "asterisk": run_asterisk, "freeswitch": run_freeswitch}[pbx](app, s)
        trouble = [r.getMessage() for r in caplog.records
                   if r.name.startswith(("shopcall.esl", "shopcall.agi")) and r.levelno >= logging.WARNING]
        assert not trouble, trouble  # the wire went as FreeSWITCH would have it
        return out

    return place


# -- the inbound flow's scenarios -------------------------------------------------------------------------


async def test_key_2_rings_all_of_delivery_and_logs_who_answered(place, conn):
    out = await place(Scenario(keys=["2"], answers=[("agent3", 42.0)]))
    assert out.dials == [(["agent2", "agent3"], "ringall", 6)]
    assert out.played[:3] == ["greeting", "recording_notice", "main_menu"]
    row = await call_row(conn, out.uid)
    assert (row["outcome"], row["missed"], row["agent"], row["group_name"]) == ("answered", False, "agent3", "delivery")
    assert row["menu_choice"] == "2" and row["caller_e164"] == "+79161234567"
    assert (row["ended_at"] - row["answered_at"]).total_seconds() >= 41
    assert out.vars["SHOPCALL_DONE"] == "1"
    assert await callbacks(conn) == []


async def test_no_input_goes_to_sales_after_the_retries(place, conn):
    out = await place(Scenario(keys=[None, None], answers=[("agent1", 5)]))
    assert out.collects == 2  # menu once + one retry
    assert (["agent1"], "ringall", 6) in out.dials
    row = await call_row(conn, out.uid)
    assert row["menu_choice"] == "1" and row["agent"] == "agent1"
    assert next(s for s in row["route_log"] if s["step"] == "menu")["how"] == "default_no_input"


async def test_invalid_key_is_told_then_default(place, conn):
    out = await place(Scenario(keys=["7", "9"], answers=[(None, 0)]))
    assert "invalid_choice" in out.played
    row = await call_row(conn, out.uid)
    assert row["group_name"] == "sales"
    assert next(s for s in row["route_log"] if s["step"] == "menu")["how"] == "default_invalid"


async def test_key_pressed_during_greeting_is_the_menu_choice(place, conn):
    out = await place(Scenario(greeting_key="3", answers=[("agent4", 1)]))
    assert "main_menu" not in out.played
    assert (await call_row(conn, out.uid))["agent"] == "agent4"


async def test_nobody_answers_missed_row_and_callback_request(place, conn):
    out = await place(Scenario(keys=["1"], answers=[(None, 0)]))
    assert out.played[-1] == "nobody_answered"
    row = await call_row(conn, out.uid)
    assert (row["outcome"], row["missed"], row["answered_by"]) == ("missed_no_answer", True, None)
    [cb] = await callbacks(conn)
    assert (cb["phone"], cb["status"], cb["reason"], cb["call_id"]) == ("+79161234567", "pending", "no_answer", row["id"])


async def test_a_blocked_caller_is_refused_unanswered(place, pbx, conn):
    await conn.execute("INSERT INTO blocked_callers (phone, reason) VALUES ('+79161234567', 'spam')")
    out = await place(Scenario(keys=["1"], answers=[("agent1", 5)]))
    assert not out.answered and out.played == [] and out.dials == []
    assert out.hangup == {"scripted": "rejected", "asterisk": "21", "freeswitch": "CALL_REJECTED"}[pbx]
    row = await call_row(conn, out.uid)
    assert (row["outcome"], row["missed"]) == ("blocked", False)
    assert await callbacks(conn) == []


async def test_after_hours_message_and_missed_row(place, conn):
    out = await place(Scenario(number="200"))
    assert "after_hours" in out.played and not out.dials
    row = await call_row(conn, out.uid)
    assert (row["outcome"], row["missed"]) == ("after_hours", True)


async def test_closed_date_is_a_holiday(place, conn):
    await conn.execute("UPDATE schedules SET closed_dates = %s WHERE name = 'always'", ([date(2026, 11, 25)],))
    out = await place(Scenario())
    assert "holiday_closed" in out.played
    assert (await call_row(conn, out.uid))["outcome"] == "holiday"


async def test_russian_public_holiday_closes_the_default_schedule(place, app, conn):
    app.clock = lambda: datetime(2027, 1, 1, 9, 0, tzinfo=UTC)  # New Year, a Friday
    out = await place(Scenario(number="555"))  # no row for 555: Mon-Fri 9-18 with RU holidays
    row = await call_row(conn, out.uid)
    assert row["outcome"] == "holiday"
    assert next(s for s in row["route_log"] if s["step"] == "hours")["reason"] == "holiday"


async def test_caller_hangs_up_in_the_menu(place, conn):
    out = await place(Scenario(hang_up_on="collect"))
    row = await call_row(conn, out.uid)
    assert (row["outcome"], row["missed"]) == ("abandoned", True)
    assert [cb["reason"] for cb in await callbacks(conn)] == ["abandoned"]


async def test_caller_gone_while_ringing(place, conn):
    out = await place(Scenario(keys=["1"], hang_up_on="dial"))
    row = await call_row(conn, out.uid)
    assert (row["outcome"], row["missed"]) == ("abandoned", True)


async def test_broken_directory_hands_the_call_back_to_the_dialplan(place, pbx, conn):
    await conn.execute("DELETE FROM groups WHERE name = 'sales'")  # the menu now names a missing group
    out = await place(Scenario(keys=["1"]))
    assert out.vars["SHOPCALL_DONE"] == "0"
    row = await call_row(conn, out.uid)
    assert row["outcome"] == "fallback" and "LookupError" in row["route_log"][-1]["error"]
    if out.peer:  # the channel is left up: closing the socket lets the dialplan go on to its fallback
        assert not out.peer.hung_up and "resume" not in out.peer.commands


AGENTS_SEE = {
    "scripted": 'Иван "Ваня" Петров, ${EXTEN} | & \\',
    "asterisk": 'Иван "Ваня" Петров, ${EXTEN} | & \\',
    # FreeSWITCH expands ${...} and backslash escapes in application arguments: made inert; and sofia writes
    # the name between quotes unescaped, so a quote would fail the agent's leg (found on a real FreeSWITCH)
    "freeswitch": "Иван 'Ваня' Петров, $ {EXTEN} | & /",
}


async def test_unsafe_caller_name_is_stored_intact_but_agents_see_it_cleaned(place, pbx, conn):
    name = 'Иван "Ваня"\nПетров, ${EXTEN} | & \\\x07'
    out = await place(Scenario(name=name, keys=["1"]))
    assert (await call_row(conn, out.uid))["caller_name"] == name
    assert out.agent_name == AGENTS_SEE[pbx]


async def test_a_clean_caller_name_is_left_alone(place, conn):
    out = await place(Scenario(name="Анна", keys=["1"]))
    assert out.agent_name is None
    assert (await call_row(conn, out.uid))["caller_name"] == "Анна"


async def test_not_a_phone_number_is_kept_raw_without_callback(place, conn):
    out = await place(Scenario(caller="anonymous", keys=["1"]))
    row = await call_row(conn, out.uid)
    assert row["caller_number"] == "anonymous" and row["caller_e164"] is None
    assert await callbacks(conn) == []


async def test_english_number_plays_english_prompts(place, conn):
    out = await place(Scenario(number="300", keys=["1"]))
    assert out.languages == {"en"}


async def test_hunt_group_rings_one_after_another(place, pbx, conn):
    await conn.execute("UPDATE groups SET strategy = 'hunt' WHERE name = 'delivery'")
    out = await place(Scenario(keys=["2"], answers=[(None, 0), (None, 0)]))
    if pbx == "asterisk":  # AgiCall hunts with one Dial per agent; FreeSWITCH with one bridge, legs joined by |
        assert out.dials == [(["agent2"], "ringall", 6), (["agent3"], "ringall", 6)]
    else:
        assert out.dials == [(["agent2", "agent3"], "hunt", 6)]
    row = await call_row(conn, out.uid)
    assert row["outcome"] == "missed_no_answer"  # and the caller heard it: the channel survived
    assert out.played[-1] == "nobody_answered"


async def test_a_skip_busy_group_leaves_out_the_agent_on_a_call(place, pbx, conn):
    await conn.execute("UPDATE groups SET skip_busy = true WHERE name = 'delivery'")
    # agent2 talks on another call; agent3's phone only rings for another caller: free, so rung
    out = await place(Scenario(keys=["2"], answers=[("agent3", 5)], on_a_call={"agent2"}, ringing={"agent3"}))
    assert out.dials == [(["agent3"], "ringall", 6)]
    row = await call_row(conn, out.uid)
    assert (row["outcome"], row["agent"]) == ("answered", "agent3")
    skips = [s for s in row["route_log"] if s["step"] == "skip"]
    assert [(s["ring"], s["skipped"], s["agents"]) for s in skips] == [("menu", "busy", ["agent2"])]
    if pbx == "freeswitch":  # asked over the call's own socket, once
        assert out.peer.commands.count("api show channels as json") == 1


async def test_a_skip_busy_group_all_on_calls_is_a_missed_call_without_ringing(place, conn):
    await conn.execute("UPDATE groups SET skip_busy = true WHERE name = 'delivery'")
    out = await place(Scenario(keys=["2"], on_a_call={"agent2", "agent3"}))
    assert out.dials == []
    assert "connecting" not in out.played and out.played[-1] == "nobody_answered"
    row = await call_row(conn, out.uid)
    assert (row["outcome"], row["missed"]) == ("missed_no_answer", True)
    assert {"step": "dial", "status": "nobody_available"}.items() <= next(
        s for s in row["route_log"] if s["step"] == "dial").items()
    [cb] = await callbacks(conn)
    assert cb["reason"] == "no_answer"


async def test_a_caller_holds_in_line_while_everyone_is_busy(place, pbx, conn):
    # the sounds do not exist here, so the music reads as 30 s long: 60 s of holding are two rounds
    await conn.execute("UPDATE groups SET skip_busy = true, hold_seconds = 60 WHERE name = 'delivery'")
    out = await place(Scenario(keys=["2"], on_a_call={"agent2", "agent3"}))
    assert out.dials == []
    assert out.played[-4:] == ["hold_notice", "hold_music", "hold_music", "nobody_answered"]
    row = await call_row(conn, out.uid)
    assert [s["how"] for s in row["route_log"] if s["step"] == "hold_end"] == ["timeout"]
    if pbx == "freeswitch":  # the step's question, then one a round
        assert out.peer.commands.count("api show channels as json") == 3
    [cb] = await callbacks(conn)
    assert cb["reason"] == "no_answer"


async def test_a_group_that_rings_busy_agents_does_not_ask_the_pbx(place, pbx, conn):
    out = await place(Scenario(keys=["2"], answers=[("agent2", 5)], on_a_call={"agent2"}))
    assert out.dials == [(["agent2", "agent3"], "ringall", 6)]  # call waiting is the PBX's business
    if pbx == "freeswitch":
        assert not [c for c in out.peer.commands if c.startswith("api show")]


# -- what only the FreeSWITCH side shows -------------------------------------------------------------------


async def test_freeswitch_dial_sets_the_timeout_on_the_channel_and_keeps_the_caller(app, conn):
    out = await run_freeswitch(app, Scenario(keys=["2"], answers=[("agent2", 3)]))
    peer = out.peer
    assert peer is not None
    [bridge] = peer.bridges
    assert bridge.call_timeout == "6"  # set on the channel: inside {} FreeSWITCH ignores it
    assert "call_timeout" not in bridge.braces
    assert peer.vars["continue_on_fail"] == "true" and peer.vars["hangup_after_bridge"] == "false"
    # the channel's bridge variables in one multiset, before the bridge (each application costs a round trip
    # and a completion event with all the channel's variables)
    multiset = next(arg for a, arg in peer.apps if a == "multiset" and "continue_on_fail" in arg)
    assert multiset == f"^^|continue_on_fail=true|hangup_after_bridge=false|ringback={RINGBACK}|call_timeout=6"
    assert peer.apps.index(("multiset", multiset)) < next(i for i, (a, _) in enumerate(peer.apps) if a == "bridge")
    assert all(target.startswith("user/") for _, target in bridge.legs)  # freeswitch.endpoint_template
    assert len({leg for leg, _ in bridge.legs}) == 2  # our own origination_uuid per leg
    row = await call_row(conn, out.uid)
    assert row["agent"] == "agent2" and row["caller_name"] == "Customer"
    # never resume (see esl/session.py); the events we never read are turned off
    assert peer.commands[:4] == ["connect", "myevents", UNUSED_EVENTS, "linger 30"]
    assert peer.commands[-1].startswith("sendmsg")  # SHOPCALL_OUTCOME; then we close and the dialplan hangs up
    assert peer.apps[-1] == ("multiset", "^^|SHOPCALL_DONE=1|SHOPCALL_OUTCOME=answered")


async def test_freeswitch_cyrillic_caller_name_and_split_reads(app, conn):
    peer = await call_once(esl_routes(app, {"inbound": inbound}), Caller(keys=["1"], answers=["agent1"]),
                           name="Мария \"Маша\" Иванова", split=True, command_timeout=10, timeout=10)
    row = await call_row(conn, peer.uuid)
    assert row["caller_name"] == 'Мария "Маша" Иванова' and row["agent"] == "agent1"


# -- a real FreeSWITCH ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_freeswitch(tmp_path_factory):
    from tests.pbx.freeswitch import FreeswitchPbx
    from tests.pbx.stack import require_pbx

    require_pbx("freeswitch")
    with FreeswitchPbx(tmp_path_factory.mktemp("fs-primitives"), dialplan=ANSWER) as pbx:
        yield pbx


@pytest.mark.parametrize("destination", ["inline", "dialplan"])
async def test_real_freeswitch_originate_socket_flow_and_hangup(real_freeswitch, destination):
    """Originate a call with our uuid whose answered leg runs `socket` back to our server, inline
    (`&socket(host:port async full)`, which originate would split at its spaces unless quoted: FreeSWITCH
    then refused `linger` on a socket that was neither async nor full) or from the dialplan; the flow sees
    the caller ID it was originated with (FreeSWITCH flips it to "Outbound Call" on answer), answers, sets
    and reads variables (Cyrillic), waits for a key, and hangs up; the client sees answer and hangup."""
    pbx = real_freeswitch
    seen: dict[str, object] = {}

    async def flow(session, channel):
        from esl.call import EslCall
        from esl.routes import call_info

        call = EslCall(session, call_info(channel, "e2e"), PromptNames())
        seen["caller"] = (call.info.caller_name, call.info.caller_number)
        await call.answer()
        await call.set_var("shopcall_e2e", "Проверка")
        seen["var"] = await call.get_var("shopcall_e2e")
        seen["key"] = await call.collect(None, max_digits=1, timeout=1)
        await call.hangup()

    server = EslServer({"e2e": flow}, port=0)
    await server.start()
    if destination == "dialplan":
        pbx.write_dialplan(pbx_dialplan(server.port))
        pbx.reload_dialplan()
        target = "e2e XML e2e"
    else:
        target = f"&socket(127.0.0.1:{server.port} async full)"
    client = EslClient("127.0.0.1", pbx.esl_port, pbx.esl_password, command_timeout=10)
    await client.start()
    log_start = pbx.full_log.stat().st_size
    try:
        result = await client.originate(
            "loopback/answer/public", uuid=str(uuid.uuid4()), timeout=20, destination=target,
            variables={"origination_caller_id_name": "Иван Петров", "origination_caller_id_number": "74951112233",
                       "shopcall_flow": "e2e"})
        assert result.ok, result.reply
        assert result.channel is not None
        cause = await asyncio.wait_for(result.channel.hangup, 30)
        await asyncio.wait_for(asyncio.gather(*server.active), 10)
    finally:
        await client.close()
        await server.stop()
    log = pbx.full_log.read_bytes()[log_start:].decode("utf-8", "replace")
    assert seen == {"caller": ("Иван Петров", "74951112233"), "var": "Проверка", "key": None}, pbx.log_tail()
    assert cause == "NORMAL_CLEARING"
    assert "Flipping CID" in log and "command not found" not in log  # what the test is about


def tone_wav(path: Path, seconds: float = 0.4, hz: int = 440) -> Path:
    """A short 8 kHz tone: something a real FreeSWITCH can play and log as played."""
    import math
    import struct
    import wave

    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * hz * i / 8000)))
                               for i in range(int(8000 * seconds))))
    return path


@pytest.mark.parametrize("sound_pack", [False, True])
async def test_real_freeswitch_mod_say_speaks_only_with_its_sound_files(real_freeswitch, tmp_path, sound_pack):
    """freeswitch.say = "mod_say" on a real FreeSWITCH with mod_say_ru loaded: no sound pack ships with it, and
    its `say` then plays silence, so the number is said by our TTS prompt; once the pack's files are there,
    by `say` (the number 42: digits/40 and digits/2)."""
    from esl.call import EslCall
    from esl.modules import Modules
    from esl.routes import call_info

    pbx = real_freeswitch
    prefix = pbx.sound_prefix("ru")
    shutil.rmtree(prefix, ignore_errors=True)
    if sound_pack:
        for name in ("1", "2", "40"):
            tone_wav(prefix / "digits" / f"{name}.wav")

    class Tts(PromptNames):  # our TTS, as far as FreeSWITCH can tell: a file it plays
        async def say_text(self, text: str, lang: str) -> Path:
            return tone_wav(tmp_path / "tts" / f"{len(text)}.wav").with_suffix("")

    async def flow(session, channel):
        call = EslCall(session, call_info(channel, "e2e"), Tts(), say="mod_say", modules=Modules())
        await call.answer()
        await call.say_number(42)
        await call.hangup()

    log = await run_real_flow(pbx, flow)
    said = "EXECUTE [depth=1] loopback/answer-a say(ru number pronounced 42)" in log
    assert said == sound_pack, log[-3000:]
    if sound_pack:
        # mod_say_ru's two files, found under the language's sound-prefix
        assert "done playing file file_string://digits/40.wav!digits/2.wav" in log, log[-3000:]
        assert "digits/40.wav" not in "".join(line for line in log.splitlines() if "[ERR]" in line)
    else:
        assert f"done playing file {tmp_path}/tts/" in log


async def run_real_flow(pbx, flow) -> str:
    """One originated call into `flow` through the real FreeSWITCH; returns what FreeSWITCH logged meanwhile."""
    server = EslServer({"e2e": flow}, port=0)
    await server.start()
    client = EslClient("127.0.0.1", pbx.esl_port, pbx.esl_password, command_timeout=10)
    await client.start()
    log_start = pbx.full_log.stat().st_size
    try:
        result = await client.originate("loopback/answer/public", uuid=str(uuid.uuid4()), timeout=20,
                                        destination=f"&socket(127.0.0.1:{server.port} async full)",
                                        variables={"shopcall_flow": "e2e"})
        assert result.ok and result.channel is not None, result.reply
        await asyncio.wait_for(result.channel.hangup, 30)
        await asyncio.wait_for(asyncio.gather(*server.active), 10)
    finally:
        await client.close()
        await server.stop()
    await asyncio.sleep(0.2)  # FreeSWITCH's logger writes behind
    return pbx.full_log.read_bytes()[log_start:].decode("utf-8", "replace")


# the far end of the loopback channel we originate: it answers and waits for our flow to hang up
ANSWER = """
<context name="public">
  <extension name="answer">
    <condition field="destination_number" expression="^answer$">
      <action application="answer"/>
      <action application="park"/>
    </condition>
  </extension>
</context>"""


def pbx_dialplan(port: int) -> str:
    return ANSWER + f"""
<context name="e2e">
  <extension name="e2e">
    <condition field="destination_number" expression="^e2e$">
      <action application="socket" data="127.0.0.1:{port} async full"/>
    </condition>
  </extension>
</context>"""


# -- EslCall's primitives, one by one, against the peer ---------------------------------------------------


async def on_freeswitch(flow, caller: Caller | None = None) -> tuple[FsPeer, object]:
    """Run `flow(call)` (an EslCall) for one call from the peer; returns the peer and what flow returned."""
    from esl.call import EslCall
    from esl.routes import call_info

    out: dict[str, object] = {}

    async def route(session, channel):
        out["value"] = await flow(EslCall(session, call_info(channel, "t"), PromptNames()))

    peer = await call_once({"t": route}, caller, variables={"shopcall_flow": "t"}, command_timeout=2, timeout=10)
    return peer, out.get("value")


async def test_freeswitch_record_reports_the_audio_written(tmp_path):
    target = tmp_path / "vm" / "message.wav"
    peer, result = await on_freeswitch(lambda call: call.record(target, max_seconds=5, silence_seconds=3))
    assert result.path == target and result.ended_by == "maxtime"
    assert result.seconds == 1.0  # record_ms: the audio in the file, not the time spent
    assert peer.apps == [("set", "playback_terminators=none"), ("playback", "tone_stream://%(250,0,1000)"),
                         ("set", "playback_terminators=#"), ("record", f"{target} 5 200 3")]


async def test_freeswitch_variables_round_trip_and_stay_inert():
    async def flow(call):
        await call.set_var("shopcall_note", "Иван ${system(id)}\n")
        with pytest.raises(ValueError):
            await call.set_var("CALLERID(name)", "x")
        return await call.get_var("shopcall_note"), await call.get_var("nothing_here")

    peer, (note, missing) = await on_freeswitch(flow)
    assert peer.vars["shopcall_note"] == note == "Иван $ {system(id)} "  # read back raw UTF-8 (uuid_getvar)
    assert missing is None


async def test_freeswitch_stream_returns_the_key_and_plain_playback_ignores_keys():
    async def flow(call):
        plain = await call.stream(Path("/sounds/ru/connecting"))
        key = await call.stream(Path("/sounds/ru/greeting"), escape="0123456789*#")
        return plain, key

    peer, (plain, key) = await on_freeswitch(flow, Caller(greeting_key="5"))
    assert (plain, key) == (None, "5")
    # FreeSWITCH stops a playback on a key in playback_terminators (default "*"): set before each kind
    assert [arg for app_, arg in peer.apps if app_ == "set"] == [
        "playback_terminators=none", "playback_terminators=0123456789*#"]
    peer, key = await on_freeswitch(
        lambda call: call.stream(Path("/sounds/ru/greeting"), escape="123"), Caller(greeting_key="9"))
    assert key is None and ("set", "playback_terminators=123") in peer.apps


async def test_freeswitch_recording_and_hangup_cause(tmp_path):
    target = tmp_path / "rec" / "call.wav"

    async def flow(call):
        await call.start_recording(target)
        await call.stop_recording()
        await call.start_recording(target, on_demand=True)
        await call.hangup("busy")

    peer, _ = await on_freeswitch(flow)
    assert peer.apps == [("set", "RECORD_BRIDGE_REQ=true"), ("record_session", str(target)),
                         ("stop_record_session", str(target)), ("bind_meta_app", f"2 b s record_session::{target}")]
    assert peer.hangup_cause == "USER_BUSY"


async def test_freeswitch_after_a_hangup_variables_come_from_the_last_event():
    async def flow(call):
        with pytest.raises(CallEnded):
            await call.stream(Path("/sounds/ru/greeting"))
        return await call.get_var("playback_ms")

    peer, value = await on_freeswitch(flow, Caller(hang_up_on="playback"))
    assert value == "2048" and peer.hung_up
