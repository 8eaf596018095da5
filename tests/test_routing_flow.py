"""Category, sticky and strategy routing, the language menu and the overflow robot, on a scripted call and
a real (throw-away) PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from shopcall.call import DialResult, DialStatus
from shopcall.loader import load, read
from tests.scripted import ScriptedCall
from tests.test_inbound_flow import app as base_app  # noqa: F401 (fixture)
from tests.test_inbound_flow import call_row, callbacks, info, run

ROUTING = Path(__file__).parent / "data" / "routing.toml"
OLGA = "89160000001"  # a customer whose last manager is agent4 and who last bought kitchenware
IVAN = "89161234567"  # a customer with two open orders and no manager yet

NO = DialResult(DialStatus.NOANSWER, detail="NOANSWER")


def yes(endpoint: str) -> DialResult:
    return DialResult(DialStatus.ANSWERED, endpoint, 10.0, "ANSWER")


@pytest.fixture
async def app(base_app, conn):  # noqa: F811
    await load(conn, read(ROUTING))
    return base_app


def dials(call: ScriptedCall) -> list[tuple]:
    return [a[1:] for a in call.actions if a[0] == "dial"]


async def test_tracking_number_rings_its_category_group_and_shows_the_source(app, conn):
    call = ScriptedCall(info("400", caller="84957778899", name="Пётр"), dial=[yes("agent3")])
    await run(call, app)
    assert dials(call) == [(["agent2", "agent3"], "hunt", 6)]
    assert call.vars["CALLERID(name)"] == "[Встраиваемая] Пётр"
    row = await call_row(conn)
    assert (row["agent"], row["group_name"], row["outcome"]) == ("agent3", "builtin", "answered")


async def test_sticky_manager_first_then_last_category_then_number_category(app, conn):
    call = ScriptedCall(info("400", caller=OLGA), dial=[NO, NO, yes("agent2")])
    await run(call, app)
    assert dials(call) == [
        (["agent4"], "ringall", 5),  # the manager who last talked to her, for the number's sticky_seconds
        (["agent3"], "ringall", 6),  # the group of what she bought last (kitchenware)
        (["agent2", "agent3"], "hunt", 6),  # the tracking number's category
    ]
    row = await call_row(conn)
    reasons = [s["reason"] for s in row["route_log"] if s["step"] == "ring"]
    assert reasons == ["sticky", "last_category", "category"]
    assert (row["agent"], row["group_name"]) == ("agent2", "builtin")


async def test_answering_makes_the_agent_the_customers_manager(app, conn):
    await run(ScriptedCall(info("400", caller=IVAN), dial=[yes("agent2")]), app)
    cur = await conn.execute("SELECT e.endpoint FROM customers c JOIN employees e ON e.id = c.last_manager_id "
                             "WHERE c.phone = '+79161234567'")
    assert (await cur.fetchone())["endpoint"] == "agent2"
    # next time Ivan rings his manager first
    call = ScriptedCall(info("400", caller=IVAN, uid="1.2"), dial=[yes("agent2")])
    await run(call, app)
    assert dials(call)[0] == (["agent2"], "ringall", 5)


async def test_logged_out_manager_is_skipped_and_logged(app, conn):
    await conn.execute("UPDATE employees SET logged_in = false WHERE endpoint = 'agent4'")
    call = ScriptedCall(info("400", caller=OLGA), dial=[yes("agent3")])
    await run(call, app)
    assert dials(call)[0] == (["agent3"], "ringall", 6)
    row = await call_row(conn)
    skip = next(s for s in row["route_log"] if s["step"] == "skip")
    assert (skip["ring"], skip["skipped"]) == ("sticky", "logged_out")


async def test_paused_agents_are_not_rung(app, conn):
    await conn.execute("UPDATE employees SET paused = true WHERE endpoint = 'agent2'")
    call = ScriptedCall(info("400", caller="84957778899"), dial=[yes("agent3")])
    await run(call, app)
    assert dials(call) == [(["agent3"], "hunt", 6)]


async def test_menu_choice_rings_the_manager_only_if_in_that_department(app, conn):
    call = ScriptedCall(info("100", caller=OLGA), keys=["3"], dial=[yes("agent4")])  # accounting
    await run(call, app)
    assert dials(call) == [(["agent4"], "ringall", 15)]  # her manager works in accounting: rung first
    call = ScriptedCall(info("100", caller=OLGA, uid="1.2"), keys=["2"], dial=[yes("agent2")])  # delivery
    await run(call, app)
    assert dials(call) == [(["agent2", "agent3"], "ringall", 6)]  # agent4 is not in delivery


async def test_language_menu_choice_is_remembered(app, conn):
    call = ScriptedCall(info("500", caller="84957778899"), keys=["2", "1"], dial=[yes("agent1")])
    await run(call, app)
    assert call.language == "en" and call.played[0] == "language_menu"
    assert (await call_row(conn))["language"] == "en"
    call = ScriptedCall(info("500", caller="84957778899", uid="1.2"), keys=["1"], dial=[yes("agent1")])
    await run(call, app)
    assert call.language == "en" and "language_menu" not in call.played


async def test_overflow_robot_says_every_open_order(app, conn):
    call = ScriptedCall(info("600", caller=IVAN), keys=["1"], dial=[NO])
    await run(call, app)
    # his last order was kitchenware, then the number's group; overflow_seconds cut each ring short
    assert dials(call) == [(["agent3"], "ringall", 4), (["agent1"], "ringall", 4)]
    assert "several_orders" in call.played
    assert "order_status_at_pickup_point" in call.played and "order_status_shipped" in call.played
    said_text = [a[1] for a in call.actions if a[0] == "stream" and a[1] not in call.played[:0]]
    assert "один ноль пять семь восемь" in said_text  # the order number, digit by digit (PromptNames)
    assert "двадцать седьмое ноября" in said_text
    row = await call_row(conn)
    said = [(s["order"], s["status"], s["delivery_date"]) for s in row["route_log"] if s["step"] == "robot_said"]
    assert said == [("10578", "at_pickup_point", "2026-11-27"), ("10577", "shipped", "2026-12-03")]
    assert (row["outcome"], row["robot_choice"], row["missed"]) == ("robot", "1", True)
    assert await callbacks(conn) == []


async def test_overflow_robot_callback_on_request_and_on_silence(app, conn):
    await run(ScriptedCall(info("600", caller=OLGA), keys=["2"], dial=[NO, NO]), app)
    [cb] = await callbacks(conn)
    assert (cb["phone"], cb["reason"]) == ("+79160000001", "robot")
    await run(ScriptedCall(info("600", caller="84957778899", uid="1.2"), keys=[None, None], dial=[NO]), app)
    assert [c["phone"] for c in await callbacks(conn)] == ["+79160000001", "+74957778899"]


async def test_robot_with_no_orders_offers_the_callback(app, conn):
    call = ScriptedCall(info("600", caller="84957778899"), keys=["1", "2"], dial=[NO])
    await run(call, app)
    assert "no_orders" in call.played and "callback_confirmed" in call.played
    assert [c["reason"] for c in await callbacks(conn)] == ["robot"]


async def test_round_robin_remembers_where_it_stopped(app, conn):
    await conn.execute("UPDATE groups SET strategy = 'roundrobin' WHERE name = 'delivery'")
    firsts = []
    for i in range(3):
        call = ScriptedCall(info("100", caller="84957778899", uid=f"rr.{i}"), keys=["2"], dial=[yes("agent2")])
        await run(call, app)
        [(endpoints, strategy, _)] = dials(call)
        assert strategy == "hunt"
        firsts.append(endpoints[0])
    assert firsts == ["agent2", "agent3", "agent2"]


async def test_least_recent_rings_who_waited_longest(app, conn):
    await conn.execute("UPDATE groups SET strategy = 'leastrecent' WHERE name = 'delivery'")
    await conn.execute("UPDATE employees SET last_call_at = now() WHERE endpoint = 'agent2'")
    call = ScriptedCall(info("100", caller="84957778899"), keys=["2"], dial=[yes("agent3")])
    await run(call, app)
    assert dials(call) == [(["agent3", "agent2"], "hunt", 6)]


async def test_feature_codes_log_out_pause_and_back(app, conn):
    from shopcall.call import CallInfo
    from shopcall.flows.agent import agent

    def from_phone(action: str, endpoint: str = "agent2") -> ScriptedCall:
        return ScriptedCall(CallInfo(uniqueid=f"a.{action}", pbx="asterisk", caller_endpoint=endpoint,
                                     args={"action": action}))

    async def state() -> tuple:
        cur = await conn.execute("SELECT logged_in, paused FROM employees WHERE endpoint = 'agent2'")
        row = await cur.fetchone()
        return row["logged_in"], row["paused"]

    for action, expected, prompt in (("logout", (False, False), "agent_logged_out"),
                                     ("login", (True, False), "agent_logged_in"),
                                     ("pause", (True, True), "agent_paused"),
                                     ("unpause", (True, False), "agent_unpaused")):
        call = from_phone(action)
        await agent(call, app)
        assert await state() == expected and call.played == [prompt]
    call = from_phone("logout", endpoint="stranger")
    await agent(call, app)
    assert call.played == ["agent_unknown"]


async def test_logged_out_agent_gets_no_calls(app, conn):
    from shopcall.call import CallInfo
    from shopcall.flows.agent import agent

    await agent(ScriptedCall(CallInfo(uniqueid="a.1", pbx="asterisk", caller_endpoint="agent2",
                                      args={"action": "logout"})), app)
    call = ScriptedCall(info("100", caller="84957778899"), keys=["2"], dial=[yes("agent3")])
    await run(call, app)
    assert dials(call) == [(["agent3"], "ringall", 6)]


def test_channel_name_to_endpoint():
    from agi.routes import channel_endpoint

    assert channel_endpoint("PJSIP/agent1-0000000a") == "agent1"
    assert channel_endpoint("PJSIP/my-phone-00000001") == "my-phone"
    assert channel_endpoint("Local/100@ctx-00000001;1") == "100@ctx"


async def test_lookups_of_a_burst_match_lookups_one_by_one(app):
    """Route and caller come in one statement for a whole batch: each key still gets its own pair."""
    import asyncio

    keys = [("400", "+79160000001"), ("400", "+79161234567"), ("400", None), ("no-such-number", "+79160000001"),
            ("100", "+79990000000"), ("400", "+79160000001")]
    alone = [await app.directory.lookup(*k) for k in keys]
    together = await asyncio.gather(*(app.directory.lookup(*k) for k in keys))
    assert together == alone
    olga = alone[0][1]
    assert (olga.manager.endpoint, olga.last_category, olga.last_category_group) == ("agent4", "kitchen", "kitchen")
    assert alone[1][1].customer_id is not None and alone[1][1].manager is None
    assert alone[2][1].customer_id is None and alone[4][1].customer_id is None
    unknown = alone[3][0]  # no row and no catch-all row in this directory: the defaults
    assert (unknown.number, unknown.greeting, unknown.menu is not None) == ("no-such-number", "greeting", True)


async def test_a_column_name_taken_twice_in_the_lookup_is_an_error_not_a_silent_overwrite(app, monkeypatch):
    from shopcall import directory

    clash = directory._LOOKUP_ONE.replace("n.number AS route_row", "n.number AS route_row, n.title AS caller_id")
    monkeypatch.setattr(directory, "_LOOKUP_ONE", clash)
    with pytest.raises(RuntimeError, match="caller_id"):
        await app.directory.lookup("400", "+79160000001")
