"""An asyncio FastAGI server: one task per call, routes by script name (agi://host:port/NAME?args).

Our own rather than panoramisk's: its server froze the event loop on a bare connect-and-close, lost reply
sync after HANGUP/511 and on 520 usage text, and dropped calls on non-UTF-8 caller names (see README, Notes).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from agi.protocol import AgiProtocolError, Script, parse_header_lines, parse_script
from agi.session import AgiSession
from shopcall.call import CallEnded, PbxError

log = logging.getLogger("shopcall.agi")

MAX_HEADER_LINES = 200
MAX_LINE = 16 * 1024
HEADER_TIMEOUT = 5.0

# handler(session, env, script) — the adapter layer (shopcall.serve) turns these into a Call and a flow
Handler = Callable[[AgiSession, dict[str, str], Script], Awaitable[None]]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow(entries: Sequence[str]) -> list[Network]:
    return [ipaddress.ip_network(e, strict=False) for e in entries]


def peer_allowed(host: str, allow: Sequence[Network]) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if addr.is_loopback:
        return True
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr in net for net in allow if net.version == addr.version)


class FastAgiServer:
    def __init__(
        self,
        routes: Mapping[str, Handler],
        *,
        host: str = "127.0.0.1",
        port: int = 4573,
        allow: Sequence[str] = (),
        command_timeout: float = 10.0,
        backlog: int = 1024,
    ) -> None:
        self.routes = dict(routes)
        self.host = host
        self.port = port
        self.allow = parse_allow(allow)
        self.command_timeout = command_timeout
        self.backlog = backlog
        self.server: asyncio.Server | None = None
        self.active: set[asyncio.Task] = set()
        self.sessions_total = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._on_connect, self.host, self.port, backlog=self.backlog, limit=MAX_LINE, reuse_address=True
        )
        sock = self.server.sockets[0].getsockname()
        self.port = sock[1]
        log.info("FastAGI listening on %s:%s (routes: %s)", sock[0], sock[1], ", ".join(sorted(self.routes)))

    async def stop(self, grace: float = 5.0) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()
        if self.active:
            _, pending = await asyncio.wait(self.active, timeout=grace)
            for task in pending:
                task.cancel()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task:
            self.active.add(task)
        peer = writer.get_extra_info("peername") or ("?", 0)
        tag = f"{peer[0]}:{peer[1]}"
        session = AgiSession(reader, writer, command_timeout=self.command_timeout, tag=tag)
        try:
            if not peer_allowed(str(peer[0]), self.allow):
                log.warning("FastAGI: refused connection from %s (not in agi.allow)", tag)
                return
            env = await self._read_env(reader, tag)
            if env is None:
                return
            self.sessions_total += 1
            session.tag = env.get("agi_uniqueid", tag)
            script = parse_script(env)
            handler = self.routes.get(script.name)
            if handler is None:
                log.error("%s: no handler for script %r (known: %s)", session.tag, script.name,
                          ", ".join(sorted(self.routes)))
                return  # the dialplan sees SHOPCALL_DONE unset and falls back
            await handler(session, env, script)
        except CallEnded as exc:
            log.info("%s: call ended: %s", session.tag, exc)
        except PbxError as exc:
            log.error("%s: %s", session.tag, exc)
        except Exception:
            log.exception("%s: handler failed", session.tag)
        finally:
            await session.close()
            if task:
                self.active.discard(task)

    async def _read_env(self, reader: asyncio.StreamReader, tag: str) -> dict[str, str] | None:
        """Read the agi_* block up to its blank line; anything else gets a log line and a closed socket."""
        lines: list[bytes] = []
        try:
            async with asyncio.timeout(HEADER_TIMEOUT):
                while True:
                    line = await reader.readline()
                    if not line:
                        if lines:
                            log.warning("FastAGI %s: connection closed inside the header block", tag)
                        return None  # a bare connect-and-close (health check, port scan)
                    if line in (b"\n", b"\r\n"):
                        break
                    lines.append(line)
                    if len(lines) > MAX_HEADER_LINES:
                        log.warning("FastAGI %s: header block longer than %d lines", tag, MAX_HEADER_LINES)
                        return None
            return parse_header_lines(lines)
        except TimeoutError:
            log.warning("FastAGI %s: no complete header block within %.0f s", tag, HEADER_TIMEOUT)
        except (ValueError, asyncio.LimitOverrunError):
            log.warning("FastAGI %s: header line longer than %d bytes", tag, MAX_LINE)
        except AgiProtocolError as exc:
            log.warning("FastAGI %s: %s", tag, exc)
        except ConnectionError as exc:
            log.info("FastAGI %s: %s", tag, exc)
        return None
