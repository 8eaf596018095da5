"""The fallback report on FreeSWITCH (esl/hangup_report.py): a call the rendered fallback extension rang
gets its row from its CHANNEL_HANGUP_COMPLETE, read by our inbound event socket client.

The 8021 side is a stand-in here, for outcomes a real call does not produce on demand (the end-to-end
tests run the report against a real FreeSWITCH: test_e2e_inbound, test_fault_kill_many): its
handshake replies are the captured ones, and each event is the real CHANNEL_HANGUP_COMPLETE of a bridged
call (outbound_bridge_ringall, FreeSWITCH 1.11) with the variables our fallback extension sets and, for the
other outcomes, the bridge variables FreeSWITCH gave in the captured no-answer bridge. The database is a
real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from urllib.parse import quote

from esl.client import EslClient
from esl.hangup_report import FLOW, FallbackReports, HungUpCall, serve_fallback_reports
from esl.protocol import Parser
from esl.routes import call_info
from shopcall.call import CallEnded, DialStatus
from shopcall.flows import load_all
from tests.esl_peer import received
from tests.test_inbound_flow import app, call_row, callbacks  # noqa: F401  (app: a fixture)

UID = "d43064ce-f9fa-4089-bd20-cec4a48d2834"  # the captured channel's Unique-ID
CREATED = datetime.fromtimestamp(1795384613707434 / 1e6, UTC)


def _captured_hangup() -> list[tuple[str, str]]:
    """The caller's CHANNEL_HANGUP_COMPLETE after a ring-all bridge that 1001 answered, values %-encoded."""
    data = b"".join(received("outbound_bridge_ringall"))
    at = data.index(b"Event-Name: CHANNEL_HANGUP_COMPLETE\n")
    block = data[at: data.index(b"\n\n", at)].decode("ascii")
    return [(k, v) for k, _, v in (line.partition(": ") for line in block.split("\n"))]


CAPTURED = _captured_hangup()
BRIDGE_VARS = {"variable_" + v for v in ("originate_disposition", "DIALSTATUS", "last_bridge_to", "bridge_channel",
                                         "bridge_uuid", "bridge_hangup_cause", "last_bridge_hangup_cause")}


def hangup_event(*, flow: str | None = FLOW, outcome: str = "answered", caller: str = "89161234567",
                 name: str = "Customer", flow_dial: str = "", agent: str = "agent1", uid: str = UID) -> bytes:
    """A framed event as the inbound socket sends it (Content-Length first, a blank line ends the body)."""
    ours = {"Caller-Caller-ID-Number": caller, "Caller-Caller-ID-Name": name, "Other-Leg-Destination-Number": agent}
    if flow:
        ours |= {"variable_shopcall_flow": flow, "variable_shopcall_number": "100",
                 "variable_shopcall_arg_flow_dial": flow_dial}
    drop: set[str] = set()
    if outcome != "answered":  # as in the captured no-answer bridge: no bridge, no other leg
        drop = BRIDGE_VARS | {k for k, _ in CAPTURED if k.startswith("Other-")}
        ours.pop("Other-Leg-Destination-Number")
        ours["Caller-Channel-Bridged-Time"] = "0"
        if outcome == "noanswer":
            ours |= {"variable_originate_disposition": "NO_ANSWER", "variable_DIALSTATUS": "NOANSWER"}
        elif outcome == "cancel":
            ours |= {"variable_originate_disposition": "ORIGINATOR_CANCEL", "variable_DIALSTATUS": "CANCEL",
                     "Hangup-Cause": "ORIGINATOR_CANCEL"}
    pairs = [(k, quote(ours.pop(k), safe="',/()-_.") if k in ours else v.replace(UID, uid))
             for k, v in CAPTURED if k not in drop]
    pairs += [(k, quote(v, safe="',/()-_.")) for k, v in ours.items()]  # the ones the capture did not have
    body = "".join(f"{k}: {v}\n" for k, v in pairs).encode("ascii") + b"\n"
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n%s" % (len(body), body)


def parsed(raw: bytes):
    return Parser().feed(raw)[0].event()


async def test_the_captured_bridge_reads_as_the_answered_fallback_ring():
    ev = parsed(hangup_event())
    call = HungUpCall(ev, call_info(ev, FLOW), sounds=None)
    result = await call.last_dial()
    assert (result.status, result.answered_endpoint, result.detail) == (DialStatus.ANSWERED, "agent1", "SUCCESS")
    assert result.talk_seconds == 2.99997  # FreeSWITCH's own clock: hangup minus bridge, in microseconds
    assert call.info.created_at == CREATED and call.info.uniqueid == UID
    assert call.info.args == {"number": "100", "flow_dial": ""} and call.info.dialled_number == "100"
    try:
        await call.stream(None)
        raise AssertionError("a hung-up call played something")
    except CallEnded:
        pass


async def test_an_other_leg_that_is_no_endpoint_name_is_not_taken_for_one():
    ev = parsed(hangup_event(agent="sofia/internal/x@y;z"))
    assert (await HungUpCall(ev, call_info(ev, FLOW), sounds=None).last_dial()).answered_endpoint is None


async def fake_freeswitch(events: list[bytes]):
    """Port 8021's side: the captured greeting and replies, then `events`, split at awkward places and two
    in one write, as FreeSWITCH's reads were."""
    hello = b"".join(received("inbound_bgapi_and_failures"))
    greeting = hello[: hello.index(b"\n\n") + 2]
    subscribed = asyncio.Event()
    commands: list[bytes] = []

    async def serve(reader, writer):
        writer.write(greeting)
        for reply in (b"+OK accepted", b"+OK event listener enabled plain"):
            commands.append(await reader.readuntil(b"\n\n"))
            writer.write(b"Content-Type: command/reply\nReply-Text: %s\n\n" % reply)
        subscribed.set()
        stream = b"".join(events)
        for piece in (stream[:37], stream[37:5000], stream[5000:]):  # 37: inside the first header
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        try:
            commands.append(await reader.readuntil(b"\n\n"))  # exit
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], subscribed, commands


async def reports_of(app, events: list[bytes]) -> FallbackReports:  # noqa: F811
    server, port, subscribed, _ = await fake_freeswitch(events)
    client = EslClient("127.0.0.1", port, "ClueCon", command_timeout=2, events=("CHANNEL_HANGUP_COMPLETE",))
    reports = FallbackReports(app, load_all()[FLOW])
    client.listeners.append(reports)
    await client.start()
    try:
        await asyncio.wait_for(subscribed.wait(), 2)
        deadline = asyncio.get_running_loop().time() + 5
        want = sum(b"variable_shopcall_flow: fallback" in e for e in events)
        while reports.reported < want and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # an event that must not be reported has had its chance too
        await reports.drain()
    finally:
        await client.close()
        server.close()
    return reports


async def test_an_answered_fallback_call_on_freeswitch_has_its_row(app, conn):  # noqa: F811
    reports = await reports_of(app, [hangup_event()])
    assert reports.reported == 1
    row = await call_row(conn, UID)
    assert (row["outcome"], row["missed"], row["agent"], row["group_name"]) == ("answered", False, "agent1", "sales")
    assert row["started_at"] == CREATED  # Caller-Channel-Created-Time, to the microsecond
    assert row["caller_e164"] == "+79161234567" and row["dialled_number"] == "100"
    assert row["route_log"][-1] | {"at": None} == {"at": None, "step": "fallback", "agistatus": None,
                                                   "flow_dial": None, "dial": "SUCCESS", "answered": "agent1"}
    assert round((row["ended_at"] - row["answered_at"]).total_seconds()) == 3
    assert await callbacks(conn) == []


async def test_missed_and_abandoned_fallback_calls_leave_callback_requests(app, conn):  # noqa: F811
    other = "0" * 8 + UID[8:]
    await reports_of(app, [hangup_event(outcome="noanswer", caller="89160000001"),
                           hangup_event(outcome="cancel", caller="89160000002", uid=other)])
    cur = await conn.execute("SELECT uniqueid, caller_e164, outcome, missed FROM calls ORDER BY caller_e164")
    assert [tuple(r.values()) for r in await cur.fetchall()] == [
        (UID, "+79160000001", "missed_no_answer", True), (other, "+79160000002", "abandoned", True)]
    assert sorted((c["phone"], c["reason"]) for c in await callbacks(conn)) == [
        ("+79160000001", "no_answer"), ("+79160000002", "abandoned")]


async def test_only_channels_the_fallback_extension_rang_are_reported(app, conn):  # noqa: F811
    # the captured channel as it was (no shopcall variables), and one of our own flows' channels
    reports = await reports_of(app, [hangup_event(flow=None), hangup_event(flow="inbound")])
    assert reports.reported == 0
    cur = await conn.execute("SELECT count(*) AS n FROM calls")
    assert (await cur.fetchone())["n"] == 0


async def test_a_caller_name_with_quotes_and_a_newline_is_stored_as_it_came(app, conn):  # noqa: F811
    await reports_of(app, [hangup_event(name='O"Brien\n${system(id)}', outcome="noanswer")])
    row = await call_row(conn, UID)
    assert row["caller_name"] == 'O"Brien\n${system(id)}' and row["outcome"] == "missed_no_answer"


async def test_a_flow_that_had_already_connected_the_caller_keeps_its_own_group(app, conn):  # noqa: F811
    # the fallback-answered extension: flow_dial=ANSWER, no bridge of its own
    await reports_of(app, [hangup_event(outcome="none", flow_dial="ANSWER")])
    row = await call_row(conn, UID)
    assert row["group_name"] is None and row["route_log"][-1]["flow_dial"] == "ANSWER"


async def test_serve_listens_on_the_configured_event_socket(app, conn):  # noqa: F811
    server, port, subscribed, commands = await fake_freeswitch([hangup_event()])
    config = dataclasses.replace(app.config, freeswitch=dataclasses.replace(
        app.config.freeswitch, esl_port=port, esl_password="secret", report_fallback=True))
    task = asyncio.create_task(serve_fallback_reports(dataclasses.replace(app, config=config), load_all()[FLOW]))
    try:
        await asyncio.wait_for(subscribed.wait(), 5)
        deadline = asyncio.get_running_loop().time() + 5
        while asyncio.get_running_loop().time() < deadline:
            cur = await conn.execute("SELECT outcome FROM calls WHERE uniqueid = %s", (UID,))
            if await cur.fetchone():
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()
    assert commands[:2] == [b"auth secret\n\n", b"event plain CHANNEL_HANGUP_COMPLETE\n\n"]
    assert (await call_row(conn, UID))["outcome"] == "answered"


def agent_leg_hangup(uid: str, agent: str, variable: str = "shopcall_agent") -> bytes:
    body = (f"Event-Name: CHANNEL_HANGUP_COMPLETE\nUnique-ID: {uid}\nHangup-Cause: NORMAL_CLEARING\n"
            f"variable_{variable}: {agent}\n\n").encode()
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n%s" % (len(body), body)


async def test_a_bridge_that_outlived_our_process_names_its_agent_from_the_agents_leg(app, conn):  # noqa: F811
    # our process died while the flow's bridge ran; it went on, the agent hung up first (their leg's hangup,
    # with the flow's shopcall_agent, comes before the caller's), then the caller went to the fallback-
    # answered extension: no other leg is left on the caller's channel to ask
    answering = "2b2e630f-f09e-45d3-b21d-eab19c94a8c4"  # the captured caller's last_bridge_to
    reports = await reports_of(app, [agent_leg_hangup(answering, "agent3"),
                                     hangup_event(flow_dial="ANSWER", agent="")])
    assert reports.reported == 1
    row = await call_row(conn, UID)
    assert (row["outcome"], row["missed"], row["agent"]) == ("answered", False, "agent3"), row
    # the fallback's own bridge rang user/agent2: FreeSWITCH names it dialed_user on that leg
    other = "0" * 8 + UID[8:]
    await reports_of(app, [agent_leg_hangup(answering, "agent2", "dialed_user"),
                           hangup_event(agent="", uid=other)])
    assert (await call_row(conn, other))["agent"] == "agent2"
