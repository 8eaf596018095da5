"""End to end: a pending callback request → the worker (in this process, with agi.ami against the real
Asterisk) rings agent1's SIPp phone → it answers → the callback flow in `shopcall serve` says the number
and dials the customer through the "trunk" (another SIPp phone) → the customer answers → request done.
A click to call goes the same way from the HTTP API (also in this process: the serve under test knows no
AMI credentials, which the test's Asterisk makes up after the serve's configuration is written)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import psycopg
import pytest
from psycopg.rows import dict_row

from agi.agent_phones import AsteriskAgentPhones
from agi.ami import AmiClient
from shopcall import callbacks, db
from shopcall.api import start_api
from shopcall.config import ApiConfig, AsteriskConfig, CallbacksConfig, Config
from shopcall.notify import wake_on
from tests.pbx import (
    DEFAULT_ROOT,
    AsteriskPbx,
    SippAgent,
    free_sip_port,
    require_asterisk_root,
)
from tests.pbx.service import free_tcp_port, prepare_shopcall, running
from tests.pbx.sipp import place_call
from tests.test_e2e_inbound import CRM_SECRET, Crm

pytestmark = pytest.mark.slow

CUSTOMER = "+79161234567"


@pytest.fixture(scope="module")
def cb_stack(pg_url: str, tmp_path_factory) -> Iterator[dict]:
    require_asterisk_root()
    work = tmp_path_factory.mktemp("e2e-callbacks")
    sms = Crm()  # the shop's SMS gateway (webhooks.messages_url): texts to missed callers
    app, data, include = prepare_shopcall(work, pg_url, free_tcp_port(), f"""
[inbound]
ring_timeout = 4
missed_call_sms = true
[webhooks]
messages_url = "{sms.url}"
secret = "{CRM_SECRET}"
poll_seconds = 0.2
""")
    # "trunk" is an endpoint like the agents': PJSIP/{number}@trunk sends the INVITE to its SIPp phone;
    # SIPp's own calls go straight into the inbound context
    pbx = AsteriskPbx(DEFAULT_ROOT, work, sip_port=None, ami_port=None, binds=[data],
                      agents={"agent1": free_sip_port(), "trunk": free_sip_port()},
                      dialplan=f'#include "{include}"\n', sip_debug=True, context="shopcall-inbound")
    with running(app, pbx):
        try:
            yield {"pbx": pbx, "app": app, "url": pg_url, "work": work, "sms": sms,
                   "sip": f"127.0.0.1:{pbx.sip_port}"}
        finally:
            sms.close()


@pytest.fixture
async def worker(cb_stack) -> AsyncIterator[tuple]:
    pbx = cb_stack["pbx"]
    config = dataclasses.replace(
        Config.default(),
        asterisk=AsteriskConfig(ami_port=pbx.ami_port, ami_user=pbx.ami_user, ami_secret=pbx.ami_secret),
        callbacks=CallbacksConfig(agent_ring_seconds=10, customer_ring_seconds=10),
    )
    ami = AmiClient("127.0.0.1", pbx.ami_port, pbx.ami_user, pbx.ami_secret, timeout=5.0)
    await ami.connect()
    async with db.open_pool(cb_stack["url"], min_size=1, max_size=4) as pool:
        yield pool, config, ami
    await ami.close()


@pytest.fixture
def dbc(cb_stack) -> Iterator[psycopg.Connection]:
    with psycopg.connect(cb_stack["url"], autocommit=True, row_factory=dict_row) as conn:
        conn.execute("TRUNCATE callback_requests, calls RESTART IDENTITY CASCADE")
        yield conn


async def answering_phones(stack) -> tuple[SippAgent, SippAgent]:
    """agent1's phone and the customer's (behind the trunk), both answering; the customer hangs up after 2 s."""
    agent = SippAgent("agent1", stack["pbx"].agents["agent1"], work_dir=stack["work"], answer_after=0.5)
    customer = SippAgent("trunk", stack["pbx"].agents["trunk"], work_dir=stack["work"], answer_after=0.5,
                         hangup_after=2.0)
    await agent.start()
    await customer.start()
    return agent, customer


def wait_for(fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


async def test_agent_answers_then_customer_answers_request_done(cb_stack, worker, dbc):
    pool, config, ami = worker
    agent, customer = await answering_phones(cb_stack)
    try:
        rid = dbc.execute(
            """INSERT INTO callback_requests (phone, group_id, reason)
               VALUES (%s, (SELECT id FROM groups WHERE name = 'sales'), 'no_answer') RETURNING id""",
            (CUSTOMER,)).fetchone()["id"]
        assert await ami.device_state("PJSIP/agent1") == "NOT_INUSE"
        offers = await callbacks.offer_due(pool, config, AsteriskAgentPhones(ami, config))
        assert [(o.request_id, o.endpoint) for o in offers] == [(rid, "agent1")], explain(cb_stack, agent)
        await customer.wait_for("HANGUP", timeout=30)
        await agent.wait_for("HANGUP", timeout=10)

        def settled():
            row = dbc.execute("SELECT * FROM callback_requests WHERE id = %s", (rid,)).fetchone()
            return row if row["status"] != "in_progress" else None

        row = wait_for(settled)
        assert row and (row["status"], row["attempts"], row["last_result"]) == ("done", 1, "answered"), (
            explain(cb_stack, agent, customer))
        call = dbc.execute("SELECT c.*, e.endpoint AS agent FROM calls c "
                           "LEFT JOIN employees e ON e.id = c.answered_by").fetchone()
        assert (call["direction"], call["outcome"], call["agent"], call["dialled_number"]) == (
            "outbound", "answered", "agent1", CUSTOMER)
        assert (agent.invites_received(), agent.answered()) == (1, 1)
        assert (customer.invites_received(), customer.answered()) == (1, 1)
        # the trunk got the customer's number in the request URI
        assert f"INVITE sip:{CUSTOMER}@" in customer.messages_file.read_text(errors="replace")
    finally:
        await agent.stop()
        await customer.stop()


async def test_agent_does_not_answer_request_back_to_pending(cb_stack, worker, dbc):
    pool, config, ami = worker
    config = dataclasses.replace(config, callbacks=CallbacksConfig(agent_ring_seconds=2))
    agent = SippAgent("agent1", cb_stack["pbx"].agents["agent1"], work_dir=cb_stack["work"], answer_after=None)
    await agent.start()
    try:
        rid = dbc.execute("INSERT INTO callback_requests (phone, reason) VALUES (%s, 'no_answer') RETURNING id",
                          (CUSTOMER,)).fetchone()["id"]
        [offer] = await callbacks.offer_due(pool, config, AsteriskAgentPhones(ami, config))
        assert offer.endpoint == "agent1"
        row = dbc.execute("SELECT * FROM callback_requests WHERE id = %s", (rid,)).fetchone()
        assert (row["status"], row["attempts"], row["last_result"]) == ("pending", 1, "agent_no_answer"), (
            explain(cb_stack, agent))
        assert row["due_at"] > row["created_at"]
        await agent.wait_for("CANCELLED")
        assert agent.invites_received() == 1
    finally:
        await agent.stop()


async def test_customer_does_not_answer_request_back_to_pending(cb_stack, worker, dbc):
    pool, config, ami = worker
    config = dataclasses.replace(config, callbacks=CallbacksConfig(agent_ring_seconds=10, customer_ring_seconds=3))
    agent = SippAgent("agent1", cb_stack["pbx"].agents["agent1"], work_dir=cb_stack["work"], answer_after=0.5)
    customer = SippAgent("trunk", cb_stack["pbx"].agents["trunk"], work_dir=cb_stack["work"], answer_after=None)
    await agent.start()
    await customer.start()
    try:
        rid = dbc.execute("INSERT INTO callback_requests (phone, reason) VALUES (%s, 'no_answer') RETURNING id",
                          (CUSTOMER,)).fetchone()["id"]
        [offer] = await callbacks.offer_due(pool, config, AsteriskAgentPhones(ami, config))
        assert offer.endpoint == "agent1"
        await customer.wait_for("CANCELLED", timeout=30)
        await agent.wait_for("HANGUP", timeout=20)  # after "the customer did not answer"
        row = wait_for(lambda: (r := dbc.execute("SELECT * FROM callback_requests WHERE id = %s",
                                                 (rid,)).fetchone())["status"] != "in_progress" and r)
        assert row and (row["status"], row["attempts"], row["last_result"]) == (
            "pending", 1, "customer_noanswer"), explain(cb_stack, agent, customer)
        call = wait_for(lambda: dbc.execute("SELECT * FROM calls").fetchone())
        assert (call["direction"], call["outcome"], call["missed"]) == ("outbound", "callback_no_answer", False)
    finally:
        await agent.stop()
        await customer.stop()


async def test_click_to_call_from_the_api_rings_the_agent_then_dials_the_customer(cb_stack, worker, dbc):
    pool, config, ami = worker
    # a 60 s poll: the agent's phone rings within the test's wait only because the click's NOTIFY wakes the worker
    config = dataclasses.replace(
        config, callbacks=CallbacksConfig(agent_ring_seconds=10, customer_ring_seconds=10, poll_seconds=60),
        api=ApiConfig(port=0, tokens=("t0ken",)))
    agent, customer = await answering_phones(cb_stack)
    wake = asyncio.Event()
    tasks = [asyncio.create_task(wake_on(cb_stack["url"], callbacks.CHANNEL, wake, purpose="test")),
             asyncio.create_task(callbacks.run_forever(pool, config, AsteriskAgentPhones(ami, config), wake))]
    api = await start_api(config, pool)
    try:
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
            explain(cb_stack, agent, customer))
        call = dbc.execute("SELECT * FROM calls").fetchone()
        assert (call["outcome"], call["callback_request_id"], call["answered_endpoint"]) == ("answered", rid, "agent1")
        steps = [s["step"] for s in call["route_log"]]
        assert steps[:2] == ["callback", "dial"] and call["route_log"][0]["asked_by_agent"] is True
        assert (agent.invites_received(), customer.invites_received()) == (1, 1)
        assert f"INVITE sip:{CUSTOMER}@" in customer.messages_file.read_text(errors="replace")
    finally:
        await api.stop()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await agent.stop()
        await customer.stop()


async def test_a_missed_caller_is_texted_then_called_back(cb_stack, worker, dbc):
    """A real call nobody answers: the missed row, its callback request, and the text to the caller's
    mobile posted to the SMS gateway by `shopcall serve`'s webhook sender; then the callback itself."""
    pool, config, ami = worker
    work = cb_stack["work"]
    agent = SippAgent("agent1", cb_stack["pbx"].agents["agent1"], work_dir=work, answer_after=None)
    await agent.start()
    try:
        call = await place_call("100", digits="1", pbx=cb_stack["sip"], work_dir=work)
        assert call.answered, explain(cb_stack, agent) + call.log_tail
        await agent.wait_for("CANCELLED")
    finally:
        await agent.stop()
    row = wait_for(lambda: dbc.execute("SELECT * FROM calls WHERE direction = 'inbound'").fetchone())
    assert row and row["outcome"] == "missed_no_answer", explain(cb_stack, agent)
    request = dbc.execute("SELECT * FROM callback_requests").fetchone()
    [text] = cb_stack["sms"].call(row["uniqueid"], event="message")
    assert (text["phone"], text["reason"], text["callback_request_id"], text["channel"]) == (
        CUSTOMER, "missed_call", request["id"], "sms")
    assert text["text"] == "Тест: мы пропустили ваш звонок и перезвоним вам в ближайшее время."


def explain(stack, *agents: SippAgent) -> str:
    return "\n".join([stack["pbx"].rx("dialplan show shopcall-callback"), "--- shopcall log", stack["app"].log_tail(40), "--- asterisk log",
                      stack["pbx"].log_tail(40), *[a.log_tail(20) for a in agents]])


