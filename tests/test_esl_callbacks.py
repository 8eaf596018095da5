"""Callback requests on FreeSWITCH: the worker asks `show channels as json` whether an agent's phone is free
and rings it with `bgapi originate` through the inbound event socket, against the replay of a real
FreeSWITCH's session (tests/data/esl/inbound_bgapi_and_failures: its first `show channels` lists no
channel, its second the two legs of loopback/9998; its first originate is answered, its second fails with
NORMAL_CLEARING). The agent's answered leg then runs the callback flow over our outbound-socket server,
driven by the FreeSWITCH stand-in of tests/esl_peer.py; a real PostgreSQL holds the requests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest

from esl.agent_phones import FreeswitchAgentPhones
from esl.channels import belongs, channels
from esl.client import EslClient
from esl.protocol import Parser
from esl.routes import esl_routes
from shopcall import callbacks
from shopcall.call import PbxError
from shopcall.config import CallbacksConfig, FreeswitchConfig
from shopcall.flows.callback import callback as callback_flow
from shopcall.serve import callback_pbx, serve_callbacks
from tests.esl_peer import Caller, call_once, received
from tests.scripted import WireSafeNames
from tests.test_callbacks import add_request, app, loaded, request  # noqa: F401 (fixtures)
from tests.test_esl_protocol import replay_server

CUSTOMER = "+79161234567"


def freeswitch(config, **fs):
    return dataclasses.replace(config, freeswitch=FreeswitchConfig(**fs))


async def replayed_phones(config, **fs):
    server, replays = await replay_server("inbound_bgapi_and_failures")
    client = EslClient("127.0.0.1", server.sockets[0].getsockname()[1], "ClueCon", command_timeout=2)
    await client.start()
    # listing_seconds=0: every question gets the next captured answer
    return FreeswitchAgentPhones(client, freeswitch(config, **fs), listing_seconds=0), client, server, replays


def test_channels_of_an_endpoint_in_the_captured_show_channels():
    bodies = [m.reply_text for m in Parser().feed(b"".join(received("inbound_bgapi_and_failures")))
              if m.content_type == "api/response" and m.reply_text.startswith('{"row_count"')]
    assert len(bodies) == 2
    assert channels(bodies[0]) == []
    rows = channels(bodies[1])  # no newline after the JSON: framed by its Content-Length only
    assert [r["name"] for r in rows] == ["loopback/9998-a", "loopback/9998-b"]
    assert all(belongs(r, "9998") for r in rows)
    assert not any(belongs(r, "999") or belongs(r, "99981") for r in rows)
    # a registered phone's own call, and one we rang through the directory's dial-string
    assert belongs({"name": "sofia/internal/agent1@192.0.2.10", "presence_id": ""}, "agent1")
    assert belongs({"name": "sofia/internal/sip:7000@192.0.2.11:5060", "presence_id": "agent1@shop.example"},
                   "agent1")
    assert not belongs({"name": "sofia/internal/agent10@192.0.2.10", "presence_id": "agent10@shop.example"},
                       "agent1")
    with pytest.raises(PbxError, match="not JSON"):
        channels("-ERR show: command not found")


async def test_whether_a_phone_is_free_comes_from_freeswitch(app):  # noqa: F811
    phones, client, server, _ = await replayed_phones(app.config, endpoint_template="loopback/{endpoint}/default")
    try:
        assert await phones.is_free("9998")  # the first capture: no channel at all
        assert not await phones.is_free("9998")  # the second: both legs of loopback/9998 are up
        with pytest.raises(PbxError):  # no third capture: the replay answers a bare +OK, not a listing
            await phones.is_free("9998")
        with pytest.raises(ValueError):
            await phones.is_free("9998 , x")  # never pasted into anything
    finally:
        await client.close()
        server.close()


async def test_one_listing_answers_for_every_candidate_of_a_claim(app):  # noqa: F811
    phones, client, server, replays = await replayed_phones(app.config, endpoint_template="loopback/{endpoint}/default")
    phones.listing_seconds = 60
    try:
        assert await phones.is_free("9998") and await phones.is_free("9998")  # the second capture not asked
    finally:
        await client.close()
        server.close()
    assert [m for m in replays[0].received if m.startswith(b"api show")] == [b"api show channels as json\n\n"]


async def test_a_request_rings_a_free_agent_through_the_event_socket(app, loaded, pool):  # noqa: F811
    answered = await add_request(loaded)
    failed = await add_request(loaded, phone="+79160000002")
    phones, client, server, replays = await replayed_phones(app.config)
    try:
        [first] = await callbacks.offer_due(pool, app.config, phones, limit=1)
        [second] = await callbacks.offer_due(pool, app.config, phones, limit=1)
    finally:
        await client.close()
        server.close()
    assert (first.request_id, first.endpoint) == (answered, "agent2")  # the delivery group's first member
    sent = [m.decode() for m in replays[0].received if m.startswith(b"bgapi originate")]
    assert sent[0].startswith("bgapi originate {origination_uuid=")
    assert sent[0].endswith(
        ",originate_timeout=20,ignore_early_media=true,"
        f"shopcall_arg_id={answered},dialed_user=agent2,origination_caller_id_number={CUSTOMER},"
        f"origination_caller_id_name='Callback {CUSTOMER}',origination_callee_id_number={CUSTOMER},"
        # the leg's caller ID after FreeSWITCH flips it on answer: what the customer's leg inherits
        f"origination_callee_id_name='Callback {CUSTOMER}'}}user/agent2 callback XML shopcall-robot\n\n")
    row = await request(loaded, answered)
    # answered: the flow on the agent's leg owns the request now
    assert (row["status"], row["agent_endpoint"], row["last_result"]) == ("in_progress", "agent2", "agent_answered")
    # the second show channels lists only loopback/9998: agent2 is free for FreeSWITCH (it still has the
    # first request in progress, which keeps it out), the originate fails as captured
    assert second.request_id == failed and second.endpoint != "agent2"
    row = await request(loaded, failed)
    assert (row["status"], row["attempts"], row["last_result"]) == ("pending", 1, "agent_failed")


async def agent_leg(app, rid: int, caller: Caller):  # noqa: F811
    variables = {"shopcall_flow": "callback", "shopcall_arg_id": str(rid), "dialed_user": "agent2"}
    app = dataclasses.replace(app, prompts=WireSafeNames())
    return await call_once(esl_routes(app, {"callback": callback_flow}), caller, number="agent2",
                           destination="callback", variables=variables)


async def test_the_agent_answers_and_the_customer_is_bridged_over_the_outbound_socket(app, loaded, pool):  # noqa: F811
    rid = await add_request(loaded)
    await claim_for_agent2(app, pool)
    fs = await agent_leg(app, rid, Caller(answers=[CUSTOMER], talk_seconds=12))
    [bridge] = fs.bridges
    assert [target for _, target in bridge.legs] == [f"sofia/gateway/trunk/{CUSTOMER}"]
    assert bridge.call_timeout == "30"  # callbacks.customer_ring_seconds
    assert "playback" in [app for app, _ in fs.apps][:4], fs.apps  # "calling back" and the number, first
    row = await request(loaded, rid)
    assert (row["status"], row["last_result"]) == ("done", "answered")
    c = await (await loaded.execute(
        "SELECT c.*, e.endpoint AS agent FROM calls c LEFT JOIN employees e ON e.id = c.answered_by")).fetchone()
    assert (c["pbx"], c["direction"], c["outcome"], c["agent"], c["dialled_number"]) == (
        "freeswitch", "outbound", "answered", "agent2", CUSTOMER)


async def test_a_customer_who_does_not_answer_leaves_the_request_due_again(app, loaded, pool):  # noqa: F811
    rid = await add_request(loaded)
    await claim_for_agent2(app, pool)
    fs = await agent_leg(app, rid, Caller(answers=[None]))
    assert len(fs.bridges) == 1 and fs.hung_up
    row = await request(loaded, rid)
    assert (row["status"], row["last_result"]) == ("pending", "customer_noanswer")


async def test_a_leg_without_a_request_in_progress_for_its_agent_dials_nobody(app, loaded):  # noqa: F811
    rid = await add_request(loaded)  # pending: never offered to agent2
    fs = await agent_leg(app, rid, Caller(answers=[CUSTOMER]))
    assert fs.bridges == [] and fs.hung_up
    assert (await request(loaded, rid))["status"] == "pending"


async def claim_for_agent2(app, pool) -> None:  # noqa: F811
    """The worker's claim as on FreeSWITCH, the ringing itself left out (the tests above cover it)."""

    class Idle:
        async def is_free(self, endpoint: str) -> bool:
            return True

    offer = await callbacks.claim(pool, Idle())  # type: ignore[arg-type]
    assert offer is not None and offer.endpoint == "agent2"


async def test_shopcall_serve_runs_the_worker_through_the_event_socket(app, loaded, pool, pg_url):  # noqa: F811
    rid = await add_request(loaded)
    server, replays = await replay_server("inbound_bgapi_and_failures")
    config = dataclasses.replace(
        app.config, freeswitch=FreeswitchConfig(esl_port=server.sockets[0].getsockname()[1]),
        callbacks=CallbacksConfig(pbx="auto", poll_seconds=0.05))
    pbx = callback_pbx(config, ["esl"])
    assert pbx == "freeswitch"
    task = asyncio.create_task(serve_callbacks(pool, config, pbx, pg_url))
    try:
        async with asyncio.timeout(10):
            while (await request(loaded, rid))["last_result"] != "agent_answered":
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.close()
    assert [m for m in replays[0].received if m.startswith(b"bgapi originate")][0].endswith(
        b"}user/agent2 callback XML shopcall-robot\n\n")


async def test_a_click_to_call_on_freeswitch_rings_its_agent_and_bridges_at_once(app, loaded, pool):  # noqa: F811
    queued = await add_request(loaded, phone="+79160000002")  # older, for the delivery group (agent2 first)
    rid = (await callbacks.click_to_call(pool, "agent4", CUSTOMER, ref="crm-5"))["id"]
    phones, client, server, replays = await replayed_phones(app.config)
    try:
        [offer] = await callbacks.offer_due(pool, app.config, phones, limit=1)
    finally:
        await client.close()
        server.close()
    assert (offer.request_id, offer.endpoint) == (rid, "agent4")  # the click first, to its agent only
    [sent] = [m.decode() for m in replays[0].received if m.startswith(b"bgapi originate")]
    assert f"shopcall_arg_id={rid},dialed_user=agent4," in sent and sent.endswith("}user/agent4 callback XML shopcall-robot\n\n")
    assert (await request(loaded, queued))["status"] == "pending"
    # agent4 answers: the customer is bridged without the number being read out first
    variables = {"shopcall_flow": "callback", "shopcall_arg_id": str(rid), "dialed_user": "agent4"}
    fs = await call_once(esl_routes(dataclasses.replace(app, prompts=WireSafeNames()), {"callback": callback_flow}),
                         Caller(answers=[CUSTOMER], talk_seconds=5), number="agent4", destination="callback",
                         variables=variables)
    [bridge] = fs.bridges
    assert [target for _, target in bridge.legs] == [f"sofia/gateway/trunk/{CUSTOMER}"]
    assert [app for app, _ in fs.apps if app in ("playback", "say", "speak")] == [], fs.apps
    row = await request(loaded, rid)
    assert (row["status"], row["last_result"], row["external_ref"]) == ("done", "answered", "crm-5")
    c = await (await loaded.execute("SELECT pbx, outcome, callback_request_id FROM calls")).fetchone()
    assert c == {"pbx": "freeswitch", "outcome": "answered", "callback_request_id": rid}
