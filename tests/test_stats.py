"""Statistics over calls made by the real flow (scripted calls), through the CLI as an admin runs it."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from datetime import date, datetime

import pytest

from shopcall import stats
from shopcall.call import DialResult, DialStatus
from shopcall.calllog import CallRecord
from tests.scripted import ScriptedCall
from tests.test_inbound_flow import REPO_ROOT, info, run
from tests.test_inbound_flow import app as flow_app  # noqa: F401 (fixture)

TODAY = date(2026, 11, 25)  # the flow tests' fixed clock is Wednesday noon in Moscow


@pytest.fixture
def app(flow_app):  # noqa: F811
    return flow_app


async def make_calls(app) -> None:
    await run(ScriptedCall(info("100", uid="s.1"), keys=["2"],
                           dial=[DialResult(DialStatus.ANSWERED, "agent2", 30, "ANSWER")]), app)
    await run(ScriptedCall(info("100", uid="s.2", caller="84957778899"), keys=["1"],
                           dial=[DialResult(DialStatus.NOANSWER)]), app)
    await run(ScriptedCall(info("200", uid="s.3", caller="84957778800")), app)


async def test_tables_count_what_the_flow_logged(app, conn, pool):
    await make_calls(app)
    await conn.execute("UPDATE calls SET started_at = '2026-11-25 12:00+03', answered_at = "
                       "CASE WHEN outcome = 'answered' THEN '2026-11-25 12:00:20+03'::timestamptz END")
    # requests are made when the call is saved (now): date them with their calls, as stats count by day
    await conn.execute("UPDATE callback_requests SET created_at = '2026-11-25 12:00+03'")
    await conn.execute("INSERT INTO survey_answers (call_id, employee_id, answer) SELECT c.id, c.answered_by, 1 "
                       "FROM calls c WHERE c.uniqueid = 's.1'")
    await conn.execute("UPDATE survey_answers SET created_at = '2026-11-25 12:05+03'")
    await conn.execute("UPDATE calls SET ended_at = '2026-11-25 12:00:50+03' WHERE uniqueid = 's.1'")
    # agent2 also called a customer back: 90 s of talk, outbound
    await app.calllog.save(CallRecord(
        "s.4", "asterisk", "+79161234567", "", "+79161234567", direction="outbound",
        started_at=datetime.fromisoformat("2026-11-25T13:00:00+03:00"),
        answered_at=datetime.fromisoformat("2026-11-25T13:00:10+03:00"),
        ended_at=datetime.fromisoformat("2026-11-25T13:01:40+03:00"),
        answered_endpoint="agent2", outcome="answered", missed=False))
    tables = {t.title: t for t in await stats.collect(pool, TODAY, TODAY, "Europe/Moscow")}
    [agent2] = tables["By agent"].rows
    assert agent2[:5] == ("agent2", "Борис Доставка", 2, 1, 1), agent2
    assert agent2[5:] == (stats_decimal("2.0"), stats_decimal("60.0"), stats_decimal("20.0"))  # 30 s + 90 s
    assert tables["Summary"].rows == [(3, 1, 2, stats_decimal("33.3"), stats_decimal("20.0"), 0, 0)]
    assert tables["Missed calls by hour"].rows == [(12, 3, 2)]
    groups = {r[0]: r[1:4] for r in tables["By group"].rows}
    assert groups["delivery"] == (1, 1, 0) and groups["sales"] == (1, 0, 1)
    assert {r[0]: r[1] for r in tables["Callback requests"].rows} == {"pending": 1}
    assert tables["Survey by agent (1 solved, 2 called several times, 3 not solved)"].rows[0][:3] == ("agent2", 1, 1)
    assert await stats.collect(pool, date(2026, 11, 26), date(2026, 11, 26), "Europe/Moscow") != tables
    text = stats.as_text(list(tables.values()))
    assert "Missed calls by hour" in text and "delivery" in text


def stats_decimal(text: str):
    from decimal import Decimal

    return Decimal(text)


async def test_cli_csv(app, conn, pool, pg_url, tmp_path):
    await make_calls(app)
    await conn.execute("UPDATE calls SET started_at = now()")  # the CLI's default range is today
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[paths]\ndata_dir = "{tmp_path}"\n[database]\nurl = "{pg_url}"\n')
    out = subprocess.run([sys.executable, "-m", "shopcall", "-c", str(cfg), "stats", "--csv"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = list(csv.reader(io.StringIO(out.stdout)))
    assert rows[0] == ["table", "calls", "answered", "missed", "answer_rate_%", "avg_wait_s", "robot", "blocked"]
    assert rows[1][:4] == ["summary", "3", "1", "2"]
    bad = subprocess.run([sys.executable, "-m", "shopcall", "-c", str(cfg), "stats", "--from", "2026-11-25",
                          "--to", "2026-11-01"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert bad.returncode == 2 and "before it starts" in bad.stderr


async def test_rings_not_answered_by_agent(app, conn, pool):
    yes = DialResult(DialStatus.ANSWERED, "agent3", 30, "ANSWER")
    # ring-all delivery (agent2, agent3): answered by agent3, nobody's miss; then one nobody answered
    await run(ScriptedCall(info("100", uid="r.1"), keys=["2"], dial=[yes]), app)
    await run(ScriptedCall(info("100", uid="r.2"), keys=["2"], dial=[DialResult(DialStatus.NOANSWER)]), app)
    # the caller hung up while the phones rang: not the agents' miss
    await run(ScriptedCall(info("100", uid="r.3"), keys=["2"], dial=[DialResult(DialStatus.CALLER_GONE)]), app)
    # hunting: agent2 let it ring out, agent3 answered
    await conn.execute("UPDATE groups SET strategy = 'hunt' WHERE name = 'delivery'")
    await run(ScriptedCall(info("100", uid="r.4"), keys=["2"], dial=[yes]), app)
    # sales (agent1) with agent1's phone offline
    await run(ScriptedCall(info("100", uid="r.5"), keys=["1"], dial=[DialResult(DialStatus.FAILED)]), app)
    await conn.execute("UPDATE calls SET started_at = '2026-11-25 12:00+03'")
    tables = {t.title: t for t in await stats.collect(pool, TODAY, TODAY, "Europe/Moscow")}
    rows = {r[0]: r[1:] for r in tables["Rings not answered, by agent"].rows}
    assert rows == {
        "agent1": ("Анна Продажи", 1, 1, stats_decimal("100.0")),
        "agent2": ("Борис Доставка", 4, 2, stats_decimal("50.0")),  # r.2 and r.4
        "agent3": ("Вера Доставка", 4, 1, stats_decimal("25.0")),  # r.2
    }
    # a route log that is not what the flow writes (an import, an old row) is left out, not an error
    await conn.execute("UPDATE calls SET route_log = '{\"x\": 1}' WHERE uniqueid = 'r.5'")
    tables = {t.title: t for t in await stats.collect(pool, TODAY, TODAY, "Europe/Moscow")}
    assert "agent1" not in {r[0] for r in tables["Rings not answered, by agent"].rows}
