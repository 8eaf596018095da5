"""RTP captures for SIPp's play_pcap_audio, made per call.

SIPp replays a pcap's RTP byte for byte. The stock dtmf_2833_<d>.pcap files all carry the same RTP
timestamp, and Asterisk drops an RFC 4733 event whose timestamp equals the previous event's as a
duplicate: a second digit in one call was never seen. Here every digit gets its own timestamp and
sequence numbers. Speech (G.711 µ-law, payload type 0) gives the agents something to say, so that a
recording has audio in it; a tone after it is a voicemail's beep, for FreeSWITCH's mod_avmd to hear.
"""

from __future__ import annotations

import math
import random
import shutil
import struct
import subprocess
from pathlib import Path

DTMF_EVENTS = {**{str(d): d for d in range(10)}, "*": 10, "#": 11}
PT_PCMU, PT_EVENT = 0, 101
FRAME = 160  # 20 ms at 8 kHz


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack("!10H", header))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _frame(payload: bytes, *, sport: int = 6000, dport: int = 6000) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                     bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1]))
    ip = ip[:10] + struct.pack("!H", _ip_checksum(ip)) + ip[12:]
    return b"\x00" * 12 + b"\x08\x00" + ip + udp  # Ethernet: zero MACs, IPv4


def write_pcap(path: Path, packets: list[tuple[float, bytes]]) -> Path:
    """`packets`: (seconds from the start, RTP packet)."""
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for t, rtp in packets:
            data = _frame(rtp)
            sec, usec = int(t), int(round((t - int(t)) * 1e6))
            f.write(struct.pack("<IIII", 1_700_000_000 + sec, usec, len(data), len(data)) + data)
    return path


class RtpStream:
    """One SSRC whose sequence numbers and timestamps keep counting across the pcaps made from it."""

    def __init__(self) -> None:
        self.ssrc = random.getrandbits(32)
        self.seq = random.getrandbits(15)
        self.ts = random.getrandbits(24)

    def _rtp(self, pt: int, ts: int, payload: bytes, marker: bool = False) -> bytes:
        self.seq = (self.seq + 1) & 0xFFFF
        return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, self.seq, ts & 0xFFFFFFFF,
                           self.ssrc) + payload

    def dtmf(self, path: Path, digit: str, *, length_ms: int = 160) -> Path:
        event = DTMF_EVENTS[digit]
        start = self.ts
        packets = []
        steps = length_ms // 20
        for i in range(1, steps + 1):  # the event grows by 20 ms per packet, all with the start timestamp
            payload = struct.pack("!BBH", event, 10, i * FRAME)
            packets.append(((i - 1) * 0.02, self._rtp(PT_EVENT, start, payload, marker=i == 1)))
        for j in range(3):  # the end packet, sent three times as RFC 4733 asks
            payload = struct.pack("!BBH", event, 0x80 | 10, steps * FRAME)
            packets.append(((steps + j) * 0.02, self._rtp(PT_EVENT, start, payload)))
        self.ts += (steps + 50) * FRAME  # the next event starts well after this one
        return write_pcap(path, packets)

    def speech(self, path: Path, ulaw: bytes) -> Path:
        packets = []
        for i in range(0, len(ulaw) - FRAME + 1, FRAME):
            packets.append((i / 8000, self._rtp(PT_PCMU, self.ts, ulaw[i:i + FRAME], marker=i == 0)))
            self.ts += FRAME
        return write_pcap(path, packets)


def speech_ulaw(text: str, voice: str = "en-us") -> bytes:
    """Telephone-quality speech as raw µ-law, from espeak-ng and sox."""
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        raise RuntimeError("espeak-ng and sox are needed to make speech for the agents")
    wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], capture_output=True, check=True).stdout
    return subprocess.run(["sox", "-t", "wav", "-", "-r", "8000", "-c", "1", "-t", "ul", "-"], input=wav,
                          capture_output=True, check=True).stdout


def ulaw_byte(sample: int) -> int:
    """G.711 µ-law of one 16-bit linear sample (the standard's bias-and-segment encoding)."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = max(0, magnitude.bit_length() - 8)  # the segment: where the highest bit above the bias is
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def tone_ulaw(hz: float, seconds: float, *, level: float = 0.5) -> bytes:
    """A sine tone as raw µ-law at 8 kHz, `level` of full scale (a voicemail's beep: 1000 Hz, ~0.5 s)."""
    n = int(seconds * 8000)
    return bytes(ulaw_byte(round(level * 32767 * math.sin(2 * math.pi * hz * i / 8000))) for i in range(n))


def silence_ulaw(seconds: float) -> bytes:
    return b"\xff" * int(seconds * 8000)  # µ-law's zero
