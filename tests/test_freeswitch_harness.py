"""Proves the FreeSWITCH harness (tests/pbx/freeswitch.py) with real calls: SIPp -> FreeSWITCH -> the
directory's users (SIPp agents) and an outbound-socket server, as test_pbx_harness does for Asterisk.
Skipped when FreeSWITCH is not installed, unless SHOPCALL_REQUIRE_PBX is set (then that is a failure)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from esl.server import EslServer
from tests.pbx.freeswitch import FreeswitchError, FreeswitchPbx
from tests.pbx.sipp import SippAgent, free_sip_port, place_call
from tests.pbx.stack import require_pbx

pytestmark = pytest.mark.slow

DIALPLAN = """
<context name="public">
  <!-- ring-all through the directory: user/NAME reaches the SIPp phone playing NAME -->
  <extension name="ringall">
    <condition field="destination_number" expression="^200$">
      <action application="answer"/>
      <action application="set" data="call_timeout=10"/>
      <action application="bridge" data="user/agent1,user/agent2"/>
      <action application="hangup"/>
    </condition>
  </extension>
  <extension name="socket">
    <condition field="destination_number" expression="^300$">
      <action application="socket" data="127.0.0.1:{port} async full"/>
      <action application="hangup"/>
    </condition>
  </extension>
</context>
"""


@pytest.fixture(scope="module")
def fs(tmp_path_factory) -> Iterator[FreeswitchPbx]:
    require_pbx("freeswitch")
    agents = {"agent1": free_sip_port(), "agent2": free_sip_port()}
    with FreeswitchPbx(tmp_path_factory.mktemp("fs-harness"), agents=agents) as pbx:
        yield pbx


async def test_ring_all_through_the_directory_cancels_the_phone_that_lost(fs, tmp_path):
    fs.write_dialplan(DIALPLAN.format(port=1))
    fs.reload_dialplan()
    a1 = SippAgent("agent1", fs.agents["agent1"], work_dir=tmp_path, answer_after=0.5, hangup_after=1.0)
    a2 = SippAgent("agent2", fs.agents["agent2"], work_dir=tmp_path, answer_after=None)
    async with a1, a2:
        call = await place_call("200", pbx=f"127.0.0.1:{fs.sip_port}", work_dir=tmp_path, wait_bye=20)
        assert call.answered and call.hung_up_by == "pbx", fs.log_tail() + call.log_tail
        assert await a2.wait_for("CANCELLED") == 1, a2.log_tail()
        assert (a1.invites_received(), a1.answered(), a2.invites_received()) == (1, 1, 1)
    # the directory's presence_id is what shopcall reads to tell whose channel it is
    assert fs.api("user_data agent1@127.0.0.1 param dial-string").startswith(
        "{presence_id=${dialed_user}@${dialed_domain}}sofia/test/sip:agent1@127.0.0.1:")


async def test_a_key_pressed_by_sipp_reaches_an_outbound_socket_server(fs, tmp_path):
    seen: dict[str, object] = {}

    async def probe(session, channel):
        seen["caller"] = channel.get("Caller-Caller-ID-Number")
        await session.execute("answer", timeout=5)
        done = await session.execute(
            "play_and_get_digits", "1 1 1 5000 # silence_stream://250 silence_stream://250 probe_digit \\d 5000",
            timeout=10)
        seen["digit"] = done.var("probe_digit")
        await session.hangup("NORMAL_CLEARING")

    server = EslServer({"": probe}, port=0)
    await server.start()
    try:
        fs.write_dialplan(DIALPLAN.format(port=server.port))
        fs.reload_dialplan()
        call = await place_call("300", digits="7", pbx=f"127.0.0.1:{fs.sip_port}", work_dir=tmp_path, wait_bye=20)
    finally:
        await server.stop()
    assert call.answered and call.hung_up_by == "pbx", fs.log_tail() + call.log_tail
    assert seen == {"caller": "79161234567", "digit": "7"}  # RFC 2833 from SIPp's pcap


async def test_a_broken_dialplan_is_an_error_not_a_silent_reload(fs):
    fs.write_dialplan("<context name='public'><extension>")
    try:
        with pytest.raises(FreeswitchError):
            fs.reload_dialplan()
    finally:
        fs.write_dialplan(DIALPLAN.format(port=1))
        fs.reload_dialplan()


def test_two_instances_run_side_by_side_on_ports_of_their_own(fs, tmp_path):
    with FreeswitchPbx(tmp_path) as other:
        assert {other.sip_port, other.esl_port}.isdisjoint({fs.sip_port, fs.esl_port})
        assert "is ready" in other.api("status") and "is ready" in fs.api("status")
        assert other.startup_seconds is not None and other.startup_seconds < 15
    assert not other.running
