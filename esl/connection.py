"""One Event Socket connection, either direction: a reader task frames what arrives, replies go to the
commands that wait for them (in order: they carry no id), events and disconnect notices to callbacks.

Every command has a timeout. After one expires the connection is closed: a late reply would otherwise
be taken for the answer to the next command.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

from esl.protocol import EslProtocolError, Event, Message, Parser
from shopcall.call import PbxError

log = logging.getLogger("shopcall.esl")

REPLY_TYPES = ("command/reply", "api/response", "auth/request")
READ_SIZE = 64 * 1024


class EslConnectionClosed(Exception):
    """The socket is gone (EOF, reset, or we closed it after a protocol error or a timeout)."""


class EslConnection:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        command_timeout: float = 10.0,
        tag: str = "",
        on_event: Callable[[Event], None] | None = None,
        on_notice: Callable[[Message], None] | None = None,
        on_close: Callable[[str], None] | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.command_timeout = command_timeout
        self.tag = tag
        self.on_event = on_event
        self.on_notice = on_notice
        self.on_close = on_close
        self.closed = False
        self.close_reason = ""
        self._parser = Parser()
        self._replies: collections.deque[asyncio.Future[Message]] = collections.deque()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._read_loop(), name=f"esl-read {self.tag}")

    def expect_reply(self) -> asyncio.Future[Message]:
        """A future for the next reply; used for what FreeSWITCH sends unasked (auth/request)."""
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._replies.append(fut)
        return fut

    async def request(self, data: bytes, *, timeout: float | None = None) -> Message:
        """Send one command and return its reply (command/reply or api/response)."""
        if self.closed:
            raise EslConnectionClosed(self.close_reason or "connection closed")
        fut = self.expect_reply()
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as exc:  # RuntimeError: transport already closed
            self._close(f"write failed: {exc}")
        limit = timeout or self.command_timeout
        try:
            async with asyncio.timeout(limit):
                return await asyncio.shield(fut)
        except TimeoutError:
            what = data.split(b"\n", 1)[0].decode("utf-8", "replace")
            self._close(f"no reply to {what!r} within {limit:.0f} s")
            raise PbxError(f"{self.tag}: FreeSWITCH did not answer {what!r} within {limit:.0f} s") from None

    async def _read_loop(self) -> None:
        reason = "closed by FreeSWITCH (EOF)"
        try:
            while True:
                data = await self.reader.read(READ_SIZE)
                if not data:
                    break
                for msg in self._parser.feed(data):
                    self._dispatch(msg)
        except EslProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.warning("%s: %s", self.tag, reason)
        except (ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc}"
        except asyncio.CancelledError:
            reason = "closed by us"
            raise
        finally:
            self._close(reason)

    def _dispatch(self, msg: Message) -> None:
        ctype = msg.content_type
        if ctype in REPLY_TYPES:
            while self._replies:
                fut = self._replies.popleft()
                if not fut.done():
                    fut.set_result(msg)
                    return
            # a reply whose command we gave up on (after a hangup, linger's "+OK" to a late command)
            log.debug("%s: ignoring a reply nobody waits for: %r", self.tag, msg.reply_text[:80])
        elif msg.is_event:
            if self.on_event:
                self.on_event(msg.event())
        elif ctype == "text/disconnect-notice":
            if self.on_notice:
                self.on_notice(msg)
        else:
            log.info("%s: ignoring a message of type %r", self.tag, ctype)

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        while self._replies:
            fut = self._replies.popleft()
            if not fut.done():
                fut.set_exception(EslConnectionClosed(reason))
                fut.exception()  # retrieved: a waiter that already gave up must not warn
        self.writer.close()
        if self.on_close:
            self.on_close(reason)

    async def close(self) -> None:
        self._close(self.close_reason or "closed by us")
        if self._task and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (OSError, TimeoutError):
            pass
