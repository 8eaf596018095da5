"""The command line, migrations, the directory loader and the call-row spool, against a real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from shopcall import db
from shopcall.calllog import CallLog, CallRecord
from shopcall.loader import DirectoryError, load, read

REPO = Path(__file__).resolve().parent.parent
DIRECTORY = REPO / "tests" / "data" / "directory.toml"


def shopcall(*args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "shopcall"] + (["-c", str(config)] if config else []) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.fixture
def config(tmp_path, pg_url) -> Path:
    path = tmp_path / "shopcall.toml"
    path.write_text(f'[paths]\ndata_dir = "{tmp_path}"\n[database]\nurl = "{pg_url}"\n[agi]\nport = 4599\n')
    return path


async def test_migrations_are_recorded_and_applied_once(conn):
    cur = await conn.execute("SELECT version, name FROM schema_migrations ORDER BY version")
    assert [r["name"] for r in await cur.fetchall()] == [m.name for m in db.list_migrations()]
    assert await db.migrate(conn) == []  # nothing pending: a second run changes nothing


def test_migration_names_are_checked(tmp_path):
    (tmp_path / "001_ok.sql").write_text("SELECT 1")
    (tmp_path / "2-bad.sql").write_text("SELECT 1")
    with pytest.raises(ValueError, match="NNN_snake_case"):
        db.list_migrations(tmp_path)


def test_db_migrate_command_reports_up_to_date(config):
    out = shopcall("db", "migrate", config=config)
    assert out.returncode == 0 and "up to date" in out.stdout


def test_check_config_names_line_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[shop]\nname = "x"\n\n[agi]\nport = 99999\n')
    out = shopcall("check-config", config=bad)
    assert out.returncode == 1
    assert f"{bad}:5: agi.port:" in out.stdout


def test_bad_config_stops_other_commands_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[agi]\nlisten = \"0.0.0.0\"\n")
    out = shopcall("db", "url", config=bad)
    assert out.returncode == 2 and "agi.allow" in out.stderr


async def test_render_dialplan_rings_the_fallback_group_from_the_directory(conn, config, tmp_path):
    await load(conn, read(DIRECTORY))
    target = tmp_path / "shopcall.conf"
    out = shopcall("render-dialplan", "--pbx", "asterisk", "-o", str(target), config=config)
    assert out.returncode == 0, out.stderr
    text = target.read_text()
    assert "AGI(agi://127.0.0.1:4599/inbound?number=${URIENCODE(${SHOPCALL_NUMBER})}&dp=2)" in text
    # the routine Dial's option U runs when an agent answers, so the talk time starts there
    assert "[shopcall-answered]\nexten => s,1,Set(SHARED(SHOPCALL_ANSWERED_AT,${ARG1})=" in text
    assert " same => n,Dial(PJSIP/agent1,20)" in text  # sales is the fallback group
    assert '"${SHOPCALL_DONE}" = "1"' in text


async def test_render_dialplan_for_freeswitch_hands_calls_to_the_socket_then_the_fallback(conn, config, tmp_path):
    import xml.etree.ElementTree as ET

    await load(conn, read(DIRECTORY))
    target = tmp_path / "shopcall.xml"
    out = shopcall("render-dialplan", "--pbx", "freeswitch", "-o", str(target), config=config)
    assert out.returncode == 0, out.stderr
    root = ET.fromstring(target.read_text())  # well-formed XML, <include> as FreeSWITCH wants it
    contexts = {c.get("name"): c for c in root.iter("context")}
    assert set(contexts) == {"shopcall", "shopcall-robot", "shopcall-agents"}

    def actions(context: str, extension: str) -> list[tuple[str, str]]:
        ext = contexts[context].find(f"extension[@name='{extension}']")
        return [(a.get("application"), a.get("data")) for a in ext.iter("action")]

    inbound = actions("shopcall", "shopcall-inbound")
    socket = ("socket", "127.0.0.1:8084 async full")
    # never socket_resume: FreeSWITCH would reset the channel when our socket closes, cutting a bridge; a
    # closed socket goes on in the dialplan after `socket` all the same
    assert not any(data.startswith("socket_resume") for _, data in inbound)
    assert inbound.index(("set", "shopcall_flow=inbound")) < inbound.index(socket)
    assert inbound[-1] == ("transfer", "shopcall-fallback XML shopcall")
    fallback = actions("shopcall", "shopcall-fallback")
    # sales is the fallback group; the ring timeout on the channel (FreeSWITCH ignores it inside {})
    assert fallback.index(("set", "call_timeout=20")) < fallback.index(("bridge", "user/agent1"))
    assert actions("shopcall", "shopcall-done") == [("hangup", "NORMAL_CLEARING")]
    # marked for its hangup report (esl/hangup_report.py), with the flow's own bridge outcome cleared first
    bridge = fallback.index(("bridge", "user/agent1"))
    assert fallback.index(("set", "shopcall_flow=fallback")) < bridge
    assert fallback.index(("set", "shopcall_arg_flow_dial=${DIALSTATUS}")) < fallback.index(("unset", "DIALSTATUS")) < bridge
    assert ("unset", "originate_disposition") in fallback[:bridge] and ("unset", "last_bridge_to") in fallback[:bridge]
    # a caller who had talked to an agent is not rung again; FreeSWITCH takes the first extension that matches
    answered = contexts["shopcall"].find("extension[@name='shopcall-fallback-answered']")
    assert [(c.get("field"), c.get("expression")) for c in answered.iter("condition")] == [
        ("destination_number", "^shopcall-fallback$"), ("${DIALSTATUS}", "^SUCCESS$")]
    assert actions("shopcall", "shopcall-fallback-answered") == [
        ("set", "shopcall_flow=fallback"), ("set", "shopcall_arg_flow_dial=ANSWER"), ("hangup", "NORMAL_CLEARING")]
    order = [e.get("name") for e in contexts["shopcall"].iter("extension")]
    assert order.index("shopcall-done") < order.index("shopcall-fallback-answered") < order.index("shopcall-fallback")
    assert ("socket", "127.0.0.1:8084 async full") in actions("shopcall-robot", "shopcall-robot")
    assert ("set", "shopcall_arg_action=login") in actions("shopcall-agents", "shopcall-agent-login")


def test_serve_refuses_parts_that_do_not_exist(config):
    out = shopcall("serve", "--only", "fax", config=config)
    assert out.returncode == 2 and "invalid choice: 'fax'" in out.stderr


async def test_loader_rejects_a_menu_naming_an_unknown_group_and_loads_nothing(conn, tmp_path):
    bad = tmp_path / "d.toml"
    bad.write_text('[[employees]]\nendpoint = "x1"\n[[menus]]\nname = "m"\noptions = { "1" = "nosuch" }\n')
    with pytest.raises(DirectoryError, match="unknown group 'nosuch'"):
        await load(conn, read(bad))
    cur = await conn.execute("SELECT count(*) AS n FROM employees")
    assert (await cur.fetchone())["n"] == 0  # one transaction: nothing half-loaded


async def test_loader_rejects_an_endpoint_that_could_change_a_dial_string(conn, tmp_path):
    bad = tmp_path / "d.toml"
    bad.write_text('[[employees]]\nendpoint = "a&PJSIP/b"\n')
    with pytest.raises(DirectoryError, match="invalid endpoint"):
        await load(conn, read(bad))


async def test_loader_is_idempotent(conn):
    data = read(DIRECTORY)
    await load(conn, data)
    await load(conn, data)
    cur = await conn.execute("SELECT count(*) AS n FROM group_members")
    assert (await cur.fetchone())["n"] == 4  # sales 1, delivery 2, accounting 1


def test_db_load_command_reports_the_problem(config, tmp_path):
    bad = tmp_path / "d.toml"
    bad.write_text("[[numbers]]\ntitle = 'no number'\n")
    out = shopcall("db", "load", str(bad), config=config)
    assert out.returncode == 1 and "numbers[0]: 'number' is required" in out.stderr


async def test_call_rows_spool_when_the_database_is_gone_and_replay_later(pool, conn, tmp_path):
    dead = db.open_pool("postgresql://nobody@127.0.0.1:1/none", min_size=0, max_size=1, timeout=1)
    await dead.open(wait=False)
    try:
        log = CallLog(dead, tmp_path / "spool")
        rec = CallRecord("9.1", "asterisk", "79161234567", 'Имя "x"\n', "100", caller_e164="+79161234567",
                         outcome="missed_no_answer", callback_reason="no_answer")
        assert await log.save(rec) is False
        assert (tmp_path / "spool" / "calls.jsonl").read_text(encoding="utf-8").count("\n") == 1
    finally:
        await dead.close()
    live = CallLog(pool, tmp_path / "spool")
    assert await live.replay_spool() == 1
    assert await live.replay_spool() == 0  # replayed once, spool now empty
    cur = await conn.execute("SELECT caller_name, outcome FROM calls WHERE uniqueid = '9.1'")
    assert await cur.fetchone() == {"caller_name": 'Имя "x"\n', "outcome": "missed_no_answer"}
    cur = await conn.execute("SELECT count(*) AS n FROM callback_requests")
    assert (await cur.fetchone())["n"] == 1


async def test_same_uniqueid_twice_is_still_one_row(pool, conn, tmp_path):
    log = CallLog(pool, tmp_path)
    rec = CallRecord("9.2", "asterisk", "", "", "100", outcome="abandoned")
    await log.save(rec)
    rec.outcome, rec.missed = "answered", False
    await log.save(rec)
    cur = await conn.execute("SELECT outcome FROM calls WHERE uniqueid = '9.2'")
    assert [r["outcome"] for r in await cur.fetchall()] == ["answered"]


def test_phone_normalisation():
    from shopcall.phone import to_e164

    assert to_e164("89161234567") == to_e164("79161234567") == to_e164("+7 (916) 123-45-67") == "+79161234567"
    assert to_e164("442071838750") == "+442071838750"  # foreign number delivered without "+"
    assert to_e164("100") is None and to_e164("anonymous") is None and to_e164("") is None
    assert to_e164("7916\n1234567") is None and to_e164("+7916123\x004567") is None


async def test_psycopg_pool_reports_unreachable_database_fast():
    with pytest.raises(psycopg.OperationalError):
        await db.migrate_url("postgresql://nobody@127.0.0.1:1/none?connect_timeout=1")


def test_names_reaching_the_pbx_reject_a_trailing_newline():
    from shopcall.call import check_endpoint, check_var_name

    for check, value in ((check_endpoint, "agent1\n"), (check_var_name, "SHOPCALL_DONE\n")):
        with pytest.raises(ValueError):
            check(value)
    assert check_endpoint("agent-1.b+c_2") == "agent-1.b+c_2"
