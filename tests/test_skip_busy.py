# ruff: noqa: F811  (pytest fixtures imported from other modules are parameters here)
"""Groups with skip_busy: an agent who is on a call is not rung, as the PBX tells at ring time. The inbound
flow on scripted calls and a real PostgreSQL; AgiCall's one command against a recording session. (Every
PBX's side of a whole call: tests/test_esl_flows.py; through the real Asterisk: tests/test_e2e_inbound.py.)"""

from __future__ import annotations

import logging

import pytest

from agi.call import AgiCall
from agi.protocol import parse_reply
from shopcall.call import CallInfo, PbxError
from shopcall.loader import DirectoryError, load, read
from tests.scripted import PromptNames, ScriptedCall
from tests.test_inbound_flow import app as base_app  # noqa: F401 (fixture of the one below)
from tests.test_inbound_flow import call_row, info, run
from tests.test_routing_flow import NO, OLGA, ROUTING, app, yes  # noqa: F401 (fixture)


def asked(call: ScriptedCall) -> list[list[str]]:
    return [a[1] for a in call.actions if a[0] == "busy"]


def dials(call: ScriptedCall) -> list[list[str]]:
    return [a[1] for a in call.actions if a[0] == "dial"]


async def test_each_step_asks_just_before_it_rings_and_the_sticky_manager_follows_the_department(
        app, conn):
    await conn.execute("UPDATE groups SET skip_busy = true WHERE name = 'builtin'")
    # Olga's manager agent4 is talking; by the time the category group rings, agent2 is too
    call = ScriptedCall(info("400", caller=OLGA), dial=[NO, yes("agent3")], on_a_call=[{"agent4"}, {"agent2"}])
    await run(call, app)
    # the sticky step asked (the tracking number's department skips busy agents), the kitchen group (no
    # skip_busy) rang without asking, the category group asked again
    assert asked(call) == [["agent4"], ["agent2", "agent3"]]
    assert dials(call) == [["agent3"], ["agent3"]]
    assert call.played.count("connecting") == 1
    row = await call_row(conn)
    assert (row["outcome"], row["agent"], row["group_name"]) == ("answered", "agent3", "builtin")
    log = [(s["step"], s.get("ring") or s.get("reason"), s.get("skipped")) for s in row["route_log"]
           if s["step"] in ("skip", "ring")]
    assert log == [("skip", "sticky", "busy"), ("ring", "last_category", None), ("skip", "category", "busy"),
                   ("ring", "category", None)]


class PbxCannotSay(ScriptedCall):
    async def busy(self, names: list[str]) -> frozenset[str]:
        raise PbxError("DEVICE_STATE: no answer")


async def test_a_pbx_that_cannot_say_who_is_busy_rings_everyone(app, conn, caplog):
    await conn.execute("UPDATE groups SET skip_busy = true WHERE name = 'delivery'")
    call = PbxCannotSay(info(), keys=["2"], dial=[yes("agent2")])
    with caplog.at_level(logging.WARNING, logger="shopcall.call"):
        await run(call, app)
    assert dials(call) == [["agent2", "agent3"]]
    assert (await call_row(conn))["outcome"] == "answered"
    assert "could not ask who is on a call" in caplog.text


async def test_the_directory_file_sets_it_and_refuses_anything_but_true_or_false(app, conn):
    data = read(ROUTING)
    data["groups"][0]["skip_busy"] = True
    await load(conn, data)
    cur = await conn.execute("SELECT name, skip_busy FROM groups WHERE name IN ('builtin', 'kitchen') ORDER BY name")
    assert [tuple(r.values()) for r in await cur.fetchall()] == [("builtin", True), ("kitchen", False)]
    data["groups"][0]["skip_busy"] = "false"  # a quoted word would be true to bool()
    with pytest.raises(DirectoryError, match="skip_busy.*true or false"):
        await load(conn, data)


class Replies:
    """The AGI session's part: records each command, answers GET FULL VARIABLE with a fixed value."""

    def __init__(self, value: str) -> None:
        self.hung_up, self.command_timeout, self.sent, self.value = False, 5.0, [], value

    async def send(self, line: bytes, *, timeout: float | None = None):
        self.sent.append(line.decode().strip())
        return parse_reply(f"200 result=1 ({self.value})")


def agi_call(value: str, template: str = "PJSIP/{endpoint}") -> tuple[AgiCall, Replies]:
    session = Replies(value)
    call = AgiCall(session, CallInfo(uniqueid="1.1", pbx="asterisk"), PromptNames(),  # type: ignore[arg-type]
                   endpoint_template=template)
    return call, session


async def test_asterisk_is_asked_every_device_state_in_one_command():
    call, session = agi_call("INUSE,NOT_INUSE,RINGINUSE,RINGING,ONHOLD,UNAVAILABLE")
    names = ["agent1", "agent2", "agent3", "agent4", "agent5", "agent6"]
    assert await call.on_a_call(names) == {"agent1", "agent3", "agent5"}
    assert session.sent == ['GET FULL VARIABLE "' + ",".join(f"${{DEVICE_STATE(PJSIP/{n})}}" for n in names) + '"']


async def test_asterisk_answers_that_do_not_fit_ring_everyone_and_names_are_checked():
    call, session = agi_call("INUSE")  # one state for two devices: no guess who it belongs to
    assert await call.on_a_call(["agent1", "agent2"]) == frozenset()
    with pytest.raises(ValueError):
        await call.on_a_call(["agent1)},${SHELL(id)"])
    call, session = agi_call("INUSE", template="PJSIP/{endpoint}$x")  # an admin's template Asterisk would read a $ in
    assert await call.on_a_call(["agent1"]) == frozenset() and session.sent == []
