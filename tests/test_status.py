# ruff: noqa: F811  (pytest fixtures imported from other modules are parameters here)
"""`shopcall status` and GET /api/v1/status on a real PostgreSQL: quiet when nothing is stuck, and each
kind of stuck thing named in words."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from shopcall import status
from shopcall.config import Config, PathsConfig
from shopcall.loader import load, read
from tests.test_api import AUTH, api, client  # noqa: F401 (fixtures)
from tests.test_cli_db import config, shopcall  # noqa: F401 (config: a fixture)

DIRECTORY = Path(__file__).parent / "data" / "directory.toml"


def cfg(tmp_path) -> Config:
    return dataclasses.replace(Config.default(), paths=PathsConfig(data_dir=tmp_path))


async def test_nothing_stuck_no_problems(conn, tmp_path):
    await load(conn, read(DIRECTORY))
    await conn.execute("UPDATE employees SET logged_in = (endpoint <> 'agent4'), paused = (endpoint = 'agent3')")
    # fresh rows are not stuck: a webhook that failed once a minute ago, a callback just due
    # not due before the test ends: a webhook sender of another test's live stack (the session-scoped e2e
    # inbound one posts kind 'call') must not claim it meanwhile
    await conn.execute("""INSERT INTO webhook_outbox (kind, url, body, attempts, last_error, next_try_at)
                          VALUES ('call', 'http://crm.example/calls', '{}', 1, 'HTTP 502', now() + interval '1 hour')""")
    await conn.execute("INSERT INTO callback_requests (phone, reason) VALUES ('+79161234567', 'no_answer')")
    report = await status.collect(conn, cfg(tmp_path))
    assert report["problems"] == []
    assert report["migrations"]["pending"] == []
    assert report["agents"] == {"total": 4, "logged_in": 3, "paused": 1, "available": 2}
    assert (report["callbacks"]["pending"], report["callbacks"]["due"]) == (1, 1)
    [hook] = report["webhooks"]
    assert (hook["kind"], hook["pending"], hook["failing"], hook["last_error"]) == ("call", 1, 1, "HTTP 502")
    assert "no problems" in status.as_text(report)


async def test_each_stuck_thing_is_named(conn, tmp_path):
    await conn.execute("""INSERT INTO webhook_outbox (kind, url, body, attempts, last_error, created_at, next_try_at)
                          VALUES ('result', 'http://shop.example/results', '{}', 7, 'HTTP 500: boom',
                                  now() - interval '2 hours', now() + interval '1 hour')""")
    await conn.execute("""INSERT INTO outbox (to_addr, subject, body, attempts, last_error, created_at)
                          VALUES ('a@example.test', 's', 'b', 3, 'connection refused', now() - interval '1 hour')""")
    await conn.execute("INSERT INTO outbox (to_addr, subject, body, status) VALUES ('b@example.test', 's', 'b', 'failed')")
    await conn.execute("""INSERT INTO callback_requests (phone, reason, due_at)
                          VALUES ('+79161234567', 'no_answer', now() - interval '40 minutes')""")
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "calls.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    (spool / "calls.bad").write_text("garbage\n")
    async with conn.transaction(force_rollback=True):  # as if sql/010 had not been applied yet
        await conn.execute("DELETE FROM schema_migrations WHERE name = '010_click_to_call'")
        report = await status.collect(conn, cfg(tmp_path))
    problems = "\n".join(report["problems"])
    assert "migrations not applied: 010_click_to_call" in problems
    assert "1 result webhooks to http://shop.example/results undelivered, the oldest for 120 min: HTTP 500: boom" in problems
    assert "1 mails unsent, the oldest for 60 min: connection refused" in problems
    assert "1 mails refused for good" in problems
    assert "1 callback requests due, the oldest for 40 min (0 agents available)" in problems
    assert "not replayed yet: 2 calls, 0 voicemails" in problems and "1 unreadable call-spool lines" in problems
    assert len(report["problems"]) == 7


async def test_the_cli_exits_1_on_problems(conn, config):
    quiet = shopcall("status", config=config)
    assert quiet.returncode == 0 and "no problems" in quiet.stdout, quiet.stderr
    await conn.execute("""INSERT INTO callback_requests (phone, reason, due_at)
                          VALUES ('+79161234567', 'no_answer', now() - interval '1 day')""")
    stuck = shopcall("status", config=config)
    assert stuck.returncode == 1 and "PROBLEM: 1 callback requests due" in stuck.stdout


async def test_the_api_serves_it(client, conn):
    resp = await client.get("/api/v1/status", headers=AUTH)
    assert resp.status == 200
    body = await resp.json()
    # (the API's default configuration reads the machine's spool: only the database's part is asserted)
    assert body["migrations"]["pending"] == [] and body["callbacks"]["due"] == 0 and body["webhooks"] == []
    assert (await client.get("/api/v1/status")).status == 401
