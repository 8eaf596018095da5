"""One end-to-end stack on either PBX: the PBX (Asterisk in its root, or FreeSWITCH), `shopcall serve` as a
process (`--only agi` or `--only esl`), the test directory in PostgreSQL, the rendered dialplan and the
test's entry context: every SIP end-to-end test module runs on both, parametrised by PBXES.

    @pytest.fixture(scope="module", params=PBXES)
    def stack(request, pg_url, tmp_path_factory):
        with pbx_stack(request.param, tmp_path_factory.mktemp("e2e"), pg_url, agents=("agent1",),
                       sections="[inbound]\\nring_timeout = 6") as s:
            yield s

The entry context (test-in on Asterisk, public on FreeSWITCH) sends every number to shopcall's inbound
context, as a PBX admin's trunk context would; on the way it may set the caller's name from the header
X-Shopcall-Test-Name (percent-encoded: SIP cannot carry a newline in a display name, a carrier's garbage can
reach the name anyway), and a call From an agent's name to *71..*74 is that agent's phone (Asterisk:
PJSIP identifies the endpoint by user name; FreeSWITCH: the test context sets user_name, as its registrar
does for an authenticated phone).

The stack writes the PBX's own sections of shopcall.toml (AMI, or the event sockets and fallback reports);
a test adds the rest with `sections` and must not repeat [asterisk], [freeswitch] or [esl]. `trunk` names
the agent phone that plays the operator's trunk: the customers a flow dials reach it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shopcall.config import Config, load_config

from .asterisk import DEFAULT_ROOT, AsteriskPbx, root_is_ready
from .freeswitch import PREFIX, FreeswitchPbx, freeswitch_is_installed
from .service import Shopcall, free_tcp_port, prepare_shopcall, running
from .sipp import free_sip_port

PBXES = ("asterisk", "freeswitch")
FS_CONTEXT = "shopcall"  # freeswitch.context: the rendered XML's inbound context


def require_pbx(kind: str) -> None:
    """Skip a PBX test when that PBX is not installed here, but fail it when SHOPCALL_REQUIRE_PBX is set
    (CI, tests/run.sh): there, a missing PBX must never pass as a skip."""
    if kind == "asterisk":
        ready, how = root_is_ready(DEFAULT_ROOT), f"no Asterisk root at {DEFAULT_ROOT}: run " \
                                                  f"scripts/build-asterisk-root.sh {DEFAULT_ROOT}"
    else:
        ready, how = freeswitch_is_installed(), f"no FreeSWITCH at {PREFIX}: tests/run.sh installs it " \
                                                f"from ../shared/freeswitch"
    if ready:
        return
    if os.environ.get("SHOPCALL_REQUIRE_PBX"):
        pytest.fail(how + " (SHOPCALL_REQUIRE_PBX is set)")
    pytest.skip(how)


@dataclass
class Stack:
    kind: str  # "asterisk" | "freeswitch"
    pbx: AsteriskPbx | FreeswitchPbx
    app: Shopcall
    data: Path  # shopcall's data dir (sounds, recordings)
    work: Path
    url: str  # PostgreSQL
    include: Path  # the rendered dialplan

    @property
    def sip(self) -> str:
        return f"127.0.0.1:{self.pbx.sip_port}"

    @property
    def config_path(self) -> Path:
        return self.work / "shopcall.toml"

    def config(self, **replace) -> Config:
        """The serve's configuration as a test process would load it, with sections replaced."""
        return dataclasses.replace(load_config(self.config_path), **replace)

    def log(self) -> str:
        return self.pbx.full_log.read_text(errors="replace")

    def explain(self, *phones, lines: int = 40) -> str:
        return "\n".join(["--- shopcall log", self.app.log_tail(lines), f"--- {self.kind} log",
                          self.pbx.log_tail(lines), *[p.log_tail(20) for p in phones]])

    @contextlib.asynccontextmanager
    async def agent_phones(self, config: Config | None = None) -> AsyncIterator:
        """The PBX's AgentPhones (is an agent's phone free, ring it for a callback, its state for the live
        view) over a link of its own: AMI on Asterisk, the inbound event socket on FreeSWITCH."""
        config = config or self.config()
        if self.kind == "asterisk":
            from agi.agent_phones import AsteriskAgentPhones
            from agi.ami import open_ami

            link = await open_ami(config, "test")
            phones = AsteriskAgentPhones(link, config)
        else:
            from esl.agent_phones import FreeswitchAgentPhones
            from esl.client import open_event_socket

            link = await open_event_socket(config, "test")
            phones = FreeswitchAgentPhones(link, config)
        try:
            yield phones
        finally:
            await link.close()

    def trunk_template(self, phone: str) -> str:
        """The dial string of a customer's number through the agent phone `phone` playing a trunk."""
        if self.kind == "asterisk":
            return f"PJSIP/{{number}}@{phone}"
        return f"sofia/test/sip:{{number}}@127.0.0.1:{self.pbx.agents[phone]}"


def pbx_sections(kind: str, pbx: AsteriskPbx | FreeswitchPbx, port: int, trunk: str | None) -> str:
    if kind == "asterisk":
        assert isinstance(pbx, AsteriskPbx)
        return f"""
[asterisk]
ami_port = {pbx.ami_port}
ami_user = "{pbx.ami_user}"
ami_secret = "{pbx.ami_secret}"
trunk_template = "PJSIP/{{number}}@{trunk or 'trunk'}"
"""
    assert isinstance(pbx, FreeswitchPbx)
    trunk_port = pbx.agents.get(trunk or "", 9)
    return f"""
[esl]
port = {port}
[freeswitch]
esl_port = {pbx.esl_port}
esl_password = "{pbx.esl_password}"
context = "{FS_CONTEXT}"
report_fallback = true
dialler_enabled = true  # as AMI lets a dialler dial on Asterisk: `serve --only dialler` dials here
trunk_template = "sofia/test/sip:{{number}}@127.0.0.1:{trunk_port}"
"""


def entry_dialplan(kind: str, include: Path) -> str:
    if kind == "asterisk":
        return f"""
[test-in]
exten => _X.,1,GotoIf($["${{PJSIP_HEADER(read,X-Shopcall-Test-Name)}}" = ""]?go)
 same => n,Set(CALLERID(name)=${{URIDECODE(${{PJSIP_HEADER(read,X-Shopcall-Test-Name)}})}})
 same => n(go),Goto(shopcall-inbound,${{EXTEN}},1)

; where the agents' phones dial from
[test-agents]
include => shopcall-agents

#include "{include}"
"""
    return f"""
<context name="public">
  <!-- an agent's phone (From its name) dialling a feature code: the registrar would set user_name -->
  <extension name="test-agent-codes">
    <condition field="caller_id_number" expression="^(agent\\d+)$"/>
    <condition field="destination_number" expression="^\\*7[1-4]$">
      <action application="set" data="user_name=${{caller_id_number}}"/>
      <action application="transfer" data="${{destination_number}} XML {FS_CONTEXT}-agents"/>
    </condition>
  </extension>
  <extension name="test-caller-name" continue="true">
    <condition field="${{sip_h_X-Shopcall-Test-Name}}" expression="^.+$">
      <action application="set_profile_var" data="caller_id_name=${{url_decode(${{sip_h_X-Shopcall-Test-Name}})}}"/>
    </condition>
  </extension>
  <extension name="test-in">
    <condition field="destination_number" expression="^(\\+?\\d+)$">
      <action application="transfer" data="$1 XML {FS_CONTEXT}"/>
    </condition>
  </extension>
</context>
"""


@contextlib.contextmanager
def pbx_stack(kind: str, work: Path, pg_url: str, *, agents: Iterable[str] = (), sections: str = "",
              directories: tuple[Path, ...] = (), trunk: str | None = None, dialplan: str = "",
              rtp_ports: tuple[int, int] | None = None, sip_debug: bool = True) -> Iterator[Stack]:
    """Start the stack (see the module docstring); `dialplan` is more of the entry context's PBX's own
    text (Asterisk contexts, or FreeSWITCH XML contexts)."""
    require_pbx(kind)
    phones = {name: free_sip_port() for name in agents}
    port = free_tcp_port()
    pbx: AsteriskPbx | FreeswitchPbx
    if kind == "asterisk":
        pbx = AsteriskPbx(DEFAULT_ROOT, work, sip_port=None, ami_port=None, binds=[work / "shopcall"],
                          agents=phones, sip_debug=sip_debug, **({"rtp_ports": rtp_ports} if rtp_ports else {}))
        pbx._pick_ports()  # the configuration below needs the AMI port before Asterisk starts
    else:
        pbx = FreeswitchPbx(work, agents=phones, sip_debug=sip_debug, rtp_ports=rtp_ports)
    app, data, include = prepare_shopcall(work, pg_url, port, pbx_sections(kind, pbx, port, trunk) + sections,
                                          directories=directories, pbx=kind)
    if kind == "asterisk":
        pbx.write_dialplan(entry_dialplan(kind, include) + dialplan)
    else:
        assert isinstance(pbx, FreeswitchPbx)
        pbx.includes = [include]
        pbx.write_dialplan(entry_dialplan(kind, include) + dialplan)
    with running(app, pbx):
        yield Stack(kind, pbx, app, data, work, pg_url, include)
