"""FastAGI server and wire format against a peer on loopback that writes what Asterisk writes.

These cover byte-level cases a real Asterisk cannot be made to produce on demand (a bare connect, garbage,
a peer that stops answering); the same server is exercised against the real Asterisk in test_e2e_inbound.py.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from agi.protocol import AgiProtocolError, parse_header_lines, parse_reply, parse_script, quote
from agi.server import FastAgiServer, peer_allowed
from agi.session import AgiSession
from shopcall.call import CallEnded, PbxError

ENV = (
    b"agi_network: yes\nagi_network_script: inbound?number=100\nagi_request: agi://127.0.0.1/inbound?number=100\n"
    b"agi_channel: PJSIP/sipp-00000001\nagi_language: ru\nagi_uniqueid: 1732540000.1\n"
    b"agi_callerid: 79161234567\nagi_calleridname: Customer\nagi_extension: s\n\n"
)


def test_header_newline_inside_caller_name_is_rejoined():
    lines = [b"agi_uniqueid: 1.2\n", b"agi_calleridname: \xd0\x98\xd0\xb2\xd0\xb0\xd0\xbd\n", b'"Vanya" Petrov\n',
             b"agi_callerid: 79161234567\n"]
    env = parse_header_lines(lines)
    assert env["agi_calleridname"] == 'Иван\n"Vanya" Petrov'
    assert env["agi_callerid"] == "79161234567"


def test_header_latin1_byte_survives():
    env = parse_header_lines([b"agi_calleridname: Jos\xe9\n"])
    assert env["agi_calleridname"] == "José"


def test_header_must_start_with_agi_key():
    with pytest.raises(AgiProtocolError):
        parse_header_lines([b"GET / HTTP/1.1\r\n"])


def test_script_route_and_args():
    s = parse_script({"agi_network_script": "inbound?number=%2B74951234567&x=1"})
    assert (s.name, s.args) == ("inbound", {"number": "+74951234567", "x": "1"})
    assert parse_script({"agi_request": "agi://10.0.0.1:4573/ivr/sub?x=2"}).name == "ivr"


@pytest.mark.parametrize(
    ("line", "result", "data", "endpos"),
    [
        ("200 result=0", "0", None, None),
        ("200 result=49 endpos=1234", "49", None, 1234),
        ("200 result= (timeout)", "", "timeout", None),
        ("200 result=12 (timeout)", "12", "timeout", None),
        ("200 result=1 (PJSIP/agent2-0000000a)", "1", "PJSIP/agent2-0000000a", None),
        ("200 result=1 (a (nested) value)", "1", "a (nested) value", None),
        ("200 result=-1 (hangup) endpos=8000", "-1", "hangup", 8000),
    ],
)
def test_reply_parsing(line, result, data, endpos):
    r = parse_reply(line)
    assert (r.code, r.result, r.data, r.endpos) == (200, result, data, endpos)


def test_quote_neutralises_quotes_backslashes_and_newlines():
    assert quote('a "b" \\ c') == '"a \\"b\\" \\\\ c"'
    assert "\n" not in quote("line1\nline2") and "\r" not in quote("x\ry")


class Peer:
    """A scripted Asterisk side of one FastAGI connection."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@pytest.fixture
async def server():
    seen: list[dict] = []

    async def handler(session: AgiSession, env, script):
        mine: dict = {"env": env, "script": script}
        seen.append(mine)
        try:
            reply = await session.send(b"ANSWER\n")
            mine["answer"] = reply.result
            reply = await session.send(b'GET VARIABLE "X"\n', timeout=1.0)
            mine["var"] = reply.data
            await session.send(b"NOOP\n")
        except (CallEnded, PbxError) as exc:
            mine["ended"] = type(exc).__name__
            raise

    srv = FastAgiServer({"inbound": handler}, port=0, command_timeout=1.0)
    await srv.start()
    srv.seen = seen  # type: ignore[attr-defined]
    yield srv
    await srv.stop(grace=1)


async def read_cmd(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), 5)


async def test_normal_session(server):
    r, w = await Peer(server.port).open()
    w.write(ENV)
    assert await read_cmd(r) == b"ANSWER\n"
    w.write(b"200 result=0\n")
    assert await read_cmd(r) == b'GET VARIABLE "X"\n'
    w.write(b"200 result=1 (value)\n")
    assert await read_cmd(r) == b"NOOP\n"
    w.write(b"200 result=0\n")
    assert await asyncio.wait_for(r.read(), 5) == b""  # server closes after the flow
    assert server.seen[0]["var"] == "value"
    assert server.seen[0]["script"].args == {"number": "100"}


async def test_hangup_line_then_511_ends_the_call_without_desync(server):
    r, w = await Peer(server.port).open()
    w.write(ENV)
    await read_cmd(r)
    w.write(b"HANGUP\n200 result=0\n")  # HANGUP arrives before the reply it interleaves with
    await read_cmd(r)
    w.write(b"511 Command Not Permitted on a dead channel or intercept routine\n")
    assert await asyncio.wait_for(r.read(), 5) == b""
    assert server.seen[0]["answer"] == "0" and server.seen[0]["ended"] == "CallEnded"


async def test_520_usage_text_is_consumed_whole(server):
    r, w = await Peer(server.port).open()
    w.write(ENV)
    await read_cmd(r)
    w.write(b"520-Invalid command syntax.  Proper usage follows:\nUsage: ANSWER\n520 End of proper usage.\n")
    assert await asyncio.wait_for(r.read(), 5) == b""
    assert server.seen[0]["ended"] == "PbxError"


async def test_peer_that_stops_answering_times_out(server):
    r, w = await Peer(server.port).open()
    w.write(ENV)
    await read_cmd(r)
    w.write(b"200 result=0\n")
    await read_cmd(r)  # GET VARIABLE: never answered
    assert await asyncio.wait_for(r.read(), 5) == b""
    assert server.seen[0]["ended"] == "PbxError"


async def test_socket_closed_mid_command_is_a_hangup(server):
    r, w = await Peer(server.port).open()
    w.write(ENV)
    await read_cmd(r)
    w.close()
    for _ in range(50):
        if server.seen and "ended" in server.seen[0]:
            break
        await asyncio.sleep(0.02)
    assert server.seen[0]["ended"] == "CallEnded"


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # bare connect-and-close (health check)
        b"GET / HTTP/1.0\r\n\r\n",
        b"agi_uniqueid: 1\nagi_network_script: inbound",  # closed inside the block
        b"agi_x: " + b"A" * 70000 + b"\n\n",  # over-long line
        bytes(range(256)) * 4 + b"\n\n",
    ],
)
async def test_garbage_closes_cleanly_and_the_server_keeps_serving(server, payload, caplog):
    caplog.set_level(logging.INFO, "shopcall.agi")
    r, w = await Peer(server.port).open()
    w.write(payload)
    await w.drain()
    w.write_eof()
    assert await asyncio.wait_for(r.read(), 10) == b""
    assert not server.seen
    await test_normal_session(server)  # still serves a real call afterwards


async def test_silent_peer_is_dropped_after_the_header_timeout(server, monkeypatch):
    monkeypatch.setattr("agi.server.HEADER_TIMEOUT", 0.3)
    r, w = await Peer(server.port).open()
    w.write(b"agi_uniqueid: 1\n")
    assert await asyncio.wait_for(r.read(), 5) == b""


async def test_unknown_route_closes_without_commands(server):
    r, w = await Peer(server.port).open()
    w.write(ENV.replace(b"inbound?number=100", b"nosuchflow"))
    assert await asyncio.wait_for(r.read(), 5) == b""


async def test_many_sessions_at_once(server):
    async def one():
        r, w = await Peer(server.port).open()
        w.write(ENV)
        for reply in (b"200 result=0\n", b"200 result=1 (v)\n", b"200 result=0\n"):
            await read_cmd(r)
            w.write(reply)
        return await asyncio.wait_for(r.read(), 10)

    results = await asyncio.gather(*(one() for _ in range(200)))
    assert results == [b""] * 200 and len(server.seen) == 200
    assert all(s["var"] == "v" for s in server.seen)


def test_allow_list():
    from agi.server import parse_allow

    allow = parse_allow(["10.1.0.0/16", "192.0.2.7"])
    assert peer_allowed("127.0.0.1", []) and peer_allowed("::1", [])
    assert peer_allowed("10.1.2.3", allow) and peer_allowed("192.0.2.7", allow)
    assert not peer_allowed("10.2.0.1", allow) and not peer_allowed("192.0.2.8", [])
    assert peer_allowed("::ffff:10.1.0.9", allow)


def test_call_info_from_asterisk_env():
    from agi.routes import call_info

    env = parse_header_lines(ENV.splitlines(keepends=True)[:-1])
    env["agi_calleridname"] = 'Мария \\"Маша\\" Иванова'
    info = call_info(env, parse_script(env))
    assert (info.uniqueid, info.caller_number, info.dialled_number) == ("1732540000.1", "79161234567", "100")
    assert info.caller_name == 'Мария "Маша" Иванова'  # PJSIP's quoted-pair escapes undone
    env.update(agi_callerid="unknown", agi_calleridname="unknown", agi_channel="DAHDI/1-1")
    info = call_info(env, parse_script(env))
    assert (info.caller_number, info.caller_name) == ("", "")


async def test_header_and_replies_a_byte_at_a_time(server):
    """The protocol splits lines itself: nothing may depend on how TCP cuts the bytes."""
    r, w = await Peer(server.port).open()
    for i in range(len(ENV)):
        w.write(ENV[i:i + 1])
        await w.drain()
    assert await read_cmd(r) == b"ANSWER\n"
    for reply, cmd in ((b"200 result=0\n", b'GET VARIABLE "X"\n'), (b"200 result=1 (a b)\n", b"NOOP\n")):
        for i in range(len(reply)):
            w.write(reply[i:i + 1])
            await w.drain()
        assert await read_cmd(r) == cmd
    w.write(b"200 result=0\n")
    assert await asyncio.wait_for(r.read(), 5) == b""
    assert server.seen[0]["var"] == "a b"


async def test_a_hangup_line_glued_to_the_header_is_kept_for_the_flow(server):
    r, w = await Peer(server.port).open()
    w.write(ENV + b"HANGUP\n")  # one read: the block and a line after it
    assert await read_cmd(r) == b"ANSWER\n"
    w.write(b"511 Command Not Permitted on a dead channel or intercept routine\n")
    assert await asyncio.wait_for(r.read(), 5) == b""
    assert server.seen[0]["ended"] == "CallEnded"


async def test_an_over_long_reply_line_ends_the_call_cleanly(server, caplog):
    caplog.set_level(logging.WARNING, "shopcall.agi")
    r, w = await Peer(server.port).open()
    w.write(ENV)
    assert await read_cmd(r) == b"ANSWER\n"
    w.write(b"200 result=0 (" + b"x" * 20000)  # no newline: not Asterisk
    assert await asyncio.wait_for(r.read(), 5) == b""
    assert server.seen[0]["ended"] == "CallEnded"
    assert "longer than" in caplog.text
    r, w = await Peer(server.port).open()  # the server goes on serving
    w.write(ENV)
    for reply in (b"200 result=0\n", b"200 result=1 (v)\n", b"200 result=0\n"):
        await read_cmd(r)
        w.write(reply)
    assert await asyncio.wait_for(r.read(), 5) == b"" and server.seen[1]["var"] == "v"


async def test_a_peer_outside_the_allow_list_is_refused_before_it_speaks(caplog):
    caplog.set_level(logging.WARNING, "shopcall.listener")
    srv = FastAgiServer({"inbound": lambda *a: asyncio.sleep(0)}, host="0.0.0.0", port=0, allow=["203.0.113.7/32"])
    await srv.start()
    try:
        ip = next((a for a in _local_addresses() if not a.startswith("127.") and a != "203.0.113.7"), None)
        if ip is None:
            pytest.skip("this machine has no non-loopback IPv4 address to connect from")
        r, w = await asyncio.open_connection(ip, srv.port)
        w.write(ENV)
        assert await asyncio.wait_for(r.read(), 5) == b""
        assert srv.sessions_total == 0 and "refused connection" in caplog.text
    finally:
        await srv.stop(grace=1)


def _local_addresses() -> list[str]:
    """This machine's outbound IPv4 address (a UDP connect sends nothing), if it has a route at all."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return []
        return [s.getsockname()[0]]


def test_a_session_on_uvloop():
    """`shopcall serve` runs on uvloop, whose transports are not asyncio.Transport subclasses."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> list[str | None]:
        got: list[str | None] = []

        async def handler(session: AgiSession, env, script):
            got.append((await session.send(b'GET VARIABLE "X"\n')).data)

        srv = FastAgiServer({"inbound": handler}, port=0, command_timeout=2.0)
        await srv.start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", srv.port)
            w.write(ENV)
            assert await read_cmd(r) == b'GET VARIABLE "X"\n'
            w.write(b"200 result=1 (on uvloop)\n")
            assert await asyncio.wait_for(r.read(), 5) == b""
        finally:
            await srv.stop(grace=1)
        return got

    assert uvloop.run(scenario()) == ["on uvloop"]
