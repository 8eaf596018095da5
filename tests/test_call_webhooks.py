"""Finished calls posted to the shop's CRM (webhooks.calls_url): the inbound flow against a scripted call, a
real PostgreSQL and a real aiohttp server on 127.0.0.1 as the CRM."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from datetime import timedelta
from pathlib import Path

import pytest

from shopcall.app import App
from shopcall.call import DialResult, DialStatus
from shopcall.calllog import CallLog, CallRecord, now
from shopcall.config import Config, WebhooksConfig
from shopcall.db import open_pool
from shopcall.directory import Directory, Menu
from shopcall.loader import load, read
from shopcall.webhooks import send_due
from tests.scripted import PromptNames, ScriptedCall
from tests.test_inbound_flow import DIRECTORY, WEDNESDAY_NOON, call_row, info, run
from tests.test_webhooks import shop  # noqa: F401  (the CRM's endpoint, a fixture)

SECRET = "crm-secret"


def hooks(url: str) -> WebhooksConfig:
    return WebhooksConfig(calls_url=url, secret=SECRET, timeout=2.0)


@pytest.fixture
async def app(conn, pool, tmp_path, shop) -> App:  # noqa: F811
    await load(conn, read(DIRECTORY))
    default = Config.default()
    config = dataclasses.replace(default, webhooks=hooks(shop.url),
                                 paths=dataclasses.replace(default.paths, recordings_dir=tmp_path / "recordings"))
    directory = Directory(pool, timezone="Europe/Moscow", default_menu=Menu(timeout=2, retries=1))
    calllog = CallLog(pool, tmp_path / "spool", calls_url=shop.url, api_url="https://pbx.shop.example:8085/")
    return App(config, pool, PromptNames(), directory, calllog, clock=lambda: WEDNESDAY_NOON)


async def posted(pool, shop) -> list[dict]:  # noqa: F811
    """Deliver what is due, and return the bodies the CRM received (each checked for its signature)."""
    await send_due(pool, hooks(shop.url))
    bodies = []
    for headers, raw in shop.requests:
        assert headers["X-Shopcall-Kind"] == "call"
        assert headers["X-Shopcall-Signature"] == "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
        bodies.append(json.loads(raw))
    shop.requests.clear()
    return bodies


async def test_an_answered_call_reaches_the_crm_with_the_agent_and_times(app, conn, pool, shop):  # noqa: F811
    call = ScriptedCall(info(), keys=["2"], dial=[DialResult(DialStatus.ANSWERED, "agent3", 42.0, "ANSWER")])
    await run(call, app)
    row = await call_row(conn)
    [body] = await posted(pool, shop)
    assert {k: body[k] for k in ("event", "call_id", "uniqueid", "direction", "caller_number", "caller_e164",
                                 "caller_name", "dialled_number", "group", "menu_choice", "outcome", "missed",
                                 "agent_endpoint", "agent_name", "callback_requested")} == {
        "event": "call_ended", "call_id": row["id"], "uniqueid": "1.1", "direction": "inbound",
        "caller_number": "89161234567", "caller_e164": "+79161234567", "caller_name": "Customer",
        "dialled_number": "100", "group": "delivery", "menu_choice": "2", "outcome": "answered",
        "missed": False, "agent_endpoint": "agent3", "agent_name": "Вера Доставка", "callback_requested": False,
    }
    assert 41.5 <= body["talk_seconds"] <= 43
    assert body["wait_seconds"] >= 0
    # agents record "always" by default: the file (the scripted PBX's) and the API's link to it
    assert body["recording_path"] == row["recording_path"] and row["recording_path"].endswith("/1.1.wav")
    assert body["recording_url"] == f"https://pbx.shop.example:8085/api/v1/calls/{row['id']}/recording"
    assert "survey_answer" in body and body["survey_answer"] is None  # every key, null when not known
    for key in ("started_at", "answered_at", "ended_at", "saved_at"):
        assert body[key].endswith("+00:00")  # ISO 8601 with the offset, as the database stored it
    assert (await posted(pool, shop)) == []  # delivered once


async def test_a_missed_call_says_a_callback_was_requested(app, conn, pool, shop):  # noqa: F811
    await run(ScriptedCall(info(), keys=["1"], dial=[DialResult(DialStatus.NOANSWER, detail="NOANSWER")]), app)
    [body] = await posted(pool, shop)
    assert (body["outcome"], body["missed"], body["callback_requested"]) == ("missed_no_answer", True, True)
    assert body["agent_endpoint"] is None and body["talk_seconds"] is None and body["group"] == "sales"
    assert body["recording_path"] is None and body["recording_url"] is None
    [cb] = await (await conn.execute("SELECT call_id FROM callback_requests")).fetchall()
    assert cb["call_id"] == body["call_id"]


async def test_an_after_hours_call_is_posted_too(app, conn, pool, shop):  # noqa: F811
    await run(ScriptedCall(info("200")), app)
    [body] = await posted(pool, shop)
    assert (body["outcome"], body["missed"], body["dialled_number"]) == ("after_hours", True, "200")


async def test_a_second_report_posts_the_merged_row_again(app, conn, pool, shop, tmp_path):  # noqa: F811
    """The dialplan's fallback report merges into the flow's row: the CRM gets the row as stored each time,
    and the later post (later saved_at) carries what both reports knew."""
    first = CallRecord(uniqueid="9.1", pbx="asterisk", caller_number="89161234567", caller_name="A",
                       dialled_number="100", caller_e164="+79161234567", menu_choice="3", group_name="accounting",
                       outcome="fallback", missed=False)
    first.ended_at = now()
    assert await app.calllog.save(first)
    second = dataclasses.replace(first, menu_choice=None, group_name=None, outcome="answered", missed=False,
                                 answered_endpoint="agent4", answered_at=first.ended_at,
                                 ended_at=first.ended_at + timedelta(seconds=30), route_log=[])
    assert await app.calllog.save(second)
    one, two = await posted(pool, shop)
    assert (one["outcome"], one["menu_choice"], one["agent_endpoint"]) == ("fallback", "3", None)
    assert (two["outcome"], two["menu_choice"], two["group"], two["agent_endpoint"]) == \
        ("answered", "3", "accounting", "agent4")
    assert one["call_id"] == two["call_id"] and two["saved_at"] > one["saved_at"]


async def test_a_row_spooled_while_the_database_was_down_is_posted_when_replayed(app, pool, shop,  # noqa: F811
                                                                                 tmp_path: Path):
    spool = tmp_path / "spool"
    dead = open_pool("postgresql://shopcall@127.0.0.1:1/none", min_size=0, max_size=1, timeout=0.5)
    async with dead:
        down = CallLog(dead, spool, calls_url=shop.url)
        rec = CallRecord(uniqueid="9.2", pbx="asterisk", caller_number="100", caller_name="", dialled_number="100")
        rec.ended_at = now()
        assert not await down.save(rec)
    assert await posted(pool, shop) == []  # nothing queued without the row
    assert await CallLog(pool, spool, calls_url=shop.url).replay_spool() == 1
    [body] = await posted(pool, shop)
    assert (body["uniqueid"], body["outcome"]) == ("9.2", "abandoned")


async def test_without_a_calls_url_nothing_is_queued(conn, pool, tmp_path):
    await load(conn, read(DIRECTORY))
    rec = CallRecord(uniqueid="9.3", pbx="asterisk", caller_number="100", caller_name="", dialled_number="100")
    rec.ended_at = now()
    assert await CallLog(pool, tmp_path).save(rec)
    assert await (await conn.execute("SELECT count(*) AS n FROM webhook_outbox")).fetchone() == {"n": 0}
    assert (await call_row(conn, "9.3"))["outcome"] == "abandoned"


def test_a_calls_url_that_is_not_http_is_refused(tmp_path: Path):
    from shopcall.config import ConfigError, load_config

    path = tmp_path / "shopcall.toml"
    path.write_text('[webhooks]\ncalls_url = "ftp://crm.example/calls"\n')
    with pytest.raises(ConfigError, match="calls_url"):
        load_config(path)
