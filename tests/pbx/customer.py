"""SIPp as the customers a robot campaign calls: one UAS on the trunk's port that answers every call the
same way — busy, ringing until the PBX gives up, or answering and pressing keys at set moments (RFC 4733,
one pcap per key with its own RTP timestamps, see rtp_pcap.py) — and counts INVITEs per dialled number.

    async with Customers("trunk", port, work_dir=tmp, mode="answer", keys=[(8.0, "1")]) as phones:
        ...                                  # the dialler calls +79161234567 through PJSIP/{number}@trunk
    phones.invites_by_number()               # {"+79161234567": 1}
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from .rtp_pcap import RtpStream, silence_ulaw, speech_ulaw, tone_ulaw
from .sipp import SippAgent, _ms, _render, sipp_literal

Mode = Literal["answer", "busy", "ring"]

_RING = """  <send>
    <![CDATA[
      SIP/2.0 180 Ringing
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:customer@[local_ip]:[local_port];transport=[transport]>
      Content-Length: 0
    ]]>
  </send>
"""
_CANCELLED = """  <recv request="CANCEL"{timeout}/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>
  <send>
    <![CDATA[
      SIP/2.0 487 Request Terminated
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      CSeq: [last_cseq_number] INVITE
      Content-Length: 0
    ]]>
  </send>
  <recv request="ACK" next="end">
    <action><log message="CANCELLED [call_id]"/></action>
  </recv>
"""
_BUSY = """  <send>
    <![CDATA[
      SIP/2.0 486 Busy Here
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>
  <recv request="ACK" next="end">
    <action><log message="BUSY [call_id]"/></action>
  </recv>
"""
_ANSWER = """  <label id="answer"/>
  <send retrans="500">
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:customer@[local_ip]:[local_port];transport=[transport]>
{asserted}      Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0 101
      a=rtpmap:0 PCMU/8000
      a=rtpmap:101 telephone-event/8000
      a=fmtp:101 0-15
      a=sendrecv
    ]]>
  </send>
  <recv request="ACK" rtd="true" crlf="true">
    <action><log message="ANSWERED [call_id]"/></action>
  </recv>
{steps}  <recv request="BYE" timeout="{wait_bye}" ontimeout="customer_bye"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>
  <nop next="end">
    <action><log message="HANGUP pbx [call_id]"/></action>
  </nop>

  <label id="customer_bye"/>
  <send retrans="500">
    <![CDATA[
      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: [$local_party];tag=[pid]SIPpTag01[call_number]
      To: [$remote_party]
      [last_Call-ID:]
      CSeq: 2 BYE
      Contact: <sip:customer@[local_ip]:[local_port];transport=[transport]>
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv response="200" crlf="true">
    <action><log message="HANGUP customer [call_id]"/></action>
  </recv>
  <nop next="end"/>
  <label id="pbx_bye"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>
  <nop next="end">
    <action><log message="HANGUP pbx [call_id]"/></action>
  </nop>
"""


class Customers(SippAgent):
    """mode "answer": ring `ring_seconds`, answer, press `keys` [(seconds after the answer, key)], say
    `speech` (an answering machine's greeting) right after answering, then, with `beep` (seconds), a
    voicemail's beep (1000 Hz) and the silence of its recording, hang up `hang_up_after` seconds after
    the last key unless the PBX hangs up first; `asserted` goes in the 200 OK as P-Asserted-Identity, as a
    carrier asserts whom the call reached ('"Carrier" <sip:89160000000@127.0.0.1>'). "busy": 486 at once.
    "ring": ring until CANCELled. Starting, stopping and the event log are SippAgent's; only the scenario differs."""

    def __init__(self, user: str, port: int, *, work_dir: Path, mode: Mode = "answer", ring_seconds: float = 0.5,
                 keys: Sequence[tuple[float, str]] = (), hang_up_after: float = 60.0, speech: str | None = None,
                 beep: float = 0.0, asserted: str | None = None, media_port: int | None = None) -> None:
        super().__init__(user, port, work_dir=work_dir, media_port=media_port)
        self.mode = mode
        self.ring_seconds, self.keys, self.hang_up_after, self.speech = ring_seconds, list(keys), hang_up_after, speech
        self.beep, self.asserted = beep, asserted
        self.base = self.scenario.with_suffix("")

    def render_scenario(self) -> str:
        if self.mode == "busy":
            steps = _BUSY
        elif self.mode == "ring":
            steps = _RING + _CANCELLED.format(timeout="")
        else:
            stream = RtpStream()
            actions, at = [], 0.0
            audio = speech_ulaw(self.speech) if self.speech else b""
            if self.beep:  # a short pause, the beep, then 3 s of the machine recording silence
                audio += silence_ulaw(0.2) + tone_ulaw(1000, self.beep) + silence_ulaw(3.0)
            if audio:
                pcap = stream.speech(Path(f"{self.base}-speech.pcap"), audio)
                actions.append(f'  <nop><action><exec play_pcap_audio="{pcap}"/></action></nop>\n')
            for i, (when, key) in enumerate(self.keys):
                pcap = stream.dtmf(Path(f"{self.base}-key{i}.pcap"), key)
                actions.append(
                    f'  <recv request="BYE" timeout="{_ms(max(0.001, when - at))}" ontimeout="key{i}" next="pbx_bye"/>\n'
                    f'  <label id="key{i}"/>\n'
                    f'  <nop><action><log message="KEY {key} [call_id]"/><exec play_pcap_audio="{pcap}"/></action></nop>\n')
                at = when
            ring = _CANCELLED.format(timeout=f' timeout="{_ms(self.ring_seconds)}" ontimeout="answer"')
            asserted = f"      P-Asserted-Identity: {sipp_literal(self.asserted)}\n" if self.asserted else ""
            steps = _RING + ring + _ANSWER.format(steps="".join(actions), wait_bye=_ms(self.hang_up_after),
                                                  asserted=asserted)
        # SIPp refuses variables that are set and never used: From/To are kept only for the customer's BYE
        parties = "" if self.mode != "answer" else (
            '      <ereg regexp="[^ ].*" search_in="hdr" header="From:" assign_to="remote_party"/>\n'
            '      <ereg regexp="[^ ].*" search_in="hdr" header="To:" assign_to="local_party"/>\n')
        return _render("uas_customer.xml", {"ANSWER_STEPS": steps, "PARTIES": parties})

    def count(self, kind: str) -> int:
        return self._count(kind)

    def invites_by_number(self) -> dict[str, int]:
        return dict(collections.Counter(line.split()[2] for line in self.events()
                                        if line.startswith("INVITE ") and len(line.split()) >= 3))
