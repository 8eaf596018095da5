"""End to end: robot campaigns through Debian's Asterisk 22 and FreeSWITCH 1.10 (every test runs on both).
Events go in through the HTTP API; the dialler (in this process, or as `shopcall serve --only dialler`
processes) claims the jobs and dials through the PBX: an AMI Originate on Asterisk, a `bgapi originate` on
FreeSWITCH's inbound event socket. The PBX dials the customer (SIPp phones, answering and pressing keys,
busy or not answering) and runs the outbound flow in `shopcall serve` (FastAGI, or the outbound event
socket); the flow settles the attempt and the results webhook reaches a real HTTP server here,
HMAC-signed.

Customers behave by number: each behaviour is a SIPp phone of its own, and the test's originator for a
number dials through that phone (`PJSIP/{number}@<behaviour>`, `sofia/test/sip:{number}@127.0.0.1:<port>`),
as an admin's trunk template would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import time
import wave
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import aiohttp
import psycopg
import pytest
from aiohttp import web
from psycopg.rows import dict_row

from shopcall import db, dialler
from shopcall.api import start_api
from shopcall.config import ApiConfig, Config
from tests.pbx import SippAgent, place_call
from tests.pbx.customer import Customers
from tests.pbx.service import REPO, free_tcp_port
from tests.pbx.stack import PBXES, Stack, pbx_stack

pytestmark = pytest.mark.slow

MSK = ZoneInfo("Europe/Moscow")
TOKEN = "e2e-token"
SECRET = "webhook-secret"
BEHAVIOURS = ("c_yes", "c_no", "c_nine", "c_silent", "c_busy", "c_ring", "c_quick")
CAMPAIGN_NUMBER = "74950001122"


def next_weekday_at(weekday: int, hour: int) -> datetime:
    day = (datetime.now(MSK) + timedelta(days=1)).date()
    while day.weekday() != weekday:
        day += timedelta(days=1)
    return datetime(day.year, day.month, day.day, hour, tzinfo=MSK)


WED_NOON = next_weekday_at(2, 12)


class Hooks:
    """The shop's webhook receiver: checks each signature, keeps the bodies."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.bad_signatures = 0

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("X-Shopcall-Signature", ""), expected):
            self.bad_signatures += 1
            return web.Response(status=401)
        self.bodies.append(json.loads(raw))
        return web.Response(status=204)


@pytest.fixture(scope="module", params=PBXES)
def stack(request, pg_url: str, tmp_path_factory) -> Iterator[Stack]:
    hooks_port = free_tcp_port()
    # c_quick plays the trunk of `serve`'s own configuration: the `--only dialler` processes dial through it
    with pbx_stack(request.param, tmp_path_factory.mktemp(f"e2e-outbound-{request.param}"), pg_url,
                   agents=("agent1", *BEHAVIOURS), trunk="c_quick", sections=f"""
[callbacks]
enabled = false                # callback requests stay pending: the test counts the operator's calls
[dialler]
poll_seconds = 0.5
answer_timeout = 6.0
[webhooks]
results_url = "http://127.0.0.1:{hooks_port}/results"
messages_url = "http://127.0.0.1:{hooks_port}/messages"
secret = "{SECRET}"
poll_seconds = 0.5
""") as s:
        with wave.open(str(s.data / "sounds" / "ru" / "robot_disclosure.wav")) as w:
            s.disclosure = w.getnframes() / w.getframerate()
        s.hooks_port = hooks_port
        yield s


@pytest.fixture
def dbc(stack) -> Iterator[psycopg.Connection]:
    with psycopg.connect(stack.url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("""TRUNCATE callback_requests, calls, dial_jobs, events, webhook_outbox, consents,
                        do_not_call, stock_subscriptions, scripts, customers, orders RESTART IDENTITY CASCADE""")
        conn.execute("DELETE FROM numbers WHERE number = %s", (CAMPAIGN_NUMBER,))
        # every campaign dials through the stack's PBX (campaigns.pbx)
        conn.execute("UPDATE campaigns SET group_name = 'sales', max_concurrent = 20, calls_per_second = 10, "
                     "ring_seconds = 10, max_attempts_per_day = 5, next_dial_at = NULL, caller_id = NULL, "
                     "pbx = %s", (stack.kind,))
        yield conn


@contextlib.asynccontextmanager
async def originators(stack: Stack, config: Config) -> AsyncIterator[dict[str, dialler.Originator]]:
    """One originator per customer behaviour, over one link to the PBX (AMI, or the inbound event
    socket), each dialling through that behaviour's phone."""
    if stack.kind == "asterisk":
        from agi.ami import open_ami
        from agi.originator import AsteriskOriginator

        link = await open_ami(config, "e2e dialler")
        make = lambda b: AsteriskOriginator(link, dataclasses.replace(  # noqa: E731
            config, asterisk=dataclasses.replace(config.asterisk, trunk_template=stack.trunk_template(b))))
    else:
        from esl.client import open_event_socket
        from esl.originator import FreeswitchOriginator

        link = await open_event_socket(config, "e2e dialler")
        make = lambda b: FreeswitchOriginator(link, dataclasses.replace(  # noqa: E731
            config, freeswitch=dataclasses.replace(config.freeswitch, trunk_template=stack.trunk_template(b))))
    try:
        yield {b: make(b) for b in BEHAVIOURS}
    finally:
        await link.close()


@pytest.fixture
async def rig(stack, dbc) -> AsyncIterator[dict]:
    """The shop's side (API client, webhook receiver) and the dialler's (pool, the PBX link, one originator
    per customer behaviour)."""
    config = stack.config(api=ApiConfig(port=0, tokens=(TOKEN,)))
    hooks = Hooks()
    hook_app = web.Application()
    hook_app.router.add_post("/results", hooks.handle)
    hook_app.router.add_post("/messages", hooks.handle)
    hook_runner = web.AppRunner(hook_app)
    await hook_runner.setup()
    await web.TCPSite(hook_runner, "127.0.0.1", stack.hooks_port).start()
    try:
        async with db.open_pool(stack.url, min_size=1, max_size=6) as pool, originators(stack, config) as by:
            api = await start_api(config, pool)
            try:
                async with aiohttp.ClientSession(f"http://127.0.0.1:{api.port}",
                                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
                    yield {"pool": pool, "config": config, "client": client, "hooks": hooks, "originators": by}
            finally:
                await api.stop()
    finally:
        await hook_runner.cleanup()


async def send(rig: dict, **event) -> dict:
    event.setdefault("idempotency_key", hashlib.sha1(json.dumps(event, sort_keys=True).encode()).hexdigest())
    resp = await rig["client"].post("/api/v1/events", json=event)
    body = await resp.json()
    assert resp.status in (200, 201), body
    return body


async def dial_round(rig: dict, who: dict[str, str], *, now: datetime = WED_NOON) -> list[dialler.Dial]:
    """One dialler round on the test's clock; each number dialled through its behaviour's trunk."""
    dials = await dialler.claim(rig["pool"], rig["config"], now=now, worker="e2e")
    await asyncio.gather(*(dialler.dial(rig["pool"], rig["config"], rig["originators"][who[d.phone]], d,
                                        clock=lambda: now) for d in dials))
    return dials


async def wait_for(fn, timeout: float = 60.0):
    """Poll without blocking the loop: the shop's webhook receiver runs on it."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.3)


async def settled_jobs(dbc, n: int, timeout: float = 90.0) -> list[dict]:
    def done():
        rows = dbc.execute("SELECT * FROM dial_jobs WHERE attempts > 0 AND status NOT IN ('dialling', 'in_call') "
                           "ORDER BY id").fetchall()
        return rows if len(rows) >= n else None
    return await wait_for(done, timeout) or dbc.execute("SELECT * FROM dial_jobs ORDER BY id").fetchall()


async def customers(stack, *specs: tuple[str, dict]) -> list[Customers]:
    started = []
    for name, kw in specs:
        c = Customers(name, stack.pbx.agents[name], work_dir=stack.work, **kw)
        await c.start()
        started.append(c)
    return started


def callers(phone: SippAgent) -> list[tuple[str, str]]:
    """(number, display name) of the From of every INVITE the phone received."""
    text = phone.messages_file.read_bytes().decode("utf-8", "replace")
    return [(m["number"], m["name"]) for m in re.finditer(
        r'message received \[\d+\] bytes :\n\nINVITE [^\n]*\n(?:[^\n]+\n)*?From: *(?:"(?P<name>[^"]*)" *)?'
        r'<sip:(?P<number>[^@>]*)@', text)]


def explain(stack: Stack, *phones) -> str:
    return stack.explain(*phones, lines=60)


CARRIER_ASSERTS = '"Carrier" <sip:89160000000@127.0.0.1>'
PHONES = {name: f"+7916000{i:04d}" for i, name in enumerate(
    ("cart_yes", "cart_no", "stock_yes", "stock_no", "order_yes", "order_no", "delivery_yes", "delivery_no"))}


async def test_every_scenario_yes_and_no(stack, rig, dbc):
    key_at = stack.disclosure + 2.0  # during the question, after the disclosure
    # c_yes's carrier asserts the number in its own form when the call is answered (FreeSWITCH would make it
    # the number the robot's operators see); the others assert nothing
    phones = await customers(stack, ("c_yes", {"keys": [(key_at, "1")], "asserted": CARRIER_ASSERTS}),
                             ("c_no", {"keys": [(key_at, "2")]}), ("c_silent", {}))
    agent = SippAgent("agent1", stack.pbx.agents["agent1"], work_dir=stack.work, answer_after=0.5,
                      hangup_after=1.5)
    await agent.start()
    try:
        p = PHONES
        await send(rig, type="customer_consent", phone=p["cart_yes"], purpose="ad", granted=True)
        await send(rig, type="customer_consent", phone=p["cart_no"], purpose="ad", granted=True)
        for name in ("cart_yes", "cart_no"):
            await send(rig, type="cart_abandoned", phone=p[name], product="Духовой шкаф")
        for name in ("stock_yes", "stock_no"):
            await send(rig, type="stock_subscribed", phone=p[name], sku="OVN-7", product_name="Духовой шкаф",
                       product_url="https://shop.example/ovn-7")
        await send(rig, type="stock_arrived", sku="OVN-7")
        for name in ("order_yes", "order_no"):
            await send(rig, type="order_created", phone=p[name], order_number=name,
                       items=[{"sku": "TS-1", "name": "Футболка", "size": "M", "price": "990.00"}])
        for name in ("delivery_yes", "delivery_no"):
            await send(rig, type="order_created", phone=p[name], order_number=name, items=[{"name": "Шкаф"}])
            await send(rig, type="shipment_status", order_number=name, status="at_pickup_point",
                       pickup_point="ул. Ленина, 1", keep_until="2026-12-10")
        # the cart follow-up waits 3 days and the pickup orders' own confirmations are not this test's
        dbc.execute("UPDATE dial_jobs SET due_at = now() - interval '1 s' WHERE campaign = 'cart_followup'")
        dbc.execute("UPDATE dial_jobs SET status = 'cancelled' WHERE order_number LIKE 'delivery%' "
                    "AND campaign = 'order_confirmation'")
        who = {p["cart_yes"]: "c_yes", p["cart_no"]: "c_no", p["stock_yes"]: "c_yes", p["stock_no"]: "c_silent",
               p["order_yes"]: "c_yes", p["order_no"]: "c_no", p["delivery_yes"]: "c_yes",
               p["delivery_no"]: "c_silent"}
        dials = await dial_round(rig, who)
        assert len(dials) == 8, explain(stack, *phones)
        rows = await settled_jobs(dbc, 8, timeout=120)
        results = {next(k for k, v in p.items() if v == r["phone"]): (r["status"], r["result"]) for r in rows}
        assert results == {
            "cart_yes": ("done", "yes"), "cart_no": ("done", "refused"),
            "stock_yes": ("done", "connected"), "stock_no": ("done", "informed"),
            "order_yes": ("done", "confirmed"), "order_no": ("done", "not_confirmed"),
            "delivery_yes": ("done", "operator"), "delivery_no": ("done", "reminded"),
        }, explain(stack, *phones, agent)
        orders = {r["number"]: r["status"] for r in dbc.execute("SELECT number, status FROM orders").fetchall()}
        assert orders["order_yes"] == "awaiting_delivery" and orders["order_no"] == "new"
        [cb] = dbc.execute("SELECT * FROM callback_requests").fetchall()  # cart "yes": sales calls back
        assert (cb["phone"], cb["reason"]) == (p["cart_yes"], "campaign:cart_followup")
        assert agent.answered() == 3  # stock yes, order no, delivery yes reached the operator
        # the operator's phone showed the customer's number (not the campaign's) and the robot's name
        assert sorted(callers(agent)) == sorted([(p["stock_yes"], "[Робот back_in_stock]"),
                                                 (p["order_no"], "[Робот order_confirmation]"),
                                                 (p["delivery_yes"], "[Робот delivery_status]")])
        # every customer's phone showed the call; each call one outbound row
        calls = dbc.execute("SELECT uniqueid, outcome FROM calls WHERE direction = 'outbound'").fetchall()
        # the channel's uniqueid is the one the dialler chose (ChannelId): a call row per attempt
        assert sorted(c["uniqueid"] for c in calls) == sorted(d.uniqueid for d in dials)
        # the results reached the shop, signed; the back-in-stock links went to the message gateway
        hooks = rig["hooks"]
        await wait_for(lambda: len([b for b in hooks.bodies if b["event"] == "call_attempt_finished"]) >= 8, 30)
        finished = [b for b in hooks.bodies if b["event"] == "call_attempt_finished"]
        assert sorted(b["result"] for b in finished) == sorted(r for _, r in results.values())
        assert hooks.bad_signatures == 0
        links = [b for b in hooks.bodies if b["event"] == "message"]
        assert sorted(b["phone"] for b in links) == sorted([p["stock_yes"], p["stock_no"]])
        assert all(b["product_url"] == "https://shop.example/ovn-7" for b in links)
        # the history API tells the shop the same
        resp = await rig["client"].get("/api/v1/history", params={"order": "order_yes"})
        [job] = (await resp.json())["jobs"]
        assert (job["result"], job["attempts_log"][0]["outcome"]) == ("confirmed", "answered")
    finally:
        for c in phones:
            await c.stop()
        await agent.stop()


async def test_nine_opts_out_busy_is_retried_and_a_duplicate_event_calls_once(stack, rig, dbc):
    nine, yes = "+79160001001", "+79160001002"
    order = {"type": "order_created", "items": [{"name": "Шкаф"}]}
    await send(rig, **order, phone=nine, order_number="n9", idempotency_key="o-n9")
    again = await send(rig, **order, phone=nine, order_number="n9", idempotency_key="o-n9")
    assert again["duplicate"] is True
    await send(rig, **order, phone=yes, order_number="n1")
    resp = await rig["client"].patch("/api/v1/campaigns/order_confirmation", json={"caller_id": CAMPAIGN_NUMBER})
    assert resp.status == 200
    [c_nine, c_busy] = await customers(stack, ("c_nine", {"keys": [(2.0, "9")]}), ("c_busy", {"mode": "busy"}))
    try:
        dials = await dial_round(rig, {nine: "c_nine", yes: "c_busy"})
        assert len(dials) == 2
        rows = {r["phone"]: r for r in await settled_jobs(dbc, 2)}
        assert (rows[nine]["status"], rows[nine]["result"]) == ("done", "opted_out"), explain(stack, c_nine)
        assert dbc.execute("SELECT source FROM do_not_call WHERE phone = %s", (nine,)).fetchone()["source"] == "dtmf"
        assert (rows[yes]["status"], rows[yes]["reason"]) == ("pending", "retry_after_busy"), explain(stack, c_busy)
        assert c_busy.invites_by_number() == {yes: 1} and c_nine.invites_by_number() == {nine: 1}
        # the customer's phone shows the campaign's caller ID
        assert f"From: <sip:{CAMPAIGN_NUMBER}@" in c_busy.messages_file.read_text(errors="replace")
        # the number that pressed 9 is never dialled again, even for a new order
        await send(rig, **order, phone=nine, order_number="n9b")
        due = rows[yes]["due_at"]
        await c_busy.stop()
        [c_yes] = await customers(stack, ("c_yes", {"keys": [(stack.disclosure + 2.0, "1")]}))
        later = await dial_round(rig, {yes: "c_yes"}, now=due + timedelta(seconds=1))
        assert [d.phone for d in later] == [yes]
        job = await wait_for(lambda: (r := dbc.execute("SELECT * FROM dial_jobs WHERE phone = %s", (yes,)).fetchone())
                       and r["status"] == "done" and r, 60)
        assert job and (job["result"], job["attempts"]) == ("confirmed", 2), explain(stack, c_yes)
        newest = dbc.execute("SELECT * FROM dial_jobs WHERE order_number = 'n9b'").fetchone()
        assert (newest["status"], newest["reason"]) == ("cancelled", "dnc")
        await c_yes.stop()
    finally:
        for c in (c_nine, c_busy):
            await c.stop()


async def test_no_call_out_of_the_window_or_without_consent(stack, rig, dbc):
    night, shop = "+79160002001", "+79160002002"
    await send(rig, type="order_created", phone=night, order_number="w1", items=[{"name": "Шкаф"}])
    await send(rig, type="cart_abandoned", phone=shop, product="Шкаф")  # advertising, no consent given
    dbc.execute("UPDATE dial_jobs SET due_at = now() - interval '1 s'")
    [c_ring] = await customers(stack, ("c_ring", {"mode": "ring"}))
    try:
        assert await dial_round(rig, {}, now=WED_NOON.replace(hour=22)) == []
        jobs = {r["phone"]: r for r in dbc.execute("SELECT * FROM dial_jobs").fetchall()}
        assert (jobs[shop]["status"], jobs[shop]["reason"]) == ("cancelled", "no_consent")
        opens = jobs[night]["due_at"]
        assert opens.astimezone(MSK).hour == 9 and jobs[night]["reason"] == "window"
        assert await dial_round(rig, {}, now=opens - timedelta(minutes=1)) == []
        await asyncio.sleep(1.0)
        assert c_ring.invites_by_number() == {}  # nothing reached a phone
        # the window opens: the call goes out (nobody answers this phone: retried later)
        dials = await dial_round(rig, {night: "c_ring"}, now=opens)
        assert [d.phone for d in dials] == [night]
        assert c_ring.invites_by_number() == {night: 1}
        job = dbc.execute("SELECT * FROM dial_jobs WHERE phone = %s", (night,)).fetchone()
        assert (job["status"], job["reason"]) == ("pending", "retry_after_no_answer"), explain(stack, c_ring)
    finally:
        await c_ring.stop()


async def test_a_customer_calling_the_campaign_number_back_reaches_its_group(stack, rig, dbc):
    resp = await rig["client"].patch("/api/v1/campaigns/order_confirmation",
                                     json={"caller_id": CAMPAIGN_NUMBER, "group_name": "sales"})
    assert resp.status == 200, await resp.text()
    # the number follows the shop's hours like any other; this test's shop is always open
    dbc.execute("UPDATE numbers SET schedule_id = (SELECT id FROM schedules WHERE name = 'always') "
                "WHERE number = %s", (CAMPAIGN_NUMBER,))
    agent = SippAgent("agent1", stack.pbx.agents["agent1"], work_dir=stack.work, answer_after=0.5,
                      hangup_after=1.0)
    await agent.start()
    try:
        result = await place_call(CAMPAIGN_NUMBER, from_user="79160003001", pbx=stack.sip,
                                  work_dir=stack.work, wait_bye=30)
        assert result.answered and agent.answered() == 1, explain(stack, agent)
        row = await wait_for(lambda: dbc.execute("SELECT c.outcome, g.name FROM calls c JOIN groups g ON g.id = c.group_id "
                                           "WHERE c.dialled_number = %s", (CAMPAIGN_NUMBER,)).fetchone())
        assert row and (row["outcome"], row["name"]) == ("answered", "sales")
    finally:
        await agent.stop()


async def test_two_dialler_processes_dial_200_contacts_exactly_once(stack, rig, dbc):
    """Two `shopcall serve --only dialler` processes share the jobs; the customers answer and hang up at once
    (no retries configured), so every number must reach the phones exactly once. They dial through the
    stack's PBX, as the campaign's pbx says: AMI on Asterisk, FreeSWITCH's inbound event socket
    (freeswitch.dialler_enabled)."""
    dbc.execute("""UPDATE campaigns SET max_concurrent = 40, calls_per_second = 25, retry_minutes = '{}',
                   max_attempts = 1 WHERE name = 'order_confirmation'""")
    phones = [f"+7916001{i:04d}" for i in range(200)]
    async with rig["pool"].connection() as conn:
        for i, phone in enumerate(phones):
            await conn.execute(
                "INSERT INTO dial_jobs (campaign, phone, order_number, dedupe_key, due_at) "
                "VALUES ('order_confirmation', %s, %s, %s, now())", (phone, f"bulk{i}", f"bulk:{i}"))
    # the calling window is opened first: the processes' clock is the real one, and this may run at night
    dbc.execute("""UPDATE campaigns SET calling_window = '{"mon":[["00:00","24:00"]],"tue":[["00:00","24:00"]],
                   "wed":[["00:00","24:00"]],"thu":[["00:00","24:00"]],"fri":[["00:00","24:00"]],
                   "sat":[["00:00","24:00"]],"sun":[["00:00","24:00"]]}' WHERE name = 'order_confirmation'""")
    [quick] = await customers(stack, ("c_quick", {"hang_up_after": 1.0}))
    procs = []
    try:
        for n in range(2):
            log = stack.work / f"dialler-{n}.log"
            procs.append(subprocess.Popen(  # noqa: ASYNC220 (started once, before the calls)
                [sys.executable, "-m", "shopcall", "-c", str(stack.config_path), "serve", "--only", "dialler"],
                stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ)))

        def finished():
            n = dbc.execute("SELECT count(*) AS n FROM dial_jobs WHERE status IN ('done', 'failed')").fetchone()["n"]
            return n == 200
        assert await wait_for(finished, 240), (dbc.execute("SELECT status, count(*) FROM dial_jobs GROUP BY 1").fetchall(),
                                         explain(stack, quick))
        await asyncio.sleep(2.0)
        counts = quick.invites_by_number()
        assert sorted(counts) == sorted(phones) and set(counts.values()) == {1}
        workers = {r["worker"] for r in dbc.execute("SELECT DISTINCT worker FROM dial_attempts").fetchall()}
        assert len(workers) == 2, workers  # both processes dialled
        for n in range(2):
            assert f"dialler on: {stack.kind}\n" in (stack.work / f"dialler-{n}.log").read_text(errors="replace")
        assert dbc.execute("SELECT count(*) AS n FROM dial_attempts").fetchone()["n"] == 200
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        await quick.stop()
        dbc.execute("UPDATE campaigns c SET calling_window = s.calling_window, retry_minutes = s.retry_minutes, "
                    "max_attempts = s.max_attempts FROM test_campaigns_seed s WHERE s.name = c.name")



async def test_an_answering_machine_is_told_by_amd_and_called_again_later(stack, rig, dbc):
    """The robot says nothing to an answering machine and the attempt is retried after the machine delay.
    Asterisk's AMD() hears a long greeting with no pause (a machine). FreeSWITCH's mod_avmd hears beeps,
    not voices: its machine is a voicemail greeting followed by the beep, within freeswitch.amd_seconds."""
    dbc.execute("UPDATE campaigns SET amd = true WHERE name = 'order_confirmation'")
    phone = "+79160004001"
    await send(rig, type="order_created", phone=phone, order_number="amd1", items=[{"name": "Шкаф"}])
    if stack.kind == "asterisk":
        greeting = ("Hello, you have reached the voice mail of Ivan Petrov. I cannot take your call right now, "
                    "please leave your name, your number and a short message after the tone and I will call "
                    "you back")
        machine_kw: dict = {"speech": greeting}
    else:  # 4.4 s of greeting (no pause as long as the 0.8 s that ends the wait), the beep, silence
        machine_kw = {"speech": "Hello, you have reached Ivan Petrov, please leave a message after the tone.",
                      "beep": 0.5}
    [machine] = await customers(stack, ("c_silent", {**machine_kw, "hang_up_after": 20}))
    try:
        [d] = await dial_round(rig, {phone: "c_silent"})
        job = await wait_for(lambda: (r := dbc.execute("SELECT * FROM dial_jobs WHERE id = %s",
                                                       (d.job_id,)).fetchone())["status"] == "pending" and r, 60)
        assert job and job["reason"] == "retry_after_machine", explain(stack, machine)
        att = dbc.execute("SELECT * FROM dial_attempts WHERE id = %s", (d.attempt_id,)).fetchone()
        assert att["outcome"] == "machine"
        [call] = dbc.execute("SELECT outcome, route_log FROM calls WHERE uniqueid = %s", (d.uniqueid,)).fetchall()
        assert call["outcome"] == "robot_machine"
        assert [s["step"] for s in call["route_log"]] == ["robot_call", "answering_machine"]  # nothing said
        if stack.kind == "asterisk":
            assert "AMD" in stack.log()
        else:
            assert re.search(rf"{d.uniqueid}: AMD \(mod_avmd, \d+ s\): MACHINE", stack.app.log_tail(400)), \
                explain(stack, machine)
    finally:
        await machine.stop()
        dbc.execute("UPDATE campaigns SET amd = false")
