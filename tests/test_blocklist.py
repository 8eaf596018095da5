"""The block list: the inbound flow refusing listed (and, when asked, anonymous) callers against a scripted
call and a real PostgreSQL; the statistics leaving them out; the CLI and the HTTP API that edit it."""

from __future__ import annotations

import dataclasses
from datetime import date

import aiohttp
import pytest

from shopcall import stats
from shopcall.api import start_api
from tests.scripted import ScriptedCall
from tests.test_api import AUTH, api_config
from tests.test_cli_db import config, shopcall  # noqa: F401  (config: a fixture)
from tests.test_inbound_flow import app, call_row, callbacks, info, run  # noqa: F401  (app: a fixture)

SPAMMER = "+74951230000"


async def block(conn, phone: str = SPAMMER, reason: str = "spam", until: str = "NULL") -> None:
    await conn.execute(f"INSERT INTO blocked_callers (phone, reason, until) VALUES (%s, %s, {until})",
                       (phone, reason))


def refused(call: ScriptedCall) -> bool:
    return call.actions == [("hangup", "rejected")]


async def test_a_blocked_caller_is_refused_before_the_greeting(app, conn):  # noqa: F811
    await block(conn)
    call = ScriptedCall(info(caller="84951230000"))
    await run(call, app)
    assert refused(call) and call.played == [], call.actions  # not answered, nothing played, nobody rung
    row = await call_row(conn)
    assert (row["outcome"], row["missed"], row["answered_by"]) == ("blocked", False, None)
    assert [s for s in row["route_log"] if s["step"] == "blocked"][0]["reason"] == "spam"
    assert await callbacks(conn) == []  # and no callback request for them


async def test_a_blocked_customer_is_refused_too(app, conn):  # noqa: F811
    await conn.execute("INSERT INTO customers (phone, language) VALUES (%s, 'en')", (SPAMMER,))
    await block(conn, reason="")
    call = ScriptedCall(info(caller=SPAMMER))
    await run(call, app)
    assert refused(call)
    assert (await call_row(conn))["outcome"] == "blocked"


async def test_a_block_that_has_ended_lets_the_call_through(app, conn):  # noqa: F811
    await block(conn, until="now() - interval '1 minute'")
    call = ScriptedCall(info(caller=SPAMMER), keys=["1"])
    await run(call, app)
    assert not refused(call) and call.played[0] == "greeting"
    assert (await call_row(conn))["outcome"] != "blocked"


@pytest.mark.parametrize("number", ["", "anonymous", "Unknown", "restricted"])
async def test_anonymous_callers_are_refused_only_when_asked(app, conn, number):  # noqa: F811
    call = ScriptedCall(info(caller=number), keys=["1"])
    await run(call, app)
    assert not refused(call)  # by default a withheld number is a customer like any other
    await conn.execute("TRUNCATE calls CASCADE")
    strict = dataclasses.replace(app, config=dataclasses.replace(
        app.config, inbound=dataclasses.replace(app.config.inbound, block_anonymous=True)))
    call = ScriptedCall(info(caller=number))
    await run(call, strict)
    assert refused(call)
    row = await call_row(conn)
    assert row["outcome"] == "blocked" and row["route_log"][-1]["reason"] == "anonymous"


async def test_an_internal_number_is_not_anonymous(app, conn):  # noqa: F811
    strict = dataclasses.replace(app, config=dataclasses.replace(
        app.config, inbound=dataclasses.replace(app.config.inbound, block_anonymous=True)))
    call = ScriptedCall(info(caller="201"), keys=["1"])  # an extension: no E.164, but a number
    await run(call, strict)
    assert not refused(call)


async def test_statistics_count_refused_calls_apart(app, conn, pool):  # noqa: F811
    await block(conn)
    await run(ScriptedCall(info(caller=SPAMMER, uid="1.1")), app)
    await run(ScriptedCall(info(uid="1.2"), keys=["1"]), app)  # a customer nobody answered
    today = date.today()
    tables = {t.title: t for t in await stats.collect(pool, today, today, "UTC")}
    summary = dict(zip(tables["Summary"].columns, tables["Summary"].rows[0], strict=True))
    assert (summary["calls"], summary["missed"], summary["blocked"], summary["answer_rate_%"]) == (1, 1, 1, 0)
    assert [row[1] for row in tables["By dialled number"].rows] == [1]


def test_the_cli_adds_lists_and_removes(config):  # noqa: F811
    out = shopcall("block", "add", "8 (495) 123-00-00", "--reason", "robocalls\nevery day", "--days", "30",
                   config=config)
    assert out.returncode == 0 and out.stdout.startswith(f"{SPAMMER}: calls refused until 20"), out.stderr
    listed = shopcall("block", "list", config=config).stdout
    assert SPAMMER in listed and "robocalls every day" in listed and "cli" in listed  # the reason on one line
    assert shopcall("block", "add", "hello", config=config).returncode == 2
    assert "days" in shopcall("block", "add", SPAMMER, "--days", "0", config=config).stderr
    assert shopcall("block", "remove", SPAMMER, config=config).returncode == 0
    gone = shopcall("block", "remove", SPAMMER, config=config)
    assert gone.returncode == 1 and "not on the block list" in gone.stderr
    assert SPAMMER not in shopcall("block", "list", config=config).stdout


@pytest.fixture
async def client(pool, conn):
    runner = await start_api(api_config(), pool)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{runner.port}") as session:
        yield session
    await runner.stop()


async def test_the_api_puts_lists_and_deletes(client, app, conn):  # noqa: F811
    resp = await client.put("/api/v1/blocked/84951230000", json={"reason": "spam", "days": 7}, headers=AUTH)
    assert resp.status == 200
    entry = await resp.json()
    assert (entry["phone"], entry["reason"], entry["source"]) == (SPAMMER, "spam", "api") and entry["until"]
    listed = await (await client.get("/api/v1/blocked", headers=AUTH)).json()
    assert [e["phone"] for e in listed["blocked"]] == [SPAMMER]
    call = ScriptedCall(info(caller=SPAMMER))
    await run(call, app)  # the flow sees it at once: the list is read with the call's route
    assert refused(call)
    resp = await client.put(f"/api/v1/blocked/{SPAMMER}", json={}, headers=AUTH)  # again: until removed
    assert resp.status == 200 and (await resp.json())["until"] is None
    assert (await client.delete(f"/api/v1/blocked/{SPAMMER}", headers=AUTH)).status == 204
    assert (await client.delete(f"/api/v1/blocked/{SPAMMER}", headers=AUTH)).status == 404
    assert (await (await client.get("/api/v1/blocked", headers=AUTH)).json())["blocked"] == []


@pytest.mark.parametrize("phone, body, status, field", [
    ("hello", {}, 400, None),
    (SPAMMER, [], 422, None),
    (SPAMMER, {"why": "x"}, 422, "why"),
    (SPAMMER, {"reason": 5}, 422, "reason"),
    (SPAMMER, {"reason": "x" * 201}, 422, "reason"),
    (SPAMMER, {"days": 0}, 422, "days"),
    (SPAMMER, {"days": True}, 422, "days"),
    (SPAMMER, {"days": 1e9}, 422, "days"),
    (SPAMMER, {"reason": "a\u0000b"}, 422, "reason"),
])
async def test_the_api_says_what_is_wrong(client, phone, body, status, field):
    resp = await client.put(f"/api/v1/blocked/{phone}", json=body, headers=AUTH)
    assert resp.status == status
    data = await resp.json()
    if field:
        assert data["detail"]["field"] == field, data


async def test_the_api_needs_a_token(client):
    assert (await client.get("/api/v1/blocked")).status == 401
    assert (await client.put(f"/api/v1/blocked/{SPAMMER}", json={})).status == 401
