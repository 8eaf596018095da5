"""An asyncio FastAGI server: one task per call, routes by script name (agi://host:port/NAME?args).

Our own rather than panoramisk's: its server froze the event loop on a bare connect-and-close, lost reply
sync after HANGUP/511 and on 520 usage text, and dropped calls on non-UTF-8 caller names (see README, Notes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from agi.protocol import AgiProtocolError, Script, parse_header_lines, parse_script
from agi.session import AgiSession
from shopcall.listener import Listener, parse_allow, peer_allowed

__all__ = ["FastAgiServer", "Handler", "parse_allow", "peer_allowed"]  # allow-list helpers re-exported

log = logging.getLogger("shopcall.agi")

MAX_HEADER_LINES = 200
MAX_LINE = 16 * 1024
HEADER_TIMEOUT = 5.0

# handler(session, env, script) — the adapter layer (shopcall.serve) turns these into a Call and a flow
Handler = Callable[[AgiSession, dict[str, str], Script], Awaitable[None]]


class FastAgiServer(Listener):
    label = "FastAGI"
    allow_key = "agi.allow"
    line_limit = MAX_LINE

    def __init__(self, routes: Mapping[str, Handler], *, host: str = "127.0.0.1", port: int = 4573,
                 allow: Sequence[str] = (), command_timeout: float = 10.0, backlog: int = 1024) -> None:
        super().__init__(routes, host=host, port=port, allow=allow, command_timeout=command_timeout,
                         backlog=backlog)

    def open_session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tag: str) -> AgiSession:
        return AgiSession(reader, writer, command_timeout=self.command_timeout, tag=tag)

    async def serve(self, session: AgiSession) -> None:
        env = await self._read_env(session.reader, session.tag)
        if env is None:
            return
        self.sessions_total += 1
        session.tag = env.get("agi_uniqueid", session.tag)
        script = parse_script(env)
        handler = self.routes.get(script.name)
        if handler is None:
            log.error("%s: no handler for script %r (known: %s)", session.tag, script.name,
                      ", ".join(sorted(self.routes)))
            return  # the dialplan sees SHOPCALL_DONE unset and falls back
        await handler(session, env, script)

    async def _read_env(self, reader: asyncio.StreamReader, tag: str) -> dict[str, str] | None:
        """Read the agi_* block up to its blank line; anything else gets a log line and a closed socket.

        The block is read whole (one search for the blank line, not a read per line: a tenth of a short
        request's CPU). Its first bytes are read first, so a peer that is not Asterisk (an HTTP probe) is
        turned away at once instead of after the timeout. Asterisk ends lines with a bare LF."""
        head = b""
        try:
            async with asyncio.timeout(HEADER_TIMEOUT):
                head = await reader.readexactly(4)
                if head != b"agi_":
                    raise AgiProtocolError(f"header block does not start with agi_*: {head!r}")
                block = head + await reader.readuntil(b"\n\n")
            lines = block[:-2].split(b"\n")
            if len(lines) > MAX_HEADER_LINES:
                log.warning("FastAGI %s: header block longer than %d lines", tag, MAX_HEADER_LINES)
                return None
            return parse_header_lines(lines)
        except asyncio.IncompleteReadError as exc:
            if head or exc.partial:
                log.warning("FastAGI %s: connection closed inside the header block", tag)
            return None  # nothing at all: a bare connect-and-close (health check, port scan)
        except TimeoutError:
            log.warning("FastAGI %s: no complete header block within %.0f s", tag, HEADER_TIMEOUT)
        except (ValueError, asyncio.LimitOverrunError):
            log.warning("FastAGI %s: header block longer than %d bytes", tag, MAX_LINE)
        except AgiProtocolError as exc:
            log.warning("FastAGI %s: %s", tag, exc)
        except ConnectionError as exc:
            log.info("FastAGI %s: %s", tag, exc)
        return None
