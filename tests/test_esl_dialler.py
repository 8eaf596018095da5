"""The dialler on FreeSWITCH: a campaign with pbx = "freeswitch" is originated through the inbound event
socket, against the replay of a real FreeSWITCH's bgapi originate session (its answers are the captured
ones: the first originate answered, the next failed with NORMAL_CLEARING)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from esl.client import EslClient
from esl.originator import FreeswitchOriginator
from shopcall import dialler
from shopcall.config import FreeswitchConfig
from tests.esl_peer import VANILLA_MODULES, Caller, FsPeer, call_once
from tests.scripted import PromptNames
from tests.test_esl_protocol import replay_server
from tests.test_outbound import WED_NOON, app, event, jobs  # noqa: F401 (fixture)


class HashedTexts(PromptNames):
    """Spoken text as the TTS cache names it: by hash, never by its words."""

    async def say_text(self, text: str, lang: str) -> Path:
        return Path(f"/tts/{lang}/{hashlib.sha1(text.encode()).hexdigest()}")


async def test_a_freeswitch_campaign_is_originated_through_the_event_socket(app, conn):  # noqa: F811
    await conn.execute("UPDATE campaigns SET pbx = 'freeswitch', caller_id = '74950001122'")
    for n, phone in enumerate(("+79161234567", "+79160000001")):
        await event(app.pool, type="order_created", phone=phone, order_number=f"fs{n}", items=[{"name": "a"}])
    server, replays = await replay_server("inbound_bgapi_and_failures")
    client = EslClient("127.0.0.1", server.sockets[0].getsockname()[1], "ClueCon", command_timeout=2)
    await client.start()
    config = replace(app.config, freeswitch=FreeswitchConfig(trunk_template="loopback/{number}/default"))
    worker = dialler.Dialler(app.pool, config, {"freeswitch": FreeswitchOriginator(client, config)},
                             clock=lambda: WED_NOON, worker="fs-test")
    try:
        dials = []
        for _ in range(2):  # one at a time: the replay answers in the captured order
            dials += await worker.round()
            await worker.drain()
    finally:
        await client.close()
        server.close()
    first, second = sorted(dials, key=lambda d: d.attempt_id)
    sent = [m.decode() for m in replays[0].received if m.startswith(b"bgapi originate")]
    assert sent[0] == (
        f"bgapi originate {{origination_uuid={first.uniqueid},originate_timeout=30,"
        f"shopcall_arg_attempt={first.attempt_id},shopcall_action_id={first.action_id},"
        f"origination_caller_id_number=74950001122}}loopback/{first.phone}/default outbound XML shopcall-robot\n\n")
    rows = {j["id"]: j for j in await jobs(conn)}
    attempts = {a["id"]: a for a in await (await conn.execute("SELECT * FROM dial_attempts")).fetchall()}
    # answered: the robot's outbound flow (over the outbound socket) owns the job now
    assert rows[first.job_id]["status"] == "dialling" and attempts[first.attempt_id]["answered_at"] is not None
    assert (attempts[second.attempt_id]["outcome"], rows[second.job_id]["status"]) == ("failed", "pending")
    assert attempts[second.attempt_id]["detail"]["pbx"] == "NORMAL_CLEARING"


async def test_the_robot_dialogue_runs_unchanged_over_the_event_socket(app, conn):  # noqa: F811
    """The outbound flow on FreeSWITCH: the answered call reaches our outbound-socket server with the
    attempt in shopcall_arg_attempt and our origination_uuid as its Unique-ID (the replayed peer of
    tests/esl_peer.py plays FreeSWITCH); the customer confirms the order with 1."""
    from esl.routes import esl_routes
    from shopcall.flows.outbound import outbound
    app = replace(app, prompts=HashedTexts())
    await conn.execute("UPDATE campaigns SET pbx = 'freeswitch'")
    await event(app.pool, type="order_created", phone="+79161234567", order_number="fs-1",
                items=[{"name": "Футболка", "size": "M", "price": "990.00"}])
    [d] = await dialler.claim(app.pool, app.config, now=WED_NOON, worker="fs")
    peer = await call_once(esl_routes(app, {"outbound": outbound}), Caller(keys=["1"]), number="79161234567",
                           destination="outbound", uuid=d.uniqueid,
                           variables={"shopcall_flow": "outbound", "shopcall_arg_attempt": str(d.attempt_id)})
    job = await (await conn.execute("SELECT * FROM dial_jobs WHERE id = %s", (d.job_id,))).fetchone()
    order = await (await conn.execute("SELECT status FROM orders WHERE number = 'fs-1'")).fetchone()
    assert (job["status"], job["result"], order["status"]) == ("done", "confirmed", "awaiting_delivery")
    played = [arg for app_, arg in peer.apps if app_ in ("playback", "play_and_get_digits")]
    assert "robot_disclosure" in played[0]
    row = await (await conn.execute("SELECT pbx, direction, uniqueid FROM calls")).fetchone()
    assert (row["pbx"], row["direction"], row["uniqueid"]) == ("freeswitch", "outbound", d.uniqueid)


async def test_an_operator_the_robot_rings_sees_the_customers_number(app, conn):  # noqa: F811
    """The customer says no to the order: the robot rings sales, showing the operators the customer's number
    and the robot's name in FreeSWITCH's own variables (the flow once set Asterisk's CALLERID(num), which no
    FreeSWITCH variable can be named: it failed every operator call on FreeSWITCH)."""
    from esl.routes import esl_routes
    from shopcall.flows.outbound import outbound
    app = replace(app, prompts=HashedTexts())
    await conn.execute("UPDATE campaigns SET pbx = 'freeswitch', caller_id = '74950001122'")
    await event(app.pool, type="order_created", phone="+79161234567", order_number="fs-2", items=[{"name": "Шкаф"}])
    [d] = await dialler.claim(app.pool, app.config, now=WED_NOON, worker="fs")
    peer = await call_once(esl_routes(app, {"outbound": outbound}), Caller(keys=["2"], answers=["agent1"]),
                           number=d.phone, name="Outbound Call", destination="outbound", uuid=d.uniqueid,
                           variables={"shopcall_flow": "outbound", "shopcall_arg_attempt": str(d.attempt_id)})
    job = await (await conn.execute("SELECT * FROM dial_jobs WHERE id = %s", (d.job_id,))).fetchone()
    att = await (await conn.execute("SELECT * FROM dial_attempts WHERE id = %s", (d.attempt_id,))).fetchone()
    assert (job["status"], job["result"], att["detail"]["operator"]) == ("done", "not_confirmed", "agent1")
    [bridge] = peer.bridges
    assert [t for _, t in bridge.legs] == ["user/agent1"]
    assert peer.vars["effective_caller_id_name"] == "[Робот order_confirmation]"
    assert peer.vars["effective_caller_id_number"] == "+79161234567"
    assert not [arg for a, arg in peer.apps if a in ("set", "multiset") and "CALLERID" in arg]


# -- AMD: a campaign's amd on FreeSWITCH, with mod_avmd where it is loaded ---------------------------------


async def test_a_campaign_with_amd_asks_for_it_in_the_originate(app, conn):  # noqa: F811
    await conn.execute("UPDATE campaigns SET pbx = 'freeswitch', amd = true")
    await event(app.pool, type="order_created", phone="+79161234567", order_number="amd0", items=[{"name": "a"}])
    server, replays = await replay_server("inbound_bgapi_and_failures")
    client = EslClient("127.0.0.1", server.sockets[0].getsockname()[1], "ClueCon", command_timeout=2)
    await client.start()
    worker = dialler.Dialler(app.pool, app.config, {"freeswitch": FreeswitchOriginator(client, app.config)},
                             clock=lambda: WED_NOON, worker="fs-test")
    try:
        [d] = await worker.round()
        await worker.drain()
    finally:
        await client.close()
        server.close()
    [sent] = [m.decode() for m in replays[0].received if m.startswith(b"bgapi originate")]
    assert f",shopcall_action_id={d.action_id},shopcall_amd=1}}" in sent


async def robot_on_freeswitch(app, conn, caller: Caller, **peer) -> tuple[FsPeer, dialler.Dial]:  # noqa: F811
    """An answered robot call of an AMD campaign reaching our outbound-socket server, as the originate
    above sets it up (shopcall_amd=1 among the channel's variables)."""
    from esl.routes import esl_routes
    from shopcall.flows.outbound import outbound

    app = replace(app, prompts=HashedTexts())
    await conn.execute("UPDATE campaigns SET pbx = 'freeswitch', amd = true")
    await event(app.pool, type="order_created", phone="+79161234567", order_number="amd-1",
                items=[{"name": "Футболка", "size": "M", "price": "990.00"}])
    [d] = await dialler.claim(app.pool, app.config, now=WED_NOON, worker="fs")
    variables = {"shopcall_flow": "outbound", "shopcall_arg_attempt": str(d.attempt_id), "shopcall_amd": "1"}
    fs = await call_once(esl_routes(app, {"outbound": outbound}), caller, number="79161234567",
                         destination="outbound", uuid=d.uniqueid, variables=variables, **peer)
    return fs, d


async def outcome(conn, d: dialler.Dial) -> tuple[str, str, str | None]:
    att = await (await conn.execute("SELECT outcome FROM dial_attempts WHERE id = %s", (d.attempt_id,))).fetchone()
    job = await (await conn.execute("SELECT status, reason FROM dial_jobs WHERE id = %s", (d.job_id,))).fetchone()
    return att["outcome"], job["status"], job["reason"]


WITH_AVMD = VANILLA_MODULES | {"mod_avmd"}


async def test_a_voicemail_beep_heard_by_mod_avmd_is_a_machine_as_with_amd_on_asterisk(app, conn):  # noqa: F811
    peer, d = await robot_on_freeswitch(app, conn, Caller(machine=True), modules=WITH_AVMD)
    assert await outcome(conn, d) == ("machine", "pending", "retry_after_machine")
    apps = [a for a, _ in peer.apps]
    assert apps == ["avmd_start", "wait_for_silence", "avmd_stop"]  # then our hangup: nothing was said to it
    assert ("wait_for_silence", "200 40 5 8000") in peer.apps  # freeswitch.amd_seconds
    assert peer.subscribed == ["CUSTOM", "avmd::beep"] and peer.hangup_cause == "NORMAL_CLEARING"


async def test_a_person_hears_the_robot_once_avmd_has_stopped(app, conn):  # noqa: F811
    peer, d = await robot_on_freeswitch(app, conn, Caller(keys=["1"]), modules=WITH_AVMD)
    assert await outcome(conn, d) == ("answered", "done", None)
    apps = [a for a, _ in peer.apps]
    assert apps[:3] == ["avmd_start", "wait_for_silence", "avmd_stop"] and "playback" in apps
    assert "robot_disclosure" in next(arg for a, arg in peer.apps if a in ("playback", "play_and_get_digits"))


async def test_without_mod_avmd_the_call_goes_on_without_amd_and_says_so_once(app, conn, caplog):  # noqa: F811
    peer, d = await robot_on_freeswitch(app, conn, Caller(keys=["1"]))  # a vanilla FreeSWITCH
    assert await outcome(conn, d) == ("answered", "done", None)
    # avmd_start would have made FreeSWITCH hang the call up (Invalid Application): never sent
    assert not {"avmd_start", "wait_for_silence"} & {a for a, _ in peer.apps}
    assert "api module_exists mod_avmd" in peer.commands
    warned = [r.getMessage() for r in caplog.records if "mod_avmd" in r.getMessage()]
    assert len(warned) == 1 and "AMD is unavailable on FreeSWITCH" in warned[0]


async def test_a_callee_gone_during_amd_is_a_hangup(app, conn):  # noqa: F811
    peer, d = await robot_on_freeswitch(app, conn, Caller(hang_up_on="wait_for_silence"), modules=WITH_AVMD)
    assert await outcome(conn, d) == ("hangup", "pending", "retry_after_hangup")
