"""The live view (shopcall/live.py): the line from a real PostgreSQL's hold_queue, the phones from the PBX
(FreeSWITCH's replayed `show channels`; Asterisk's real AMI is asked in tests/test_e2e_inbound.py while a
caller waits), through GET /api/v1/live and `shopcall live`."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from shopcall import hold, live
from shopcall.api import LivePhones, start_api
from shopcall.call import PbxError
from shopcall.config import Config
from tests.test_api import AUTH, api_config
from tests.test_cli_db import shopcall
from tests.test_esl_callbacks import replayed_phones


@pytest.fixture
async def floor(conn, pool):
    """Two groups, three agents (one in no group), three callers in line and one whose process died."""
    await conn.execute("INSERT INTO employees (name, endpoint, paused, logged_in) VALUES "
                       "('Anna', 'anna', false, true), ('Boris', 'boris', true, true), ('Олег', 'oleg', false, false)")
    await conn.execute("INSERT INTO groups (name) VALUES ('sales'), ('delivery')")
    await conn.execute("INSERT INTO group_members (group_id, employee_id) SELECT g.id, e.id FROM groups g, "
                       "employees e WHERE (g.name, e.endpoint) IN (('sales', 'anna'), ('sales', 'boris'), "
                       "('delivery', 'anna'))")
    ids = {r["name"]: r["id"] for r in await (await conn.execute("SELECT id, name FROM groups")).fetchall()}
    await hold.join(pool, "c.1", ids["sales"], "79161234567")
    await hold.join(pool, "c.2", ids["delivery"], "")
    await hold.join(pool, "c.3", ids["sales"], '"Ivan" <100>')  # whatever the PBX said, kept as text
    await hold.join(pool, "c.dead", ids["sales"], "79990000000")
    await conn.execute("UPDATE hold_queue SET joined_at = joined_at - interval '30 seconds' WHERE uniqueid = 'c.1'")
    await conn.execute("UPDATE hold_queue SET joined_at = now() - interval '1 hour', "
                       "seen_at = now() - interval '10 minutes' WHERE uniqueid = 'c.dead'")


async def test_the_line_by_group_in_order_without_dead_calls(floor, pool):
    view = await live.snapshot(pool, None)
    assert [(w["uniqueid"], w["group"], w["position"], w["caller_number"]) for w in view["waiting"]] == [
        ("c.1", "sales", 1, "79161234567"), ("c.2", "delivery", 1, None), ("c.3", "sales", 2, '"Ivan" <100>')]
    assert 30 <= view["waiting"][0]["waiting_seconds"] < 60
    assert [(g["group"], g["waiting"]) for g in view["groups"]] == [("delivery", 1), ("sales", 2)]
    assert view["groups"][1]["longest_wait_seconds"] == view["waiting"][0]["waiting_seconds"]
    assert [(a["endpoint"], a["groups"], a["paused"], a["logged_in"], a["phone"]) for a in view["agents"]] == [
        ("anna", ["delivery", "sales"], False, True, None), ("boris", ["sales"], True, True, None),
        ("oleg", [], False, False, None)]
    assert not view["phones_asked"] and view["pbx_error"] is None
    text = live.as_text(view)
    assert "sales            #2" in text and "unknown number" in text and "Олег" in text
    assert "phones: not asked" in text


class SlowPbx:
    """A PBX that answers about anna, never about boris and fails about oleg: what a loaded or half-gone
    Asterisk does, which a real one cannot be made to do on cue (hence this stand-in)."""

    async def phone_state(self, endpoint: str) -> str:
        if endpoint == "boris":
            await asyncio.sleep(30)
        if endpoint == "oleg":
            raise PbxError("AMI: not connected")
        return "on_call"


async def test_a_pbx_that_is_slow_or_failing_makes_phones_unknown_not_the_view_late(floor, pool, caplog):
    started = asyncio.get_running_loop().time()
    view = await live.snapshot(pool, SlowPbx(), timeout=0.5)
    assert asyncio.get_running_loop().time() - started < 5  # one timeout for all, asked at once
    assert {a["endpoint"]: a["phone"] for a in view["agents"]} == {"anna": "on_call", "boris": "unknown",
                                                                  "oleg": "unknown"}
    assert view["phones_asked"] and "boris" in view["pbx_error"]
    assert "could not say every phone's state" in caplog.text


async def test_freeswitch_phone_states_from_its_channel_listing(floor, pool):
    phones, client, server, _ = await replayed_phones(Config.default(), endpoint_template="loopback/{endpoint}/default")
    try:
        assert await phones.phone_state("9998") == "free"  # the first capture: no channel at all
        assert await phones.phone_state("9998") == "on_call"  # the second: both legs ACTIVE
        view = await live.snapshot(pool, phones)  # no third capture: FreeSWITCH's answer is not a listing
        assert {a["phone"] for a in view["agents"]} == {"unknown"} and "show channels" in view["pbx_error"]
        with pytest.raises(ValueError):
            await phones.phone_state("9998 , x")
    finally:
        await client.close()
        server.close()


async def test_the_api_serves_the_view_and_takes_no_parameters(floor, pool):
    holder = LivePhones()
    runner = await start_api(api_config(), pool, holder)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{runner.port}") as client:
            assert (await client.get("/api/v1/live")).status == 401
            body = await (await client.get("/api/v1/live", headers=AUTH)).json()
            assert [w["uniqueid"] for w in body["waiting"]] == ["c.1", "c.2", "c.3"]
            assert body["agents"][0]["phone"] is None and body["phones_asked"] is False
            holder.phones = SlowPbx()  # the link arrives after the API started (serve connects meanwhile)
            body = await (await client.get("/api/v1/live", headers=AUTH)).json()
            assert body["agents"][0]["phone"] == "on_call" and body["phones_asked"] is True
            resp = await client.get("/api/v1/live?group=sales", headers=AUTH)
            assert resp.status == 400 and "group" in (await resp.json())["error"]
            spec = await (await client.get("/api/openapi.json")).json()
            assert spec["paths"]["/api/v1/live"]["get"]["responses"]["200"]
    finally:
        await runner.stop()


def test_the_cli_prints_the_line(floor, pg_url, tmp_path):
    cfg = tmp_path / "shopcall.toml"
    cfg.write_text(f'[paths]\ndata_dir = "{tmp_path}"\n[database]\nurl = "{pg_url}"\n')
    out = shopcall("live", "--json", config=cfg)
    assert out.returncode == 0, out.stderr
    view = json.loads(out.stdout)
    assert [w["caller_number"] for w in view["waiting"]] == ["79161234567", None, '"Ivan" <100>']
    text = shopcall("live", config=cfg).stdout
    assert text.startswith("waiting in line:") and "anna" in text


def test_the_cli_says_a_pbx_it_cannot_reach_and_still_prints_the_line(floor, pg_url, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on: an Asterisk that is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "shopcall.toml"
    cfg.write_text(f'[paths]\ndata_dir = "{tmp_path}"\n[database]\nurl = "{pg_url}"\n'
                   f'[asterisk]\nami_port = {port}\nami_secret = "s3cret"\n')
    out = shopcall("live", config=cfg)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("waiting in line:") and "anna" in out.stdout
    assert "phones: could not reach asterisk: " in out.stdout and "Connection refused" in out.stdout
    quiet = shopcall("live", "--no-phones", "--json", config=cfg)
    view = json.loads(quiet.stdout)
    assert not view["phones_asked"] and view["pbx_error"] is None
