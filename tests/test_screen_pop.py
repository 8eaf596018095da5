# ruff: noqa: F811  (pytest fixtures imported from other modules are parameters here)
"""The CRM's screen pop (webhooks.ringing_url): an inbound flow on a scripted call, a real PostgreSQL and
a real aiohttp receiver standing in for the shop's CRM."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json

import pytest

from shopcall import screen_pop
from shopcall.config import WebhooksConfig
from shopcall.screen_pop import ScreenPop
from tests.scripted import ScriptedCall
from tests.test_inbound_flow import call_row, info, run
from tests.test_routing_flow import NO, OLGA, app, base_app, yes  # noqa: F401 (fixtures)
from tests.test_webhooks import Shop, shop  # noqa: F401 (fixture)

SECRET = "pop-secret"


def popping(app, url: str, **hooks) -> None:
    app.screen_pop = ScreenPop(WebhooksConfig(ringing_url=url, secret=SECRET, **hooks))


async def received(shop: Shop, n: int) -> list[tuple[dict, dict]]:
    async with asyncio.timeout(5):
        while len(shop.requests) < n:
            await asyncio.sleep(0.01)
    out = []
    for headers, raw in shop.requests:
        expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
        assert headers["X-Shopcall-Signature"] == expected and headers["X-Shopcall-Kind"] == "ringing"
        out.append((headers, json.loads(raw)))
    return out


async def test_each_ring_step_pops_the_card_for_the_agents_it_rings(app, conn, shop):
    popping(app, shop.url)
    call = ScriptedCall(info("400", caller=OLGA, name='Ольга "VIP"'), dial=[NO, NO, yes("agent2")])
    await run(call, app)
    pops = await received(shop, 3)
    await app.screen_pop.close()
    bodies = [b for _, b in pops]
    assert [b["reason"] for b in bodies] == ["sticky", "last_category", "category"]
    assert [[a["endpoint"] for a in b["agents"]] for b in bodies] == [["agent4"], ["agent3"], ["agent2", "agent3"]]
    customer = (await call_row(conn))["customer_id"]
    first = bodies[0]
    assert customer is not None and {b["customer_id"] for b in bodies} == {customer}
    assert (first["event"], first["uniqueid"], first["caller_e164"], first["caller_name"], first["dialled_number"]) == (
        "call_ringing", "1.1", "+79160000001", 'Ольга "VIP"', "400")
    assert first["agents"][0]["name"] and first["group"] is None and bodies[2]["group"] == "builtin"
    assert bodies[2]["shown_to_agents"].startswith("[")  # the category prefix the agents' phones show
    assert len({h["X-Shopcall-Delivery"] for h, _ in pops}) == 3  # one per step: a repeat is spotted


async def test_a_crm_that_is_down_or_slow_costs_the_call_nothing(app, conn, shop):
    popping(app, "http://127.0.0.1:9/nothing-listens", ringing_timeout=0.5)
    call = ScriptedCall(info("100"), keys=["2"], dial=[yes("agent3")])
    await run(call, app)
    assert (await call_row(conn))["outcome"] == "answered"
    await app.screen_pop.close()
    assert (app.screen_pop.sent, app.screen_pop.failed) == (0, 1)

    shop.delay = 5.0  # answers after the timeout
    popping(app, shop.url, ringing_timeout=0.3)
    call = ScriptedCall(info("100", uid="1.2"), keys=["2"], dial=[yes("agent3")])
    async with asyncio.timeout(2):  # the flow does not wait for the CRM
        await run(call, app)
    await app.screen_pop.close()
    assert (app.screen_pop.sent, app.screen_pop.failed) == (0, 1)


async def test_past_the_limit_further_pops_are_dropped(shop, monkeypatch):
    monkeypatch.setattr(screen_pop, "MAX_IN_FLIGHT", 2)
    shop.delay = 0.3
    pop = ScreenPop(WebhooksConfig(ringing_url=shop.url, secret=SECRET))
    for i in range(4):
        pop.ringing({"event": "call_ringing", "n": i}, f"x/{i}")
    await pop.close()
    assert (pop.sent, pop.dropped) == (2, 2)
    assert [json.loads(raw)["n"] for _, raw in shop.requests] == [0, 1]


async def test_no_url_no_pop(app, conn):
    assert app.screen_pop is None  # App.build makes one only with webhooks.ringing_url
    built = dataclasses.replace(app.config, webhooks=WebhooksConfig(ringing_url="http://127.0.0.1:9/x"))
    from shopcall.app import App

    assert App.build(built, app.pool).screen_pop is not None
    assert App.build(app.config, app.pool).screen_pop is None


@pytest.mark.parametrize("name", ["a\r\nX-Evil: 1", "${CALLERID(num)}", "&|,"])
async def test_caller_names_travel_as_json_only(app, conn, shop, name):
    popping(app, shop.url)
    call = ScriptedCall(info("100", name=name), keys=["2"], dial=[yes("agent3")])
    await run(call, app)
    [(headers, body)] = await received(shop, 1)
    await app.screen_pop.close()
    assert body["caller_name"] == name and "X-Evil" not in headers
