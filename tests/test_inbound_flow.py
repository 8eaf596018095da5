"""The inbound flow against a scripted call and a real (throw-away) PostgreSQL."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from shopcall.app import App
from shopcall.call import CallEnded, CallInfo, DialResult, DialStatus
from shopcall.calllog import CallLog
from shopcall.config import Config, PathsConfig
from shopcall.directory import Directory, Menu
from shopcall.flows.inbound import inbound
from shopcall.loader import load, read
from tests.scripted import PromptNames, ScriptedCall

DIRECTORY = Path(__file__).parent / "data" / "directory.toml"
REPO_ROOT = Path(__file__).resolve().parent.parent
WEDNESDAY_NOON = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)  # 12:00 in Moscow


@pytest.fixture
async def app(conn, pool, tmp_path) -> App:
    await load(conn, read(DIRECTORY))
    # data (recordings, voicemail, spool) under the test's own directory, never the machine's /var/lib
    config = dataclasses.replace(Config.default(), paths=PathsConfig(data_dir=tmp_path))
    directory = Directory(pool, timezone="Europe/Moscow", default_menu=Menu(timeout=2, retries=1))
    return App(config, pool, PromptNames(), directory, CallLog(pool, tmp_path / "spool"),
               clock=lambda: WEDNESDAY_NOON)


def info(number: str = "100", caller: str = "89161234567", name: str = "Customer", uid: str = "1.1") -> CallInfo:
    return CallInfo(uniqueid=uid, pbx="asterisk", caller_number=caller, caller_name=name, dialled_number=number)


async def run(call: ScriptedCall, app: App) -> None:
    try:
        await inbound(call, app)
    except CallEnded:
        pass


async def call_row(conn, uid: str = "1.1") -> dict:
    cur = await conn.execute(
        "SELECT c.*, e.endpoint AS agent, g.name AS group_name FROM calls c "
        "LEFT JOIN employees e ON e.id = c.answered_by LEFT JOIN groups g ON g.id = c.group_id "
        "WHERE uniqueid = %s", (uid,))
    rows = await cur.fetchall()
    assert len(rows) == 1, f"expected exactly one call row, got {len(rows)}"
    return rows[0]


async def callbacks(conn) -> list[dict]:
    cur = await conn.execute("SELECT * FROM callback_requests ORDER BY id")
    return await cur.fetchall()


async def test_key_2_rings_all_of_delivery_and_logs_who_answered(app, conn):
    call = ScriptedCall(info(), keys=["2"], dial=[DialResult(DialStatus.ANSWERED, "agent3", 42.0, "ANSWER")])
    await run(call, app)
    dials = [a for a in call.actions if a[0] == "dial"]
    assert dials == [("dial", ["agent2", "agent3"], "ringall", 6)]
    assert call.played[:3] == ["greeting", "recording_notice", "main_menu"]
    row = await call_row(conn)
    assert (row["outcome"], row["missed"], row["agent"], row["group_name"]) == ("answered", False, "agent3", "delivery")
    assert row["menu_choice"] == "2" and row["caller_e164"] == "+79161234567"
    assert (row["ended_at"] - row["answered_at"]).total_seconds() >= 41
    assert call.vars["SHOPCALL_DONE"] == "1"
    assert await callbacks(conn) == []


async def test_no_input_goes_to_sales_after_the_retries(app, conn):
    call = ScriptedCall(info(), keys=[None, None], dial=[DialResult(DialStatus.ANSWERED, "agent1", 5, "ANSWER")])
    await run(call, app)
    assert [a[0] for a in call.actions].count("collect") == 2  # menu once + one retry
    assert ("dial", ["agent1"], "ringall", 6) in call.actions
    row = await call_row(conn)
    assert row["menu_choice"] == "1" and row["agent"] == "agent1"
    menu_step = next(s for s in row["route_log"] if s["step"] == "menu")
    assert menu_step["how"] == "default_no_input"


async def test_invalid_key_is_told_then_default(app, conn):
    call = ScriptedCall(info(), keys=["7", "9"], dial=[DialResult(DialStatus.NOANSWER)])
    await run(call, app)
    assert "invalid_choice" in call.played
    row = await call_row(conn)
    assert row["group_name"] == "sales"
    assert next(s for s in row["route_log"] if s["step"] == "menu")["how"] == "default_invalid"


async def test_key_pressed_during_greeting_is_the_menu_choice(app, conn):
    call = ScriptedCall(info(), greeting_key="3", dial=[DialResult(DialStatus.ANSWERED, "agent4", 1, "ANSWER")])
    await run(call, app)
    assert "main_menu" not in call.played
    assert (await call_row(conn))["agent"] == "agent4"


async def test_nobody_answers_missed_row_and_callback_request(app, conn):
    call = ScriptedCall(info(), keys=["1"], dial=[DialResult(DialStatus.NOANSWER, detail="NOANSWER")])
    await run(call, app)
    assert call.played[-1] == "nobody_answered"
    row = await call_row(conn)
    assert (row["outcome"], row["missed"], row["answered_by"]) == ("missed_no_answer", True, None)
    [cb] = await callbacks(conn)
    assert (cb["phone"], cb["status"], cb["reason"], cb["call_id"]) == ("+79161234567", "pending", "no_answer", row["id"])


async def test_repeat_missed_caller_keeps_one_open_callback(app, conn):
    for uid in ("1.1", "1.2"):
        await run(ScriptedCall(info(uid=uid), keys=["1"]), app)
    assert len(await callbacks(conn)) == 1


async def test_after_hours_message_and_missed_row(app, conn):
    call = ScriptedCall(info("200"))
    await run(call, app)
    assert "after_hours" in call.played and not [a for a in call.actions if a[0] == "dial"]
    row = await call_row(conn)
    assert (row["outcome"], row["missed"]) == ("after_hours", True)


async def test_closed_date_is_a_holiday(app, conn):
    await conn.execute("UPDATE schedules SET closed_dates = %s WHERE name = 'always'", ([date(2026, 11, 25)],))
    call = ScriptedCall(info())
    await run(call, app)
    assert "holiday_closed" in call.played
    assert (await call_row(conn))["outcome"] == "holiday"


async def test_russian_public_holiday_closes_the_default_schedule(app, conn):
    app.clock = lambda: datetime(2027, 1, 1, 9, 0, tzinfo=UTC)  # New Year, a Friday
    call = ScriptedCall(info("555"))  # no row for 555 and no catch-all: Mon-Fri 9-18 with RU holidays
    await run(call, app)
    row = await call_row(conn)
    assert row["outcome"] == "holiday"
    assert next(s for s in row["route_log"] if s["step"] == "hours")["reason"] == "holiday"


async def test_manual_night_override(app, conn):
    await conn.execute("UPDATE schedules SET override = 'closed' WHERE name = 'always'")
    await run(ScriptedCall(info()), app)
    assert (await call_row(conn))["outcome"] == "after_hours"


async def test_caller_hangs_up_in_the_menu(app, conn):
    call = ScriptedCall(info(), hang_up_on="collect")
    await run(call, app)
    row = await call_row(conn)
    assert (row["outcome"], row["missed"]) == ("abandoned", True)
    assert [cb["reason"] for cb in await callbacks(conn)] == ["abandoned"]


async def test_caller_gone_while_ringing(app, conn):
    call = ScriptedCall(info(), keys=["1"], dial=[DialResult(DialStatus.CALLER_GONE, detail="CANCEL")])
    await run(call, app)
    row = await call_row(conn)
    assert (row["outcome"], row["missed"]) == ("abandoned", True)


async def test_broken_directory_hands_the_call_back_to_the_dialplan(app, conn):
    await conn.execute("DELETE FROM groups WHERE name = 'sales'")  # the menu now names a missing group
    call = ScriptedCall(info(), keys=["1"])
    await run(call, app)
    assert call.vars["SHOPCALL_DONE"] == "0"
    row = await call_row(conn)
    assert row["outcome"] == "fallback" and "LookupError" in row["route_log"][-1]["error"]


async def test_unsafe_caller_name_is_stored_intact_but_agents_see_it_cleaned(app, conn):
    name = 'Иван "Ваня"\nПетров, ${EXTEN} | & \\\x07'
    call = ScriptedCall(info(name=name), keys=["1"])
    await run(call, app)
    assert (await call_row(conn))["caller_name"] == name
    # a newline would be copied raw into the INVITE ringing the agent, whose phone then drops it
    assert call.vars["CALLERID(name)"] == 'Иван "Ваня" Петров, ${EXTEN} | & \\'


async def test_a_clean_caller_name_is_left_alone(app, conn):
    call = ScriptedCall(info(name="Анна"), keys=["1"])
    await run(call, app)
    assert "CALLERID(name)" not in call.vars


async def test_not_a_phone_number_is_kept_raw_without_callback(app, conn):
    await run(ScriptedCall(info(caller="anonymous"), keys=["1"]), app)
    row = await call_row(conn)
    assert row["caller_number"] == "anonymous" and row["caller_e164"] is None
    assert await callbacks(conn) == []


async def test_english_number_plays_english_prompts(app, conn):
    call = ScriptedCall(info("300"), keys=["1"])
    await run(call, app)
    assert call.language == "en"


async def test_closed_the_caller_hears_when_the_numbers_own_hours_open_next(app, conn):
    # number 200's schedule: open Thursdays 10:30-19:00 Moscow time; it is Wednesday noon there
    await conn.execute("""UPDATE schedules SET weekly = '{"thu": [["10:30", "19:00"]]}' WHERE name = 'never'""")
    call = ScriptedCall(info("200"))
    await run(call, app)
    closed = call.played.index("after_hours")
    assert call.played[closed:closed + 2] == ["after_hours", "Мы откроемся завтра в десять тридцать."]
    step = next(s for s in (await call_row(conn))["route_log"] if s["step"] == "opens")
    assert step["at"] == "2026-11-26T10:30+03:00"


async def test_closed_for_weeks_or_told_not_to_nothing_is_said_about_opening(app, conn):
    call = ScriptedCall(info("200"))  # "never": no opening within the 14 days looked at
    await run(call, app)
    assert "after_hours" in call.played and not any(p.startswith("Мы откроемся") for p in call.played)
    await conn.execute("""UPDATE schedules SET weekly = '{"thu": [["10:30", "19:00"]]}' WHERE name = 'never'""")
    app.config = dataclasses.replace(app.config, inbound=dataclasses.replace(app.config.inbound,
                                                                             say_next_opening=False))
    call = ScriptedCall(info("200", uid="1.2"))
    await run(call, app)
    assert "after_hours" in call.played and not any(p.startswith("Мы откроемся") for p in call.played)


async def test_a_tts_failure_only_leaves_out_when_we_open(app, conn):
    await conn.execute("""UPDATE schedules SET weekly = '{"thu": [["10:30", "19:00"]]}' WHERE name = 'never'""")
    call = ScriptedCall(info("200"))

    async def broken(text: str, lang: str):
        raise RuntimeError("espeak-ng: not found")

    call.sounds.say_text = broken  # type: ignore[method-assign]
    await run(call, app)
    assert "after_hours" in call.played
    assert (await call_row(conn))["outcome"] == "after_hours"
