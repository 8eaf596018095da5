"""The fallback report (shopcall/flows/fallback.py): a call the dialplan rang itself gets its row and, if
missed, its callback request. Against a scripted call (the dialplan's dial result) and a real PostgreSQL;
the same report from the real Asterisk's hangup handler is in tests/test_fault_kill_many.py."""

from __future__ import annotations

from datetime import UTC, datetime

from shopcall.call import CallInfo, DialResult, DialStatus
from shopcall.flows.fallback import fallback, started_at
from tests.scripted import ScriptedCall
from tests.test_inbound_flow import app, call_row, callbacks, info, run  # noqa: F401  (app: a fixture)


def report(uid: str = "1764650000.7", *, flow_dial: str = "", agistatus: str = "FAILURE",
           caller: str = "89161234567") -> CallInfo:
    args = {"number": "100", "flow_dial": flow_dial, "agistatus": agistatus}
    return CallInfo(uniqueid=uid, pbx="asterisk", caller_number=caller, caller_name="Customer",
                    dialled_number="100", script="fallback", args=args)


async def test_an_answered_fallback_call_has_its_row_with_the_agent_and_the_fallback_group(app, conn):  # noqa: F811
    call = ScriptedCall(report(), dial=[DialResult(DialStatus.ANSWERED, "agent1", 42.0, "ANSWER")])
    await fallback(call, app)
    assert call.actions == [("last_dial",)]  # a dead channel: nothing is played or set
    row = await call_row(conn, "1764650000.7")
    assert (row["outcome"], row["missed"], row["agent"], row["group_name"]) == ("answered", False, "agent1", "sales")
    assert row["started_at"] == datetime.fromtimestamp(1764650000, UTC)  # the channel's creation, from its uniqueid
    assert round((row["ended_at"] - row["answered_at"]).total_seconds()) == 42
    assert row["caller_e164"] == "+79161234567" and row["dialled_number"] == "100"
    assert row["route_log"][-1] | {"at": None} == {"at": None, "step": "fallback", "agistatus": "FAILURE",
                                                   "flow_dial": None, "dial": "ANSWER", "answered": "agent1"}
    assert await callbacks(conn) == []


async def test_a_missed_fallback_call_counts_as_missed_and_leaves_a_callback_request(app, conn):  # noqa: F811
    await fallback(ScriptedCall(report(), dial=[DialResult(DialStatus.NOANSWER, detail="NOANSWER")]), app)
    row = await call_row(conn, "1764650000.7")
    assert (row["outcome"], row["missed"], row["agent"]) == ("missed_no_answer", True, None)
    assert [(c["phone"], c["reason"]) for c in await callbacks(conn)] == [("+79161234567", "no_answer")]


async def test_a_caller_who_hung_up_while_the_fallback_rang_is_abandoned(app, conn):  # noqa: F811
    await fallback(ScriptedCall(report(), dial=[DialResult(DialStatus.CALLER_GONE, detail="CANCEL")]), app)
    row = await call_row(conn, "1764650000.7")
    assert (row["outcome"], row["missed"]) == ("abandoned", True)
    assert [c["reason"] for c in await callbacks(conn)] == ["abandoned"]


async def test_no_dial_at_all_is_a_failed_missed_call(app, conn):  # noqa: F811
    # the fallback group had no members when the dialplan was rendered: Congestion, no DIALSTATUS
    await fallback(ScriptedCall(report(), dial=[DialResult(DialStatus.FAILED)]), app)
    row = await call_row(conn, "1764650000.7")
    assert (row["outcome"], row["missed"]) == ("failed", True)


async def test_the_report_completes_the_row_of_a_flow_that_failed_without_blanking_it(app, conn):  # noqa: F811
    await conn.execute("DELETE FROM groups WHERE name = 'delivery'")  # key 2 now names a missing group
    flow_call = ScriptedCall(info(uid="1764650000.8"), keys=["2"])
    await run(flow_call, app)
    assert flow_call.vars["SHOPCALL_DONE"] == "0"  # the dialplan takes over
    first = await call_row(conn, "1764650000.8")
    assert first["outcome"] == "fallback" and first["menu_choice"] == "2"

    call = ScriptedCall(report("1764650000.8"), dial=[DialResult(DialStatus.ANSWERED, "agent1", 5.0, "ANSWER")])
    await fallback(call, app)
    row = await call_row(conn, "1764650000.8")  # still one row
    assert (row["outcome"], row["agent"], row["group_name"]) == ("answered", "agent1", "sales")
    assert row["menu_choice"] == "2" and row["language"] == first["language"] == "ru"
    assert row["started_at"] == first["started_at"]  # the flow's own, finer than the uniqueid's second
    assert [s["step"] for s in row["route_log"]][-2:] == ["error", "fallback"]


async def test_a_call_the_flow_had_connected_keeps_the_flows_group(app, conn):  # noqa: F811
    # our server died while the caller talked to an agent of delivery: the dialplan hung up, rang nobody
    flow_call = ScriptedCall(info(uid="1764650000.9"), keys=["2"],
                             dial=[DialResult(DialStatus.ANSWERED, "agent2", 1.0, "ANSWER")])
    await run(flow_call, app)
    await conn.execute("UPDATE calls SET outcome = 'fallback', answered_by = NULL WHERE uniqueid = '1764650000.9'")
    call = ScriptedCall(report("1764650000.9", flow_dial="ANSWER", agistatus="HANGUP"),
                        dial=[DialResult(DialStatus.ANSWERED, "agent2", 30.0, "ANSWER")])
    await fallback(call, app)
    row = await call_row(conn, "1764650000.9")
    assert (row["outcome"], row["agent"], row["group_name"]) == ("answered", "agent2", "delivery")


async def test_arguments_that_are_not_status_words_are_left_out(app, conn):  # noqa: F811
    bad = report(flow_dial="ANSWER,1", agistatus="FAIL\nURE")
    await fallback(ScriptedCall(bad, dial=[DialResult(DialStatus.NOANSWER, detail="NOANSWER")]), app)
    step = (await call_row(conn, "1764650000.7"))["route_log"][-1]
    assert (step["agistatus"], step["flow_dial"]) == (None, None)
    assert (await call_row(conn, "1764650000.7"))["group_name"] == "sales"  # not taken for the flow's answer


def test_started_at_comes_from_the_uniqueid_when_it_is_asterisks():
    ended = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    assert started_at("1764676800.42", ended) == datetime(2025, 12, 2, 12, 0, tzinfo=UTC)
    assert started_at("abc-1", ended) == ended
    assert started_at("9999999999.1", ended) == ended  # a clock ahead of ours is not believed


async def test_a_flows_row_replayed_after_the_fallback_report_does_not_undo_it(app, conn):  # noqa: F811
    # the database was down when the flow failed (its row spooled), back when the call hung up: the
    # report is written first, the flow's older row replayed after
    await conn.execute("DELETE FROM groups WHERE name = 'delivery'")
    saved: list = []
    real_save = app.calllog.save

    async def hold(rec):  # the flow's row waits, as in the spool
        saved.append(rec)
        return False

    app.calllog.save = hold
    await run(ScriptedCall(info(uid="1764650000.10"), keys=["2"]), app)
    app.calllog.save = real_save
    await fallback(ScriptedCall(report("1764650000.10"),
                                dial=[DialResult(DialStatus.ANSWERED, "agent1", 5.0, "ANSWER")]), app)
    assert await app.calllog.save(saved[0])  # the replay
    row = await call_row(conn, "1764650000.10")
    assert (row["outcome"], row["missed"], row["agent"], row["group_name"]) == ("answered", False, "agent1", "sales")
    assert row["menu_choice"] == "2"  # only the flow knew it
    steps = [s["step"] for s in row["route_log"]]
    assert steps[0] == "number" and steps[-2:] == ["error", "fallback"]  # in the order they happened
