"""Inbound Event Socket client (we connect to FreeSWITCH's port 8021): what the dialler uses to place calls.

- `auth`: a wrong password is answered `-ERR invalid` plus a disconnect notice (captured): EslAuthError.
- `bgapi originate` with our own `origination_uuid`, so the call's events can be matched before the job
  even reports. The job's outcome arrives as a BACKGROUND_JOB event whose own body is `+OK <uuid>` or
  `-ERR <CAUSE>` (NO_ROUTE_DESTINATION, CHAN_NOT_IMPLEMENTED, ...). `+OK` comes as soon as there is early
  media, not on answer: the answer is the CHANNEL_ANSWER event of that uuid.
- Event subscriptions are global on 8021 (every channel's BACKGROUND_JOB and CHANNEL_* events), so
  everything is matched by Job-UUID / Unique-ID; a job's event may also be parsed before the coroutine
  that sent it has seen the reply, so unclaimed job results are kept for a while.
- The connection is re-established with back-off. An originate in flight when it drops is reported as
  failed, never re-sent: it may have happened (the AMI lesson: a re-sent originate dials twice).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import uuid as uuidlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from esl import protocol
from esl.connection import EslConnection, EslConnectionClosed
from esl.protocol import Event, Message
from shopcall.call import PbxError

if TYPE_CHECKING:
    from shopcall.config import Config

log = logging.getLogger("shopcall.esl.client")

EVENTS = ("BACKGROUND_JOB", "CHANNEL_ANSWER", "CHANNEL_HANGUP_COMPLETE")
_DIAL = re.compile(r"^[\w./@:+=,|\[\]-]{1,2000}$")
_DEST = re.compile(r"^(&[a-z_]+\([\w./:@ -]*\)|[\w.+-]+( XML [\w.-]+)?)$")
_EARLY_JOBS = 512  # unclaimed BACKGROUND_JOB results kept (other clients' jobs arrive here too)


class EslAuthError(PbxError):
    """FreeSWITCH refused the event socket password."""


@dataclass
class ChannelWatch:
    """What happens to one originated channel, from its CHANNEL_ANSWER / CHANNEL_HANGUP_COMPLETE."""

    uuid: str
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    hangup: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class OriginateResult:
    ok: bool
    uuid: str  # our origination_uuid: the channel's Unique-ID in every event
    job_uuid: str = ""
    reply: str = ""  # the job's body, e.g. "+OK <uuid>" or "-ERR NO_ROUTE_DESTINATION"
    cause: str = ""  # the failure cause, e.g. NO_ROUTE_DESTINATION, USER_BUSY
    channel: ChannelWatch | None = None  # answer / hangup of the channel (None when it failed)


def _brace_value(value: str) -> str:
    """A value inside originate's `{}`: nothing that ends the value or the block, or gets expanded."""
    if re.search(r"[{}\[\]'\\\r\n\x00]", value) or "${" in value:
        raise ValueError(f"value not usable in an originate variable: {value!r}")
    return f"'{value}'" if re.search(r"[ ,]", value) else value


class EslClient:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8021,
        password: str = "ClueCon",
        *,
        command_timeout: float = 10.0,
        backoff: tuple[float, float] = (0.5, 30.0),
        events: tuple[str, ...] = EVENTS,
    ) -> None:
        self.host, self.port, self.password = host, port, password
        self.command_timeout = command_timeout
        self.backoff = backoff
        self.events = events
        self.connects = 0
        self._conn: EslConnection | None = None
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._jobs: dict[str, asyncio.Future[Event]] = {}
        self._early: collections.OrderedDict[str, Event] = collections.OrderedDict()
        self._watches: dict[str, ChannelWatch] = {}
        # called with every channel event (not the jobs), e.g. esl/hangup_report.py's CHANNEL_HANGUP_COMPLETE
        self.listeners: list[Callable[[Event], None]] = []

    # -- connection -----------------------------------------------------------------------------

    async def start(self, *, retry: bool = True) -> None:
        """Connect and authenticate. A wrong password raises EslAuthError; a FreeSWITCH that cannot be
        reached is retried in the background with back-off (commands wait for it up to their timeout),
        or, with retry=False (a one-off command), raises."""
        try:
            await self._connect_once()
        except EslAuthError:
            raise
        except (OSError, PbxError, EslConnectionClosed) as exc:
            if not retry:
                raise
            log.warning("FreeSWITCH %s:%s not reachable yet (%s): retrying in the background",
                        self.host, self.port, exc)
            self._lost.set()
        self._supervisor = asyncio.create_task(self._supervise(), name="esl-client")

    async def _connect_once(self) -> None:
        tag = f"esl-client {self.host}:{self.port}"
        async with asyncio.timeout(self.command_timeout):
            reader, writer = await asyncio.open_connection(self.host, self.port)
        conn = EslConnection(reader, writer, command_timeout=self.command_timeout, tag=tag,
                             on_event=self._on_event)
        conn.on_close = lambda reason: self._on_close(conn, reason)
        greeting = conn.expect_reply()  # FreeSWITCH speaks first: auth/request
        conn.start()
        try:
            async with asyncio.timeout(self.command_timeout):
                hello = await greeting
            if hello.content_type != "auth/request":
                raise PbxError(f"{tag}: expected auth/request, got {hello.content_type!r}")
            reply = await conn.request(protocol.command("auth " + self.password))
            if not reply.ok:
                raise EslAuthError(f"FreeSWITCH at {self.host}:{self.port} rejected the event socket "
                                   f"password ({reply.reply_text.strip()}): check freeswitch.esl_password")
            reply = await conn.request(protocol.command("event plain " + " ".join(self.events)))
            if not reply.ok:
                raise PbxError(f"{tag}: event subscription refused: {reply.reply_text!r}")
        except TimeoutError:
            await conn.close()
            raise PbxError(f"{tag}: no auth/request greeting within {self.command_timeout:.0f} s") from None
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self.connects += 1
        self._lost.clear()
        self._ready.set()
        log.info("connected to FreeSWITCH event socket %s:%s", self.host, self.port)

    def _on_close(self, conn: EslConnection, reason: str) -> None:
        if conn is not self._conn:
            return  # a connection that never got ready (refused auth) leaves the state alone
        self._ready.clear()
        self._lost.set()
        for job, fut in list(self._jobs.items()):
            if not fut.done():
                fut.set_exception(PbxError(f"connection to FreeSWITCH lost ({reason}) while job {job} ran: "
                                           "the originate may or may not have happened"))
        if not self._stopping:
            log.warning("FreeSWITCH event socket lost: %s", reason)

    async def _supervise(self) -> None:
        delay = self.backoff[0]
        while not self._stopping:
            await self._lost.wait()
            if self._stopping:
                return
            await asyncio.sleep(delay)
            try:
                await self._connect_once()
                delay = self.backoff[0]
            except EslAuthError as exc:
                log.error("%s", exc)
                delay = self.backoff[1]
            except (OSError, PbxError, EslConnectionClosed) as exc:
                delay = min(delay * 2, self.backoff[1])
                log.warning("reconnecting to FreeSWITCH failed (%s); next try in %.1f s", exc, delay)

    async def close(self) -> None:
        self._stopping = True
        self._lost.set()
        if self._supervisor:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except asyncio.CancelledError:
                pass
        if self._conn:
            try:
                await self._conn.request(protocol.command("exit"), timeout=2)
            except (PbxError, EslConnectionClosed):
                pass
            await self._conn.close()

    async def _request(self, line: str, *, timeout: float | None = None) -> Message:
        try:
            async with asyncio.timeout(self.command_timeout):
                await self._ready.wait()
        except TimeoutError:
            raise PbxError(f"not connected to FreeSWITCH at {self.host}:{self.port}") from None
        assert self._conn is not None
        try:
            return await self._conn.request(protocol.command(line), timeout=timeout)
        except EslConnectionClosed as exc:
            raise PbxError(f"connection to FreeSWITCH lost: {exc}") from None

    # -- commands -------------------------------------------------------------------------------

    async def api(self, line: str) -> str:
        return (await self._request("api " + line)).reply_text

    async def bgapi(self, line: str, *, timeout: float) -> tuple[str, str]:
        """Run a background job; returns (Job-UUID, the job's output)."""
        reply = await self._request("bgapi " + line)
        job = reply.headers.get("Job-UUID") or reply.reply_text.rpartition(" ")[2]
        if not reply.ok or not job:
            raise PbxError(f"bgapi {line.split(' ', 1)[0]} refused: {reply.reply_text!r}")
        early = self._early.pop(job, None)
        if early is not None:
            return job, early.body
        fut = self._jobs[job] = asyncio.get_running_loop().create_future()
        if self._conn is None or self._conn.closed:  # lost between the reply and now
            self._jobs.pop(job, None)
            raise PbxError(f"connection to FreeSWITCH lost while job {job} ran: it may or may not have happened")
        try:
            async with asyncio.timeout(timeout):
                return job, (await fut).body
        except TimeoutError:
            raise PbxError(f"job {job} ({line.split(' ', 1)[0]}) reported nothing within {timeout:.0f} s") from None
        finally:
            self._jobs.pop(job, None)

    async def originate(
        self,
        dial_string: str,
        *,
        uuid: str | None = None,
        variables: Mapping[str, str] | None = None,
        timeout: int = 60,
        destination: str = "&park()",
    ) -> OriginateResult:
        """Place a call; `destination` is an application (`&park()`) or `EXTEN XML CONTEXT`."""
        if not _DIAL.match(dial_string):
            raise ValueError(f"invalid dial string {dial_string!r}")
        if not _DEST.match(destination):
            raise ValueError(f"invalid originate destination {destination!r}")
        call_uuid = protocol.check_uuid(uuid or str(uuidlib.uuid4()))
        pairs = {"origination_uuid": call_uuid, "originate_timeout": str(int(timeout))}
        for name, value in (variables or {}).items():
            pairs[protocol.check_var(name)] = _brace_value(str(value))
        block = "{" + ",".join(f"{k}={v}" for k, v in pairs.items()) + "}"
        watch = self._watches[call_uuid] = ChannelWatch(call_uuid)  # before sending: events may beat the job
        try:
            # originate splits its arguments at spaces: an application's arguments with a space in them
            # (`&socket(host:port async full)`) are one argument only when quoted
            dest = f"'{destination}'" if " " in destination and destination.startswith("&") else destination
            job, body = await self.bgapi(f"originate {block}{dial_string} {dest}",
                                         timeout=timeout + self.command_timeout)
        except BaseException:
            self._watches.pop(call_uuid, None)
            raise
        body = body.strip()
        if body.startswith("+OK"):
            return OriginateResult(True, call_uuid, job, body, channel=watch)
        self._watches.pop(call_uuid, None)
        cause = body[4:].strip() if body.startswith("-ERR") else body
        return OriginateResult(False, call_uuid, job, body, cause or "UNKNOWN")

    def _on_event(self, ev: Event) -> None:
        if ev.name == "BACKGROUND_JOB":
            job = ev.get("Job-UUID")
            fut = self._jobs.get(job)
            if fut and not fut.done():
                fut.set_result(ev)
            elif job:
                self._early[job] = ev
                while len(self._early) > _EARLY_JOBS:
                    self._early.popitem(last=False)
            return
        for listener in self.listeners:
            try:
                listener(ev)
            except Exception:  # one listener's bug must not stop the event reader
                log.exception("event listener %r failed on %s", listener, ev.name)
        watch = self._watches.get(ev.get("Unique-ID"))
        if watch is None:
            return
        if ev.name == "CHANNEL_ANSWER":
            watch.answered.set()
        elif ev.name == "CHANNEL_HANGUP_COMPLETE":
            if not watch.hangup.done():
                watch.hangup.set_result(ev.get("Hangup-Cause"))
            self._watches.pop(watch.uuid, None)


async def open_event_socket(config: Config, purpose: str, *, events: tuple[str, ...] = EVENTS,
                            listeners: Sequence[Callable[[Event], None]] = (), wait: bool = True) -> EslClient:
    """A client of freeswitch.esl_*, started: waits out a FreeSWITCH that is not there yet (start-up), or
    with wait=False tries once and raises (OSError, TimeoutError, PbxError, EslConnectionClosed)."""
    from shopcall.backoff import keep_trying

    fs = config.freeswitch
    client = EslClient(fs.esl_host, fs.esl_port, fs.esl_password, command_timeout=config.esl.command_timeout,
                       events=events)
    client.listeners.extend(listeners)  # before start: no event may arrive unheard
    if not wait:
        await client.start(retry=False)
        return client
    await keep_trying(client.start, f"{purpose}: FreeSWITCH event socket at {fs.esl_host}:{fs.esl_port}",
                      (OSError, TimeoutError, PbxError))
    return client

