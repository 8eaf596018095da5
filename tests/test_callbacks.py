"""The callback worker (shopcall.callbacks) and flow on a real PostgreSQL with a fake AMI and a scripted call."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from pathlib import Path

import pytest

from agi.agent_phones import AsteriskAgentPhones
from agi.ami import AmiConnectionLost, OriginateResult
from shopcall import callbacks
from shopcall.app import App
from shopcall.call import CallEnded, CallInfo, DialResult, DialStatus
from shopcall.calllog import CallLog
from shopcall.config import AsteriskConfig, CallbacksConfig, Config, FreeswitchConfig
from shopcall.directory import Directory, Menu
from shopcall.flows.callback import callback as callback_flow
from shopcall.loader import load, read
from shopcall.serve import callback_pbx, serve_callbacks
from tests.scripted import PromptNames, ScriptedCall

DIRECTORY = Path(__file__).parent / "data" / "directory.toml"


def make_config(**cb: int) -> Config:
    return dataclasses.replace(Config.default(), callbacks=CallbacksConfig(**cb))


class FakeAmi:
    """Device states per endpoint and a scripted originate (answered unless told otherwise)."""

    def __init__(self, *, states: dict[str, str] | None = None, result: OriginateResult | None = None,
                 delay: float = 0.0, error: Exception | None = None) -> None:
        self.states = states or {}
        self.result = result or OriginateResult(True, 4)
        self.delay, self.error = delay, error
        self.originated: list[dict] = []
        self.asked: list[str] = []

    async def device_state(self, device: str) -> str:
        self.asked.append(device)
        await asyncio.sleep(0.01)  # a round trip: lets concurrent workers interleave
        return self.states.get(device, "NOT_INUSE")

    async def originate(self, channel: str, **kw) -> OriginateResult:
        self.originated.append({"channel": channel, **kw})
        await asyncio.sleep(self.delay)
        if self.error:
            raise self.error
        return self.result


def asterisk(ami: FakeAmi) -> AsteriskAgentPhones:
    return AsteriskAgentPhones(ami, Config.default())  # type: ignore[arg-type]


@pytest.fixture
async def loaded(conn):
    await load(conn, read(DIRECTORY))
    return conn


async def add_request(conn, phone: str = "+79161234567", group: str | None = "delivery", due: str = "now()") -> int:
    cur = await conn.execute(
        f"""INSERT INTO callback_requests (phone, group_id, reason, due_at)
            VALUES (%s, (SELECT id FROM groups WHERE name = %s), 'no_answer', {due}) RETURNING id""",
        (phone, group))
    return (await cur.fetchone())["id"]


async def request(conn, rid: int) -> dict:
    return await (await conn.execute("SELECT * FROM callback_requests WHERE id = %s", (rid,))).fetchone()


async def test_group_member_first_and_request_settled_by_agent_answer(loaded, pool):
    rid = await add_request(loaded)
    ami = FakeAmi(states={"PJSIP/agent2": "INUSE"})  # agent2 (delivery) is on a call: agent3 gets it
    [offer] = await callbacks.offer_due(pool, make_config(), asterisk(ami))
    assert (offer.request_id, offer.endpoint, offer.attempt) == (rid, "agent3", 1)
    [o] = ami.originated
    assert (o["channel"], o["context"], o["exten"], o["ring_seconds"]) == ("PJSIP/agent3", "shopcall-callback", "s", 20)
    assert o["variables"] == {"SHOPCALL_CALLBACK_ID": rid}
    row = await request(loaded, rid)
    assert (row["status"], row["attempts"], row["agent_endpoint"]) == ("in_progress", 1, "agent3")
    assert (row["last_result"], row["connected_at"]) == ("agent_answered", None)  # the flow sets connected_at


async def test_any_free_agent_when_the_group_is_busy_and_none_when_all_are(loaded, pool):
    rid = await add_request(loaded)
    busy = {f"PJSIP/agent{i}": "INUSE" for i in (2, 3)}
    [offer] = await callbacks.offer_due(pool, make_config(), asterisk(FakeAmi(states=busy | {"PJSIP/agent1": "RINGING"})))
    assert offer.endpoint == "agent4"
    await loaded.execute("UPDATE callback_requests SET status = 'pending' WHERE id = %s", (rid,))
    await loaded.execute("UPDATE employees SET paused = true WHERE endpoint = 'agent4'")
    ami = FakeAmi(states=busy)
    await loaded.execute("UPDATE employees SET logged_in = false WHERE endpoint = 'agent1'")
    assert await callbacks.offer_due(pool, make_config(), asterisk(ami)) == []
    assert ami.originated == [] and (await request(loaded, rid))["status"] == "pending"


async def test_concurrent_workers_never_dial_one_request_twice(loaded, pool):
    ids = [await add_request(loaded, phone=f"+7916000000{i}") for i in range(3)]
    ami = FakeAmi(delay=0.05)
    rounds = await asyncio.gather(*(callbacks.offer_due(pool, make_config(), asterisk(ami)) for _ in range(4)))
    offered = [o.request_id for r in rounds for o in r]
    assert sorted(offered) == ids  # each once, whichever worker took it
    assert len(ami.originated) == 3
    agents = [o["channel"] for o in ami.originated]
    assert len(set(agents)) == 3  # and never two callbacks to one agent at once
    # the agents are still on those callbacks: a second pass finds nothing to do for them
    await add_request(loaded, phone="+79160000009")
    again = await callbacks.offer_due(pool, make_config(), asterisk(FakeAmi()))
    assert [o.endpoint for o in again] == [
        e for e in ("agent1", "agent2", "agent3", "agent4") if f"PJSIP/{e}" not in agents]


def given(offers: list[callbacks.Offer]) -> set[tuple[int, str]]:
    return {(o.request_id, o.endpoint) for o in offers}


async def test_a_group_request_gets_its_groups_free_member_though_an_older_request_without_a_group_is_due(
        loaded, pool):
    # seen on a PBX: the older request without a group took agent2 (first in line, and delivery's only free
    # member) and delivery's request went to agent4 of accounting
    older = await add_request(loaded, phone="+79160000001", group=None, due="now() - interval '1 hour'")
    delivery = await add_request(loaded, phone="+79160000002")
    ami = FakeAmi(states={"PJSIP/agent1": "INUSE", "PJSIP/agent3": "INUSE"})
    offers = await callbacks.offer_due(pool, make_config(), asterisk(ami))
    assert given(offers) == {(delivery, "agent2"), (older, "agent4")}
    assert sorted(ami.asked) == [f"PJSIP/agent{i}" for i in (1, 2, 3, 4)]  # each phone asked about once


async def test_the_only_free_agent_goes_to_their_groups_request_before_an_older_one_without_a_group(loaded, pool):
    older = await add_request(loaded, phone="+79160000001", group=None, due="now() - interval '1 hour'")
    delivery = await add_request(loaded, phone="+79160000002")
    busy = {f"PJSIP/agent{i}": "INUSE" for i in (1, 3, 4)}
    assert given(await callbacks.offer_due(pool, make_config(), asterisk(FakeAmi(states=busy)))) == {
        (delivery, "agent2")}
    assert (await request(loaded, older))["status"] == "pending"  # any agent may take it: the next one free


async def test_two_groups_each_get_their_only_free_member_whatever_the_age_order(loaded, pool):
    await loaded.execute("DELETE FROM group_members WHERE employee_id = (SELECT id FROM employees "
                         "WHERE endpoint = 'agent3')")  # agent3: in no group
    delivery = await add_request(loaded, phone="+79160000001", due="now() - interval '3 hours'")
    accounting = await add_request(loaded, phone="+79160000002", group="accounting", due="now() - interval '2 hours'")
    sales = await add_request(loaded, phone="+79160000003", group="sales", due="now() - interval '1 hour'")
    ami = FakeAmi(states={"PJSIP/agent2": "INUSE"})  # delivery has no free member: its request takes agent3
    offers = await callbacks.offer_due(pool, make_config(), asterisk(ami))
    assert given(offers) == {(delivery, "agent3"), (accounting, "agent4"), (sales, "agent1")}


async def test_an_agent_in_two_groups_is_left_to_the_group_only_they_can_serve(loaded, pool):
    await loaded.execute("""INSERT INTO group_members (group_id, employee_id, position)
                            SELECT g.id, e.id, -1 FROM groups g, employees e
                            WHERE g.name = 'delivery' AND e.endpoint = 'agent1'""")  # first in delivery's line
    delivery = await add_request(loaded, phone="+79160000001", due="now() - interval '1 hour'")
    sales = await add_request(loaded, phone="+79160000002", group="sales")
    ami = FakeAmi(states={"PJSIP/agent3": "INUSE", "PJSIP/agent4": "INUSE"})
    offers = await callbacks.offer_due(pool, make_config(), asterisk(ami))
    assert given(offers) == {(delivery, "agent2"), (sales, "agent1")}


async def test_a_group_without_a_free_member_gets_an_outsider_not_another_groups_only_one(loaded, pool):
    await loaded.execute("UPDATE employees SET last_call_at = now() WHERE endpoint = 'agent1'")  # agent4 first in line
    delivery = await add_request(loaded, phone="+79160000001", due="now() - interval '1 hour'")
    accounting = await add_request(loaded, phone="+79160000002", group="accounting")
    ami = FakeAmi(states={"PJSIP/agent2": "INUSE", "PJSIP/agent3": "INUSE"})
    offers = await callbacks.offer_due(pool, make_config(), asterisk(ami))
    assert given(offers) == {(delivery, "agent1"), (accounting, "agent4")}


async def test_a_click_to_call_still_goes_first_and_only_to_its_agent(loaded, pool):
    queued = await add_request(loaded, phone="+79160000001", due="now() - interval '1 hour'")  # delivery's
    click = (await callbacks.click_to_call(pool, "agent2", "+79160000002"))["id"]
    ami = FakeAmi(states={"PJSIP/agent3": "INUSE"})  # agent2 is delivery's only free member: the click's still
    [first] = await callbacks.offer_due(pool, make_config(), asterisk(ami), limit=1)
    assert (first.request_id, first.endpoint) == (click, "agent2")
    [then] = await callbacks.offer_due(pool, make_config(), asterisk(ami))
    assert (then.request_id, then.endpoint) == (queued, "agent1")
    # a click whose agent is busy waits for them; the others go on without that agent
    await loaded.execute("UPDATE callback_requests SET status = 'done'")
    other = await add_request(loaded, phone="+79160000003", group="accounting")
    click = (await callbacks.click_to_call(pool, "agent4", "+79160000004"))["id"]
    ami = FakeAmi(states={"PJSIP/agent4": "INUSE"})
    assert [o.request_id for o in await callbacks.offer_due(pool, make_config(), asterisk(ami))] == [other]
    assert (await request(loaded, click))["status"] == "pending"


async def test_no_answer_retries_later_then_fails_after_max_attempts(loaded, pool):
    rid = await add_request(loaded)
    config = make_config(max_attempts=2, retry_minutes=15)
    ami = FakeAmi(result=OriginateResult(False, 3))
    await callbacks.offer_due(pool, config, asterisk(ami))
    row = await request(loaded, rid)
    assert (row["status"], row["attempts"], row["last_result"], row["agent_endpoint"]) == (
        "pending", 1, "agent_no_answer", None)
    wait = (await (await loaded.execute("SELECT due_at - now() AS d FROM callback_requests WHERE id = %s",
                                        (rid,))).fetchone())["d"]
    assert 14 * 60 < wait.total_seconds() <= 15 * 60
    assert await callbacks.offer_due(pool, config, asterisk(ami)) == []  # not due yet
    await loaded.execute("UPDATE callback_requests SET due_at = now() WHERE id = %s", (rid,))
    await callbacks.offer_due(pool, config, asterisk(ami))
    row = await request(loaded, rid)
    assert (row["status"], row["attempts"], row["done_at"] is not None) == ("failed", 2, True)
    assert len(ami.originated) == 2


async def test_lost_originate_is_left_in_progress_and_reconciled(loaded, pool):
    rid = await add_request(loaded)
    config = make_config()
    await callbacks.offer_due(pool, config, asterisk(FakeAmi(error=AmiConnectionLost("connection lost"))))
    row = await request(loaded, rid)
    assert row["status"] == "in_progress"  # outcome unknown: the phone may ring; not re-dialled
    assert await callbacks.reconcile(pool, config) == []  # still inside the ring time
    assert await callbacks.reconcile(pool, config, ring_grace=0) == [rid]
    row = await request(loaded, rid)
    assert (row["status"], row["last_result"], row["agent_endpoint"]) == ("pending", "stale", None)
    # a connected call (the flow runs) is given back only after the longest call
    [offer] = await callbacks.offer_due(pool, config, asterisk(FakeAmi()))
    assert await callbacks.connected(pool, rid, offer.endpoint) is not None
    assert await callbacks.reconcile(pool, config, ring_grace=0) == []
    assert await callbacks.reconcile(pool, config, ring_grace=0, call_grace=0) == [rid]


async def test_stale_worker_cannot_release_a_reclaimed_request(loaded, pool):
    rid = await add_request(loaded)
    config = make_config()
    await callbacks.offer_due(pool, config, asterisk(FakeAmi(error=AmiConnectionLost("x"))))
    await callbacks.reconcile(pool, config, ring_grace=0)
    [offer] = await callbacks.offer_due(pool, config, asterisk(FakeAmi(error=AmiConnectionLost("x"))))
    assert offer.attempt == 2
    assert await callbacks.release(pool, config, rid, "agent_no_answer", attempt=1) is None
    assert (await request(loaded, rid))["status"] == "in_progress"


# ---- the flow on the agent's answered leg ----------------------------------------------------------


class AgentLeg(ScriptedCall):
    """ScriptedCall plus the trunk dial (tests/scripted.py belongs to the inbound flows)."""

    def __init__(self, info: CallInfo, *, customer: DialResult) -> None:
        super().__init__(info)
        self.customer = customer

    async def dial_number(self, number: str, *, timeout: int = 30) -> DialResult:
        self._do("dial_number", number, timeout)
        return self.customer


@pytest.fixture
async def app(loaded, pool, tmp_path) -> App:
    directory = Directory(pool, timezone="Europe/Moscow", default_menu=Menu(timeout=2, retries=1))
    return App(make_config(max_attempts=3), pool, PromptNames(), directory, CallLog(pool, tmp_path / "spool"))


def leg(rid: int, agent: str = "agent2", uid: str = "2.1") -> CallInfo:
    return CallInfo(uniqueid=uid, pbx="asterisk", caller_number=agent, channel=f"PJSIP/{agent}-00000001",
                    caller_endpoint=agent, args={"id": str(rid)})


async def test_flow_tells_the_agent_dials_the_customer_and_marks_done(app, loaded, pool):
    rid = await add_request(loaded)
    await callbacks.offer_due(pool, app.config, asterisk(FakeAmi(states={"PJSIP/agent3": "INUSE"})))
    call = AgentLeg(leg(rid), customer=DialResult(DialStatus.ANSWERED, None, 12.0, "ANSWER"))
    await callback_flow(call, app)
    assert call.played[0] == "callback_agent_intro"
    assert call.played[1].startswith("семь девять один шесть")  # the number's digits, said
    assert ("dial_number", "+79161234567", 30) in call.actions
    row = await request(loaded, rid)
    assert (row["status"], row["last_result"]) == ("done", "answered")
    c = await (await loaded.execute(
        "SELECT c.*, e.endpoint AS agent, g.name AS g FROM calls c LEFT JOIN employees e ON e.id = c.answered_by "
        "LEFT JOIN groups g ON g.id = c.group_id")).fetchone()
    assert (c["direction"], c["outcome"], c["agent"], c["missed"], c["dialled_number"], c["g"]) == (
        "outbound", "answered", "agent2", False, "+79161234567", "delivery")
    assert await (await loaded.execute("SELECT count(*) AS n FROM callback_requests")).fetchone() == {"n": 1}


async def test_flow_customer_no_answer_goes_back_to_pending(app, loaded, pool):
    rid = await add_request(loaded)
    await callbacks.offer_due(pool, app.config, asterisk(FakeAmi(states={"PJSIP/agent3": "INUSE"})))
    call = AgentLeg(leg(rid), customer=DialResult(DialStatus.NOANSWER, detail="NOANSWER"))
    await callback_flow(call, app)
    assert call.played[-1] == "callback_customer_unreachable"
    row = await request(loaded, rid)
    assert (row["status"], row["last_result"]) == ("pending", "customer_noanswer")


async def test_flow_agent_hangs_up_before_the_customer_is_dialled(app, loaded, pool):
    rid = await add_request(loaded)
    await callbacks.offer_due(pool, app.config, asterisk(FakeAmi(states={"PJSIP/agent3": "INUSE"})))
    call = AgentLeg(leg(rid), customer=DialResult(DialStatus.ANSWERED))
    call.hang_up_on = "stream"
    with pytest.raises(CallEnded):
        await callback_flow(call, app)
    assert not any(a[0] == "dial_number" for a in call.actions)
    assert (await request(loaded, rid))["status"] == "pending"


async def test_flow_refuses_a_request_that_is_not_in_progress_for_this_agent(app, loaded, pool):
    rid = await add_request(loaded)
    call = AgentLeg(leg(rid), customer=DialResult(DialStatus.ANSWERED))
    await callback_flow(call, app)
    assert [a[0] for a in call.actions] == ["hangup"]
    assert (await request(loaded, rid))["status"] == "pending"


async def test_run_forever_offers_and_reconciles(loaded, pool):
    rid = await add_request(loaded)
    stuck = await add_request(loaded, phone="+79160000002")
    await loaded.execute("UPDATE callback_requests SET status = 'in_progress', attempts = 1, claimed_at = "
                         "now() - interval '1 hour', agent_endpoint = 'agent4' WHERE id = %s", (stuck,))
    ami = FakeAmi(result=OriginateResult(False, 5))
    task = asyncio.create_task(callbacks.run_forever(pool, make_config(poll_seconds=0.05), asterisk(ami)))
    try:
        # until both outcomes are written: cancelling a round between its originate and its release would
        # leave the request in progress, which is the test's doing, not the worker's
        for _ in range(100):
            rows = [await request(loaded, r) for r in (rid, stuck)]
            if all(r["last_result"] == "agent_busy" for r in rows):
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert {o["variables"]["SHOPCALL_CALLBACK_ID"] for o in ami.originated} == {rid, stuck}
    for r in (rid, stuck):
        row = await request(loaded, r)
        assert (row["status"], row["last_result"]) == ("pending", "agent_busy")


async def test_worker_is_off_without_an_ami_secret(pool, caplog):
    caplog.set_level("INFO", "shopcall.serve")
    await asyncio.wait_for(serve_callbacks(pool, Config.default(), "asterisk", ""), 1)  # returns at once
    assert "callback worker off: asterisk.ami_secret is empty" in caplog.text


def test_the_agents_pbx_follows_the_calls_a_process_serves():
    every = ("agi", "esl", "api", "dialler")
    default = Config.default()
    ami = dataclasses.replace(default, asterisk=AsteriskConfig(ami_secret="s"))
    fs_dialler = dataclasses.replace(default, freeswitch=FreeswitchConfig(dialler_enabled=True))
    assert callback_pbx(ami, every) == "asterisk"
    assert callback_pbx(default, every) == "asterisk"  # and it says the secret is missing
    assert callback_pbx(fs_dialler, every) == "freeswitch"  # the event socket is in use already
    assert callback_pbx(ami, ["esl"]) == callback_pbx(default, ["esl"]) == "freeswitch"
    assert callback_pbx(ami, ["api"]) is None and callback_pbx(ami, ["dialler"]) is None
    chosen = dataclasses.replace(ami, callbacks=CallbacksConfig(pbx="freeswitch"))
    assert callback_pbx(chosen, every) == callback_pbx(chosen, ["agi"]) == "freeswitch"
    assert callback_pbx(chosen, ["api"]) is None


class FakeSession:
    """Just enough of agi.session.AgiSession: replies to Dial and the GET VARIABLEs after it."""

    def __init__(self, dialstatus: str) -> None:
        self.hung_up, self.command_timeout, self.sent = False, 5.0, []
        self.vars = {"DIALSTATUS": dialstatus, "DIALEDPEERNAME": "PJSIP/trunk-00000002", "ANSWEREDTIME": "7"}

    async def send(self, line: bytes, *, timeout: float | None = None):
        from agi.protocol import parse_reply

        text = line.decode().strip()
        self.sent.append(text)
        if text.startswith("GET VARIABLE"):
            return parse_reply(f"200 result=1 ({self.vars[text.split()[-1]]})")
        if text.startswith("GET FULL VARIABLE"):  # Asterisk substitutes each ${NAME} of the expression
            expr = text.removeprefix("GET FULL VARIABLE ").strip('"')
            value = re.sub(r"[$][{]([^}]+)[}]", lambda m: self.vars.get(m[1], ""), expr)
            return parse_reply(f"200 result=1 ({value})")
        return parse_reply("200 result=0")


async def test_agi_dial_number_uses_the_trunk_template_and_validates_the_number():
    from agi.call import AgiCall

    session = FakeSession("ANSWER")
    call = AgiCall(session, CallInfo(uniqueid="1.1", pbx="asterisk"), PromptNames(),  # type: ignore[arg-type]
                   trunk_template="PJSIP/{number}@carrier")
    result = await call.dial_number("+79161234567", timeout=25)
    assert session.sent[0] == 'EXEC Dial "PJSIP/+79161234567@carrier,25,g"'
    assert (result.status, result.talk_seconds, result.answered_endpoint) == (DialStatus.ANSWERED, 7.0, None)
    for bad in ("+7916&PJSIP/agent1", "7916,1", "", "12", "79161234567\n"):
        with pytest.raises(ValueError):
            await call.dial_number(bad)
    assert len(session.sent) == 2  # the Dial and its outcome: the bad numbers sent nothing
