# ruff: noqa: F811  (pytest fixtures imported from other modules are parameters here)
"""Waiting in line (groups with skip_busy and hold_seconds): hold music, the caller's place, the first free
agent, key 1 for a call back. The inbound flow on scripted calls and a real PostgreSQL, whose hold_queue
is the line. (Every PBX's side: tests/test_esl_flows.py; through the real Asterisk: test_e2e_inbound.py.)

The scripted call's sounds do not exist, so the music's length reads as 30 s (prompts.sound_seconds):
hold_seconds = 90 is three rounds, each ended by one question to the PBX."""

from __future__ import annotations

import wave
from pathlib import Path

import pytest

from shopcall import hold_music
from shopcall.call import DialResult, DialStatus
from shopcall.loader import DirectoryError, load, read
from tests.scripted import ScriptedCall
from tests.test_inbound_flow import DIRECTORY, call_row, callbacks, info, run
from tests.test_inbound_flow import app as base_app  # noqa: F401 (fixture)

BOTH = {"agent2", "agent3"}


@pytest.fixture
async def app(base_app, conn):
    await conn.execute("UPDATE groups SET skip_busy = true, hold_seconds = 90 WHERE name = 'delivery'")
    return base_app


def yes(endpoint: str) -> DialResult:
    return DialResult(DialStatus.ANSWERED, endpoint, 20.0, "ANSWER")


def steps(row: dict, *kinds: str) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "at"} for s in row["route_log"] if s["step"] in kinds]


async def line(conn) -> list[str]:
    return [r["uniqueid"] for r in await (await conn.execute("SELECT uniqueid FROM hold_queue")).fetchall()]


async def test_everyone_busy_the_caller_holds_and_gets_the_first_free_agent(app, conn):
    # busy at the step, still busy after the first round, agent3 free after the second
    call = ScriptedCall(info(), keys=["2"], dial=[yes("agent3")], on_a_call=[BOTH, BOTH, {"agent2"}])
    await run(call, app)
    assert [a[1] for a in call.actions if a[0] == "dial"] == [["agent3"]]
    assert "connecting" not in call.played
    assert call.played[-3:] == ["hold_notice", "hold_music", "hold_music"]
    row = await call_row(conn)
    assert (row["outcome"], row["agent"], row["group_name"]) == ("answered", "agent3", "delivery")
    [held, ended] = steps(row, "hold", "hold_end")
    assert (held["group"], held["hold_seconds"]) == ("delivery", 90)
    assert (ended["how"], ended["place"]) == ("rang", 1)
    assert await line(conn) == []  # the call left the line


async def test_nobody_free_for_the_whole_hold_is_a_missed_call_with_a_callback(app, conn):
    call = ScriptedCall(info(), keys=["2"], on_a_call=[BOTH] * 10)
    await run(call, app)
    assert [a for a in call.actions if a[0] == "dial"] == []
    assert [a[1] for a in call.actions if a[0] == "busy"] == [["agent2", "agent3"]] * 4  # the step, 3 rounds
    assert call.played[-5:] == ["hold_notice", "hold_music", "hold_music", "hold_music", "nobody_answered"]
    row = await call_row(conn)
    assert (row["outcome"], row["missed"]) == ("missed_no_answer", True)
    assert steps(row, "hold_end")[0]["how"] == "timeout"
    [cb] = await callbacks(conn)
    assert cb["reason"] == "no_answer"
    assert await line(conn) == []


async def test_key_1_while_holding_asks_for_a_call_back(app, conn):
    call = ScriptedCall(info(), keys=["2"], on_a_call=[BOTH] * 10, keys_on={"hold_music": "1"})
    await run(call, app)
    assert call.played[-3:] == ["hold_notice", "hold_music", "callback_confirmed"]
    row = await call_row(conn)
    assert (row["outcome"], row["missed"]) == ("missed_no_answer", True)
    assert steps(row, "hold_end")[0]["how"] == "callback"
    [cb] = await callbacks(conn)
    assert (cb["reason"], cb["phone"]) == ("hold", "+79161234567")


async def test_the_caller_hanging_up_in_line_leaves_it(app, conn):
    call = ScriptedCall(info(), keys=["2"], on_a_call=[BOTH] * 10)
    played = call.stream

    async def stream(sound, *, escape=""):
        if sound.name == "hold_music":
            call.hang_up_on = "stream"
        return await played(sound, escape=escape)

    call.stream = stream  # type: ignore[method-assign]
    await run(call, app)
    row = await call_row(conn)
    assert row["outcome"] == "abandoned"
    assert steps(row, "hold_end")[0]["how"] == "caller_gone"
    assert await line(conn) == []


class Line(ScriptedCall):
    """A caller behind another: `before` is in line first, and is put through after `leaves_after` rounds."""

    def __init__(self, *args, conn, leaves_after: int, **kw) -> None:
        super().__init__(*args, **kw)
        self.conn, self.leaves_after, self.asked = conn, leaves_after, 0

    async def busy(self, names: list[str]) -> frozenset[str]:
        self.asked += 1
        if self.asked == 1 + self.leaves_after:
            await self.conn.execute("DELETE FROM hold_queue WHERE uniqueid = 'before'")
        return await super().busy(names)


async def test_callers_wait_in_the_order_they_came(app, conn):
    gid = (await (await conn.execute("SELECT id FROM groups WHERE name = 'delivery'")).fetchone())["id"]
    await conn.execute("INSERT INTO hold_queue (uniqueid, group_id, joined_at) VALUES ('before', %s, now() - "
                       "interval '20 seconds'), ('gone', %s, now() - interval '3 hours'), "
                       "('dead', %s, now() - interval '3 hours')", (gid, gid, gid))
    # two calls whose process died: one not refreshed for minutes, one for hours
    await conn.execute("UPDATE hold_queue SET seen_at = now() - interval '3 minutes' WHERE uniqueid = 'gone'")
    await conn.execute("UPDATE hold_queue SET seen_at = now() - interval '2 hours' WHERE uniqueid = 'dead'")
    # agent3 is free from the first round on, but the caller ahead gets them first; after the second
    # round that caller is through (their row is gone) and this one rings agent3
    call = Line(info(), keys=["2"], dial=[yes("agent3")], on_a_call=[BOTH, {"agent2"}, {"agent2"}, {"agent2"}],
                conn=conn, leaves_after=2)
    await run(call, app)
    assert [a[1] for a in call.actions if a[0] == "dial"] == [["agent3"]]
    # the place said once, after the notice: second (the dead processes' callers do not count)
    assert call.played[-4:] == ["hold_notice", "Ваш номер в очереди — второй.", "hold_music", "hold_music"]
    row = await call_row(conn)
    assert row["agent"] == "agent3" and steps(row, "hold_end")[0]["how"] == "rang"
    assert await line(conn) == ["gone"]  # a call leaving sweeps the rows unseen for an hour


async def test_a_database_gone_away_makes_the_caller_first_not_lost(app, conn, pool, monkeypatch):
    from shopcall import hold

    async def down(*args):
        raise OSError("connection refused")

    monkeypatch.setattr(hold, "ahead", down)
    monkeypatch.setattr(hold, "join", down)
    monkeypatch.setattr(hold, "leave", down)
    call = ScriptedCall(info(), keys=["2"], dial=[yes("agent2")], on_a_call=[BOTH, set()])
    await run(call, app)
    assert (await call_row(conn))["agent"] == "agent2"


async def test_the_directory_file_sets_hold_seconds_only_with_skip_busy(app, conn):
    data = read(DIRECTORY)
    group = next(g for g in data["groups"] if g["name"] == "delivery")
    group.update(skip_busy=True, hold_seconds=120)
    await load(conn, data)
    cur = await conn.execute("SELECT skip_busy, hold_seconds FROM groups WHERE name = 'delivery'")
    assert tuple((await cur.fetchone()).values()) == (True, 120)
    for bad, message in (({"skip_busy": False}, "needs skip_busy"), ({"hold_seconds": 4000}, "0 to 3600"),
                         ({"hold_seconds": "60"}, "whole seconds"), ({"hold_seconds": True}, "whole seconds")):
        with pytest.raises(DirectoryError, match=message):
            await load(conn, {**data, "groups": [{**group, **bad}]})


def test_the_hold_music_is_made_once_as_telephone_audio(tmp_path: Path):
    base = hold_music.render(tmp_path / "hold_music")
    with wave.open(str(base) + ".wav") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        assert w.getnframes() == 8000 * hold_music.SECONDS
    ulaw = Path(str(base) + ".ulaw").read_bytes()
    assert len(ulaw) == 8000 * hold_music.SECONDS and len(set(ulaw)) > 50  # music, not silence
    stamp = Path(str(base) + ".wav").stat().st_mtime_ns
    hold_music.render(base)
    assert Path(str(base) + ".wav").stat().st_mtime_ns == stamp  # there already: left alone
