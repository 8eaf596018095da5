# ruff: noqa: F811  (pytest fixtures imported from other modules are parameters here)
"""Click to call (POST /api/v1/calls): the CRM asks for a call from an agent's phone. Real PostgreSQL;
the agents' PBX is the fake AMI of test_callbacks (the real Asterisk's run is in test_e2e_callbacks)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json

import pytest

from agi.ami import OriginateResult
from shopcall import callbacks
from shopcall.call import DialResult, DialStatus
from shopcall.calllog import CallLog
from shopcall.config import WebhooksConfig
from shopcall.flows.callback import callback as callback_flow
from shopcall.notify import wake_on
from shopcall.screen_pop import ScreenPop
from tests.test_api import AUTH, api, client  # noqa: F401 (fixtures)
from tests.test_callbacks import (  # noqa: F401 (fixtures)
    AgentLeg,
    FakeAmi,
    add_request,
    app,
    asterisk,
    leg,
    loaded,
    make_config,
    request,
)
from tests.test_cli_db import config, shopcall  # noqa: F401  (config: a fixture)
from tests.test_webhooks import shop  # noqa: F401 (fixture)

PHONE = "+79161234567"


async def test_the_agent_asked_for_is_rung_first_even_when_paused(loaded, pool):
    older = await add_request(loaded, phone="+79160000001", due="now() - interval '1 hour'")
    await loaded.execute("UPDATE employees SET paused = true WHERE endpoint = 'agent4'")
    row = await callbacks.click_to_call(pool, "agent4", PHONE, ref="crm-42")
    assert (row["reason"], row["status"], row["agent_wanted"], row["external_ref"]) == (
        "click_to_call", "pending", "agent4", "crm-42")
    ami = FakeAmi()
    offers = await callbacks.offer_due(pool, make_config(), asterisk(ami))
    # the click first and to agent4 only (paused does not matter: they asked); the queue goes on to others
    assert [(o.request_id, o.endpoint) for o in offers][0] == (row["id"], "agent4")
    assert ami.originated[0]["channel"] == "PJSIP/agent4"
    assert {o.request_id for o in offers} == {row["id"], older}
    assert "PJSIP/agent4" not in [o["channel"] for o in ami.originated[1:]]


async def test_a_busy_agent_holds_back_only_their_click_which_gives_up_after_the_wait(loaded, pool):
    queued = await add_request(loaded, phone="+79160000001")
    click = (await callbacks.click_to_call(pool, "agent2", PHONE))["id"]
    ami = FakeAmi(states={"PJSIP/agent2": "INUSE"})
    offers = await callbacks.offer_due(pool, make_config(), asterisk(ami))
    assert [o.request_id for o in offers] == [queued]  # agent2 is on a call: the rest of the queue still goes
    assert (await request(loaded, click))["status"] == "pending"
    cfg = make_config(click_wait_seconds=30)
    await callbacks.reconcile(pool, cfg)
    assert (await request(loaded, click))["status"] == "pending"  # still inside the wait
    await loaded.execute("UPDATE callback_requests SET wanted_at = now() - interval '31 seconds' WHERE id = %s",
                         (click,))
    await callbacks.reconcile(pool, cfg)
    row = await request(loaded, click)
    assert (row["status"], row["last_result"], row["done_at"] is not None) == ("failed", "agent_not_free", True)


async def test_a_click_is_tried_once_while_a_taken_over_callback_goes_back_to_the_queue(loaded, pool):
    cfg = make_config(max_attempts=3)
    no_answer = FakeAmi(result=OriginateResult(False, 3))
    click = (await callbacks.click_to_call(pool, "agent1", PHONE))["id"]
    await callbacks.offer_due(pool, cfg, asterisk(no_answer))
    row = await request(loaded, click)
    assert (row["status"], row["attempts"], row["last_result"]) == ("failed", 1, "agent_no_answer")

    waiting = await add_request(loaded, phone="+79160000002")  # a missed caller's callback request
    taken = await callbacks.click_to_call(pool, "agent1", "+79160000002", ref="crm-7")
    assert (taken["id"], taken["reason"], taken["agent_wanted"]) == (waiting, "no_answer", "agent1")
    await callbacks.offer_due(pool, cfg, asterisk(no_answer))
    row = await request(loaded, waiting)
    assert (row["status"], row["agent_wanted"], row["last_result"]) == ("pending", None, "agent_no_answer")
    assert row["external_ref"] == "crm-7"
    await loaded.execute("UPDATE callback_requests SET due_at = now() WHERE id = %s", (waiting,))
    ami = FakeAmi(states={"PJSIP/agent1": "INUSE"})
    [offer] = await callbacks.offer_due(pool, cfg, asterisk(ami))
    assert offer.endpoint != "agent1"  # back in the queue: any agent, the group first


async def test_refused_clicks(loaded, pool):
    with pytest.raises(callbacks.CallbackError) as e:
        await callbacks.click_to_call(pool, "nobody", PHONE)
    assert (e.value.status, e.value.field) == (404, "agent")
    await callbacks.click_to_call(pool, "agent1", PHONE)
    with pytest.raises(callbacks.CallbackError) as e:  # one click at a time per agent
        await callbacks.click_to_call(pool, "agent1", "+79160000003")
    assert (e.value.status, e.value.field) == (409, "agent")
    with pytest.raises(callbacks.CallbackError) as e:  # the number is someone's click already
        await callbacks.click_to_call(pool, "agent2", PHONE)
    assert (e.value.status, e.value.field) == (409, "phone")
    # two clicks for one number at once: one request, the other told so
    results = await asyncio.gather(*(callbacks.click_to_call(pool, a, "+79160000004") for a in ("agent3", "agent4")),
                                   return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["CallbackError", "dict"]
    n = await (await loaded.execute("SELECT count(*) AS n FROM callback_requests WHERE phone = '+79160000004'")
               ).fetchone()
    assert n == {"n": 1}


async def test_the_flow_dials_at_once_and_the_row_names_the_request(app, loaded, pool):  # noqa: F811
    rid = (await callbacks.click_to_call(pool, "agent2", PHONE, ref="crm-9"))["id"]
    await callbacks.offer_due(pool, app.config, asterisk(FakeAmi()))
    call = AgentLeg(leg(rid), customer=DialResult(DialStatus.ANSWERED, None, 12.0, "ANSWER"))
    await callback_flow(call, app)
    assert call.played == []  # the agent asked for it: the number is not read out
    assert call.actions[1] == ("dial_number", PHONE, 30)
    row = await request(loaded, rid)
    assert (row["status"], row["last_result"]) == ("done", "answered")
    c = await (await loaded.execute("SELECT outcome, callback_request_id, direction FROM calls")).fetchone()
    assert c == {"outcome": "answered", "callback_request_id": rid, "direction": "outbound"}


async def test_the_customer_not_answering_ends_a_click(app, loaded, pool, tmp_path):  # noqa: F811
    app = dataclasses.replace(app, calllog=CallLog(pool, tmp_path / "spool", calls_url="http://127.0.0.1:9/crm"))
    rid = (await callbacks.click_to_call(pool, "agent2", PHONE, ref="crm-10"))["id"]
    await callbacks.offer_due(pool, app.config, asterisk(FakeAmi()))
    call = AgentLeg(leg(rid), customer=DialResult(DialStatus.NOANSWER, detail="NOANSWER"))
    await callback_flow(call, app)
    assert call.played == ["callback_customer_unreachable"]
    row = await request(loaded, rid)
    assert (row["status"], row["last_result"]) == ("failed", "customer_noanswer")
    [hook] = await (await loaded.execute("SELECT body FROM webhook_outbox WHERE kind = 'call'")).fetchall()
    body = hook["body"]
    assert (body["outcome"], body["callback_request_id"], body["crm_ref"], body["agent_endpoint"]) == (
        "click_to_call_no_answer", rid, "crm-10", "agent2")


async def test_a_notify_wakes_the_worker_long_before_its_poll(loaded, pool, pg_url):
    ami = FakeAmi()
    wake = asyncio.Event()
    cfg = make_config(poll_seconds=60)
    listener = asyncio.create_task(wake_on(pg_url, callbacks.CHANNEL, wake, purpose="test"))
    worker = asyncio.create_task(callbacks.run_forever(pool, cfg, asterisk(ami), wake))
    try:
        await asyncio.sleep(0.5)  # the worker's first round (nothing due) and the LISTEN
        assert ami.originated == []
        rid = (await callbacks.click_to_call(pool, "agent3", PHONE))["id"]
        async with asyncio.timeout(5):  # the poll alone would take 60 s
            while not ami.originated:
                await asyncio.sleep(0.02)
        assert ami.originated[0]["variables"] == {"SHOPCALL_CALLBACK_ID": rid}
    finally:
        for task in (worker, listener):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# ---- over the API ------------------------------------------------------------------------------------


async def test_api_click_to_call_then_follow_the_request(client, loaded):
    resp = await client.post("/api/v1/calls", json={"agent": "agent1", "phone": "8 916 123-45-67", "ref": "c-1"},
                             headers=AUTH)
    assert resp.status == 202, await resp.text()
    made = await resp.json()
    assert (made["phone"], made["agent_wanted"], made["status"], made["external_ref"]) == (
        PHONE, "agent1", "pending", "c-1")
    resp = await client.get(f"/api/v1/callbacks/{made['id']}", headers=AUTH)
    assert resp.status == 200 and (await resp.json()) == made
    listed = await (await client.get("/api/v1/callbacks", params={"phone": PHONE}, headers=AUTH)).json()
    assert [c["id"] for c in listed["callbacks"]] == [made["id"]]
    again = await client.post("/api/v1/calls", json={"agent": "agent2", "phone": PHONE}, headers=AUTH)
    assert again.status == 409 and (await again.json())["detail"] == {"field": "phone"}


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"agent": "nobody", "phone": PHONE}, 404, "agent"),
    ({"agent": "agent1;evil", "phone": PHONE}, 422, "agent"),
    ({"agent": "agent1", "phone": "12"}, 422, "phone"),
    ({"agent": "agent1", "phone": "+79161234567&PJSIP/x"}, 422, "phone"),  # never reaches a dial string
    ({"agent": "agent1", "phone": "+7916123${X}4567"}, 422, "phone"),
    ({"phone": PHONE}, 422, "agent"),
    ({"agent": "agent1", "phone": PHONE, "ref": 5}, 422, "ref"),
    ({"agent": "agent1", "phone": PHONE, "ref": "x" * 201}, 422, "ref"),
    ({"agent": "agent1", "phone": PHONE, "dial": "now"}, 422, "dial"),
])
async def test_api_bad_clicks(client, loaded, body, status, field):
    resp = await client.post("/api/v1/calls", data=json.dumps(body), headers=AUTH)
    assert resp.status == status, await resp.text()
    assert (await resp.json())["detail"]["field"] == field


async def test_api_unknown_request_is_404(client, loaded):
    for rid in ("999", "0", "١٢", "99999999999999999999"):
        assert (await client.get(f"/api/v1/callbacks/{rid}", headers=AUTH)).status == 404



def test_the_cli_asks_for_a_call(config, loaded):  # noqa: F811
    out = shopcall("call", "agent1", "8 916 123-45-67", "--ref", "crm-1", config=config)
    assert out.returncode == 0 and out.stdout.startswith("request ") and PHONE in out.stdout, out.stderr
    busy = shopcall("call", "agent1", "+79160000005", config=config)
    assert busy.returncode == 1 and "already being rung" in busy.stderr
    assert shopcall("call", "agent1", "hello", config=config).returncode == 2
    assert shopcall("call", "agent1;x", PHONE, config=config).returncode == 2


async def test_api_cancels_a_pending_request_but_not_one_that_rings(client, loaded):
    made = await (await client.post("/api/v1/calls", json={"agent": "agent1", "phone": PHONE}, headers=AUTH)).json()
    resp = await client.delete(f"/api/v1/callbacks/{made['id']}", headers=AUTH)
    assert resp.status == 200, await resp.text()
    gone = await resp.json()
    assert (gone["status"], gone["last_result"], gone["done_at"] is not None) == ("done", "cancelled", True)
    again = await client.delete(f"/api/v1/callbacks/{made['id']}", headers=AUTH)
    assert again.status == 409 and "done" in (await again.json())["error"]
    # the agent is free for another click at once, and the number can be asked for again
    assert (await client.post("/api/v1/calls", json={"agent": "agent1", "phone": PHONE}, headers=AUTH)).status == 202
    ringing = await add_request(loaded, phone="+79160000006")
    await loaded.execute("UPDATE callback_requests SET status = 'in_progress', agent_endpoint = 'agent2' "
                         "WHERE id = %s", (ringing,))
    resp = await client.delete(f"/api/v1/callbacks/{ringing}", headers=AUTH)
    assert resp.status == 409 and "in_progress" in (await resp.json())["error"]
    assert (await client.delete("/api/v1/callbacks/99999", headers=AUTH)).status == 404


async def test_the_crm_pops_the_card_when_the_agents_phone_rings(loaded, pool, shop):
    pop = ScreenPop(WebhooksConfig(ringing_url=shop.url, secret="s"))
    queued = await add_request(loaded, phone="+79160000002")
    rid = (await callbacks.click_to_call(pool, "agent1", PHONE, ref="crm-3"))["id"]
    offers = await callbacks.offer_due(pool, make_config(), asterisk(FakeAmi()), pop=pop)
    await pop.close()
    assert {o.request_id for o in offers} == {rid, queued}
    bodies = {b["callback_request_id"]: b for b in (json.loads(raw) for _, raw in shop.requests)}
    click, callback = bodies[rid], bodies[queued]
    assert (click["event"], click["direction"], click["reason"], click["phone"], click["crm_ref"]) == (
        "call_ringing", "outbound", "click_to_call", PHONE, "crm-3")
    assert click["agents"] == [{"endpoint": "agent1", "name": None}] and click["ring_seconds"] == 20
    assert (callback["reason"], callback["phone"], callback["crm_ref"]) == ("callback", "+79160000002", None)
    assert callback["agents"][0]["endpoint"] != "agent1"
    assert {h["X-Shopcall-Kind"] for h, _ in shop.requests} == {"ringing"}
