"""A small asyncio client for the Asterisk Manager Interface (AMI).

Written instead of using panoramisk (see /work/shared/docs/library-findings.md), for the defects found there:

* `connect()` returns only once `Login` succeeded; a wrong secret raises AmiAuthError.
* every action carries an ActionID and waits for *its* response under a timeout; events are dispatched
  to listeners and never mistaken for responses.
* `Originate` is always `Async: true` and resolves with the matching `OriginateResponse` event.
* a lost connection fails every action in flight with AmiConnectionLost and is re-established with
  back-off; nothing is ever re-sent, so an Originate lost with the connection cannot dial twice.
* a periodic `Ping` whose reply does not come back closes the connection (then it reconnects).
* frames are cut by the blank line in bytes and decoded after, so a UTF-8 character split across two
  reads is intact; a header value with CR/LF is refused (it would inject headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shopcall.config import Config

log = logging.getLogger("shopcall.ami")

Message = dict[str, str]
Listener = Callable[[Message], None]

# Reason codes of OriginateResponse (Asterisk's enum ast_control_frame_type, as the manager reports them)
REASON_TEXT = {0: "failed", 1: "hangup", 3: "no_answer", 4: "answered", 5: "busy", 8: "congestion"}


class AmiError(Exception):
    """Asterisk answered an action with `Response: Error`, or the client cannot proceed."""


class AmiAuthError(AmiError):
    """Login refused (wrong user or secret, or the host is not permitted in manager.conf)."""


class AmiTimeout(AmiError, TimeoutError):
    """No response (or no OriginateResponse) within the timeout: the outcome is unknown."""


class AmiConnectionLost(AmiError):
    """The connection dropped while the action was in flight: it may or may not have been executed.
    It is never re-sent (for an Originate that would be a second call)."""


@dataclass(frozen=True)
class OriginateResult:
    success: bool
    reason: int  # 4 answered, 3 no answer, 5 busy, 8 congestion, 0/1 failed (see REASON_TEXT)
    channel: str = ""
    uniqueid: str = ""
    message: str = ""  # Asterisk's words when the Originate itself was refused

    @property
    def reason_text(self) -> str:
        return REASON_TEXT.get(self.reason, f"reason {self.reason}")


def check_value(value: object) -> str:
    """A header value as sent: CR or LF would end the header and inject others (or end the action)."""
    text = str(value)
    if "\r" in text or "\n" in text:
        raise ValueError(f"AMI header value contains CR/LF: {text!r}")
    return text


def encode_action(name: str, action_id: str, headers: Mapping[str, object] | None = None,
                  variables: Mapping[str, object] | None = None) -> bytes:
    lines = [f"Action: {check_value(name)}", f"ActionID: {check_value(action_id)}"]
    for key, value in (headers or {}).items():
        if not key.replace("-", "").isalnum():
            raise ValueError(f"bad AMI header name {key!r}")
        lines.append(f"{key}: {check_value(value)}")
    for key, value in (variables or {}).items():
        if not key.replace("_", "").replace("(", "").replace(")", "").isalnum():
            raise ValueError(f"bad channel variable name {key!r}")
        lines.append(f"Variable: {key}={check_value(value)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def parse_message(frame: bytes) -> Message:
    """One frame (without its blank line). A repeated header keeps its first value, except that
    Asterisk's multi-line `Output:` of a Command is joined with newlines."""
    msg: Message = {}
    for raw in frame.decode("utf-8", "replace").split("\n"):
        line = raw.rstrip("\r")
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key in msg:
            if key == "Output":
                msg[key] += "\n" + value
            continue
        msg[key] = value
    return msg


class AmiClient:
    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        secret: str,
        *,
        timeout: float = 10.0,
        ping_interval: float = 20.0,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
    ) -> None:
        self.host, self.port, self.username, self.secret = host, port, username, secret
        self.timeout = timeout
        self.ping_interval = ping_interval
        self.reconnect_min, self.reconnect_max = reconnect_min, reconnect_max
        self.banner = ""
        self.connections = 0  # successful logins so far (tests, logs)
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._pending: dict[str, asyncio.Future[Message]] = {}
        self._originates: dict[str, asyncio.Future[Message]] = {}
        self._listeners: list[tuple[str | None, Listener]] = []
        self._ids = itertools.count(1)
        self._prefix = f"shopcall-{os.getpid()}-{id(self) & 0xFFFF:x}"
        self._runner: asyncio.Task[None] | None = None
        self._closing = False

    # -- life cycle -----------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and log in once (raising on failure), then keep the connection up in the background."""
        reader, writer = await self._open()
        self._runner = asyncio.create_task(self._run(reader, writer), name="ami-connection")

    async def close(self) -> None:
        self._closing = True
        if self._runner:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        self._drop("client closed")

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise AmiConnectionLost(f"not connected to AMI at {self.host}:{self.port}") from None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=1 << 20), self.timeout)
        try:
            banner = await asyncio.wait_for(reader.readline(), self.timeout)
            if not banner.startswith(b"Asterisk Call Manager/"):
                raise AmiError(f"not an Asterisk manager at {self.host}:{self.port}: {banner[:80]!r}")
            self.banner = banner.decode("utf-8", "replace").strip()
            action_id = self._next_id()
            writer.write(encode_action("Login", action_id, {"Username": self.username, "Secret": self.secret}))
            await writer.drain()
            while True:  # events may precede the response (they do not, before login, but be tolerant)
                frame = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
                msg = parse_message(frame[:-4])
                if msg.get("ActionID") == action_id:
                    break
            if msg.get("Response") != "Success":
                raise AmiAuthError(f"AMI login as {self.username!r} refused: {msg.get('Message', msg)}")
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        self.connections += 1
        self._connected.set()
        log.info("AMI connected to %s:%s (%s)", self.host, self.port, self.banner)
        return reader, writer

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        delay = self.reconnect_min
        while not self._closing:
            pinger = asyncio.create_task(self._ping_loop(writer), name="ami-ping")
            try:
                await self._read_loop(reader)
                log.warning("AMI connection closed by %s:%s", self.host, self.port)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                log.warning("AMI connection lost: %s", exc)
            except Exception:  # a bug here must not leave the client silently dead: reconnect
                log.exception("AMI reader failed")
            finally:
                pinger.cancel()
                writer.close()
                self._drop("connection lost")
            while not self._closing:
                await asyncio.sleep(delay)
                try:
                    reader, writer = await self._open()
                    delay = self.reconnect_min
                    break
                except (OSError, TimeoutError, AmiError, asyncio.IncompleteReadError) as exc:
                    delay = min(delay * 2, self.reconnect_max)
                    log.warning("AMI reconnect failed (%s); next try in %.1f s", exc, delay)

    def _drop(self, why: str) -> None:
        """Fail everything in flight: the caller decides; nothing is queued for a re-send."""
        self._connected.clear()
        self._writer = None
        for table in (self._pending, self._originates):
            for fut in table.values():
                if not fut.done():
                    fut.set_exception(AmiConnectionLost(why))
            table.clear()

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                frame = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    log.warning("AMI connection closed inside a frame (%d bytes)", len(exc.partial))
                return
            self._dispatch(parse_message(frame[:-4]))

    def _dispatch(self, msg: Message) -> None:
        action_id = msg.get("ActionID", "")
        # an event may carry a Response header too (OriginateResponse does): Event decides
        if "Response" in msg and "Event" not in msg:
            fut = self._pending.pop(action_id, None)
            if fut and not fut.done():
                fut.set_result(msg)
            return
        event = msg.get("Event", "")
        if event == "OriginateResponse":
            fut = self._originates.pop(action_id, None)
            if fut and not fut.done():
                fut.set_result(msg)
        for wanted, listener in list(self._listeners):
            if wanted is None or wanted == event:
                try:
                    listener(msg)
                except Exception:
                    log.exception("AMI event listener failed on %s", event)

    async def _ping_loop(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            try:
                await self.action("Ping", timeout=self.timeout)
            except AmiConnectionLost:
                return
            except (AmiTimeout, AmiError) as exc:
                # half-open TCP or a hung Asterisk: closing makes the reader end and the loop reconnect
                log.warning("AMI ping failed (%s): reconnecting", exc)
                writer.transport.abort()
                return

    # -- actions --------------------------------------------------------------------------------

    def add_listener(self, listener: Listener, event: str | None = None) -> None:
        """Call `listener(message)` for every event (or only events named `event`)."""
        self._listeners.append((event, listener))

    def remove_listener(self, listener: Listener) -> None:
        self._listeners = [(e, fn) for e, fn in self._listeners if fn is not listener]

    def _next_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    async def action(self, name: str, headers: Mapping[str, object] | None = None, *,
                     variables: Mapping[str, object] | None = None, timeout: float | None = None,
                     check: bool = True) -> Message:
        """Send an action once and return its response; `Response: Error` raises AmiError if `check`."""
        timeout = self.timeout if timeout is None else timeout
        action_id = self._next_id()
        data = encode_action(name, action_id, headers, variables)  # validate before waiting for anything
        await self.wait_connected(timeout)
        msg = await self._send(action_id, data, timeout, name)
        if check and msg.get("Response") == "Error":
            raise AmiError(f"{name}: {msg.get('Message', 'error')}")
        return msg

    async def _send(self, action_id: str, data: bytes, timeout: float, name: str,
                    extra: asyncio.Future[Message] | None = None) -> Message:
        writer = self._writer
        if writer is None:
            raise AmiConnectionLost("not connected")
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[action_id] = fut
        try:
            writer.write(data)
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return fut.result()
        except TimeoutError:
            raise AmiTimeout(f"{name}: no response within {timeout:.1f} s") from None
        finally:
            self._pending.pop(action_id, None)

    async def originate(
        self,
        channel: str,
        *,
        context: str,
        exten: str = "s",
        priority: int = 1,
        ring_seconds: int = 20,
        variables: Mapping[str, object] | None = None,
        caller_id: str | None = None,
        timeout: float | None = None,
        action_id: str | None = None,
        channel_id: str | None = None,
    ) -> OriginateResult:
        """Place a call (always Async) and wait for its OriginateResponse: answered or why not.

        AmiConnectionLost / AmiTimeout mean the outcome is unknown: the call may be ringing. It is not
        re-sent; the caller decides (shopcall.callbacks leaves the request for reconciliation).
        `action_id` lets the caller record the id before sending; `channel_id` sets the new channel's
        uniqueid, so a restarted dialler can ask the PBX whether that call still exists."""
        headers: dict[str, object] = {
            "Channel": channel, "Context": context, "Exten": exten, "Priority": priority,
            "Timeout": int(ring_seconds * 1000), "Async": "true",
        }
        if caller_id is not None:
            headers["CallerID"] = caller_id
        if channel_id is not None:
            headers["ChannelId"] = channel_id
        action_id = action_id or self._next_id()
        data = encode_action("Originate", action_id, headers, variables)
        wait = self.timeout if timeout is None else timeout
        await self.wait_connected(wait)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Message] = loop.create_future()
        self._originates[action_id] = done  # registered before sending: the event can beat the response
        try:
            response = await self._send(action_id, data, wait, "Originate")
            if response.get("Response") != "Success":
                return OriginateResult(False, 0, channel, message=response.get("Message", ""))
            try:
                # the event comes when the channel answers or gives up: allow the ring time plus margin
                event = await asyncio.wait_for(asyncio.shield(done), ring_seconds + wait)
            except TimeoutError:
                raise AmiTimeout(f"Originate {channel}: no OriginateResponse") from None
        finally:
            self._originates.pop(action_id, None)
        reason = int(event["Reason"]) if event.get("Reason", "").isdigit() else 0
        return OriginateResult(event.get("Response") == "Success", reason, event.get("Channel", channel),
                               event.get("Uniqueid", ""))

    async def getvar(self, variable: str, channel: str | None = None) -> str | None:
        headers = {"Variable": variable} | ({"Channel": channel} if channel else {})
        msg = await self.action("Getvar", headers, check=False)
        if msg.get("Response") != "Success":
            return None
        return msg.get("Value")

    async def channel_exists(self, channel: str) -> bool:
        """Is there a live channel of this name or uniqueid (Asterisk looks channels up by both)?"""
        msg = await self.action("Getvar", {"Channel": channel, "Variable": "CHANNEL(state)"}, check=False)
        return msg.get("Response") == "Success"

    async def device_state(self, device: str) -> str:
        """NOT_INUSE, INUSE, RINGING, UNAVAILABLE, UNKNOWN, ... for e.g. PJSIP/agent1."""
        return (await self.getvar(f"DEVICE_STATE({device})")) or "UNKNOWN"


async def open_ami(config: Config, purpose: str, *, wait: bool = True) -> AmiClient:
    """A client of asterisk.ami_*, connected: waits out an Asterisk that is not there yet (start-up), or
    with wait=False tries once and raises (OSError, TimeoutError, AmiError)."""
    from shopcall.backoff import keep_trying

    ast = config.asterisk
    ami = AmiClient(ast.ami_host, ast.ami_port, ast.ami_user, ast.ami_secret)
    if not wait:
        await ami.connect()
        return ami
    await keep_trying(ami.connect, f"{purpose}: AMI at {ast.ami_host}:{ast.ami_port}", (OSError, TimeoutError, AmiError))
    return ami

