"""Calls that fell back to the rendered dialplan's own ring on FreeSWITCH, recorded at their hangup.

On Asterisk the fallback path pushes a hangup handler that reports the call over FastAGI. FreeSWITCH has
no dialplan step that runs after the caller hangs up and reaches us, but it announces every hangup on its
inbound event socket: the rendered fallback extension names the flow (`shopcall_flow=fallback`, with
`shopcall_arg_flow_dial`, the flow's own dial status), and the channel's CHANNEL_HANGUP_COMPLETE carries
those variables with the fallback bridge's outcome (`originate_disposition`, `DIALSTATUS`, the bridge and
hangup times, the other leg). Our client (freeswitch.report_fallback) turns that event into a call that has
already ended and runs the same `fallback` flow as on Asterisk.

Like the Asterisk report, it needs us to be up when the call ends: a hangup while we are not connected to
FreeSWITCH's event socket is only in FreeSWITCH's own CDR.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Mapping
from pathlib import Path

from esl.call import AGENT_VARIABLE, bridge_status, talk_seconds
from esl.client import open_event_socket
from esl.protocol import Event
from esl.routes import call_info
from shopcall.app import App
from shopcall.call import (
    Call,
    CallEnded,
    CallInfo,
    DialResult,
    DialStatus,
    RecordResult,
    SoundSource,
    is_endpoint,
)
from shopcall.flows import Flow

log = logging.getLogger("shopcall.esl.fallback")

FLOW = "fallback"  # the rendered fallback extension sets shopcall_flow to this
AGENT_LEGS_KEPT = 4096  # agents' legs remembered until their caller's channel hangs up


class HungUpCall(Call):
    """A channel that has hung up, as its CHANNEL_HANGUP_COMPLETE describes it. The fallback flow only
    reads it (`last_dial`, `get_var`); a verb that would act on the channel raises CallEnded."""

    def __init__(self, event: Event, info: CallInfo, sounds: SoundSource,
                 agents: Mapping[str, str] | None = None) -> None:
        super().__init__(info, sounds)
        self.event = event
        self.agents = agents or {}  # leg uuid -> agent, from the hangups of agents' legs
        self.ended = True

    async def last_dial(self) -> DialResult:
        """The outcome of the bridge that ran last: the fallback's, or the flow's when our process died
        during it (the bridge went on without us). The dialplan unsets the flow's bridge variables before the
        fallback bridges, so none left means no bridge ran (the group had no members). Who answered: the
        answering leg (last_bridge_to) as its own hangup named it (shopcall_agent on the flow's legs,
        dialed_user on user/ legs), else the other leg's destination number (`user/agent1`), if either is
        an endpoint name."""
        ev = self.event
        disposition, status = bridge_status(ev)
        if status != DialStatus.ANSWERED:
            return DialResult(status, None, 0.0, disposition)
        other = self.agents.get(ev.var("last_bridge_to") or "") or ev.get("Other-Leg-Destination-Number")
        return DialResult(status, other if is_endpoint(other) else None, talk_seconds(ev), disposition)

    async def get_var(self, name: str) -> str | None:
        return self.event.var(name)

    async def _gone(self):
        raise CallEnded(f"{self.info.uniqueid} has hung up: this is its hangup report")

    async def answer(self) -> None:
        await self._gone()

    async def stream(self, sound: Path, *, escape: str = "") -> str | None:
        return await self._gone()

    async def collect(self, sound: Path | None, *, max_digits: int, timeout: float) -> str | None:
        return await self._gone()

    async def ring(self, names, *, strategy, timeout, caller_name, caller_number=None) -> DialResult:
        return await self._gone()

    async def busy(self, names: list[str]) -> frozenset[str]:
        return await self._gone()

    async def record(self, path: Path, *, max_seconds: int = 120, silence_seconds: int = 5,
                     beep: bool = True) -> RecordResult:
        return await self._gone()

    async def set_var(self, name: str, value: str) -> None:
        await self._gone()

    async def hangup(self, cause: str = "normal") -> None:
        return None  # it has


class FallbackReports:
    """An event listener for EslClient: each CHANNEL_HANGUP_COMPLETE of a channel the rendered fallback
    extension rang runs the fallback flow, as a task of its own (the event reader must not wait on the
    database)."""

    def __init__(self, app: App, flow: Flow) -> None:
        self.app = app
        self.flow = flow
        self.tasks: set[asyncio.Task[None]] = set()
        self.reported = 0
        # the agents' legs that hung up lately, uuid -> agent: an agent's leg ends before the caller's
        self.agents: collections.OrderedDict[str, str] = collections.OrderedDict()

    def __call__(self, ev: Event) -> None:
        if ev.name != "CHANNEL_HANGUP_COMPLETE":
            return
        agent = ev.var(AGENT_VARIABLE) or ev.var("dialed_user")
        if agent:
            self.agents[ev.get("Unique-ID")] = agent
            while len(self.agents) > AGENT_LEGS_KEPT:
                self.agents.popitem(last=False)
        if ev.var("shopcall_flow") != FLOW:
            return
        task = asyncio.create_task(self._report(ev), name=f"fallback-report-{ev.get('Unique-ID')}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _report(self, ev: Event) -> None:
        call = HungUpCall(ev, call_info(ev, FLOW), self.app.prompts, self.agents)
        try:
            await self.flow(call, self.app)  # a database that is down spools the row (calllog)
            self.reported += 1
        except Exception:
            log.exception("%s: the fallback report failed", call.info.uniqueid)

    async def drain(self, timeout: float = 10.0) -> None:
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)


async def serve_fallback_reports(app: App, flow: Flow) -> None:
    """Listen on FreeSWITCH's inbound event socket for calls that fell back, until cancelled."""
    reports = FallbackReports(app, flow)
    client = await open_event_socket(app.config, "fallback reports", events=("CHANNEL_HANGUP_COMPLETE",),
                                     listeners=[reports])
    try:
        await asyncio.Event().wait()
    finally:
        await client.close()
        await reports.drain()
