"""Event Socket wire handling, from the transcripts captured on a real FreeSWITCH 1.11 (tests/data/esl/).

Parser tests replay the captured reads byte for byte; session tests let `Replay` play FreeSWITCH's side of
a transcript against our server (the same bytes, in the same read chunks); client tests let it play the
8021 side against our inbound client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from esl import protocol
from esl.call import EslCall
from esl.client import EslAuthError, EslClient
from esl.protocol import EslProtocolError, Event, Message, Parser
from esl.routes import call_info
from esl.server import EslServer, route_name
from esl.session import UNUSED_EVENTS, OutboundSession
from shopcall.call import CallEnded, CallInfo, DialStatus, PbxError
from tests.esl_peer import CLUECON, Replay, command_key, received
from tests.scripted import PromptNames

# (messages, reads, reads completing >1 message, messages spanning >1 read): the capture tool's own count,
# from the summary at the end of each .txt; every transcript in tests/data/esl/ is here
FRAMING = {
    "inbound_auth_rejected": (3, 2, 1, 0),
    "inbound_bgapi_and_failures.outbound_side": (2, 2, 0, 0),
    "inbound_bgapi_and_failures": (28, 23, 5, 0),
    "outbound_bridge_noanswer": (16, 10, 2, 0),
    "outbound_bridge_noanswer_calltimeout_in_braces": (13, 8, 2, 0),
    "outbound_bridge_noanswer_leg_timeout": (12, 6, 1, 0),
    "outbound_bridge_noanswer_leg_timeout_continue_on_fail": (17, 10, 2, 0),
    "outbound_bridge_noanswer_leg_timeout_continue_on_fail.inbound_helper": (7, 8, 0, 1),
    "outbound_bridge_ringall": (15, 8, 2, 0),
    "outbound_caller_hangs_up_midplay": (12, 6, 1, 0),
    "outbound_caller_hangs_up_midplay_linger": (16, 10, 2, 1),
    "outbound_cyrillic_menu": (18, 10, 3, 0),
    "outbound_cyrillic_menu.inbound_helper": (8, 7, 1, 0),
    "outbound_event_json": (13, 8, 1, 0),
    "outbound_record_voicemail": (29, 18, 6, 0),
    "outbound_bridge_noanswer.inbound_helper": (7, 6, 1, 0),
    "outbound_bridge_noanswer_calltimeout_in_braces.inbound_helper": (7, 6, 1, 0),
    "outbound_bridge_noanswer_leg_timeout.inbound_helper": (7, 6, 1, 0),
    "outbound_bridge_ringall.inbound_helper": (7, 6, 1, 0),
    "outbound_caller_hangs_up_midplay.inbound_helper": (8, 7, 1, 0),
    "outbound_caller_hangs_up_midplay_linger.inbound_helper": (8, 7, 1, 0),
    "outbound_event_json.inbound_helper": (7, 7, 0, 0),
    "outbound_record_voicemail.inbound_helper": (8, 7, 1, 0),
    # first set (no counts in the capture): what a whole-buffer framing gives
    "outbound_playback": (15, None, None, None),
    "inbound_originate": (16, None, None, None),
    "outbound_side_of_inbound_originate": (20, None, None, None),
    "dtmf_recv_b_inbound": (17, None, None, None),
    "dtmf_recv_b_outbound": (21, None, None, None),
    "dtmf_fscli_earlymedia_outbound": (16, None, None, None),
}


def frame_reads(name: str) -> tuple[list[list[Message]], Parser]:
    parser = Parser()
    return [parser.feed(chunk) for chunk in received(name)], parser


def all_messages(name: str) -> list[Message]:
    return [m for batch in frame_reads(name)[0] for m in batch]


def events(name: str) -> list[Event]:
    return [m.event() for m in all_messages(name) if m.is_event]


# -- framing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FRAMING))
def test_every_captured_read_sequence_frames_into_whole_messages(name):
    parser = Parser()
    per_read, spanned = [], 0
    for chunk in received(name):
        carried = parser.pending > 0
        batch = parser.feed(chunk)
        spanned += bool(carried and batch)
        per_read.append(batch)
    assert parser.pending == 0, "bytes left over after the last read"
    messages, reads, multi, spans = FRAMING[name]
    assert sum(len(b) for b in per_read) == messages
    if reads is not None:
        assert (len(per_read), sum(len(b) > 1 for b in per_read), spanned) == (reads, multi, spans)
    # byte by byte gives the very same messages: nothing depends on where reads end
    one_by_one = Parser()
    singles = [m for byte in b"".join(received(name)) for m in one_by_one.feed(bytes([byte]))]
    assert singles == [m for b in per_read for m in b]
    for msg in singles:
        if msg.is_event:
            assert msg.event().name


def test_connect_reply_is_url_encoded_and_has_no_content_length():
    connect = all_messages("outbound_cyrillic_menu")[0]
    assert "Content-Length" not in connect.headers
    assert connect.reply_text == "+OK\n" and connect.ok  # %2BOK%0A: + stays +, %0A is a newline
    channel = connect.event()
    assert channel.get("Caller-Caller-ID-Name") == "Иван Петров"
    assert channel.get("Caller-Caller-ID-Number") == "79161234567"
    assert channel.var("current_application_data") == "127.0.0.1:8084 async full"
    assert channel.get("Socket-Mode") == "async" and channel.get("Control") == "full"
    info = call_info(channel, "inbound")
    assert (info.uniqueid, info.caller_name, info.dialled_number, info.pbx) == (
        "2a89d3b3-cb31-42f2-8a47-387d8cbc337f", "Иван Петров", "9998", "freeswitch")


def test_an_originated_leg_keeps_the_caller_id_it_was_originated_with():
    # FreeSWITCH flips an originated channel's caller ID to the callee's when it answers (seen on 1.10.12:
    # `Flipping CID from "Иван Петров" <74951112233> to "Outbound Call" <public>`)
    flipped = Event({"Unique-ID": "u1", "Channel-Name": "loopback/answer-a", "Caller-Logical-Direction": "outbound",
                     "Caller-Caller-ID-Name": "Outbound Call", "Caller-Caller-ID-Number": "public",
                     "Caller-Orig-Caller-ID-Name": "Иван Петров", "Caller-Orig-Caller-ID-Number": "74951112233"})
    info = call_info(flipped, "callback")
    assert (info.caller_name, info.caller_number) == ("Иван Петров", "74951112233")
    # a caller's own (inbound) leg: its caller ID as it came, a SIP display name unescaped
    inbound = Event({"Unique-ID": "u2", "Channel-Name": "sofia/test/79161234567@127.0.0.1",
                     "Caller-Logical-Direction": "inbound", "Caller-Caller-ID-Name": 'Иван \\"Тест\\" Петров',
                     "Caller-Caller-ID-Number": "79161234567", "Caller-Orig-Caller-ID-Number": "x"})
    info = call_info(inbound, "inbound")
    assert (info.caller_name, info.caller_number) == ('Иван "Тест" Петров', "79161234567")


def test_percent_decoding_never_form_decodes():
    assert protocol.pct_decode(b"a+b%2Bc%20d") == "a+b+c d"
    assert protocol.pct_decode(b"%D0%98%D0%B2") == "Ив"
    assert protocol.pct_decode(b"100%") == "100%"  # a lone % is kept
    assert protocol.pct_decode(b"Jos\xe9") == "José"  # not UTF-8: Latin-1, nothing lost


def test_api_response_body_is_raw_utf8_counted_in_bytes():
    getvar = [m for m in all_messages("outbound_cyrillic_menu") if m.content_type == "api/response"][0]
    assert getvar.headers["Content-Length"] == "21" and getvar.reply_text == "Иван Петров"
    assert len(getvar.reply_text) == 11  # no trailing newline


def test_cyrillic_survives_in_json_event_bodies():
    json_msgs = [m for m in all_messages("outbound_event_json") if m.content_type == "text/event-json"]
    assert json_msgs
    for msg in json_msgs:
        assert int(msg.headers["Content-Length"]) == len(msg.body)
        text = msg.body.decode("utf-8")
        assert len(text) < len(msg.body)  # raw UTF-8, not \u escapes: bytes != characters
        ev = msg.event()
        assert ev.get("Caller-Caller-ID-Name") == "Иван Петров"
        assert all(isinstance(v, str) for v in ev.headers.values())
    complete = [e for e in map(Message.event, json_msgs) if e.name == "CHANNEL_EXECUTE_COMPLETE"]
    assert complete[0].get("Application-Response") == "FILE PLAYED"


def test_a_message_split_across_reads_completes_on_its_last_byte():
    reads, parser = frame_reads("outbound_caller_hangs_up_midplay_linger")
    assert parser.pending == 0
    assert [m.content_type for m in reads[-1]] == ["text/disconnect-notice"]
    notice = reads[-1][0]
    assert notice.headers["Content-Disposition"] == "disconnect" and notice.body == CLUECON
    # inbound: an api/response whose headers came in one read and its body in the next
    reads, _ = frame_reads("inbound_originate")
    at = next(i for i, batch in enumerate(reads) if not batch)
    assert reads[at + 1][0].reply_text.startswith("+OK") and "sent DTMF 12#" in reads[at + 1][0].reply_text


def test_two_events_in_one_read_the_dtmf_and_the_completion_it_caused():
    reads, _ = frame_reads("outbound_cyrillic_menu")
    batch = next(b for b in reads if any(m.is_event and m.event().name == "DTMF" for m in b))
    dtmf, done = (m.event() for m in batch)
    assert (dtmf.name, dtmf.get("DTMF-Digit")) == ("DTMF", "2")
    assert done.name == "CHANNEL_EXECUTE_COMPLETE" and done.get("Application") == "play_and_get_digits"
    assert done.var("menu_choice") == "2" and done.var("read_result") == "success"
    assert done.get("Application-Response") == "_none_"
    after_hangup = max(reads, key=len)
    assert len(after_hangup) == 7  # the 19 KB read after the hangup


def test_repeated_hangup_cause_is_kept_once():
    msg = next(m for m in all_messages("outbound_caller_hangs_up_midplay")
               if m.is_event and m.event().name == "CHANNEL_HANGUP_COMPLETE")
    assert msg.body.count(b"\nHangup-Cause: NORMAL_CLEARING\n") == 2
    assert msg.event().get("Hangup-Cause") == "NORMAL_CLEARING"
    json_done = [e for e in events("outbound_event_json") if e.name == "CHANNEL_HANGUP_COMPLETE"][0]
    assert json_done.get("Hangup-Cause") == "NORMAL_CLEARING"


def test_background_job_carries_its_own_content_length_and_body():
    jobs = [e for e in events("inbound_bgapi_and_failures") if e.name == "BACKGROUND_JOB"]
    assert [j.body for j in jobs] == [
        "+OK eb835624-71fa-456f-b1f1-61d355d38f21\n", "-ERR NORMAL_CLEARING\n",
        "-ERR NO_ROUTE_DESTINATION\n", "-ERR CHAN_NOT_IMPLEMENTED\n"]
    assert jobs[0].get("Job-Command") == "originate"
    assert jobs[0].get("Job-Command-Arg") == (
        "{origination_uuid=eb835624-71fa-456f-b1f1-61d355d38f21}loopback/9998/default &park()")
    [cyrillic] = [e for e in events("outbound_cyrillic_menu.inbound_helper") if e.name == "BACKGROUND_JOB"]
    assert "origination_caller_id_name='Иван Петров'," in cyrillic.get("Job-Command-Arg")
    assert cyrillic.body.startswith("+OK ")


def test_bgapi_reply_names_the_job_twice():
    replies = [m for m in all_messages("inbound_bgapi_and_failures") if "Job-UUID" in m.headers]
    assert replies and all(m.reply_text == "+OK Job-UUID: " + m.headers["Job-UUID"] for m in replies)


def test_array_values():
    done = [e for e in events("outbound_bridge_ringall") if e.name == "CHANNEL_EXECUTE_COMPLETE"][0]
    causes = protocol.array_values(done.var("originate_causes") or "")
    assert [c.split(";")[1] for c in causes] == ["NONE", "LOSE_RACE"]


@pytest.mark.parametrize("data", [
    b"this is not event socket\n\n",
    b"Content-Type: api/response\nContent-Length: lots\n\n",
    b"Content-Length: -5\n\n",
    b"Content-Type: text/event-json\nContent-Length: 3\n\n[1]",
])
def test_garbage_is_a_protocol_error(data):
    with pytest.raises(EslProtocolError):
        for msg in Parser().feed(data):
            msg.event()


def test_headers_without_an_end_are_bounded():
    with pytest.raises(EslProtocolError):
        Parser().feed(b"X-Long: " + b"a" * (protocol.MAX_HEADER_BYTES + 10))


# -- what we send -----------------------------------------------------------------------------------------


def test_sendmsg_headers_never_carry_a_line_break():
    data = protocol.execute("playback", "/s/a.wav", "5f0b3d6e-0000-4000-8000-000000000001")
    assert data == (b"sendmsg\ncall-command: execute\nexecute-app-name: playback\nexecute-app-arg: /s/a.wav\n"
                    b"event-lock: true\nEvent-UUID: 5f0b3d6e-0000-4000-8000-000000000001\n\n")
    with pytest.raises(ValueError):
        protocol.sendmsg({"call-command": "execute", "execute-app-arg": "x\nexecute-app-name: system"})
    with pytest.raises(ValueError):
        protocol.command("api status\n\nexit")
    with pytest.raises(ValueError):
        protocol.execute("play back", "", "u")


@pytest.mark.parametrize("path", ["/s/a b.wav", "/s/${system(id)}.wav", "/s/'a'.wav", "/s/a\\b.wav", ""])
def test_file_names_that_could_change_an_argument_are_refused(path):
    with pytest.raises(ValueError):
        protocol.check_file(path)


def test_free_text_is_made_inert_for_freeswitch_expansion():
    assert protocol.app_text('Иван "Ваня"\nПетров ${system(rm -rf /)} \\n') == 'Иван "Ваня" Петров $ {system(rm -rf /)} /n'
    assert protocol.app_text("plain 100$ name") == "plain 100$ name"
    with pytest.raises(ValueError):
        protocol.check_var("CALLERID(name)")


def test_route_by_variable_or_socket_argument():
    assert route_name(Event({"variable_shopcall_flow": "inbound"})) == "inbound"
    assert route_name(Event({"variable_current_application_data": "10.0.0.5:8084 async full robot"})) == "robot"
    assert route_name(Event({"variable_current_application_data": "127.0.0.1:8084 async full"})) == ""


# -- our server against the replayed FreeSWITCH side ----------------------------------------------------

Handler = Callable[[OutboundSession, Event], Awaitable[object]]


async def replay_session(name: str | Replay, handler: Handler, *, command_timeout: float = 3.0,
                         after: Callable[[Replay, OutboundSession], Awaitable[None]] | None = None):
    """Run `handler` on our server while `Replay` plays the transcript's FreeSWITCH side."""
    out: dict[str, object] = {}

    async def route(session: OutboundSession, channel: Event) -> None:
        out["session"] = session
        try:
            out["value"] = await handler(session, channel)
        except BaseException as exc:
            out["error"] = exc
            raise
        if after:
            await after(replay, session)

    server = EslServer({"": route}, port=0, command_timeout=command_timeout)
    await server.start()
    replay = Replay(name) if isinstance(name, str) else name
    try:
        await asyncio.wait_for(replay.connect_to(server.port), 10)
        await asyncio.wait_for(asyncio.gather(*server.active), 10)
    finally:
        await server.stop()
    return replay, out


def sent_commands(replay: Replay) -> list[str]:
    return [command_key(c) if c.startswith(b"sendmsg") else c.decode().strip() for c in replay.received]


async def test_replay_playback_and_hangup():
    async def handler(session, channel):
        ev = await session.execute("playback", "tone_stream://%(200,0,500)", timeout=2)
        await session.hangup("NORMAL_CLEARING")
        await asyncio.wait_for(session.finished.wait(), 2)
        return ev

    replay, out = await replay_session("outbound_playback", handler)
    ev = out["value"]
    assert ev.get("Application-Response") == "FILE PLAYED" and ev.var("playback_ms") == "200"
    assert sent_commands(replay) == ["connect", "myevents", UNUSED_EVENTS, "linger 30", "sendmsg playback",
                                     "sendmsg hangup"]
    assert out["session"].hangup_cause == "NORMAL_CLEARING"


async def test_replay_cyrillic_menu_digits_and_caller_name():
    async def handler(session, channel):
        name = await session.api(f"uuid_getvar {session.uuid} caller_id_name")
        ev = await session.execute("play_and_get_digits", "1 1 3 5000 # tone_stream://%(200,0,800) "
                                   "silence_stream://250 menu_choice \\d 3000", timeout=3)
        await session.hangup("NORMAL_CLEARING")
        await asyncio.wait_for(session.finished.wait(), 2)
        return name, ev, call_info(channel, "inbound")

    replay, out = await replay_session("outbound_cyrillic_menu", handler)
    name, ev, info = out["value"]
    assert name == "Иван Петров" and info.caller_name == "Иван Петров"
    assert ev.var("menu_choice") == "2" and out["session"].dtmf == ["2"]


async def test_replay_caller_hangs_up_mid_playback(caplog):
    caplog.set_level(logging.DEBUG, logger="shopcall.esl")

    async def handler(session, channel):
        ev = await session.execute("playback", "tone_stream://%(10000,0,440)", timeout=5)
        assert session.hung_up and ev.get("Application-Response") == "PLAYBACK ERROR"
        assert ev.var("playback_ms") == "2048"  # what was played, not wall time
        writes_before = len(replay.received)
        with pytest.raises(CallEnded):
            await session.execute("playback", "tone_stream://%(500,0,440)", timeout=2)
        await asyncio.sleep(0.05)
        assert len(replay.received) == writes_before  # a late command is not even written
        await session.hangup("NORMAL_CLEARING")  # nothing left to hang up: a no-op
        return session.hangup_cause

    replay = Replay("outbound_caller_hangs_up_midplay")
    _, out = await replay_session(replay, handler)
    assert "error" not in out and out["value"] == "NORMAL_CLEARING"
    assert "channel hung up (NORMAL_CLEARING)" in caplog.text
    assert "disconnect notice (disconnect" in caplog.text


async def test_replay_a_reply_arriving_after_the_hangup_is_ignored(caplog):
    caplog.set_level(logging.DEBUG, logger="shopcall.esl")

    async def handler(session, channel):
        ev = await session.execute("playback", "tone_stream://%(10000,0,440)", timeout=5)
        assert session.hung_up and ev.get("Application-Response") == "PLAYBACK ERROR"

    async def after(replay: Replay, session: OutboundSession) -> None:
        await replay.send_unclaimed()  # the "+OK"s linger gave to late commands, then the final notice
        await asyncio.sleep(0.1)

    replay, out = await replay_session("outbound_caller_hangs_up_midplay_linger", handler, after=after)
    assert "error" not in out
    assert caplog.text.count("ignoring a reply nobody waits for") == 2
    assert "disconnect notice (linger, linger 5 s)" in caplog.text
    assert "disconnect notice (disconnect)" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def esl_call(session: OutboundSession) -> EslCall:
    return EslCall(session, CallInfo(uniqueid=session.uuid, pbx="freeswitch"), PromptNames(),
                   endpoint_template="loopback/{endpoint}/esltest")


async def test_replay_ringall_bridge_names_who_answered():
    async def handler(session, channel):
        return await session.execute("bridge", "{ignore_early_media=true}loopback/1001/esltest,"
                                     "loopback/1002/esltest", timeout=8)

    _, out = await replay_session("outbound_bridge_ringall", handler)
    ev = out["value"]
    legs = {ev.var("last_bridge_to"): "1001", "bb207711-2eef-4116-8f6a-e6035c030e57": "1002"}
    result = esl_call(out["session"])._dial_result(ev, legs)
    assert (result.status, result.answered_endpoint, result.detail) == (DialStatus.ANSWERED, "1001", "SUCCESS")
    assert result.talk_seconds == pytest.approx(2.98, abs=0.01)  # from FreeSWITCH's own timestamps


async def test_replay_bridge_nobody_answers_keeps_the_caller():
    async def handler(session, channel):
        await session.execute("set", "call_timeout=6", timeout=2)
        ev = await session.execute("bridge", "{ignore_early_media=true}loopback/1002/esltest,"
                                   "loopback/1003/esltest", timeout=10)
        assert not session.hung_up  # NO_ANSWER leaves the caller with us
        return ev, esl_call(session)._dial_result(ev, {"x": "1002", "y": "1003"})

    _, out = await replay_session("outbound_bridge_noanswer", handler)
    ev, result = out["value"]
    assert (ev.var("originate_disposition"), ev.var("DIALSTATUS")) == ("NO_ANSWER", "NOANSWER")
    assert ev.var("last_bridge_to") is None
    assert (result.status, result.answered_endpoint, result.detail) == (DialStatus.NOANSWER, None, "NO_ANSWER")


async def test_replay_leg_timeout_without_continue_on_fail_kills_our_channel():
    async def handler(session, channel):
        ev = await session.execute("bridge", "{ignore_early_media=true,leg_timeout=6}loopback/1002/esltest,"
                                   "loopback/1003/esltest", timeout=10)
        assert session.hung_up  # CHANNEL_HANGUP came before the bridge's EXECUTE_COMPLETE
        return ev

    _, out = await replay_session("outbound_bridge_noanswer_leg_timeout", handler)
    session = out["session"]
    assert session.hangup_cause == "ALLOTTED_TIMEOUT"
    result = esl_call(session)._dial_result(out["value"], {"x": "1002"})
    assert (result.status, result.detail) == (DialStatus.NOANSWER, "ALLOTTED_TIMEOUT")


async def test_replay_json_events():
    async def handler(session, channel):
        ev = await session.execute("playback", "tone_stream://%(500,0,600)", timeout=3)
        await session.hangup("NORMAL_CLEARING")
        await asyncio.wait_for(session.finished.wait(), 2)
        return ev

    _, out = await replay_session("outbound_event_json", handler)
    ev = out["value"]
    assert ev.get("Application-Response") == "FILE PLAYED"
    assert ev.get("Caller-Caller-ID-Name") == "Иван Петров"
    assert out["session"].hangup_cause == "NORMAL_CLEARING"


async def test_replay_record_reports_audio_written_and_ignores_unknown_events(caplog):
    caplog.set_level(logging.DEBUG, logger="shopcall.esl")

    async def handler(session, channel):
        return await session.execute("record", "/srv/fs/rec/test.wav 5", timeout=10)

    _, out = await replay_session("outbound_record_voicemail", handler)
    ev = out["value"]
    assert (ev.var("record_ms"), ev.var("record_seconds")) == ("1000", "1")  # after ~6 s of wall time
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- peers that misbehave ----------------------------------------------------------------------------------


async def raw_peer(port: int, script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await script(reader, writer)
    finally:
        writer.close()


CONNECT = received("outbound_cyrillic_menu")[0]


async def first_execute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    """FreeSWITCH's side of a session's start (the captured connect reply, "+OK" to myevents, nixevent and
    linger), up to our first `sendmsg execute`, not answered yet; returns its Event-UUID."""
    await reader.readuntil(b"\n\n")
    writer.write(CONNECT)
    for _ in range(3):
        await reader.readuntil(b"\n\n")
        writer.write(b"Content-Type: command/reply\nReply-Text: +OK\n\n")
    cmd = await reader.readuntil(b"\n\n")
    return cmd.split(b"Event-UUID: ")[1].split(b"\n")[0].decode()


async def test_a_linger_notice_before_the_bridges_completion_still_gets_its_outcome():
    """Seen on a real FreeSWITCH 1.10: the caller hangs up during a bridge an agent had answered, and the
    linger notice (sent as soon as the channel goes down) overtakes the bridge's EXECUTE_COMPLETE; the
    completion, with who answered, must still be what the bridge returns."""
    out: dict[str, object] = {}

    async def route(session, channel):
        try:
            out["done"] = await session.execute("bridge", "user/agent1", timeout=5)
        except Exception as exc:  # noqa: BLE001 (the test reports what it was)
            out["done"] = exc

    server = EslServer({"": route}, port=0, command_timeout=2)
    await server.start()

    def event(body: str) -> bytes:
        raw = body.encode()
        return b"Content-Length: %d\nContent-Type: text/event-plain\n\n%s" % (len(raw), raw)

    async def peer(reader, writer):
        app_uuid = await first_execute(reader, writer)
        uid = "2a89d3b3-cb31-42f2-8a47-387d8cbc337f"
        writer.write(b"Content-Type: command/reply\nReply-Text: +OK\n\n"
                     + event(f"Event-Name: CHANNEL_HANGUP\nUnique-ID: {uid}\nHangup-Cause: NORMAL_CLEARING\n\n")
                     + b"Content-Type: text/disconnect-notice\nControlled-Session-UUID: %s\n"
                       b"Content-Disposition: linger\nLinger-Time: 30\nContent-Length: 0\n\n" % uid.encode())
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(event(f"Event-Name: CHANNEL_EXECUTE_COMPLETE\nUnique-ID: {uid}\nApplication: bridge\n"
                           f"Application-UUID: {app_uuid}\nvariable_originate_disposition: SUCCESS\n"
                           f"variable_last_bridge_to: leg-1\n\n"))
        await writer.drain()
        await asyncio.sleep(0.2)

    await raw_peer(server.port, peer)
    await asyncio.wait_for(asyncio.gather(*server.active), 5)
    await server.stop()
    done = out["done"]
    assert isinstance(done, Event) and done.var("originate_disposition") == "SUCCESS", done


async def test_peer_that_stops_answering_times_out(caplog):
    ran = []

    async def route(session, channel):
        ran.append(channel)

    server = EslServer({"": route}, port=0, command_timeout=0.3)
    await server.start()

    async def silent(reader, writer):
        await reader.readuntil(b"\n\n")
        writer.write(CONNECT)  # the channel, then silence: myevents never gets its reply
        await reader.readuntil(b"\n\n")
        await asyncio.sleep(1.0)

    await raw_peer(server.port, silent)
    await asyncio.wait_for(asyncio.gather(*server.active), 3)
    await server.stop()
    assert not ran
    assert "did not answer 'myevents' within 0 s" in caplog.text or "did not answer 'myevents'" in caplog.text


async def test_application_that_never_completes_times_out():
    async def route(session, channel):
        with pytest.raises(PbxError, match="did not complete"):
            await session.execute("playback", "/s/a.wav", timeout=0.3)
        route.done = True  # type: ignore[attr-defined]

    server = EslServer({"": route}, port=0, command_timeout=1)
    await server.start()

    async def only_ok(reader, writer):
        await reader.readuntil(b"\n\n")
        writer.write(CONNECT)
        for _ in range(4):  # myevents, nixevent, linger, sendmsg: "+OK" to each, no events ever
            await reader.readuntil(b"\n\n")
            writer.write(b"Content-Type: command/reply\nReply-Text: +OK\n\n")
        await reader.read()

    await raw_peer(server.port, only_ok)
    await asyncio.wait_for(asyncio.gather(*server.active), 3)
    await server.stop()
    assert getattr(route, "done", False)


async def test_bare_connect_and_close_and_unknown_messages_leave_the_server_serving(caplog):
    caplog.set_level(logging.INFO, logger="shopcall.esl")
    seen = []

    async def route(session, channel):
        seen.append(channel.get("Unique-ID"))
        ev = await session.execute("answer", timeout=1)
        seen.append(ev.get("Application-Response"))

    server = EslServer({"": route}, port=0, command_timeout=1)
    await server.start()
    await raw_peer(server.port, lambda r, w: asyncio.sleep(0))  # connect and close at once

    async def odd(reader, writer):
        event_uuid = await first_execute(reader, writer)
        body = (b"Event-Name: SOMETHING_NEW\nUnique-ID: x\n\n")
        done = (f"Event-Name: CHANNEL_EXECUTE_COMPLETE\nApplication: answer\nApplication-Response: _none_\n"
                f"Application-UUID: {event_uuid}\n\n").encode()
        writer.write(b"Content-Type: command/reply\nReply-Text: +OK\n\n"
                     b"Content-Type: text/rude-rejection\nContent-Length: 2\n\nno"
                     + b"Content-Length: %d\nContent-Type: text/event-plain\n\n%s" % (len(body), body)
                     + b"Content-Length: %d\nContent-Type: text/event-plain\n\n%s" % (len(done), done))
        await reader.read()

    await raw_peer(server.port, odd)
    await asyncio.wait_for(asyncio.gather(*server.active), 3)
    await server.stop()
    assert seen == ["2a89d3b3-cb31-42f2-8a47-387d8cbc337f", "_none_"]
    assert "ignoring a message of type 'text/rude-rejection'" in caplog.text


# -- the inbound client against the replayed 8021 side -------------------------------------------------------


async def replay_server(name: str) -> tuple[asyncio.Server, list[Replay]]:
    replays: list[Replay] = []

    async def serve(reader, writer):
        replay = Replay(name)
        replays.append(replay)
        await replay.serve(reader, writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, replays


async def test_wrong_password_is_a_clear_error():
    server, replays = await replay_server("inbound_auth_rejected")
    port = server.sockets[0].getsockname()[1]
    client = EslClient("127.0.0.1", port, "wrong", command_timeout=2)
    with pytest.raises(EslAuthError, match=r"rejected the event socket password \(-ERR invalid\)"):
        await client.start()
    server.close()
    assert replays[0].received == [b"auth wrong\n\n"]


async def test_originate_matches_background_jobs_and_channel_events():
    server, replays = await replay_server("inbound_bgapi_and_failures")
    port = server.sockets[0].getsockname()[1]
    client = EslClient("127.0.0.1", port, "ClueCon", command_timeout=2)
    await client.start()
    try:
        ok = await client.originate("loopback/9998/default", uuid="eb835624-71fa-456f-b1f1-61d355d38f21")
        assert ok.ok and ok.uuid == "eb835624-71fa-456f-b1f1-61d355d38f21" and ok.job_uuid.startswith("a3bb8314")
        assert ok.channel is not None and ok.channel.answered.is_set()  # CHANNEL_ANSWER came before the job
        failures = [await client.originate(target, timeout=5) for target in
                    ("loopback/nonexistent_ext/default", "loopback/nonexistent_ext/esltest", "nosuchendpoint/foo")]
        assert [(f.ok, f.cause) for f in failures] == [
            (False, "NORMAL_CLEARING"), (False, "NO_ROUTE_DESTINATION"), (False, "CHAN_NOT_IMPLEMENTED")]
        assert await client.api(f"uuid_kill {ok.uuid}") == "+OK\n"
        assert await asyncio.wait_for(ok.channel.hangup, 2) == "NORMAL_CLEARING"
    finally:
        await client.close()
        server.close()
    sent = replays[0].received
    assert sent[0] == b"auth ClueCon\n\n"
    assert sent[1] == b"event plain BACKGROUND_JOB CHANNEL_ANSWER CHANNEL_HANGUP_COMPLETE\n\n"
    assert sent[2] == (b"bgapi originate {origination_uuid=eb835624-71fa-456f-b1f1-61d355d38f21,"
                       b"originate_timeout=60}loopback/9998/default &park()\n\n")
    assert sent[-1] == b"exit\n\n"


async def test_originate_variables_are_validated_and_quoted():
    client = EslClient()
    with pytest.raises(ValueError):
        await client.originate("user/a b")
    with pytest.raises(ValueError):
        await client.originate("user/a", variables={"x": "${system(id)}"})
    with pytest.raises(ValueError):
        await client.originate("user/a", variables={"CALLERID(name)": "x"})


async def test_client_reconnects_with_back_off_and_fails_jobs_in_flight():
    connections = []

    async def serve(reader, writer):
        connections.append(writer)
        writer.write(b"Content-Type: auth/request\n\n")
        await reader.readuntil(b"\n\n")
        writer.write(b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n")
        await reader.readuntil(b"\n\n")
        writer.write(b"Content-Type: command/reply\nReply-Text: +OK event listener enabled plain\n\n")
        cmd = await reader.readuntil(b"\n\n")
        if len(connections) == 1:  # the first connection dies while an originate runs
            writer.write(b"Content-Type: command/reply\nReply-Text: +OK Job-UUID: 11111111-0000-4000-8000-000000000000\n"
                         b"Job-UUID: 11111111-0000-4000-8000-000000000000\n\n")
            await asyncio.sleep(0.05)
            writer.close()
            return
        assert cmd == b"api status\n\n"
        body = b"UP 0 years\n"
        writer.write(b"Content-Type: api/response\nContent-Length: %d\n\n%s" % (len(body), body))
        await reader.read()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = EslClient("127.0.0.1", port, "ClueCon", command_timeout=2, backoff=(0.05, 0.2))
    await client.start()
    with pytest.raises(PbxError, match="may or may not have happened"):
        await client.originate("user/agent1", timeout=5)
    assert await client.api("status") == "UP 0 years\n"
    assert client.connects == 2
    await client.close()
    server.close()


async def test_a_peer_outside_the_allow_list_gets_nothing(monkeypatch, caplog):
    import shopcall.listener

    monkeypatch.setattr(shopcall.listener, "peer_allowed", lambda host, allow: False)  # as if from 203.0.113.9
    server = EslServer({"": lambda s, c: asyncio.sleep(0)}, port=0)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await asyncio.wait_for(reader.read(), 2) == b""  # closed without even a `connect`
    writer.close()
    await server.stop()
    assert "refused connection" in caplog.text and server.sessions_total == 0
