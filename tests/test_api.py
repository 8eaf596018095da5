"""The HTTP API over a real socket, with a real PostgreSQL and aiohttp's client."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
import wave
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from shopcall import db, stats
from shopcall.api import PUBLIC, ApiRunner, ApiStartError, start_api
from shopcall.calllog import CallLog, CallRecord
from shopcall.config import ApiConfig, Config
from shopcall.ratelimit import Buckets

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MSK = datetime.fromisoformat("2026-11-25T12:00:00+03:00")


def api_config(**api) -> Config:
    return replace(Config.default(), api=ApiConfig(**{"port": 0, "tokens": (TOKEN,), **api}))


@pytest.fixture
async def api(pool) -> AsyncIterator[tuple[ApiRunner, aiohttp.ClientSession]]:
    runner = await start_api(api_config(), pool)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{runner.port}") as client:
        yield runner, client
    await runner.stop()


@pytest.fixture
def client(api) -> aiohttp.ClientSession:
    return api[1]


@pytest.fixture
async def seeded(conn, pool, tmp_path) -> None:
    """Two agents, a group, three calls from two callers (two from the same one), one survey answer."""
    await conn.execute("INSERT INTO employees (name, endpoint) VALUES ('Anna', 'anna'), ('Boris', 'boris')")
    await conn.execute("INSERT INTO groups (name) VALUES ('sales')")
    log = CallLog(pool, tmp_path / "spool")
    answered = CallRecord("a.1", "asterisk", "89161234567", "Ivan", "100", caller_e164="+79161234567",
                          started_at=MSK, group_name="sales", answered_at=MSK + timedelta(seconds=20),
                          answered_endpoint="anna", outcome="answered", missed=False)
    missed = CallRecord("a.2", "asterisk", "89161234567", "Ivan", "100", caller_e164="+79161234567",
                        started_at=MSK + timedelta(hours=1), group_name="sales", outcome="missed_no_answer",
                        callback_reason="no_answer")
    other = CallRecord("a.3", "asterisk", "84957778899", "Olga", "200", caller_e164="+74957778899",
                       started_at=MSK, outcome="after_hours")
    for rec in (answered, missed, other):
        assert await log.save(rec)
    await conn.execute("INSERT INTO survey_answers (call_id, employee_id, answer) SELECT c.id, c.answered_by, 1 "
                       "FROM calls c WHERE c.uniqueid = 'a.1'")
    # the callback request is made when the call is saved (now): date it with its call, as stats count by day
    await conn.execute("UPDATE callback_requests SET created_at = %s", (MSK + timedelta(hours=1),))
    await conn.execute("UPDATE survey_answers SET created_at = %s", (MSK + timedelta(minutes=5),))


# --------------------------------------------------------------------------- auth, start


@pytest.mark.parametrize("headers, message", [
    ({}, "missing bearer token"),
    ({"Authorization": "Bearer wrong"}, "invalid bearer token"),
    ({"Authorization": f"Basic {TOKEN}"}, "missing bearer token"),
    ({"Authorization": "Bearer ключ"}, "invalid bearer token"),  # non-ASCII must not crash the compare
])
async def test_bad_tokens_are_401(client, headers, message):
    resp = await client.get("/api/v1/agents", headers=headers)
    assert resp.status == 401
    assert message in (await resp.json())["error"]


async def test_right_token_passes(client):
    assert (await client.get("/api/v1/agents", headers=AUTH)).status == 200


async def test_unknown_path_is_json_404_after_auth(client):
    assert (await client.get("/api/v1/nothing")).status == 401
    resp = await client.get("/api/v1/nothing", headers=AUTH)
    assert resp.status == 404 and "error" in await resp.json()
    resp = await client.delete("/api/v1/agents", headers=AUTH)
    assert resp.status == 405 and "error" in await resp.json()


async def test_no_tokens_configured_says_what_to_set(pool):
    runner = await start_api(api_config(tokens=()), pool)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{runner.port}") as client:
            resp = await client.get("/api/v1/agents", headers={"Authorization": "Bearer anything"})
            assert resp.status == 401 and "api.tokens" in (await resp.json())["error"]
            assert (await client.get("/healthz")).status == 200  # monitoring still works
    finally:
        await runner.stop()


async def started(pool, **api):
    runner = await start_api(api_config(**api), pool)
    return runner, aiohttp.ClientSession(f"http://127.0.0.1:{runner.port}")


async def test_a_token_over_its_rate_is_told_when_to_come_back_and_others_are_not_slowed(pool):
    runner, client = await started(pool, tokens=(TOKEN, "other-token"), rate_per_second=0.5, rate_burst=3)
    try:
        async with client:
            assert [(await client.get("/api/v1/agents", headers=AUTH)).status for _ in range(3)] == [200] * 3
            resp = await client.get("/api/v1/agents", headers=AUTH)
            body = await resp.json()
            assert resp.status == 429 and "api.rate_per_second" in body["error"]
            assert resp.headers["Retry-After"] == "2" and body["detail"] == {"retry_after": 2}  # 1 token at 0.5/s
            other = await client.get("/api/v1/agents", headers={"Authorization": "Bearer other-token"})
            assert other.status == 200  # a bucket per token
            assert (await client.get("/healthz")).status == 200  # monitoring is never limited
    finally:
        await runner.stop()


async def test_token_guessing_from_one_address_is_slowed_down(pool):
    runner, client = await started(pool, auth_failures_per_minute=3)
    try:
        async with client:
            for headers in ({}, {"Authorization": "Bearer guess1"}, {"Authorization": "Bearer guess2"}):
                assert (await client.get("/api/v1/agents", headers=headers)).status == 401
            # the next try is not even compared, so the right token does not tell a guesser it was right
            resp = await client.get("/api/v1/agents", headers=AUTH)
            assert resp.status == 429 and "api.auth_failures_per_minute" in (await resp.json())["error"]
            assert resp.headers["Retry-After"] == "20"  # a minute's share of 3
            assert (await client.get("/healthz")).status == 200
    finally:
        await runner.stop()


def test_buckets_refill_with_time_and_forget_idle_keys():
    now = [0.0]
    b = Buckets(2.0, 2, max_keys=3, clock=lambda: now[0])
    assert [b.take("a") for _ in range(3)] == [0.0, 0.0, 0.5]
    assert b.wait("a") == 0.5 and b.take("a") == 0.5  # wait and a refused take take nothing
    now[0] = 0.5
    assert b.take("a") == 0.0 and b.take("a") == 0.5  # one token back after 0.5 s at 2/s, taken
    b.take("b"), b.take("c")
    now[0] = 10.0  # b and c are full again, a too: all forgotten when a fourth key comes
    b.take("d")
    assert set(b._buckets) == {"d"}
    off = Buckets(0, 1)
    assert not off.enabled and all(off.take("x") == 0.0 for _ in range(100))


async def test_refuses_public_listen_without_allow(pool):
    with pytest.raises(ApiStartError, match="api.allow"):
        await start_api(api_config(listen="0.0.0.0"), pool)


def _outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        addr = s.getsockname()[0]
    return None if addr.startswith("127.") else addr


async def test_client_outside_allow_is_403(pool):
    addr = _outward_address()
    if addr is None:
        pytest.skip("no non-loopback address on this machine to connect from")
    # allow a network this machine is not on (TEST-NET-2 or -3, whichever does not hold its address)
    other = "198.51.100.0/24" if not addr.startswith("198.51.100.") else "203.0.113.0/24"
    runner = await start_api(api_config(listen="0.0.0.0", allow=(other,)), pool)
    try:
        async with aiohttp.ClientSession() as client:
            resp = await client.get(f"http://{addr}:{runner.port}/healthz")
            assert resp.status == 403 and "api.allow" in (await resp.json())["error"]
    finally:
        await runner.stop()


# --------------------------------------------------------------------------- stats


async def test_stats_json(client, seeded):
    resp = await client.get("/api/v1/stats", params={"from": "2026-11-25", "to": "2026-11-25"}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    data = await resp.json()
    assert (data["from"], data["to"], data["timezone"]) == ("2026-11-25", "2026-11-25", "Europe/Moscow")
    assert list(data["tables"]) == list(stats.QUERIES)
    summary = data["tables"]["summary"]
    assert summary["columns"] == list(stats.QUERIES["summary"][1])
    assert summary["rows"] == [[3, 1, 2, 33.3, 20.0, 0, 0]]
    assert data["tables"]["missed_by_hour"]["rows"] == [[12, 2, 1], [13, 1, 1]]
    assert data["tables"]["callbacks"]["rows"] == [["pending", 1]]
    assert data["tables"]["survey_by_agent"]["rows"][0][:3] == ["anna", 1, 1]


async def test_stats_csv(client, seeded):
    resp = await client.get("/api/v1/stats", params={"from": "2026-11-25", "to": "2026-11-26", "format": "csv"},
                            headers=AUTH)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"
    rows = list(csv.reader(io.StringIO(await resp.text())))
    assert ["summary", "3", "1", "2", "33.3", "20.0", "0", "0"] in rows
    assert ["by_group", "sales", "2", "1", "1", "50.0", "20.0"] in rows


@pytest.mark.parametrize("query, parameter", [
    ({"from": "2026-13-01"}, "from"),
    ({"from": "yesterday"}, "from"),
    ({"from": "2026-11-25", "to": "2026-11-24"}, "to"),
    ({"to": "0001-01-01"}, "to"),
    ({"from": "9999-12-31"}, "from"),  # the day after would overflow
    ({"format": "xml"}, "format"),
    ({"form": "2026-11-25"}, "form"),
])
async def test_stats_bad_parameters_are_400(client, query, parameter):
    resp = await client.get("/api/v1/stats", params=query, headers=AUTH)
    assert resp.status == 400
    body = await resp.json()
    assert body["detail"]["parameter"] == parameter and parameter in body["error"]


# --------------------------------------------------------------------------- agents


async def test_agents_list_and_update(client, seeded):
    resp = await client.get("/api/v1/agents", headers=AUTH)
    assert (await resp.json())["agents"] == [
        {"endpoint": "anna", "name": "Anna", "logged_in": True, "paused": False},
        {"endpoint": "boris", "name": "Boris", "logged_in": True, "paused": False},
    ]
    resp = await client.post("/api/v1/agents/anna", json={"paused": True}, headers=AUTH)
    assert resp.status == 200
    assert await resp.json() == {"endpoint": "anna", "logged_in": True, "paused": True}
    resp = await client.post("/api/v1/agents/anna", json={"logged_in": False}, headers=AUTH)
    assert await resp.json() == {"endpoint": "anna", "logged_in": False, "paused": True}
    agents = (await (await client.get("/api/v1/agents", headers=AUTH)).json())["agents"]
    assert agents[0] == {"endpoint": "anna", "name": "Anna", "logged_in": False, "paused": True}


async def test_unknown_agent_is_404(client, seeded):
    resp = await client.post("/api/v1/agents/nobody", json={"paused": True}, headers=AUTH)
    assert resp.status == 404 and "nobody" in (await resp.json())["error"]


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[true]", 422, "JSON object"),
    (b'{"paused": "yes"}', 422, "paused"),
    (b'{"paused": 1}', 422, "paused"),
    (b'{"logged_in": null}', 422, "logged_in"),
    (b'{"pause": true}', 422, "pause"),
    (b"{}", 422, "nothing to change"),
])
async def test_agent_bad_body(client, seeded, body, status, words):
    resp = await client.post("/api/v1/agents/anna", data=body, headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status == status
    assert words in (await resp.json())["error"]


async def test_agent_bad_endpoint_name_and_big_body(client, seeded):
    resp = await client.post("/api/v1/agents/a%3Bb", json={"paused": True}, headers=AUTH)
    assert resp.status == 400 and "invalid endpoint name" in (await resp.json())["error"]
    resp = await client.post("/api/v1/agents/anna", data=b"{" + b" " * 100_000 + b"}",
                             headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status == 413 and "error" in await resp.json()


# --------------------------------------------------------------------------- calls


async def test_calls_by_phone(client, seeded):
    for phone in ("+79161234567", "8 916 123-45-67", "79161234567"):
        resp = await client.get("/api/v1/calls", params={"phone": phone}, headers=AUTH)
        assert resp.status == 200
        data = await resp.json()
        assert data["phone"] == "+79161234567"
        assert [c["uniqueid"] for c in data["calls"]] == ["a.2", "a.1"]  # newest first
    first = data["calls"][1]
    assert first["group"] == "sales" and first["answered_endpoint"] == "anna" and first["survey_answer"] == 1
    assert datetime.fromisoformat(first["started_at"]) == MSK
    resp = await client.get("/api/v1/calls", params={"phone": "+79161234567", "limit": "1"}, headers=AUTH)
    assert [c["uniqueid"] for c in (await resp.json())["calls"]] == ["a.2"]
    resp = await client.get("/api/v1/calls", params={"phone": "+74951112233"}, headers=AUTH)
    assert (await resp.json())["calls"] == []


async def test_calls_of_a_range_of_days_in_pages(client, seeded, conn):
    day = {"from": "2026-11-25"}
    data = await (await client.get("/api/v1/calls", params={**day, "limit": "2"}, headers=AUTH)).json()
    # a.1 and a.3 started at the same moment: the id breaks the tie, the same way on every page
    assert [c["uniqueid"] for c in data["calls"]] == ["a.2", "a.3"] and data["next"] == data["calls"][-1]["id"]
    rest = await (await client.get("/api/v1/calls", params={**day, "limit": "2", "before": str(data["next"])},
                                   headers=AUTH)).json()
    assert [c["uniqueid"] for c in rest["calls"]] == ["a.1"] and rest["next"] is None
    answered = rest["calls"][0]
    assert (answered["agent_name"], answered["wait_seconds"], answered["caller_name"]) == ("Anna", 20.0, "Ivan")
    # Moscow days: 12:00 and 13:00 MSK on the 25th, nothing on the 24th or the 26th
    for other in ("2026-11-24", "2026-11-26"):
        assert (await (await client.get("/api/v1/calls", params={"from": other}, headers=AUTH)).json())["calls"] == []
    both = await (await client.get("/api/v1/calls", params={**day, "to": "2026-11-26", "phone": "+74957778899"},
                                   headers=AUTH)).json()
    assert [c["uniqueid"] for c in both["calls"]] == ["a.3"]


async def test_calls_as_one_csv(client, seeded):
    resp = await client.get("/api/v1/calls", params={"from": "2026-11-25", "format": "csv"}, headers=AUTH)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/csv")
    assert 'filename="calls-2026-11-25-2026-11-25.csv"' in resp.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert [r["uniqueid"] for r in rows] == ["a.2", "a.3", "a.1"]
    assert (rows[2]["outcome"], rows[2]["answered_endpoint"], rows[2]["survey_answer"], rows[2]["recorded"]) == (
        "answered", "anna", "1", "False")
    assert rows[0]["answered_at"] == "" and datetime.fromisoformat(rows[2]["started_at"]) == MSK


async def test_a_csv_of_many_calls_comes_in_chunks(client, conn, pool, tmp_path):
    await conn.execute("""INSERT INTO calls (uniqueid, pbx, direction, caller_number, caller_name, dialled_number,
                              started_at, ended_at, outcome, missed, route_log)
                          SELECT 'bulk.' || n, 'asterisk', 'inbound', '8916' || n, 'Имя, "с кавычками"', '100',
                                 %s + n * interval '1 second', %s + n * interval '2 second', 'missed_no_answer',
                                 true, '[]'
                            FROM generate_series(1, 1234) AS n""", (MSK, MSK))
    resp = await client.get("/api/v1/calls", params={"from": "2026-11-25", "format": "csv"}, headers=AUTH)
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert len(rows) == 1234 and rows[0]["uniqueid"] == "bulk.1234" and rows[-1]["uniqueid"] == "bulk.1"
    assert {r["caller_name"] for r in rows} == {'Имя, "с кавычками"'}


@pytest.mark.parametrize("query, parameter", [
    ({}, "phone"), ({"phone": "hello"}, "phone"), ({"phone": "123"}, "phone"),
    ({"phone": "+79161234567", "limit": "0"}, "limit"), ({"phone": "+79161234567", "limit": "x"}, "limit"),
    ({"phone": "+79161234567", "limit": "100000"}, "limit"),
    ({"from": "2026-13-01"}, "from"), ({"from": "2026-11-25", "to": "2026-11-24"}, "to"),
    ({"phone": "+79161234567", "to": "2026-11-25"}, "to"),
    ({"from": "2026-11-25", "before": "x"}, "before"), ({"from": "2026-11-25", "format": "xml"}, "format"),
    ({"from": "2026-11-25", "format": "csv", "limit": "5"}, "limit"),
])
async def test_calls_bad_parameters(client, query, parameter):
    resp = await client.get("/api/v1/calls", params=query, headers=AUTH)
    assert resp.status == 400 and (await resp.json())["detail"]["parameter"] == parameter


# --------------------------------------------------------------------------- callbacks


async def test_the_callback_queue_lists_the_open_requests(client, seeded, conn):
    resp = await client.get("/api/v1/callbacks", headers=AUTH)
    assert resp.status == 200
    [cb] = (await resp.json())["callbacks"]
    call_id = (await (await conn.execute("SELECT id FROM calls WHERE uniqueid = 'a.2'")).fetchone())["id"]
    assert (cb["phone"], cb["reason"], cb["status"], cb["group"], cb["call_id"], cb["attempts"]) == (
        "+79161234567", "no_answer", "pending", "sales", call_id, 0)
    for phone, found in (("8 916 123-45-67", 1), ("+74957778899", 0)):
        resp = await client.get("/api/v1/callbacks", params={"phone": phone}, headers=AUTH)
        assert len((await resp.json())["callbacks"]) == found
    await conn.execute("UPDATE callback_requests SET status = 'done', done_at = now()")
    assert (await (await client.get("/api/v1/callbacks", headers=AUTH)).json())["callbacks"] == []
    resp = await client.get("/api/v1/callbacks", params={"status": "done,failed"}, headers=AUTH)
    [done] = (await resp.json())["callbacks"]
    assert done["status"] == "done" and done["done_at"]


@pytest.mark.parametrize("query, parameter", [
    ({"status": "open"}, "status"), ({"status": "pending,"}, "status"), ({"phone": "hello"}, "phone"),
    ({"limit": "0"}, "limit"), ({"sort": "x"}, "sort"),
])
async def test_the_callback_queue_says_what_is_wrong(client, query, parameter):
    resp = await client.get("/api/v1/callbacks", params=query, headers=AUTH)
    assert resp.status == 400 and (await resp.json())["detail"]["parameter"] == parameter


# --------------------------------------------------------------------------- recordings


@pytest.fixture
async def recordings(pool, conn, tmp_path) -> AsyncIterator[tuple[aiohttp.ClientSession, dict[str, int], Path]]:
    """An API whose recordings_dir is a temporary one, and calls: recorded, not recorded, purged, a file gone,
    and a row whose path points outside recordings_dir. Yields the client, call ids by name, the WAV."""
    rec_dir = tmp_path / "recordings"
    wav = rec_dir / "2026" / "11" / "25" / "r.1.wav"
    wav.parent.mkdir(parents=True)
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(bytes(range(256)) * 64)
    outside = tmp_path / "secret.wav"
    outside.write_bytes(b"RIFF not yours")
    log = CallLog(pool, tmp_path / "spool")
    paths = {"recorded": wav, "plain": None, "purged": None, "gone": rec_dir / "r.4.wav", "outside": outside}
    ids = {}
    for i, (name, path) in enumerate(paths.items()):
        assert await log.save(CallRecord(f"r.{i}", "asterisk", "89161234567", "Ivan", "100",
                                         caller_e164="+79161234567", started_at=MSK + timedelta(minutes=i),
                                         outcome="answered", missed=False,
                                         recording_path=str(path) if path else None))
        ids[name] = (await (await conn.execute("SELECT id FROM calls WHERE uniqueid = %s", (f"r.{i}",))).fetchone())["id"]
    # saving checks the file exists: point the rows at theirs afterwards, as a later deletion would
    await conn.execute("UPDATE calls SET recording_path = %s WHERE id = %s", (str(paths["gone"]), ids["gone"]))
    await conn.execute("UPDATE calls SET recording_purged_at = now() WHERE id = %s", (ids["purged"],))
    config = replace(api_config(), paths=replace(Config.default().paths, recordings_dir=rec_dir))
    runner = await start_api(config, pool)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{runner.port}") as client:
        yield client, ids, wav
    await runner.stop()


async def test_a_recording_is_served_whole_and_by_range(recordings):
    client, ids, wav = recordings
    resp = await client.get(f"/api/v1/calls/{ids['recorded']}/recording", headers=AUTH)
    assert resp.status == 200 and resp.headers["Content-Type"] == "audio/wav"
    assert f'filename="call-{ids["recorded"]}.wav"' in resp.headers["Content-Disposition"]
    assert await resp.read() == wav.read_bytes()
    resp = await client.get(f"/api/v1/calls/{ids['recorded']}/recording", headers={**AUTH, "Range": "bytes=44-99"})
    assert resp.status == 206 and await resp.read() == wav.read_bytes()[44:100]
    resp = await client.get(f"/api/v1/calls/{ids['recorded']}/recording")
    assert resp.status == 401  # a recording is personal data: the token is needed as everywhere


async def test_recordings_that_cannot_be_served_say_why(recordings):
    client, ids, _ = recordings

    async def fetch(call_id: object) -> tuple[int, str]:
        resp = await client.get(f"/api/v1/calls/{call_id}/recording", headers=AUTH)
        return resp.status, (await resp.json())["error"]

    assert await fetch(ids["plain"]) == (404, "this call was not recorded")
    status, error = await fetch(ids["purged"])
    assert status == 410 and "retention_days" in error
    assert await fetch(ids["gone"]) == (404, "the recording file is missing")
    assert await fetch(ids["outside"]) == (404, "the recording is not in recordings_dir")
    for bad in ("999999", "abc", "99999999999999999999", "-1", "0", "%D9%A3"):  # the last: an Arabic-Indic 3
        status, error = await fetch(bad)
        assert status == 404 and error.startswith("no call has id"), (bad, error)
    resp = await client.get(f"/api/v1/calls/{ids['recorded']}/recording?x=1", headers=AUTH)
    assert resp.status == 400


async def test_the_call_history_links_each_recording(recordings):
    client, ids, _ = recordings
    resp = await client.get("/api/v1/calls", params={"phone": "+79161234567"}, headers=AUTH)
    links = {c["id"]: c["recording"] for c in (await resp.json())["calls"]}
    assert links[ids["recorded"]] == f"/api/v1/calls/{ids['recorded']}/recording"
    assert links[ids["plain"]] is None and links[ids["purged"]] is None


# --------------------------------------------------------------------------- openapi, healthz


async def test_openapi_lists_every_route(api):
    runner, client = api
    resp = await client.get("/api/openapi.json")  # no token needed
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    served = {(r.method.lower(), r.resource.canonical) for r in runner.runner.app.router.routes()
              if r.method != "HEAD"}
    described = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == described
    public = {p for p, ops in doc["paths"].items() if any(op.get("security") == [] for op in ops.values())}
    assert public == PUBLIC


async def test_healthz(client):
    resp = await client.get("/healthz")
    assert resp.status == 200 and (await resp.json())["status"] == "ok"


async def test_healthz_and_endpoints_503_when_database_is_gone():
    # a port nobody listens on: connections are refused at once
    pool = db.open_pool(f"postgresql://postgres@127.0.0.1:{_free_port()}/postgres?connect_timeout=1",
                        min_size=0, max_size=1, timeout=1.0)
    await pool.open(wait=False)
    runner = await start_api(api_config(), pool)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{runner.port}") as client:
            resp = await client.get("/healthz")
            assert resp.status == 503 and "database" in (await resp.json())["error"]
            resp = await client.get("/api/v1/agents", headers=AUTH)
            assert resp.status == 503 and (await resp.json())["error"] == "database unavailable"
    finally:
        await runner.stop()
        await pool.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- property: never a 5xx


async def test_random_query_strings_never_give_5xx(api, seeded):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    port = api[0].port
    keys = st.sampled_from(["from", "to", "format", "phone", "limit", "x", ""]) | st.text(max_size=8)
    values = st.text(max_size=30) | st.dates().map(str) | st.integers().map(str)
    paths = st.sampled_from(["/api/v1/stats", "/api/v1/calls", "/api/v1/agents", "/healthz"])

    # database=None: no .hypothesis directory in the checkout
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(paths, st.lists(st.tuples(keys, values), max_size=4))
    def check(path: str, pairs: list[tuple[str, str]]) -> None:
        url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(pairs)}"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=AUTH), timeout=10) as resp:
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        assert status < 500, (url, body)
        if path != "/api/v1/stats" or status != 200 or b"format=csv" not in url.encode():
            json.loads(body)  # every answer but CSV is JSON

    # the server runs on this loop; the blocking client runs in a thread
    await asyncio.to_thread(check)


async def test_a_failing_handler_gives_json_500_without_trace_and_logs(client, monkeypatch, caplog):
    async def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(stats, "collect", broken)
    caplog.set_level("DEBUG", logger="shopcall.api")
    resp = await client.get("/api/v1/stats", headers=AUTH)
    assert resp.status == 500
    text = await resp.text()
    assert json.loads(text)["error"].startswith("internal error") and "secret" not in text
    assert "Traceback" not in text
    assert any("GET /api/v1/stats -> 500" in r.getMessage() for r in caplog.records)
    assert TOKEN not in caplog.text


def test_the_cli_writes_the_same_csv(seeded, pg_url, tmp_path):
    from tests.test_cli_db import shopcall

    cfg = tmp_path / "shopcall.toml"
    cfg.write_text(f'[paths]\ndata_dir = "{tmp_path}"\n[database]\nurl = "{pg_url}"\n')
    out = shopcall("calls", "--from", "2026-11-25", config=cfg)
    assert out.returncode == 0, out.stderr
    assert [r["uniqueid"] for r in csv.DictReader(io.StringIO(out.stdout))] == ["a.2", "a.3", "a.1"]
    mine = shopcall("calls", "--phone", "8 916 123-45-67", config=cfg)  # every day of this caller's
    assert [r["uniqueid"] for r in csv.DictReader(io.StringIO(mine.stdout))] == ["a.2", "a.1"]
    assert shopcall("calls", "--phone", "hello", config=cfg).returncode == 2
    assert shopcall("calls", "--from", "2026-11-25", "--to", "2026-11-24", config=cfg).returncode == 2
