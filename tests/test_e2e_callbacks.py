"""End to end, on Debian's Asterisk 22 and on FreeSWITCH 1.10 (every test runs on both): a pending callback
request → the worker (in this process, with the PBX's AgentPhones: AMI on Asterisk, the inbound event
socket on FreeSWITCH) rings an agent's SIPp phone → it answers → the callback flow in `shopcall serve` says
the number and dials the customer through the "trunk" (another SIPp phone) → the customer answers →
request done. A click to call goes the same way from the HTTP API (also in this process). The serve's
own callback worker is off: the test's rounds are the only ones.

The PBXes differ on the way, not in the outcome: Asterisk re-INVITEs the agent's phone once the customer
answers (a connected-line update, which the agents' SIPp phones answer); FreeSWITCH flips the agent's leg's
caller ID on answer (esl/agent_phones.py sets what it flips to) and tells whose phone is busy from a listing
that lags its channels (see until_free)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import aiohttp
import psycopg
import pytest
from psycopg.rows import dict_row

from shopcall import callbacks, db
from shopcall.api import start_api
from shopcall.config import ApiConfig, CallbacksConfig
from shopcall.notify import wake_on
from tests.pbx.sipp import SippAgent, place_call
from tests.pbx.stack import PBXES, Stack, pbx_stack
from tests.test_e2e_inbound import CRM_SECRET, Crm

pytestmark = pytest.mark.slow
T = TypeVar("T")

CUSTOMER = "+79161234567"
# agent1 is sales, agent2 and agent3 delivery, agent4 accounting (tests/data/directory.toml); "trunk" is
# the operator's trunk: the customers the callback flow dials reach its SIPp phone
AGENTS = ("agent1", "agent2", "agent3", "agent4")
CUSTOMER_RING_SECONDS = 5  # the serve's: how long the flow lets the customer's phone ring


@pytest.fixture(scope="module", params=PBXES)
def stack(request, pg_url: str, tmp_path_factory) -> Iterator[Stack]:
    sms = Crm()  # the shop's SMS gateway (webhooks.messages_url): texts to missed callers
    try:
        with pbx_stack(request.param, tmp_path_factory.mktemp(f"e2e-callbacks-{request.param}"), pg_url,
                       agents=(*AGENTS, "trunk"), trunk="trunk", sections=f"""
[inbound]
ring_timeout = 4
missed_call_sms = true
[callbacks]
enabled = false                # the test's rounds are the only ones: no worker of the serve's own
customer_ring_seconds = {CUSTOMER_RING_SECONDS}
[webhooks]
messages_url = "{sms.url}"
secret = "{CRM_SECRET}"
poll_seconds = 0.2
""") as s:
            s.sms = sms
            yield s
    finally:
        sms.close()


@pytest.fixture
async def worker(stack: Stack) -> AsyncIterator[tuple]:
    """A pool, the test process's configuration and the PBX's AgentPhones, for callbacks.offer_due."""
    config = stack.config(callbacks=CallbacksConfig(agent_ring_seconds=10))
    async with stack.agent_phones(config) as phones, db.open_pool(stack.url, min_size=1, max_size=4) as pool:
        yield pool, config, phones


@pytest.fixture
def dbc(stack: Stack) -> Iterator[psycopg.Connection]:
    """A clean queue, and agent1 the only agent who may be offered a request (the others are logged out:
    their phones are free as far as the PBX knows, and a request without a group could go to any of them)."""
    with psycopg.connect(stack.url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("TRUNCATE callback_requests, calls RESTART IDENTITY CASCADE")
        conn.execute("""UPDATE employees SET logged_in = (endpoint = 'agent1'), paused = false,
                        last_call_at = NULL, last_call_ended_at = NULL""")
        yield conn


async def phone(stack: Stack, name: str, **behaviour) -> SippAgent:
    agent = SippAgent(name, stack.pbx.agents[name], work_dir=stack.work, **behaviour)
    await agent.start()
    return agent


async def answering_phones(stack: Stack) -> tuple[SippAgent, SippAgent]:
    """agent1's phone and the customer's (behind the trunk), both answering; the customer hangs up after 2 s."""
    return (await phone(stack, "agent1", answer_after=0.5),
            await phone(stack, "trunk", answer_after=0.5, hangup_after=2.0))


def invites(agent: SippAgent) -> list[tuple[str, str]]:
    """(request URI, From header) of every call the phone was offered: the INVITEs of SIPp's message trace
    that open a dialog (no To tag; re-INVITEs and retransmissions left out)."""
    text = agent.messages_file.read_text(errors="replace") if agent.messages_file.exists() else ""
    found: dict[str, tuple[str, str]] = {}
    for block in re.split(r"^-{10,}.*$", text, flags=re.M):
        lines = [line.strip() for line in block.strip().splitlines()[1:] if line.strip()]  # past "... received"
        if not lines or not lines[0].startswith("INVITE "):
            continue
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        if ";tag=" not in headers.get("to", ""):
            found.setdefault(headers.get("call-id", ""), (lines[0].split()[1], headers.get("from", "")))
    return list(found.values())


async def until_free(phones: callbacks.AgentPhones, *endpoints: str, timeout: float = 10.0) -> None:
    """Wait until the PBX says these phones are free, as a worker's next round would find them. FreeSWITCH's
    `show channels` reads its core database, which a thread of its own updates: the previous test's legs
    were still listed, ACTIVE, 100 ms after FreeSWITCH had destroyed them, and the round offered nothing."""
    deadline = time.monotonic() + timeout
    for endpoint in endpoints:
        while not await phones.is_free(endpoint):
            assert time.monotonic() < deadline, f"{endpoint}'s phone is still busy for the PBX"
            await asyncio.sleep(0.2)


def wait_for(fn: Callable[[], T], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def settled(dbc: psycopg.Connection, rid: int, timeout: float = 20.0) -> dict | None:
    """The request once the flow let go of it (its call row is written just after)."""
    return wait_for(lambda: (r := dbc.execute("SELECT * FROM callback_requests WHERE id = %s",
                                              (rid,)).fetchone())["status"] != "in_progress" and r, timeout)


async def test_agent_answers_then_customer_answers_request_done(stack, worker, dbc):
    pool, config, phones = worker
    agent, customer = await answering_phones(stack)
    try:
        rid = dbc.execute(
            """INSERT INTO callback_requests (phone, group_id, reason)
               VALUES (%s, (SELECT id FROM groups WHERE name = 'sales'), 'no_answer') RETURNING id""",
            (CUSTOMER,)).fetchone()["id"]
        await until_free(phones, "agent1")
        offers = await callbacks.offer_due(pool, config, phones)
        assert [(o.request_id, o.endpoint) for o in offers] == [(rid, "agent1")], stack.explain(agent)
        await customer.wait_for("HANGUP", timeout=30)
        await agent.wait_for("HANGUP", timeout=10)
        row = settled(dbc, rid)
        assert row and (row["status"], row["attempts"], row["last_result"]) == ("done", 1, "answered"), (
            stack.explain(agent, customer))
        call = wait_for(lambda: dbc.execute("SELECT c.*, e.endpoint AS agent FROM calls c "
                                            "LEFT JOIN employees e ON e.id = c.answered_by").fetchone())
        assert (call["pbx"], call["direction"], call["outcome"], call["agent"], call["dialled_number"]) == (
            stack.kind, "outbound", "answered", "agent1", CUSTOMER)
        assert (call["callback_request_id"], call["group_id"] is not None) == (rid, True)
        # the customer talked for the 2 s before they hung up, by the PBX's clock
        assert 1.5 <= (call["ended_at"] - call["answered_at"]).total_seconds() <= 5, (
            call["answered_at"], call["ended_at"])
        assert (agent.invites_received(), agent.answered()) == (1, 1)
        assert (customer.invites_received(), customer.answered()) == (1, 1)
        # the agent's phone showed whom they call back; the trunk got the customer's number in the request URI
        [(_, shown)] = invites(agent)
        assert f"<sip:{CUSTOMER}@" in shown and "Callback" in shown, shown
        [(uri, shown)] = invites(customer)
        assert uri.startswith(f"sip:{CUSTOMER}@"), uri
        # the customer's leg shows the agent's leg's caller ID, on both PBXes; FreeSWITCH flips that leg's
        # caller ID to its callee ID on answer, which showed the customer "Outbound Call" <agent1> until
        # esl/agent_phones.py set the callee ID too
        assert shown.startswith(f'"Callback {CUSTOMER}" <sip:{CUSTOMER}@'), shown
    finally:
        await agent.stop()
        await customer.stop()


async def test_agent_does_not_answer_request_back_to_pending(stack, worker, dbc):
    pool, config, phones = worker
    config = stack.config(callbacks=CallbacksConfig(agent_ring_seconds=2))
    agent = await phone(stack, "agent1", answer_after=None)
    try:
        rid = dbc.execute("INSERT INTO callback_requests (phone, reason) VALUES (%s, 'no_answer') RETURNING id",
                          (CUSTOMER,)).fetchone()["id"]
        await until_free(phones, "agent1")
        [offer] = await callbacks.offer_due(pool, config, phones)
        assert offer.endpoint == "agent1"
        row = dbc.execute("SELECT * FROM callback_requests WHERE id = %s", (rid,)).fetchone()
        assert (row["status"], row["attempts"], row["last_result"]) == ("pending", 1, "agent_no_answer"), (
            stack.explain(agent))
        assert row["due_at"] > row["created_at"]
        await agent.wait_for("CANCELLED")
        assert (agent.invites_received(), agent.cancelled()) == (1, 1)
        assert dbc.execute("SELECT count(*) AS n FROM calls").fetchone()["n"] == 0  # nobody answered: no call
    finally:
        await agent.stop()


async def test_customer_does_not_answer_request_back_to_pending(stack, worker, dbc):
    pool, config, phones = worker
    agent = await phone(stack, "agent1", answer_after=0.5)
    customer = await phone(stack, "trunk", answer_after=None)
    try:
        rid = dbc.execute("INSERT INTO callback_requests (phone, reason) VALUES (%s, 'no_answer') RETURNING id",
                          (CUSTOMER,)).fetchone()["id"]
        await until_free(phones, "agent1")
        [offer] = await callbacks.offer_due(pool, config, phones)
        assert offer.endpoint == "agent1"
        # the flow lets the customer's phone ring for the serve's customer_ring_seconds
        assert await customer.wait_for("CANCELLED", timeout=30) == 1, stack.explain(agent, customer)
        await agent.wait_for("HANGUP", timeout=20)  # after "the customer did not answer"
        row = settled(dbc, rid)
        assert row and (row["status"], row["attempts"], row["last_result"]) == (
            "pending", 1, "customer_noanswer"), stack.explain(agent, customer)
        call = wait_for(lambda: dbc.execute("SELECT * FROM calls").fetchone())
        assert (call["direction"], call["outcome"], call["missed"], call["answered_endpoint"]) == (
            "outbound", "callback_no_answer", False, "agent1")
        assert [s["status"] for s in call["route_log"] if s["step"] == "dial"] == ["noanswer"], call["route_log"]
        assert (agent.answered(), customer.invites_received(), customer.answered()) == (1, 1, 0)
    finally:
        await agent.stop()
        await customer.stop()


async def test_click_to_call_from_the_api_rings_the_agent_then_dials_the_customer(stack, worker, dbc):
    pool, config, phones = worker
    # a 60 s poll: the agent's phone rings within the test's wait only because the click's NOTIFY wakes the worker
    config = stack.config(callbacks=CallbacksConfig(agent_ring_seconds=10, poll_seconds=60),
                          api=ApiConfig(port=0, tokens=("t0ken",)))
    agent, customer = await answering_phones(stack)
    wake = asyncio.Event()
    tasks = [asyncio.create_task(wake_on(stack.url, callbacks.CHANNEL, wake, purpose="test")),
             asyncio.create_task(callbacks.run_forever(pool, config, phones, wake))]
    api = await start_api(config, pool)
    try:
        await until_free(phones, "agent1")  # else the click would wait for the 60 s poll
        await asyncio.sleep(0.5)  # the worker's first (empty) round and the LISTEN
        async with aiohttp.ClientSession(f"http://127.0.0.1:{api.port}") as client:
            resp = await client.post("/api/v1/calls", json={"agent": "agent1", "phone": CUSTOMER, "ref": "crm-77"},
                                     headers={"Authorization": "Bearer t0ken"})
            assert resp.status == 202, await resp.text()
            rid = (await resp.json())["id"]
            await customer.wait_for("HANGUP", timeout=30)
            await agent.wait_for("HANGUP", timeout=10)
            deadline = time.monotonic() + 20
            while (row := await (await client.get(f"/api/v1/callbacks/{rid}", headers={
                    "Authorization": "Bearer t0ken"})).json())["status"] == "in_progress" and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
        assert (row["status"], row["last_result"], row["external_ref"]) == ("done", "answered", "crm-77"), (
            stack.explain(agent, customer))
        call = wait_for(lambda: dbc.execute("SELECT * FROM calls").fetchone())
        assert (call["outcome"], call["callback_request_id"], call["answered_endpoint"]) == ("answered", rid, "agent1")
        steps = [s["step"] for s in call["route_log"]]
        assert steps[:2] == ["callback", "dial"] and call["route_log"][0]["asked_by_agent"] is True
        assert (agent.invites_received(), customer.invites_received()) == (1, 1)
        [(uri, _)] = invites(customer)
        assert uri.startswith(f"sip:{CUSTOMER}@"), uri
    finally:
        await api.stop()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await agent.stop()
        await customer.stop()


async def test_a_missed_caller_is_texted_then_called_back(stack, worker, dbc):
    """A real call nobody answers: the missed row, its callback request, and the text to the caller's
    mobile posted to the SMS gateway by `shopcall serve`'s webhook sender; then the callback itself."""
    pool, config, phones = worker
    agent = await phone(stack, "agent1", answer_after=None)
    try:
        call = await place_call("100", digits="1", pbx=stack.sip, work_dir=stack.work)
        assert call.answered, stack.explain(agent) + call.log_tail
        await agent.wait_for("CANCELLED")
    finally:
        await agent.stop()
    row = wait_for(lambda: dbc.execute("SELECT * FROM calls WHERE direction = 'inbound'").fetchone())
    assert row and row["outcome"] == "missed_no_answer", stack.explain(agent)
    request = dbc.execute("SELECT r.*, g.name AS group_name FROM callback_requests r "
                          "LEFT JOIN groups g ON g.id = r.group_id").fetchone()
    assert (request["phone"], request["group_name"], request["status"]) == (CUSTOMER, "sales", "pending")
    [text] = stack.sms.call(row["uniqueid"], event="message")
    assert (text["phone"], text["reason"], text["callback_request_id"], text["channel"]) == (
        CUSTOMER, "missed_call", request["id"], "sms")
    assert text["text"] == "Тест: мы пропустили ваш звонок и перезвоним вам в ближайшее время."
    # the worker's next round calls them back: agent1 (sales) answers, then the customer
    agent, customer = await answering_phones(stack)
    try:
        await until_free(phones, "agent1")
        [offer] = await callbacks.offer_due(pool, config, phones)
        assert (offer.request_id, offer.endpoint) == (request["id"], "agent1")
        await customer.wait_for("HANGUP", timeout=30)
        done = settled(dbc, request["id"])
        assert done and (done["status"], done["last_result"]) == ("done", "answered"), stack.explain(agent, customer)
        back = wait_for(lambda: dbc.execute("SELECT * FROM calls WHERE direction = 'outbound'").fetchone())
        assert (back["outcome"], back["callback_request_id"], back["dialled_number"]) == (
            "answered", request["id"], CUSTOMER)
    finally:
        await agent.stop()
        await customer.stop()


async def test_one_round_gives_a_groups_request_to_its_only_member_and_an_older_one_to_another_agent(
        stack, worker, dbc):
    """The defect fixed in claim_due: with several requests offered in one round, a request of delivery went
    to an agent outside delivery while delivery's only member took a request without a group. Here agent2 is
    delivery's only logged-in member and the longest idle (so the claim before the fix gave agent2 the older
    request), agent1 (sales) the other free agent; the older request has no group, the newer is delivery's."""
    pool, config, phones = worker
    dbc.execute("UPDATE employees SET logged_in = endpoint IN ('agent1', 'agent2'), "
                "last_call_at = CASE endpoint WHEN 'agent1' THEN now() - interval '1 minute' END")
    nobody, delivery = "+79161230001", "+79161230002"
    anyone_id = dbc.execute(
        """INSERT INTO callback_requests (phone, reason, due_at) VALUES (%s, 'no_answer', now() - interval '2 minutes')
           RETURNING id""", (nobody,)).fetchone()["id"]
    delivery_id = dbc.execute(
        """INSERT INTO callback_requests (phone, group_id, reason, due_at)
           VALUES (%s, (SELECT id FROM groups WHERE name = 'delivery'), 'no_answer', now() - interval '1 minute')
           RETURNING id""", (delivery,)).fetchone()["id"]
    agent1 = await phone(stack, "agent1", answer_after=0.5)
    agent2 = await phone(stack, "agent2", answer_after=0.5)
    trunk = await phone(stack, "trunk", answer_after=0.5, hangup_after=1.0)
    try:
        await until_free(phones, "agent1", "agent2")
        offers = await callbacks.offer_due(pool, config, phones)
        assert sorted((o.request_id, o.endpoint) for o in offers) == [
            (anyone_id, "agent1"), (delivery_id, "agent2")], stack.explain(agent1, agent2)
        # each phone was rung once, showing the number of the request it took
        [(_, shown1)] = invites(agent1)
        [(_, shown2)] = invites(agent2)
        assert f"<sip:{nobody}@" in shown1 and f"<sip:{delivery}@" in shown2, (shown1, shown2)
        for rid in (anyone_id, delivery_id):
            row = settled(dbc, rid)
            assert row and (row["status"], row["attempts"], row["last_result"]) == ("done", 1, "answered"), (
                stack.explain(agent1, agent2, trunk))
        # each customer was dialled once, shown their request's caller ID (never an agent's endpoint)
        assert sorted((uri.split("@")[0], shown.split(">")[0]) for uri, shown in invites(trunk)) == [
            (f"sip:{n}", f'"Callback {n}" <sip:{n}@127.0.0.1') for n in (nobody, delivery)]
        calls = wait_for(lambda: len(rows := dbc.execute(
            "SELECT c.*, g.name AS group_name FROM calls c LEFT JOIN groups g ON g.id = c.group_id").fetchall()) == 2
            and rows)
        assert calls, stack.explain(agent1, agent2, trunk)
        assert {c["dialled_number"]: (c["answered_endpoint"], c["group_name"], c["outcome"]) for c in calls} == {
            nobody: ("agent1", None, "answered"), delivery: ("agent2", "delivery", "answered")}
        assert (agent1.answered(), agent2.answered()) == (1, 1)
    finally:
        for p in (agent1, agent2, trunk):
            await p.stop()
