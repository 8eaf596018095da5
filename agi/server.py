"""An asyncio FastAGI server: one task per call, routes by script name (agi://host:port/NAME?args).

Our own rather than panoramisk's: its server froze the event loop on a bare connect-and-close, lost reply
sync after HANGUP/511 and on 520 usage text, and dropped calls on non-UTF-8 caller names (see README, Notes).
A Protocol, not streams: the bytes are split here, in one place, and the call's task only awaits lines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import cast

from agi.protocol import AgiProtocolError, Script, parse_header_lines, parse_script
from agi.session import AgiSession
from shopcall.listener import Listener, parse_allow, peer_allowed

__all__ = ["FastAgiServer", "Handler", "parse_allow", "peer_allowed"]  # allow-list helpers re-exported

log = logging.getLogger("shopcall.agi")

MAX_HEADER_LINES = 200
MAX_LINE = 16 * 1024  # the header block, or one reply line, longer than this is not Asterisk
HEADER_TIMEOUT = 5.0

# handler(session, env, script) — the adapter layer (shopcall.serve) turns these into a Call and a flow
Handler = Callable[[AgiSession, dict[str, str], Script], Awaitable[None]]


class FastAgiServer(Listener):
    label = "FastAGI"
    allow_key = "agi.allow"

    def __init__(self, routes: Mapping[str, Handler], *, host: str = "127.0.0.1", port: int = 4573,
                 allow: Sequence[str] = (), command_timeout: float = 10.0, backlog: int = 1024) -> None:
        super().__init__(routes, host=host, port=port, allow=allow, command_timeout=command_timeout,
                         backlog=backlog)

    async def _listen(self) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _AgiProtocol(self), self.host, self.port, backlog=self.backlog,
                                        reuse_address=True)

    async def route(self, session: AgiSession, env: dict[str, str]) -> None:
        self.sessions_total += 1
        session.tag = env.get("agi_uniqueid", session.tag)
        script = parse_script(env)
        handler = self.routes.get(script.name)
        if handler is None:
            log.error("%s: no handler for script %r (known: %s)", session.tag, script.name,
                      ", ".join(sorted(self.routes)))
            return  # the dialplan sees SHOPCALL_DONE unset and falls back
        await handler(session, env, script)


class _AgiProtocol(asyncio.Protocol):
    """One connection: the agi_* header block, then reply lines handed to the session. Anything that is not
    FastAGI gets a log line and a closed socket; nothing else breaks."""

    def __init__(self, server: FastAgiServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.session: AgiSession | None = None  # set once the connection is admitted
        self.header_timer: asyncio.TimerHandle | None = None
        self.in_header = True
        self.tag = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.tag = f"{peer[0]}:{peer[1]}"
        if not self.server.admits(peer, self.tag):
            self.transport.close()
            return
        self.session = AgiSession(self.transport, command_timeout=self.server.command_timeout, tag=self.tag)
        self.header_timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT, self._header_timeout)

    def data_received(self, data: bytes) -> None:
        if self.session is None:
            return
        self.buf += data
        if self.in_header and not self._header():
            return
        start = 0
        while (end := self.buf.find(b"\n", start)) >= 0:
            self.session.feed_line(bytes(self.buf[start:end + 1]))
            start = end + 1
        del self.buf[:start]
        if len(self.buf) > MAX_LINE:
            log.warning("FastAGI %s: a line longer than %d bytes", self.session.tag, MAX_LINE)
            self.session.feed_eof()
            self.transport.abort()

    def _header(self) -> bool:
        """True once the block is complete and its call started (the rest of the buffer is reply lines).
        The block is found in one search for its blank line (Asterisk ends lines with a bare LF); its
        first bytes are checked at once, so an HTTP probe is turned away without waiting."""
        if len(self.buf) >= 4 and not self.buf.startswith(b"agi_"):
            return self._refuse(f"header block does not start with agi_*: {bytes(self.buf[:80])!r}")
        end = self.buf.find(b"\n\n")
        if end < 0 or end > MAX_LINE:
            if len(self.buf) > MAX_LINE:
                return self._refuse(f"header block longer than {MAX_LINE} bytes")
            return False
        lines = bytes(self.buf[:end]).split(b"\n")
        del self.buf[:end + 2]
        if len(lines) > MAX_HEADER_LINES:
            return self._refuse(f"header block longer than {MAX_HEADER_LINES} lines")
        try:
            env = parse_header_lines(lines)
        except AgiProtocolError as exc:
            return self._refuse(str(exc))
        self.in_header = False
        self._cancel_timer()
        assert self.session is not None
        asyncio.get_running_loop().create_task(
            self.server.run_session(self.session, self.server.route(self.session, env)))
        return True

    def _refuse(self, why: str) -> bool:
        log.warning("FastAGI %s: %s", self.tag, why)
        self._cancel_timer()
        self.transport.abort()
        self.session = None
        return False

    def _header_timeout(self) -> None:
        log.warning("FastAGI %s: no complete header block within %.0f s", self.tag, HEADER_TIMEOUT)
        self.header_timer = None
        self.transport.abort()

    def _cancel_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def eof_received(self) -> bool:
        if self.in_header:
            if self.session is not None and self.buf:
                log.warning("FastAGI %s: connection closed inside the header block", self.tag)
            self._cancel_timer()
            return False  # close: a bare connect-and-close (health check, port scan) says nothing
        if self.session is not None:
            self.session.feed_eof()
        return True  # keep our side open: the flow may still be writing (dead-channel commands)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self.session is not None:
            self.session.feed_eof()
