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

from esl.protocol import Event
from esl.session import OutboundSession
from shopcall.listener import Listener

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


class EslServer(Listener):
    label = "ESL outbound server"
    allow_key = "esl.allow"

    def __init__(self, routes: Mapping[str, Handler], *, host: str = "127.0.0.1", port: int = 8084,
                 allow: Sequence[str] = (), command_timeout: float = 10.0, backlog: int = 2048) -> None:
        super().__init__(routes, host=host, port=port, allow=allow, command_timeout=command_timeout,
                         backlog=backlog)

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._on_connect, self.host, self.port, backlog=self.backlog,
                                          reuse_address=True)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        tag = f"{peer[0]}:{peer[1]}"
        session = OutboundSession(reader, writer, command_timeout=self.command_timeout, tag=tag)
        if not self.admits(peer, tag):
            await session.close()
            return
        await self.run_session(session, self.serve(session))

    async def serve(self, session: OutboundSession) -> None:
        channel = await session.connect()
        self.sessions_total += 1
        name = route_name(channel)
        handler = self.routes.get(name)
        if handler is None:
            # closing hands the call back to the dialplan after `socket`, which rings the fallback
            log.error("%s: no flow %r (known: %s)", session.tag, name, ", ".join(sorted(self.routes)))
            return
        await handler(session, channel)
