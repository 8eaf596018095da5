"""The test agent (tests/sipp/uas_agent.xml on a real SIPp) against a PBX that retransmits its INVITE.

Asterisk retransmits an INVITE when it is too busy to take the agent's 200 within 500 ms. SIPp 3.6 aborts
a call on such a retransmission once it has sent a second reply (the 200 after the 180), and the PBX's leg
then stays up until the caller's own BYE timeout: the "cliff" that made bench/e2e_ratio.py's readings
noise, and a flake waiting for any e2e test under load. Here the PBX side is a UDP socket speaking SIP by
hand, so the retransmission comes exactly where it hurts; SIPp is the real one the e2e tests use.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

from tests.pbx import SippAgent, free_sip_port

pytestmark = pytest.mark.skipif(shutil.which("sipp") is None, reason="SIPp (Debian sip-tester) is not installed")

SDP = ("v=0\r\no=pbx 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n")


def invite(agent_port: int, pbx_port: int) -> bytes:
    return (f"INVITE sip:agent1@127.0.0.1:{agent_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{pbx_port};rport;branch=z9hG4bKPjretrans1\r\n"
            "From: <sip:79160001122@127.0.0.1>;tag=pbx1\r\n"
            "To: <sip:agent1@127.0.0.1>\r\n"
            f"Contact: <sip:asterisk@127.0.0.1:{pbx_port}>\r\n"
            "Call-ID: retrans-invite-1\r\nCSeq: 100 INVITE\r\nMax-Forwards: 70\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n{SDP}").encode()


def ack(agent_port: int, pbx_port: int, to_tag: str) -> bytes:
    return (f"ACK sip:agent1@127.0.0.1:{agent_port};transport=UDP SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{pbx_port};rport;branch=z9hG4bKPjack1\r\n"
            "From: <sip:79160001122@127.0.0.1>;tag=pbx1\r\n"
            f"To: <sip:agent1@127.0.0.1>;tag={to_tag}\r\n"
            "Call-ID: retrans-invite-1\r\nCSeq: 100 ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()


def ok_for(request: str) -> bytes:
    """200 OK to the agent's BYE, its Via, From, To, Call-ID and CSeq copied."""
    keep = [line for line in request.split("\r\n") if re.match(r"(Via|From|To|Call-ID|CSeq):", line)]
    return ("SIP/2.0 200 OK\r\n" + "\r\n".join(keep) + "\r\nContent-Length: 0\r\n\r\n").encode()


async def receive(sock: socket.socket, timeout: float) -> str:
    loop = asyncio.get_running_loop()
    data = await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout)
    return data.decode("utf-8", "replace")


async def test_a_retransmitted_invite_after_the_200_does_not_abort_the_agents_call(tmp_path: Path) -> None:
    port = free_sip_port()
    agent = SippAgent("agent1", port, work_dir=tmp_path, answer_after=0.1, hangup_after=1.0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    pbx_port = sock.getsockname()[1]
    to = ("127.0.0.1", port)
    await agent.start()
    try:
        sock.sendto(invite(port, pbx_port), to)
        assert (await receive(sock, 5)).startswith("SIP/2.0 180")
        ok = await receive(sock, 5)
        assert ok.startswith("SIP/2.0 200") and "CSeq: 100 INVITE" in ok
        to_tag = re.search(r"^To:.*;tag=(\S+)", ok, re.M).group(1)
        sock.sendto(invite(port, pbx_port), to)  # the PBX did not take the 200 in time: INVITE again
        # the 200's own retransmission answers it (500 ms on), and the call goes on
        again = await receive(sock, 3)
        assert again.startswith("SIP/2.0 200") and "CSeq: 100 INVITE" in again
        sock.sendto(ack(port, pbx_port, to_tag), to)
        deadline = time.monotonic() + 5
        while True:  # the agent hangs up after its second of talk; skip any 200 retransmitted before the ACK
            msg = await receive(sock, max(0.1, deadline - time.monotonic()))
            if msg.startswith("BYE "):
                break
        sock.sendto(ok_for(msg), to)
        assert await agent.wait_for("HANGUP", 1, timeout=5) == 1
        assert agent.answered() == 1
        assert agent.aborted() == 0, agent.log_tail()
    finally:
        sock.close()
        await agent.stop()
