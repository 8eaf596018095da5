"""One outbound-socket session: FreeSWITCH's `socket` application connected to us for one channel.

We send `connect` (the reply is the whole channel), `myevents` (events of this channel only) less those
we never read (`nixevent`), and `linger` (so the hangup events still arrive). Never `resume` (nor socket_resume): with it, FreeSWITCH resets the
channel when our socket closes (CS_EXECUTE -> CS_RESET), which tears down a bridge in progress, so every
conversation would end with our process. Without it, a closed socket only ends the `socket` application's
park once the running application is done: a bridge goes on until a side hangs up, and the dialplan then
continues after `socket` (the rendered fallback: an answered call is hung up, anything else rings the
fallback group), as a Dial outlives a dead FastAGI server on Asterisk. Each application runs as `sendmsg
execute` tagged with an Event-UUID, and completes when the CHANNEL_EXECUTE_COMPLETE with that
Application-UUID arrives.

A hangup arrives as CHANNEL_HANGUP, and the EXECUTE_COMPLETE of the application that was running comes
right after it (a bridge reports its outcome there), so waiters are released only once the channel is
really finished: CHANNEL_HANGUP_COMPLETE, the disconnect notice, EOF, or a short grace after the hangup.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid

from esl import protocol
from esl.connection import EslConnection, EslConnectionClosed
from esl.protocol import Event, Message
from shopcall.call import CallEnded, PbxError

log = logging.getLogger("shopcall.esl")

CONNECT_TIMEOUT = 5.0  # the connect reply comes at once; a peer that is not FreeSWITCH gets dropped
HANGUP_GRACE = 3.0  # after CHANNEL_HANGUP, how long the running application may take to report
LINGER_SECONDS = 30
# myevents sends every channel event of ours, each with all the channel's variables (~5 KB); a call of our
# flow made ~46 of them, 26 CHANNEL_EXECUTE alone, and building and parsing them cost FreeSWITCH and us more
# than the call's own work (bench/e2e_ratio.py --pbx freeswitch). We read the completions, DTMF and hangups.
UNUSED_EVENTS = ("nixevent CHANNEL_EXECUTE CHANNEL_PARK CHANNEL_UNPARK CHANNEL_STATE CHANNEL_ANSWER "
                 "CHANNEL_APPLICATION CHANNEL_BRIDGE CHANNEL_UNBRIDGE CHANNEL_CREATE CHANNEL_DATA CHANNEL_DESTROY "
                 "CHANNEL_ORIGINATE CHANNEL_UUID CHANNEL_OUTGOING CHANNEL_PROGRESS CHANNEL_PROGRESS_MEDIA "
                 "DETECTED_SPEECH TALK NOTALK")
_EVENT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(::[a-z0-9_]+)?$")  # CHANNEL_ANSWER, CUSTOM, avmd::beep


class OutboundSession:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        command_timeout: float = 10.0,
        tag: str = "",
    ) -> None:
        self.tag = tag
        self.command_timeout = command_timeout
        self.conn = EslConnection(
            reader, writer, command_timeout=command_timeout, tag=tag,
            on_event=self._on_event, on_notice=self._on_notice, on_close=self._on_close,
        )
        self.channel = Event({})
        self.uuid = ""
        self.variables: dict[str, str] = {}  # the channel's variables as of the latest event
        self.hung_up = False
        self.hangup_cause = ""
        self.finished = asyncio.Event()  # nothing more will come for this channel
        self.dtmf: list[str] = []
        self.custom: list[Event] = []  # CUSTOM events subscribed to on top of myevents (avmd::beep)
        self._running: dict[str, asyncio.Future[Event]] = {}
        self._grace: asyncio.TimerHandle | None = None
        self._closing = False

    # -- setup --------------------------------------------------------------------------------

    async def connect(self) -> Event:
        self.conn.start()
        reply = await self._request(protocol.command("connect"), timeout=CONNECT_TIMEOUT)
        if not reply.ok:
            raise PbxError(f"{self.tag}: connect refused: {reply.reply_text!r}")
        self.channel = reply.event()
        self.uuid = self.channel.get("Unique-ID")
        self.tag = self.conn.tag = self.uuid or self.tag
        self.variables.update(self.channel.variables)
        for line in ("myevents", UNUSED_EVENTS, f"linger {LINGER_SECONDS}"):
            reply = await self._request(protocol.command(line))
            if not reply.ok:
                log.warning("%s: %r answered %r", self.tag, line, reply.reply_text)
        return self.channel

    # -- commands -----------------------------------------------------------------------------

    async def _request(self, data: bytes, *, timeout: float | None = None) -> Message:
        try:
            return await self.conn.request(data, timeout=timeout)
        except EslConnectionClosed as exc:
            raise CallEnded(f"event socket closed: {exc}") from None

    async def execute(self, app: str, arg: str = "", *, timeout: float) -> Event:
        """Run one application and return its CHANNEL_EXECUTE_COMPLETE (also when the caller hung up
        while it ran: a bridge's outcome is in there). Raises CallEnded if the channel is already gone."""
        if self.hung_up or self.conn.closed:
            raise CallEnded("caller hung up")
        event_uuid = str(uuid.uuid4())
        done: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._running[event_uuid] = done  # before sending: the completion may beat the reply
        try:
            reply = await self._request(protocol.execute(app, arg, event_uuid))
            if not reply.ok:
                raise PbxError(f"{self.tag}: execute {app} refused: {reply.reply_text!r}")
            try:
                async with asyncio.timeout(timeout):
                    return await done
            except TimeoutError:
                raise PbxError(f"{self.tag}: {app} did not complete within {timeout:.0f} s") from None
        finally:
            self._running.pop(event_uuid, None)
            if done.done() and not done.cancelled():
                done.exception()  # released by a hangup while we were still waiting for the reply

    async def subscribe(self, *names: str) -> None:
        """More events of this channel than myevents gives (`CUSTOM avmd::beep`); its uuid filter stays."""
        for name in names:
            if not _EVENT_NAME.match(name):
                raise ValueError(f"invalid event name {name!r}")
        reply = await self._request(protocol.command("event plain " + " ".join(names)))
        if not reply.ok:
            raise PbxError(f"{self.tag}: event {' '.join(names)} refused: {reply.reply_text!r}")

    async def api(self, line: str) -> str:
        """`api <line>` on this socket; returns the body (raw UTF-8: Content-Length counted bytes)."""
        reply = await self._request(protocol.command("api " + line))
        return reply.reply_text

    async def hangup(self, cause: str) -> None:
        if self.hung_up or self.conn.closed:
            return
        reply = await self._request(protocol.hangup(cause))
        if not reply.ok:
            log.warning("%s: hangup %s answered %r", self.tag, cause, reply.reply_text)

    async def close(self) -> None:
        """Close the socket: a channel still up goes on in the dialplan after the `socket` application."""
        self._closing = True
        if self._grace:
            self._grace.cancel()
        await self.conn.close()
        self._release("session closed")

    # -- what FreeSWITCH tells us --------------------------------------------------------------

    def _on_event(self, ev: Event) -> None:
        if self.uuid and ev.get("Unique-ID") not in ("", self.uuid):
            return  # not our channel (a filter other than myevents would let these through)
        self.variables.update(ev.variables)
        name = ev.name
        if name == "CHANNEL_EXECUTE_COMPLETE":
            done = self._running.get(ev.get("Application-UUID"))
            if done and not done.done():
                done.set_result(ev)
        elif name == "DTMF":
            self.dtmf.append(ev.get("DTMF-Digit"))
        elif name == "CUSTOM":
            self.custom.append(ev)
        elif name == "CHANNEL_HANGUP":
            self._hung_up(ev)
            if self._running and self._grace is None:
                self._grace = asyncio.get_running_loop().call_later(HANGUP_GRACE, self._release, "hung up")
        elif name == "CHANNEL_HANGUP_COMPLETE":
            self._hung_up(ev)
            self._release("hung up")

    def _hung_up(self, ev: Event) -> None:
        if not self.hung_up:
            self.hung_up = True
            self.hangup_cause = ev.get("Hangup-Cause")
            log.info("%s: channel hung up (%s)", self.tag, self.hangup_cause or "no cause")

    def _on_notice(self, msg: Message) -> None:
        disposition = msg.headers.get("Content-Disposition", "disconnect")
        log.info("%s: disconnect notice (%s%s)", self.tag, disposition,
                 f", linger {msg.headers['Linger-Time']} s" if "Linger-Time" in msg.headers else "")
        self.hung_up = True  # both forms mean the channel is gone or being torn down
        if disposition == "linger":
            # events still come: FreeSWITCH sends this notice as soon as the channel goes down, and it can
            # overtake the running application's completion (seen with a bridge the caller hung up on, on a
            # real 1.10: the agent who had answered was lost from the row); wait for it a short while
            if self._running and self._grace is None:
                self._grace = asyncio.get_running_loop().call_later(HANGUP_GRACE, self._release, "hung up")
            return
        self._release("disconnect notice")

    def _on_close(self, reason: str) -> None:
        if not self.hung_up and not self._closing:
            log.info("%s: event socket closed before a hangup: %s", self.tag, reason)
        self.hung_up = True
        self._release(reason)

    def _release(self, reason: str) -> None:
        self.finished.set()
        for done in self._running.values():
            if not done.done():
                done.set_exception(CallEnded(f"caller hung up ({reason})"))
