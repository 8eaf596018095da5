"""Proves the real-PBX harness (tests/pbx) with real calls: SIPp -> Asterisk -> FastAGI / SIPp agents.

Self-contained on purpose (no shopcall imports). Skipped when the Asterisk root is missing, unless
SHOPCALL_REQUIRE_PBX is set (then that is a failure).
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.pbx import (
    DEFAULT_ROOT,
    AsteriskPbx,
    CallResult,
    SippAgent,
    free_sip_port,
    place_call,
    require_asterisk_root,
)

pytestmark = pytest.mark.slow

DIALPLAN = """\
[test-in]
; (1) probe: ANSWER, GET DATA, SET VARIABLE over FastAGI, then the agent
exten => _X.,1,AGI(agi://127.0.0.1:{agi_port}/probe)
 same => n,Verbose(1,probe RESULT=${{RESULT}})
 same => n,Dial(PJSIP/agent1,10)
 same => n,Hangup()
; (4) ring-all
exten => 200,1,Answer()
 same => n,Dial(PJSIP/agent1&PJSIP/agent2,10)
 same => n,Hangup()
; (2), (3) the caller name as the AGI sees it; X-Shopcall-Test-Name (percent-encoded) overrides it
exten => 300,1,GotoIf($["${{PJSIP_HEADER(read,X-Shopcall-Test-Name)}}" = ""]?agi)
 same => n,Set(CALLERID(name)=${{URIDECODE(${{PJSIP_HEADER(read,X-Shopcall-Test-Name)}})}})
 same => n(agi),AGI(agi://127.0.0.1:{agi_port}/env)
 same => n,Hangup()
"""


@pytest.fixture(scope="session")
def pbx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsteriskPbx]:
    require_asterisk_root()
    agents = {"agent1": free_sip_port(), "agent2": free_sip_port()}
    work = tmp_path_factory.mktemp("pbx")
    # sip_port/ami_port None: the first free ones from 5060/5038 on (other sessions may run a PBX too).
    with AsteriskPbx(DEFAULT_ROOT, work, sip_port=None, ami_port=None, agents=agents) as p:
        yield p


@dataclass
class AgiRequest:
    raw: bytes  # the header block exactly as received, up to and including the blank line
    env: dict[str, str]
    replies: list[str] = field(default_factory=list)
    digits: str = ""


class ProbeAgi:
    """A tiny FastAGI server: `probe` answers, reads one digit and sets RESULT; `env` answers only."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue[AgiRequest] = asyncio.Queue()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    async def next_request(self, timeout: float = 20) -> AgiRequest:
        return await asyncio.wait_for(self.requests.get(), timeout)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = bytearray()
        while True:
            line = await reader.readline()
            raw += line
            if line in (b"\n", b"\r\n", b""):
                break
        env = {}
        for line in raw.decode("utf-8", "replace").split("\n"):
            key, sep, value = line.partition(": ")
            if sep and key.startswith("agi_"):
                env[key] = value
        req = AgiRequest(bytes(raw), env)

        async def command(text: str) -> str:
            writer.write(text.encode() + b"\n")
            await writer.drain()
            reply = (await reader.readline()).decode("utf-8", "replace").strip()
            req.replies.append(reply)
            return reply

        try:
            await command("ANSWER")
            if env.get("agi_network_script") == "probe":
                reply = await command("GET DATA beep 3000 1")
                req.digits = reply.split("result=", 1)[1].split(" ", 1)[0] if "result=" in reply else ""
            await command(f'SET VARIABLE RESULT "{req.digits}"')
        finally:
            writer.close()
            await self.requests.put(req)


@pytest.fixture
async def agi(pbx: AsteriskPbx) -> AsyncIterator[ProbeAgi]:
    server = ProbeAgi()
    await server.start()
    pbx.write_dialplan(DIALPLAN.format(agi_port=server.port))
    pbx.reload_dialplan()
    yield server
    await server.stop()


def _why(pbx: AsteriskPbx, call: CallResult, *agents: SippAgent) -> str:
    parts = [f"call: {call}", pbx.log_tail(60), *(a.log_tail(30) for a in agents)]
    return "\n".join(parts)


async def _call(pbx: AsteriskPbx, work: Path, to: str, **kw: object) -> CallResult:
    return await place_call(to, pbx=f"127.0.0.1:{pbx.sip_port}", work_dir=work, wait_bye=20, **kw)  # type: ignore[arg-type]


async def test_call_with_digit_reaches_agi_and_agent(pbx: AsteriskPbx, agi: ProbeAgi, tmp_path: Path) -> None:
    agent = SippAgent("agent1", pbx.agents["agent1"], work_dir=tmp_path, answer_after=1.0, hangup_after=1.0)
    async with agent:
        call = await _call(pbx, tmp_path, "100", digits="2")
        req = await agi.next_request()
        await agent.wait_for("HANGUP")
    why = _why(pbx, call, agent)
    assert req.env["agi_callerid"] == "79161234567", why
    assert req.env["agi_dnid"] == "100", why
    assert req.digits == "2", (req.replies, why)
    assert req.replies[-1] == "200 result=1", why
    assert (agent.invites_received(), agent.answered()) == (1, 1), why
    assert call.ok and call.hung_up_by == "pbx", why


@pytest.mark.parametrize(
    ("via", "name"),
    [("from", 'Иван "Ваня" Петров'), ("pai", 'Иван "Ваня" Петров'), ("from", "Shop [x] \\ ]]> «Ёж»")],
)
async def test_cyrillic_display_name_with_quotes(
    pbx: AsteriskPbx, agi: ProbeAgi, tmp_path: Path, via: str, name: str
) -> None:
    if via == "from":
        call = await _call(pbx, tmp_path, "300", display_name=name)
    else:  # trust_id_inbound: P-Asserted-Identity wins over From
        call = await _call(pbx, tmp_path, "300", display_name="From Header", pai_display_name=name)
    req = await agi.next_request()
    why = _why(pbx, call)
    assert call.ok and call.hung_up_by == "pbx", why
    # The UTF-8 bytes arrive intact, but Asterisk's PJSIP copies the display name without undoing the
    # RFC 3261 quoted-pair escapes (res_pjsip_caller_id set_id_from_hdr): agi_calleridname is what stood
    # between the SIP quotes, e.g. Иван \"Ваня\" Петров.
    on_the_wire = name.replace("\\", "\\\\").replace('"', '\\"')
    assert req.env["agi_calleridname"] == on_the_wire, why
    assert f"agi_calleridname: {on_the_wire}\n".encode() in req.raw, why


async def test_name_with_newline_via_header(pbx: AsteriskPbx, agi: ProbeAgi, tmp_path: Path) -> None:
    name = "Иван\nПетров"
    header = urllib.parse.quote(name.encode("utf-8"), safe="")
    call = await _call(pbx, tmp_path, "300", extra_headers={"X-Shopcall-Test-Name": header})
    req = await agi.next_request()
    why = _why(pbx, call)
    assert call.ok, why
    # res_agi writes the name raw: the newline splits the header block into a line without "agi_".
    assert "agi_calleridname: Иван\nПетров\nagi_".encode() in req.raw, req.raw
    assert req.env["agi_calleridname"] == "Иван", req.raw
    assert req.env["agi_callerid"] == "79161234567", req.raw


async def test_ring_all_cancels_the_agent_who_did_not_answer(
    pbx: AsteriskPbx, agi: ProbeAgi, tmp_path: Path
) -> None:
    agent1 = SippAgent("agent1", pbx.agents["agent1"], work_dir=tmp_path, answer_after=1.0, hangup_after=1.0)
    agent2 = SippAgent("agent2", pbx.agents["agent2"], work_dir=tmp_path, answer_after=None)
    async with agent1, agent2:
        call = await _call(pbx, tmp_path, "200")
        await agent2.wait_for("CANCELLED")
        await agent1.wait_for("HANGUP")
    why = _why(pbx, call, agent1, agent2)
    assert call.ok and call.hung_up_by == "pbx", why
    assert (agent1.invites_received(), agent1.answered(), agent1.cancelled()) == (1, 1, 0), why
    assert (agent2.invites_received(), agent2.answered(), agent2.cancelled()) == (1, 0, 1), why
