"""Recording policy (employee, group, number), the post-call survey and the recordings purge, on a
scripted call (which also plays the PBX writing the recording) and a real PostgreSQL."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shopcall import recording
from shopcall.call import DialResult, DialStatus
from shopcall.config import Config, PathsConfig
from tests.scripted import ScriptedCall
from tests.test_inbound_flow import app as base_app  # noqa: F401 (fixture)
from tests.test_inbound_flow import call_row, info, run


def yes(endpoint: str) -> DialResult:
    return DialResult(DialStatus.ANSWERED, endpoint, 10.0, "ANSWER")


@pytest.fixture
async def app(base_app, tmp_path):  # noqa: F811
    base_app.config = dataclasses.replace(Config.default(), paths=PathsConfig(data_dir=tmp_path))
    return base_app


def started(call: ScriptedCall) -> list[tuple]:
    return [a[1:] for a in call.actions if a[0] == "start_recording"]


async def test_agents_recorded_always_by_default_path_on_the_row(app, conn, tmp_path):
    call = ScriptedCall(info(), keys=["2"], dial=[yes("agent2")])
    await run(call, app)
    [(path, on_demand)] = started(call)
    assert path.startswith(str(tmp_path / "recordings")) and path.endswith("/1.1.wav") and not on_demand
    verbs = [a[0] for a in call.actions]
    assert verbs.index("start_recording") < verbs.index("dial")  # armed before the agent answers
    assert (await call_row(conn))["recording_path"] == path


async def test_never_agent_answering_discards_the_recording(app, conn):
    await conn.execute("UPDATE employees SET recording_policy = 'never' WHERE endpoint = 'agent3'")
    call = ScriptedCall(info(), keys=["2"], dial=[yes("agent3")])  # delivery: agent2 always, agent3 never
    await run(call, app)
    [(path, _)] = started(call)
    assert ("stop_recording",) in call.actions and not Path(path).exists()
    row = await call_row(conn)
    assert row["recording_path"] is None
    assert any(s["step"] == "recording_discarded" for s in row["route_log"])


async def test_group_of_never_agents_is_not_recorded_at_all(app, conn):
    await conn.execute("UPDATE employees SET recording_policy = 'never' WHERE endpoint = 'agent4'")
    call = ScriptedCall(info(), keys=["3"], dial=[yes("agent4")])
    await run(call, app)
    assert started(call) == [] and (await call_row(conn))["recording_path"] is None


async def test_number_policy_wins_over_agents(app, conn):
    await conn.execute("UPDATE numbers SET recording_policy = 'never' WHERE number = '100'")
    call = ScriptedCall(info(), keys=["2"], dial=[yes("agent2")])
    await run(call, app)
    assert started(call) == []


async def test_group_on_demand_lets_the_agent_start_it(app, conn):
    await conn.execute("UPDATE groups SET recording_policy = 'on_demand' WHERE name = 'delivery'")
    call = ScriptedCall(info(), keys=["2"], dial=[yes("agent2")])
    await run(call, app)
    [(_, on_demand)] = started(call)
    assert on_demand
    row = await call_row(conn)  # the agent never pressed the feature code here: no file, no path
    assert row["recording_path"] is None and any(s["step"] == "recording_missing" for s in row["route_log"])


def test_policy_resolution():
    assert recording.resolve(None, None, ["never", "always"]) == "always"
    assert recording.resolve(None, None, ["never", "on_demand"]) == "on_demand"
    assert recording.resolve(None, None, []) == "never"
    assert recording.resolve(None, "never", ["always"]) == "never"
    assert recording.resolve("always", "never", ["never"]) == "always"
    assert not recording.keep_for(None, None, "never") and recording.keep_for(None, "always", "never")


async def test_survey_after_the_agent_hangs_up(app, conn):
    await conn.execute("UPDATE groups SET survey_enabled = true WHERE name = 'delivery'")
    call = ScriptedCall(info(), keys=["2", "3"], dial=[yes("agent2")])
    await run(call, app)
    assert call.played[-2:] == ["survey_question", "survey_thanks"]
    row = await call_row(conn)
    cur = await conn.execute("SELECT s.answer, e.endpoint FROM survey_answers s JOIN employees e "
                             "ON e.id = s.employee_id WHERE s.call_id = %s", (row["id"],))
    assert await cur.fetchone() == {"answer": 3, "endpoint": "agent2"}


async def test_no_survey_where_it_is_off_or_nobody_answered(app, conn):
    await conn.execute("UPDATE groups SET survey_enabled = true WHERE name = 'delivery'")
    call = ScriptedCall(info(), keys=["1"], dial=[yes("agent1")])  # sales: survey off
    await run(call, app)
    call2 = ScriptedCall(info(uid="1.2"), keys=["2"], dial=[DialResult(DialStatus.NOANSWER)])
    await run(call2, app)
    assert "survey_question" not in call.played + call2.played


async def test_purge_deletes_old_recordings_and_clears_the_paths(app, conn, pool, tmp_path):
    old, new = tmp_path / "old.wav", tmp_path / "new.wav"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    for uid, path, age in (("o", old, 100), ("n", new, 1)):
        await conn.execute(
            "INSERT INTO calls (uniqueid, started_at, outcome, missed, recording_path) VALUES (%s, %s, 'answered', "
            "false, %s)", (uid, datetime.now(UTC) - timedelta(days=age), str(path)))
    assert await recording.purge(pool, days=90) == (1, 1)
    assert not old.exists() and new.exists()
    cur = await conn.execute("SELECT uniqueid, recording_path, recording_purged_at IS NOT NULL AS purged "
                             "FROM calls ORDER BY uniqueid")
    assert await cur.fetchall() == [
        {"uniqueid": "n", "recording_path": str(new), "purged": False},
        {"uniqueid": "o", "recording_path": None, "purged": True},
    ]


async def settle(app) -> None:
    import asyncio

    while app.tasks:
        await asyncio.gather(*app.tasks)


async def test_after_hours_voicemail_is_stored_and_its_notice_queued(app, conn):
    await conn.execute("UPDATE voicemails SET status = status")  # the table exists (migration 002)
    call = ScriptedCall(info("200"), message_seconds=3.0)
    await run(call, app)
    await settle(app)
    assert call.played[-2:] == ["after_hours", "voicemail_prompt"] and ("record" in [a[0] for a in call.actions])
    cur = await conn.execute("SELECT v.*, e.endpoint FROM voicemails v JOIN employees e ON e.id = v.employee_id")
    [vm] = await cur.fetchall()
    assert (vm["endpoint"], vm["group_name"], vm["status"]) == ("agent1", "sales", "queued")
    assert 2.9 < vm["seconds"] < 3.1 and vm["call_id"] == (await call_row(conn))["id"]
    cur = await conn.execute("SELECT to_addr, attachments FROM outbox")
    [mail] = await cur.fetchall()
    assert mail["to_addr"] == "anna@example.test" and mail["attachments"] == [vm["path"]]


async def test_a_message_under_a_second_is_dropped(app, conn):
    call = ScriptedCall(info("200"), message_seconds=0.4)
    await run(call, app)
    await settle(app)
    cur = await conn.execute("SELECT count(*) AS n FROM voicemails")
    assert (await cur.fetchone())["n"] == 0
    row = await call_row(conn)
    assert next(s for s in row["route_log"] if s["step"] == "voicemail")["seconds"] == 0.4
