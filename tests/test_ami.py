"""agi.ami against a fake AMI peer on loopback that writes what Asterisk writes, and once against the
harness's real Asterisk."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from agi.ami import (
    AmiAuthError,
    AmiClient,
    AmiConnectionLost,
    AmiTimeout,
    check_value,
    encode_action,
    parse_message,
)

SECRET = "s3cret"


class FakeAmi:
    """Speaks the manager protocol: banner, Login, Ping, Getvar, Originate (Async, with a scripted
    OriginateResponse). `on_originate(peer, writer, msg)` decides what happens to each originate."""

    def __init__(self) -> None:
        self.received: list[dict[str, str]] = []
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.on_originate: Callable | None = None
        self.silent_actions: set[str] = set()  # actions this peer never answers
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server
        self.server.close()
        for w in self.writers:
            w.close()

    def originates(self) -> list[dict[str, str]]:
        return [m for m in self.received if m.get("Action") == "Originate"]

    @staticmethod
    def send(writer: asyncio.StreamWriter, **headers: str) -> None:
        writer.write(("".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode())

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        writer.write(b"Asterisk Call Manager/9.0.0\r\n")
        try:
            while True:
                frame = await reader.readuntil(b"\r\n\r\n")
                msg = parse_message(frame[:-4])
                self.received.append(msg)
                await self._answer(writer, msg)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, w: asyncio.StreamWriter, msg: dict[str, str]) -> None:
        action, aid = msg.get("Action", ""), msg.get("ActionID", "")
        if action in self.silent_actions:
            return
        if action == "Login":
            if msg.get("Secret") == SECRET:
                self.send(w, Response="Success", ActionID=aid, Message="Authentication accepted")
                self.send(w, Event="FullyBooted", Privilege="system,all", Status="Fully Booted")
            else:
                self.send(w, Response="Error", ActionID=aid, Message="Authentication failed")
        elif action == "Ping":
            self.send(w, Response="Success", ActionID=aid, Ping="Pong", Timestamp="1.0")
        elif action == "Getvar":
            self.send(w, Event="Newchannel", Channel="PJSIP/x-1")  # an event interleaved before the reply
            self.send(w, Response="Success", ActionID=aid, Variable=msg["Variable"], Value="NOT_INUSE")
        elif action == "Originate":
            self.send(w, Response="Success", ActionID=aid, Message="Originate successfully queued")
            if self.on_originate:
                await self.on_originate(self, w, msg)
        else:
            self.send(w, Response="Error", ActionID=aid, Message="Invalid/unknown command")
        await w.drain()


@pytest.fixture
async def peer() -> AsyncIterator[FakeAmi]:
    p = FakeAmi()
    await p.start()
    yield p
    await p.stop()


@pytest.fixture
async def client(peer: FakeAmi) -> AsyncIterator[AmiClient]:
    c = AmiClient("127.0.0.1", peer.port, "shopcall", SECRET, timeout=1.0, reconnect_min=0.05)
    await c.connect()
    yield c
    await c.close()


async def test_login_ok_and_action_matched_across_events(peer: FakeAmi, client: AmiClient) -> None:
    assert client.banner.startswith("Asterisk Call Manager/")
    seen: list[str] = []
    client.add_listener(lambda m: seen.append(m["Event"]))
    assert await client.device_state("PJSIP/agent1") == "NOT_INUSE"
    assert "Newchannel" in seen
    pong = await client.action("Ping")
    assert pong["Ping"] == "Pong"
    login = peer.received[0]
    assert (login["Action"], login["Username"], login["ActionID"] != "") == ("Login", "shopcall", True)


async def test_wrong_secret_is_a_clear_error(peer: FakeAmi) -> None:
    c = AmiClient("127.0.0.1", peer.port, "shopcall", "wrong", timeout=1.0)
    with pytest.raises(AmiAuthError, match="Authentication failed"):
        await c.connect()
    assert not c.connected


async def _answer_after(delay: float, response: str = "Success", reason: str = "4"):
    async def on(peer: FakeAmi, w: asyncio.StreamWriter, msg: dict[str, str]) -> None:
        async def later() -> None:
            await asyncio.sleep(delay)
            FakeAmi.send(w, Event="Newchannel", Channel=msg["Channel"] + "-0001")
            FakeAmi.send(w, Event="OriginateResponse", Privilege="call,all", ActionID=msg["ActionID"],
                         Response=response, Channel=msg["Channel"] + "-0001", Context=msg["Context"],
                         Exten=msg["Exten"], Reason=reason, Uniqueid="1700000000.5")
        asyncio.create_task(later())
    return on


async def test_originate_async_resolved_by_its_originate_response(peer: FakeAmi, client: AmiClient) -> None:
    peer.on_originate = await _answer_after(0.1)
    res = await client.originate("PJSIP/agent1", context="shopcall-callback", ring_seconds=2,
                                 variables={"SHOPCALL_CALLBACK_ID": 7})
    assert (res.success, res.reason, res.reason_text, res.uniqueid) == (True, 4, "answered", "1700000000.5")
    [sent] = peer.originates()
    assert sent["Async"] == "true" and sent["Timeout"] == "2000" and sent["ActionID"]
    assert sent["Variable"] == "SHOPCALL_CALLBACK_ID=7"


async def test_two_originates_each_get_their_own_response(peer: FakeAmi, client: AmiClient) -> None:
    async def on(p: FakeAmi, w: asyncio.StreamWriter, msg: dict[str, str]) -> None:
        reason = "4" if msg["Channel"] == "PJSIP/a" else "3"
        delay = 0.2 if msg["Channel"] == "PJSIP/a" else 0.05  # the second one finishes first
        await (await _answer_after(delay, "Success" if reason == "4" else "Failure", reason))(p, w, msg)
    peer.on_originate = on
    a, b = await asyncio.gather(client.originate("PJSIP/a", context="c", ring_seconds=2),
                                client.originate("PJSIP/b", context="c", ring_seconds=2))
    assert (a.success, a.reason_text, b.success, b.reason_text) == (True, "answered", False, "no_answer")


async def test_connection_lost_mid_originate_is_not_sent_again(peer: FakeAmi, client: AmiClient) -> None:
    async def drop(p: FakeAmi, w: asyncio.StreamWriter, msg: dict[str, str]) -> None:
        w.transport.abort()  # Asterisk restarts while the agent's phone rings
    peer.on_originate = drop
    with pytest.raises(AmiConnectionLost):
        await client.originate("PJSIP/agent1", context="shopcall-callback", ring_seconds=2)
    for _ in range(100):  # the client reconnects and logs in again by itself
        if client.connected and peer.connections == 2:
            break
        await asyncio.sleep(0.02)
    assert client.connections == 2
    assert (await client.action("Ping"))["Ping"] == "Pong"
    await asyncio.sleep(0.2)
    assert len(peer.originates()) == 1  # panoramisk sent it again here: a double dial


async def test_action_timeout(peer: FakeAmi, client: AmiClient) -> None:
    peer.silent_actions.add("CoreSettings")
    with pytest.raises(AmiTimeout, match="CoreSettings"):
        await client.action("CoreSettings", timeout=0.2)
    assert (await client.action("Ping"))["Ping"] == "Pong"  # a late reply to nobody breaks nothing


async def test_originate_without_its_event_times_out(peer: FakeAmi, client: AmiClient) -> None:
    with pytest.raises(AmiTimeout, match="OriginateResponse"):
        await client.originate("PJSIP/agent1", context="c", ring_seconds=0.2, timeout=0.2)


async def test_dead_connection_noticed_by_ping(peer: FakeAmi) -> None:
    c = AmiClient("127.0.0.1", peer.port, "shopcall", SECRET, timeout=0.2, ping_interval=0.1, reconnect_min=0.05)
    await c.connect()
    try:
        peer.silent_actions.add("Ping")  # a half-open connection: nothing comes back
        for _ in range(100):
            if peer.connections >= 2:
                break
            await asyncio.sleep(0.02)
        assert peer.connections >= 2 and c.connections >= 2
    finally:
        await c.close()


async def test_utf8_split_across_reads() -> None:
    name = "Иван Петров"
    raw = b""

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal raw
        writer.write(b"Asterisk Call Manager/9.0.0\r\n")
        frame = parse_message((await reader.readuntil(b"\r\n\r\n"))[:-4])
        writer.write(f"Response: Success\r\nActionID: {frame['ActionID']}\r\n\r\n".encode())
        await writer.drain()
        getvar = parse_message((await reader.readuntil(b"\r\n\r\n"))[:-4])
        raw = f"Response: Success\r\nActionID: {getvar['ActionID']}\r\nValue: {name}\r\n\r\n".encode()
        cut = raw.index("И".encode()) + 1  # inside the two bytes of "И"
        writer.write(raw[:cut])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(raw[cut:])
        await writer.drain()
        with contextlib.suppress(Exception):
            await reader.read()

    server = await asyncio.start_server(conn, "127.0.0.1", 0)
    c = AmiClient("127.0.0.1", server.sockets[0].getsockname()[1], "u", "s", timeout=1.0)
    try:
        await c.connect()
        assert await c.getvar("CALLERID(name)", channel="PJSIP/x-1") == name
    finally:
        await c.close()
        server.close()


def test_header_values_cannot_carry_crlf() -> None:
    with pytest.raises(ValueError, match="CR/LF"):
        check_value("PJSIP/agent1\r\nAction: Hangup")
    with pytest.raises(ValueError):
        encode_action("Originate", "1", {"Channel": "a\nb"})
    with pytest.raises(ValueError):
        encode_action("Originate", "1", variables={"X": "1\r\nAction: Logoff"})
    assert encode_action("Ping", "7") == b"Action: Ping\r\nActionID: 7\r\n\r\n"


async def test_crlf_in_originate_is_refused_before_sending(peer: FakeAmi, client: AmiClient) -> None:
    with pytest.raises(ValueError):
        await client.originate("PJSIP/agent1", context="c", caller_id='"x\r\nAction: Logoff" <1>')
    assert peer.originates() == []


# ---- the real Asterisk of the harness --------------------------------------------------------------


@pytest.fixture(scope="module")
def real_pbx(tmp_path_factory):

    from tests.pbx import DEFAULT_ROOT, AsteriskPbx, require_asterisk_root

    require_asterisk_root()
    with AsteriskPbx(DEFAULT_ROOT, tmp_path_factory.mktemp("ami"), sip_port=None, ami_port=None) as pbx:
        yield pbx


@pytest.mark.slow
async def test_real_asterisk_login_ping_coresettings(real_pbx) -> None:
    c = AmiClient("127.0.0.1", real_pbx.ami_port, real_pbx.ami_user, real_pbx.ami_secret, timeout=5.0)
    await c.connect()
    try:
        assert c.banner.startswith("Asterisk Call Manager/")
        assert (await c.action("Ping"))["Ping"] == "Pong"
        settings = await c.action("CoreSettings")
        assert settings["AsteriskVersion"].startswith("22")
        assert await c.device_state("PJSIP/nobody") in ("INVALID", "UNKNOWN", "UNAVAILABLE")
    finally:
        await c.close()
    bad = AmiClient("127.0.0.1", real_pbx.ami_port, real_pbx.ami_user, "wrong", timeout=5.0)
    with pytest.raises(AmiAuthError):
        await bad.connect()


@pytest.mark.slow
async def test_the_live_view_keeps_its_own_link_to_the_real_asterisk(real_pbx) -> None:
    from dataclasses import replace

    from shopcall.api import LivePhones
    from shopcall.config import AsteriskConfig, Config
    from shopcall.serve import live_pbx, serve_live_phones

    config = replace(Config.default(), asterisk=AsteriskConfig(
        ami_port=real_pbx.ami_port, ami_user=real_pbx.ami_user, ami_secret=real_pbx.ami_secret))
    assert live_pbx(config, ["api"]) == "asterisk" and live_pbx(Config.default(), ["api"]) is None
    assert live_pbx(Config.default(), ["api", "esl"]) == "freeswitch"
    assert live_pbx(Config.default(), ["api", "agi", "esl"]) is None  # `shopcall serve` without AMI
    holder = LivePhones()
    task = asyncio.create_task(serve_live_phones(config, "asterisk", holder))
    try:
        for _ in range(100):
            if holder.phones is not None:
                break
            await asyncio.sleep(0.05)
        assert holder.phones is not None
        assert await holder.phones.phone_state("nobody") == "unavailable"  # no such endpoint: INVALID
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert holder.phones is None  # a stopped link is not asked


async def test_reconnects_with_back_off_after_asterisk_restarts(peer: FakeAmi) -> None:
    c = AmiClient("127.0.0.1", peer.port, "shopcall", SECRET, timeout=0.3, reconnect_min=0.05, reconnect_max=0.2)
    await c.connect()
    try:
        assert peer.server
        peer.server.close()
        for w in peer.writers:
            w.transport.abort()  # Asterisk goes away
        await asyncio.sleep(0.1)
        with pytest.raises(AmiConnectionLost):
            await c.action("Ping", timeout=0.2)  # waits a little for the connection, never queues for later
        await asyncio.sleep(0.5)  # a few failed attempts, with growing pauses
        peer.server = await asyncio.start_server(peer._conn, "127.0.0.1", peer.port)
        for _ in range(100):
            if c.connected:
                break
            await asyncio.sleep(0.02)
        assert c.connections == 2
        assert (await c.action("Ping"))["Ping"] == "Pong"
        assert [m["Action"] for m in peer.received].count("Ping") == 1  # the failed Ping was not sent later
    finally:
        await c.close()
