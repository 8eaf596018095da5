# ruff: noqa: F811  (pytest fixtures imported from other modules are parameters here)
"""A text to a missed caller (inbound.missed_call_sms): the inbound flow on a scripted call, a real
PostgreSQL, and the real webhook sender posting to a real aiohttp receiver standing in for the SMS gateway."""

from __future__ import annotations

import dataclasses
import json

from shopcall.call import DialResult, DialStatus
from shopcall.calllog import CallLog, CallRecord, MissedCallSms
from shopcall.config import WebhooksConfig
from shopcall.phone import is_mobile
from shopcall.webhooks import send_due
from tests.scripted import ScriptedCall
from tests.test_inbound_flow import app, info, run  # noqa: F401 (fixture)
from tests.test_webhooks import Shop, shop  # noqa: F401 (fixture)

TEXTS = {"ru": "{shop}: мы пропустили ваш звонок.", "en": "{shop}: we missed your call."}


def texting(app, url: str):
    sms = MissedCallSms(url, TEXTS, "Магазин «Ёлка»")
    return dataclasses.replace(app, calllog=CallLog(app.pool, app.config.spool_dir, missed_sms=sms))


async def messages(conn) -> list[dict]:
    cur = await conn.execute("SELECT body, dedupe_key FROM webhook_outbox WHERE kind = 'message' ORDER BY id")
    return await cur.fetchall()


async def test_a_missed_mobile_caller_gets_one_text_per_callback_request(app, conn, pool, shop):
    app = texting(app, shop.url)
    await run(ScriptedCall(info(caller="89161234567"), keys=["1"]), app)  # nobody answers
    await run(ScriptedCall(info(caller="89161234567", uid="1.2"), keys=["1"]), app)  # tries again
    [msg] = await messages(conn)
    [request] = await (await conn.execute("SELECT id FROM callback_requests")).fetchall()
    body = msg["body"]
    assert (body["phone"], body["text"], body["reason"], body["callback_request_id"], body["uniqueid"]) == (
        "+79161234567", "Магазин «Ёлка»: мы пропустили ваш звонок.", "missed_call", request["id"], "1.1")
    assert msg["dedupe_key"] == f"message:callback:{request['id']}"
    # the gateway gets it through the outbox, signed like every webhook
    assert await send_due(pool, WebhooksConfig(messages_url=shop.url, secret="k"), kinds=("message",)) == 1
    [(headers, raw)] = shop.requests
    assert headers["X-Shopcall-Kind"] == "message" and json.loads(raw) == body
    # called back and done: the next missed call opens a new request, and texts again
    await conn.execute("UPDATE callback_requests SET status = 'done'")
    await run(ScriptedCall(info(caller="89161234567", uid="1.3"), keys=["1"]), app)
    assert len(await messages(conn)) == 2


async def test_no_text_for_a_landline_an_answered_call_or_without_the_option(app, conn, shop):
    sms_app = texting(app, shop.url)
    await run(ScriptedCall(info(caller="84951234567"), keys=["1"]), sms_app)  # Moscow landline: a callback only
    await run(ScriptedCall(info(caller="89160000001", uid="1.2"), keys=["1"],
                           dial=[DialResult(DialStatus.ANSWERED, "agent1", 5.0, "ANSWER")]), sms_app)
    await run(ScriptedCall(info(caller="89160000002", uid="1.3"), keys=["1"]), app)  # the option off
    assert await messages(conn) == []
    phones = {r["phone"] for r in await (await conn.execute("SELECT phone FROM callback_requests")).fetchall()}
    assert phones == {"+74951234567", "+79160000002"}


async def test_the_text_is_in_the_callers_language(app, conn, shop):
    sms = MissedCallSms(shop.url, TEXTS, "Shop")
    rec = CallRecord("9.9", "asterisk", "+447911123456", "", "100", caller_e164="+447911123456", language="en")
    assert sms.body(rec, 5)["text"] == "Shop: we missed your call."
    assert sms.body(dataclasses.replace(rec, language="de"), 5)["text"] == "Shop: мы пропустили ваш звонок."
    assert is_mobile("+447911123456") and is_mobile("+79161234567") and not is_mobile("+74951234567")
    assert is_mobile("+12025550123")  # the US: fixed line or mobile, cannot be told apart, so texted
