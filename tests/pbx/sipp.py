"""SIPp (Debian package sip-tester) as the callers and agents' phones of a test, run with asyncio.

Callers: ``result = await place_call("100", work_dir=tmp, digits="2", display_name='Иван "Ваня" Петров')``
renders tests/sipp/uac_call.xml for the call, places it through the PBX (127.0.0.1:5060 by default), sends
the digits as RFC 4733 events (SIPp replays /usr/share/sip-tester/dtmf_2833_<d>.pcap) and waits for the PBX
to hang up; see CallResult.

Agents: ``SippAgent("agent1", 5071, work_dir=tmp, answer_after=1.0, hangup_after=1.0)`` is a UAS on its own
port (the PBX dials ``sip:agent1@127.0.0.1:5071``); ``await agent.start()`` ... ``await agent.stop()``; it
counts INVITEs, answers and CANCELs from its event log.

Every SIPp instance gets its own SIP port and media port (even, 10 apart); pass ``port``/``media_port`` or
let the allocator pick free ones.

A display name cannot carry CR/LF in SIP. To test a caller name containing a newline (a carrier delivering
garbage), send it percent-encoded in a header and set it in the test dialplan::

    place_call("100", extra_headers={"X-Shopcall-Test-Name": urllib.parse.quote("Иван\\nПетров")})
    exten => _X.,1,Set(CALLERID(name)=${URIDECODE(${PJSIP_HEADER(read,X-Shopcall-Test-Name)})})

(verified on Asterisk 22: URIDECODE turns %0A into a real newline in CALLERID(name)).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from .rtp_pcap import RtpStream, speech_ulaw

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "sipp"
PCAP_DIR = Path("/usr/share/sip-tester")
SIPP = "sipp"
DEFAULT_PBX = "127.0.0.1:5060"
_PCAP_NAMES = {**{d: d for d in "0123456789"}, "*": "star", "#": "pound"}
_TOKEN = re.compile(r"^[A-Za-z0-9.!%*_+`'~-]+$")  # RFC 3261 token (header names)
_USER = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=%+-]+$")  # RFC 3261 user part, unescaped subset


class SippError(RuntimeError):
    pass


# ---- escaping --------------------------------------------------------------------------------------


def sip_quoted_string(text: str) -> str:
    """RFC 3261 quoted-string: backslash-escape '\\' and '"'; UTF-8 is allowed as is, CR/LF are not."""
    if "\r" in text or "\n" in text:
        raise ValueError("SIP header values cannot contain CR/LF (use the X-Shopcall-Test-Name route)")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sipp_literal(text: str) -> str:
    """Text that SIPp sends verbatim from a <send> CDATA template.

    SIPp reads '[...]' as keywords and '\\xHH' as a hex byte, so '[', ']' and '\\' go out as \\x5B, \\x5D,
    \\x5C; with ']' never raw, ']]>' cannot end the CDATA early. UTF-8 bytes are left as they are: SIPp's
    parser copies bytes through whatever encoding the XML prolog declares.
    """
    if "\r" in text or "\n" in text:
        raise ValueError("SIP header values cannot contain CR/LF")
    return text.replace("\\", "\\x5C").replace("[", "\\x5B").replace("]", "\\x5D")


def _render(template: str, values: Mapping[str, str]) -> str:
    text = (SCENARIO_DIR / template).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise SippError(f"unfilled placeholder in {template}: {text[text.index('{{'):][:40]}")
    return text


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))  # a recv timeout of 0 would mean "wait forever"


# ---- ports -----------------------------------------------------------------------------------------


def _udp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ring(first: int, last: int, step: int = 1) -> Iterator[int]:
    """All ports first..last, starting at a per-process offset so concurrent test sessions rarely race."""
    ports = list(range(first, last, step))
    start = (os.getpid() * 7919) % len(ports)
    return itertools.cycle(ports[start:] + ports[:start])


_sip_ports = _ring(5100, 5900)
_media_ports = _ring(30000, 40000, 10)


def free_sip_port() -> int:
    for _ in range(800):
        port = next(_sip_ports)
        if _udp_free(port):
            return port
    raise SippError("no free UDP port in 5100-5899")


def free_media_port() -> int:
    """An even base port; SIPp uses base (audio RTP), +1, +2 (video), +3."""
    for _ in range(1000):
        port = next(_media_ports)
        if all(_udp_free(port + i) for i in range(4)):
            return port
    raise SippError("no free media port range in 30000-39999")


def _tail(path: Path, n: int = 40) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_bytes().decode("utf-8", "replace").splitlines()[-n:])


_seq = itertools.count(1)


# ---- caller ----------------------------------------------------------------------------------------


@dataclass
class CallResult:
    returncode: int  # SIPp's: 0 = the call completed as scripted
    answered: bool  # got a 200 OK to the INVITE
    final_status: int | None  # final response code to the INVITE (200, 486, ...)
    hung_up_by: Literal["pbx", "caller"] | None  # None: unanswered/failed
    duration: float  # wall-clock seconds of the whole SIPp run
    talk_time: float | None  # seconds from 200 OK to BYE
    stderr: str
    log_tail: str  # SIPp's message trace (last lines) and errors
    scenario: Path
    events: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.answered


def render_caller_scenario(
    *,
    from_user: str,
    display_name: str | None,
    digits: str,
    digit_delay: float,
    digit_gap: float,
    pai_display_name: str | None,
    extra_headers: Mapping[str, str],
    wait_bye: float,
    pcap_prefix: Path | None = None,
    speech: str | None = None,
    speech_delay: float = 0.0,
) -> str:
    """With `pcap_prefix`, each digit gets a pcap of its own (rtp_pcap.RtpStream): distinct RFC 4733
    timestamps, so Asterisk sees every digit and not only the first."""
    if not _USER.match(from_user):
        raise ValueError(f"bad SIP user {from_user!r}")
    uri = f"<sip:{from_user}@[local_ip]:[local_port]>"
    from_ = f"{sipp_literal(sip_quoted_string(display_name))} {uri}" if display_name is not None else uri
    headers = []
    if pai_display_name is not None:
        headers.append(
            f"P-Asserted-Identity: {sipp_literal(sip_quoted_string(pai_display_name))} "
            f"<sip:{from_user}@[local_ip]>"
        )
    for name, value in extra_headers.items():
        if not _TOKEN.match(name):
            raise ValueError(f"bad SIP header name {name!r}")
        headers.append(f"{name}: {sipp_literal(value)}")
    steps = []
    wait = digit_delay
    stream = RtpStream() if pcap_prefix is not None else None
    for i, digit in enumerate(digits):
        if digit not in _PCAP_NAMES:
            raise ValueError(f"no RFC 4733 pcap for digit {digit!r} (0-9, *, #)")
        if stream is not None and pcap_prefix is not None:
            pcap = stream.dtmf(Path(f"{pcap_prefix}-digit{i}.pcap"), digit)
        else:
            pcap = PCAP_DIR / f"dtmf_2833_{_PCAP_NAMES[digit]}.pcap"
        steps.append(
            f'  <recv request="BYE" timeout="{_ms(wait)}" ontimeout="digit{i}" next="pbx_bye"/>\n'
            f'  <label id="digit{i}"/>\n'
            f'  <nop><action><exec play_pcap_audio="{pcap}"/></action></nop>\n'
        )
        wait = digit_gap
    if speech:  # after the digits (or the answer): the caller talks, e.g. into voicemail
        if pcap_prefix is None:
            raise ValueError("speech needs pcap_prefix (a directory for the generated pcap)")
        pcap = (stream or RtpStream()).speech(Path(f"{pcap_prefix}-speech.pcap"), speech_ulaw(speech))
        steps.append(
            f'  <recv request="BYE" timeout="{_ms(speech_delay)}" ontimeout="speech" next="pbx_bye"/>\n'
            f'  <label id="speech"/>\n'
            f'  <nop><action><exec play_pcap_audio="{pcap}"/></action></nop>\n'
        )
    # After the last digit its pcap (0.14 s) is still playing: the BYE wait covers it.
    return _render(
        "uac_call.xml",
        {
            "FROM": from_,
            "FROM_USER": from_user,
            "HEADERS": "".join("\n      " + h for h in headers),
            "DIGITS": "".join(steps),
            "WAIT_BYE_MS": str(_ms(wait_bye)),
        },
    )


async def place_call(
    to: str,
    *,
    from_user: str = "79161234567",
    display_name: str | None = None,
    digits: str = "",
    digit_delay: float = 1.5,
    digit_gap: float = 0.6,
    pai_display_name: str | None = None,
    extra_headers: Mapping[str, str] | None = None,
    wait_bye: float = 60.0,
    speech: str | None = None,
    speech_delay: float = 0.0,
    pbx: str = DEFAULT_PBX,
    port: int | None = None,
    media_port: int | None = None,
    work_dir: Path | None = None,
    timeout: float | None = None,
) -> CallResult:
    """Call `to` at the PBX; after the answer send `digits`, then wait up to `wait_bye` s for the PBX's BYE
    (answering it), else hang up ourselves. Never raises for call failures: check the CallResult."""
    if not _USER.match(to):
        raise ValueError(f"bad SIP user {to!r}")
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="shopcall-sipp-"))
    port = port or free_sip_port()
    media_port = media_port or free_media_port()
    base = work / f"call-{next(_seq)}-{port}"
    scenario = base.with_suffix(".xml")
    scenario.write_text(
        render_caller_scenario(
            from_user=from_user, display_name=display_name, digits=digits, digit_delay=digit_delay,
            digit_gap=digit_gap, pai_display_name=pai_display_name, extra_headers=extra_headers or {},
            wait_bye=wait_bye, pcap_prefix=base, speech=speech, speech_delay=speech_delay,
        ),
        encoding="utf-8",
    )  # fmt: skip
    stderr_file = Path(f"{base}_stderr.log")
    cmd = [
        SIPP, pbx, "-sf", str(scenario), "-s", to, "-i", "127.0.0.1", "-p", str(port), "-mp", str(media_port),
        "-m", "1", "-nostdin", "-aa",
        "-trace_logs", "-log_file", f"{base}_events.log",
        "-trace_msg", "-message_file", f"{base}_messages.log",
        "-trace_err", "-error_file", f"{base}_errors.log",
    ]  # fmt: skip
    limit = timeout if timeout is not None else digit_delay + len(digits) * digit_gap + wait_bye + 60
    started = time.monotonic()
    with _sink(stderr_file) as err:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=err
        )
        try:
            rc = await asyncio.wait_for(proc.wait(), limit)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
    return _call_result(rc, time.monotonic() - started, base, scenario)


def _sink(path: Path) -> BinaryIO:
    return open(path, "wb")  # the caller closes it (with-block)


def _call_result(rc: int, duration: float, base: Path, scenario: Path) -> CallResult:
    events = _read_lines(Path(f"{base}_events.log"))
    answered_at = _tick(events, "ANSWERED")
    hung_up_by: Literal["pbx", "caller"] | None = None
    if (hangup_at := _tick(events, "HANGUP pbx")) is not None:
        hung_up_by = "pbx"
    elif (hangup_at := _tick(events, "HANGUP caller")) is not None:
        hung_up_by = "caller"
    talk = (hangup_at - answered_at) / 1000 if answered_at is not None and hangup_at is not None else None
    errors = Path(f"{base}_errors.log")
    return CallResult(
        returncode=rc,
        answered=answered_at is not None,
        final_status=_final_status(Path(f"{base}_messages.log")),
        hung_up_by=hung_up_by,
        duration=duration,
        talk_time=talk,
        stderr=_tail(Path(f"{base}_stderr.log"), 200),
        log_tail=_tail(Path(f"{base}_messages.log")) + (f"\n--- errors\n{_tail(errors)}" if errors.exists() else ""),
        scenario=scenario,
        events=events,
    )


_RECEIVED_RESPONSE = re.compile(r"message received \[\d+\] bytes :\n\nSIP/2\.0 (\d{3})[^\n]*\n(?:[^\n]+\n)*?CSeq: *\d+ INVITE")


def _final_status(messages: Path) -> int | None:
    if not messages.exists():
        return None
    text = messages.read_bytes().decode("utf-8", "replace")
    codes = [int(m.group(1)) for m in _RECEIVED_RESPONSE.finditer(text)]
    return next((c for c in codes if c >= 200), None)


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_bytes().decode("utf-8", "replace").splitlines() if line.strip()]


def _tick(events: list[str], prefix: str) -> int | None:
    for line in events:
        if line.startswith(prefix + " "):
            return int(line.split()[-1])
    return None


# ---- agent -----------------------------------------------------------------------------------------


class SippAgent:
    """A UAS playing one agent's phone for the life of a test.

    answer_after: seconds of ringing before answering; None rings until CANCELled.
    hangup_after: seconds after the answer when the agent sends BYE; None waits for the PBX's BYE.
    A CANCEL while ringing (ring-all: another agent answered) gets 200 + 487 in either mode.
    """

    def __init__(
        self,
        user: str,
        port: int,
        *,
        work_dir: Path,
        answer_after: float | None = 1.0,
        hangup_after: float | None = None,
        media_port: int | None = None,
        says: str | None = None,
    ) -> None:
        if not _USER.match(user):
            raise ValueError(f"bad SIP user {user!r}")
        self.user = user
        self.port = port
        self.media_port = media_port or free_media_port()
        self.answer_after = answer_after
        self.hangup_after = hangup_after
        self.says = says  # spoken (RTP µ-law) right after answering, so a recording has audio
        base = Path(work_dir) / f"agent-{user}-{port}"
        self.scenario = base.with_suffix(".xml")
        self.events_file = Path(f"{base}_events.log")
        self.messages_file = Path(f"{base}_messages.log")
        self.errors_file = Path(f"{base}_errors.log")
        self.stderr_file = Path(f"{base}_stderr.log")
        self._proc: asyncio.subprocess.Process | None = None

    def render_scenario(self) -> str:
        if self.answer_after is None:
            ring = '  <recv request="CANCEL"/>\n'
        else:
            ring = f'  <recv request="CANCEL" timeout="{_ms(self.answer_after)}" ontimeout="answer"/>\n'
        # SIPp times a wait by its first message (the optional re-INVITE here): both carry the hang-up time,
        # which a re-INVITE starts again
        wait = f' timeout="{_ms(self.hangup_after)}" ontimeout="agent_bye"' if self.hangup_after is not None else ""
        talk = (f'  <label id="talk_wait"/>\n  <recv request="INVITE" optional="true" next="reinvite"{wait}/>\n'
                f'  <recv request="BYE"{wait}/>\n')
        if self.says:
            pcap = RtpStream().speech(self.scenario.with_suffix(".speech.pcap"), speech_ulaw(self.says))
            talk = f'  <nop><action><exec play_pcap_audio="{pcap}"/></action></nop>\n' + talk
        return _render("uas_agent.xml", {"USER": self.user, "RING_WAIT": ring, "TALK_WAIT": talk})

    async def start(self, timeout: float = 5.0) -> None:
        if not _udp_free(self.port):
            raise SippError(f"UDP port {self.port} for agent {self.user} is in use")
        self.scenario.write_text(self.render_scenario(), encoding="utf-8")
        for f in (self.events_file, self.messages_file, self.errors_file):
            f.unlink(missing_ok=True)
        cmd = [
            SIPP, "-sf", str(self.scenario), "-i", "127.0.0.1", "-p", str(self.port),
            "-mp", str(self.media_port), "-nostdin", "-aa",
            "-trace_logs", "-log_file", str(self.events_file),
            "-trace_msg", "-message_file", str(self.messages_file),
            "-trace_err", "-error_file", str(self.errors_file),
        ]  # fmt: skip
        with _sink(self.stderr_file) as err:
            self._proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=err
            )
        deadline = time.monotonic() + timeout
        while _udp_free(self.port):  # listening once SIPp holds the port
            if self._proc.returncode is not None or time.monotonic() > deadline:
                await self.stop()
                raise SippError(f"SIPp agent {self.user} did not start:\n{_tail(self.stderr_file)}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 3)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def __aenter__(self) -> SippAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def events(self) -> list[str]:
        return _read_lines(self.events_file)

    def _count(self, kind: str) -> int:
        return sum(1 for line in self.events() if line.split(" ", 1)[0] == kind)

    def invites_received(self) -> int:
        return self._count("INVITE")

    def answered(self) -> int:
        return self._count("ANSWERED")

    def cancelled(self) -> int:
        return self._count("CANCELLED")

    def hangups(self) -> int:
        return self._count("HANGUP")

    def aborted(self) -> int:
        """Calls SIPp gave up on ("Aborting call on unexpected message"): a harness fault, not the PBX's,
        that leaves the PBX's leg up until the caller's own BYE timeout."""
        if not self.errors_file.exists():
            return 0
        return self.errors_file.read_bytes().count(b"Aborting call on unexpected message")

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 5.0) -> int:
        """Wait until `kind` (INVITE, ANSWERED, CANCELLED, HANGUP) was logged `count` times."""
        deadline = time.monotonic() + timeout
        while True:
            n = self._count(kind)
            if n >= count or time.monotonic() > deadline:
                return n
            await asyncio.sleep(0.05)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(
            f"--- {p.name}\n{_tail(p, n)}" for p in (self.messages_file, self.errors_file, self.stderr_file)
            if p.exists()
        )  # fmt: skip
