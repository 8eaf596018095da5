"""An asyncio outbound-socket server: FreeSWITCH's `socket host:port async full` connects here, one task
per call, routed to a flow by the channel variable `shopcall_flow` (or a last word after `async full` in
the socket application's argument, which FreeSWITCH ignores and shows us in the channel data).

Our own thin layer (see ../shared/docs/library-findings.md): genesis pulls ~45 packages, fixes its listen
backlog at 100 (sessions were lost under a burst) and its reader dies on one non-UTF-8 byte.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from agi.server import parse_allow, peer_allowed
from esl.protocol import Event
from esl.session import OutboundSession
from shopcall.call import CallEnded, PbxError

log = logging.getLogger("shopcall.esl")

# handler(session, channel) — esl.routes turns these into an EslCall and a flow
Handler = Callable[[OutboundSession, Event], Awaitable[None]]

FLOW_VARIABLE = "shopcall_flow"


def route_name(channel: Event) -> str:
    name = channel.var(FLOW_VARIABLE)
    if name:
        return name
    words = (channel.var("current_application_data") or "").split()
    extra = [w for w in words[1:] if w not in ("async", "full")]
    return extra[-1] if extra else ""


class EslServer:
    def __init__(
        self,
        routes: Mapping[str, Handler],
        *,
        host: str = "127.0.0.1",
        port: int = 8084,
        allow: Sequence[str] = (),
        command_timeout: float = 10.0,
        backlog: int = 2048,
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
            self._on_connect, self.host, self.port, backlog=self.backlog, reuse_address=True
        )
        sock = self.server.sockets[0].getsockname()
        self.port = sock[1]
        log.info("ESL outbound server listening on %s:%s (flows: %s)", sock[0], sock[1],
                 ", ".join(sorted(self.routes)))

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
        session = OutboundSession(reader, writer, command_timeout=self.command_timeout, tag=tag)
        try:
            if not peer_allowed(str(peer[0]), self.allow):
                log.warning("ESL: refused connection from %s (not in esl.allow)", tag)
                return
            channel = await session.connect()
            self.sessions_total += 1
            name = route_name(channel)
            handler = self.routes.get(name)
            if handler is None:
                # closing hands the call back to the dialplan (socket_resume), which rings the fallback
                log.error("%s: no flow %r (known: %s)", session.tag, name, ", ".join(sorted(self.routes)))
                return
            await handler(session, channel)
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
