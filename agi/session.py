"""One FastAGI connection: send a command, read its reply, under a timeout, in bytes.

Lines arrive from the server's protocol (agi/server.py), which splits what Asterisk sends; a session only
waits for them. No StreamReader/StreamWriter: they were about 40 % of a short request's CPU.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from agi.protocol import AgiProtocolError, Reply, decode, parse_reply
from shopcall.call import CallEnded, PbxError

log = logging.getLogger("shopcall.agi")

MAX_STRAY_LINES = 50  # lines that are not replies (leftovers of a broken header block) before we give up


class AgiSession:
    def __init__(self, transport: asyncio.WriteTransport, *, command_timeout: float = 10.0, tag: str = "") -> None:
        self.transport = transport
        self.command_timeout = command_timeout
        self.tag = tag
        self.hung_up = False  # Asterisk said HANGUP: the channel is gone, only dead-channel commands work
        self.closed = False
        self._lock = asyncio.Lock()
        self._lines: deque[bytes] = deque()  # complete lines from Asterisk, each with its b"\n"
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None

    # -- fed by the protocol
    def feed_line(self, line: bytes) -> None:
        self._lines.append(line)
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _readline(self) -> bytes:
        """The next line with its newline; b"" once Asterisk has closed the connection."""
        while not self._lines:
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._lines.popleft()

    # -- used by AgiCall
    async def send(self, line: bytes, *, timeout: float | None = None) -> Reply:
        """Send one command and return its 200 reply; a dead channel raises CallEnded, an error PbxError."""
        if self.closed:
            raise CallEnded("FastAGI connection closed")
        async with self._lock:  # one command in flight: replies carry no id to match them by
            try:
                if self.transport.is_closing():
                    raise ConnectionResetError("connection closed")
                # one command at a time, each waits for its reply: at most one line is ever buffered
                self.transport.write(line)
                # asyncio.timeout, not wait_for: wait_for makes a Task per command (a fifth of a request's CPU)
                async with asyncio.timeout(timeout or self.command_timeout):
                    reply = await self._read_reply()
            except TimeoutError:
                self.closed = True
                raise PbxError(
                    f"{self.tag}: no reply to {line.decode(errors='replace').strip()!r} "
                    f"within {timeout or self.command_timeout:.0f} s"
                ) from None
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                self.closed = True
                raise CallEnded(f"FastAGI connection lost: {exc}") from None
        if reply.code == 200:
            return reply
        if reply.code == 511:
            self.hung_up = True
            raise CallEnded("channel is dead (511)")
        raise PbxError(f"{self.tag}: {line.decode(errors='replace').strip()!r} -> {reply.text}")

    async def _read_reply(self) -> Reply:
        stray = 0
        while True:
            raw = await self._readline()
            if not raw:
                raise asyncio.IncompleteReadError(b"", None)
            line = decode(raw).rstrip("\r\n")
            if line == "HANGUP":
                self.hung_up = True
                log.info("%s: caller hung up", self.tag)
                continue
            if line.startswith("520-"):  # multi-line usage text ends with "520 End of proper usage."
                text = [line]
                while not line.startswith("520 "):
                    raw = await self._readline()
                    if not raw:
                        raise asyncio.IncompleteReadError(b"", None)
                    line = decode(raw).rstrip("\r\n")
                    text.append(line)
                return Reply(520, "", None, None, "\n".join(text))
            try:
                return parse_reply(line)
            except AgiProtocolError:
                stray += 1
                log.warning("%s: ignoring a line that is not an AGI reply: %r", self.tag, line[:120])
                if stray > MAX_STRAY_LINES:
                    raise PbxError(f"{self.tag}: too many lines that are not AGI replies") from None

    async def close(self) -> None:
        self.closed = True
        if not self.transport.is_closing():
            self.transport.close()  # buffered output is still flushed; the protocol's connection_lost follows
