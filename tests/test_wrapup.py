# ruff: noqa: F811  (pytest fixtures imported from other modules are parameters here)
"""Wrap-up time (inbound.wrapup_seconds): an agent whose call just ended is not rung again at once, by the
inbound flow (scripted calls) or the callback worker; real PostgreSQL."""

from __future__ import annotations

import dataclasses

import psycopg

from shopcall import callbacks
from shopcall.config import InboundConfig
from tests.scripted import ScriptedCall
from tests.test_callbacks import FakeAmi, add_request, asterisk, make_config
from tests.test_inbound_flow import app, call_row, info, run  # noqa: F401 (fixture)
from tests.test_routing_flow import yes


def resting(app, seconds: int = 60):
    return dataclasses.replace(app, config=dataclasses.replace(app.config, inbound=InboundConfig(wrapup_seconds=seconds)))


def dials(call: ScriptedCall) -> list[list[str]]:
    return [a[1] for a in call.actions if a[0] == "dial"]


async def test_an_agent_in_wrapup_is_left_out_of_the_ring(app, conn):
    await conn.execute("UPDATE employees SET last_call_ended_at = now() - interval '10 seconds' "
                       "WHERE endpoint = 'agent2'")
    call = ScriptedCall(info(), keys=["2"], dial=[yes("agent3")])
    await run(call, resting(app, 60))
    assert dials(call) == [["agent3"]]
    row = await call_row(conn)
    assert {"ring": "menu", "skipped": "wrapup", "agents": ["agent2"]} in [
        {k: v for k, v in s.items() if k not in ("at", "step")} for s in row["route_log"] if s["step"] == "skip"]
    # agent3 just answered: now they are the one resting, for the next call
    await conn.execute("UPDATE employees SET last_call_ended_at = NULL WHERE endpoint = 'agent2'")
    call = ScriptedCall(info(uid="1.4"), keys=["2"], dial=[yes("agent2")])
    await run(call, resting(app, 60))
    assert dials(call) == [["agent2"]]
    # past the wrap-up, or with none configured, both ring again
    await conn.execute("UPDATE employees SET last_call_ended_at = now() - interval '10 seconds'")
    call = ScriptedCall(info(uid="1.2"), keys=["2"], dial=[yes("agent3")])
    await run(call, resting(app, 5))
    assert dials(call) == [["agent2", "agent3"]]
    call = ScriptedCall(info(uid="1.3"), keys=["2"], dial=[yes("agent3")])
    await run(call, app)  # wrap-up off: agent3 rings though they answered a moment ago
    assert dials(call) == [["agent2", "agent3"]]


async def test_when_everyone_is_in_wrapup_they_ring_anyway(app, conn):
    await conn.execute("UPDATE employees SET last_call_ended_at = now() WHERE endpoint IN ('agent2', 'agent3')")
    call = ScriptedCall(info(), keys=["2"], dial=[yes("agent2")])
    await run(call, resting(app))
    assert dials(call) == [["agent2", "agent3"]]  # a pause between calls is never a reason to miss one
    row = await call_row(conn)
    assert any(s.get("wrapup_ignored") == ["agent2", "agent3"] for s in row["route_log"])


async def test_the_answered_call_starts_the_wrapup_without_waking_the_group_caches(app, conn, pg_url):
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as listener:
        await listener.execute("LISTEN shopcall_directory")
        await run(ScriptedCall(info(), keys=["2"], dial=[yes("agent3")]), app)
        heard = [n async for n in listener.notifies(timeout=0.5)]
    assert heard == []  # the call's employee update is not a directory change
    row = await call_row(conn)
    emp = await (await conn.execute("SELECT last_call_ended_at FROM employees WHERE endpoint = 'agent3'")).fetchone()
    assert emp["last_call_ended_at"] == row["ended_at"]
    # while an admin's change still is one
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as listener:
        await listener.execute("LISTEN shopcall_directory")
        await conn.execute("UPDATE employees SET paused = true WHERE endpoint = 'agent3'")
        heard = [n async for n in listener.notifies(timeout=2, stop_after=1)]
    assert [n.payload for n in heard] == ["employees"]


async def test_the_callback_worker_offers_queued_requests_to_rested_agents_only(app, conn, pool):
    await conn.execute("UPDATE employees SET last_call_ended_at = now() WHERE endpoint = 'agent2'")
    await add_request(conn)  # the delivery group's: agent2 first, were they not in wrap-up
    config = dataclasses.replace(make_config(), inbound=InboundConfig(wrapup_seconds=60))
    [offer] = await callbacks.offer_due(pool, config, asterisk(FakeAmi()))
    assert offer.endpoint == "agent3"
    # an agent who asks for a click to call gets it whatever their wrap-up
    rid = (await callbacks.click_to_call(pool, "agent2", "+79160000009"))["id"]
    [click] = await callbacks.offer_due(pool, config, asterisk(FakeAmi()))
    assert (click.request_id, click.endpoint) == (rid, "agent2")
