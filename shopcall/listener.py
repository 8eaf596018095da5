"""What both PBX servers share: the listening socket, the allow-list, one task per call, a graceful stop.
The FastAGI server (agi/) and the event socket server (esl/) only say how a session starts and is routed."""

from __future__ import annotations

import abc
import asyncio
import ipaddress
import logging
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

from shopcall.call import CallEnded, PbxError

log = logging.getLogger("shopcall.listener")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow(entries: Sequence[str]) -> list[Network]:
    return [ipaddress.ip_network(e, strict=False) for e in entries]


def peer_allowed(host: str, allow: Sequence[Network]) -> bool:
    """Loopback always; anything else only from a network on the allow-list."""
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if addr.is_loopback:
        return True
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr in net for net in allow if net.version == addr.version)


class Listener(abc.ABC):
    label = "server"  # for the logs: "FastAGI", "ESL outbound server"
    allow_key = "allow"  # the configuration key an admin would change

    def __init__(
        self,
        routes: Mapping[str, Any],
        *,
        host: str,
        port: int,
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
        self.server = await self._listen()
        sock = self.server.sockets[0].getsockname()
        self.port = sock[1]
        log.info("%s listening on %s:%s (flows: %s)", self.label, sock[0], sock[1], ", ".join(sorted(self.routes)))

    @abc.abstractmethod
    async def _listen(self) -> asyncio.Server:
        """Open the listening socket; each admitted connection runs its call through run_session."""

    async def stop(self, grace: float = 5.0) -> None:
        """Stop listening; calls in progress get `grace` seconds to finish."""
        if self.server:
            self.server.close()
            await self.server.wait_closed()
        if self.active:
            _, pending = await asyncio.wait(self.active, timeout=grace)
            for task in pending:
                task.cancel()

    def admits(self, peer: Any, tag: str) -> bool:
        if peer_allowed(str(peer[0]), self.allow):
            return True
        log.warning("%s: refused connection from %s (not in %s)", self.label, tag, self.allow_key)
        return False

    async def run_session(self, session: Any, work: Coroutine[Any, Any, None]) -> None:
        """Run one call's work as a tracked task: how it ended goes to the log, the session is closed."""
        task = asyncio.current_task()
        if task:
            self.active.add(task)
        try:
            await work
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
