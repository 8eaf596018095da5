"""The music a caller hears while waiting in line, made here (no music ships with Debian's Asterisk root
or with FreeSWITCH's minimal install): a soft arpeggio, 8 kHz mono like the prompts, in .wav and .ulaw.
A shop's own recording (`<custom_dir>/<lang>/hold_music.wav`) replaces it, as for any prompt.

One file is one round of waiting: after it the call checks for a free agent, so its length is how often
a waiting caller is looked at (SECONDS)."""

from __future__ import annotations

import math
import os
import struct
import wave
from pathlib import Path

PROMPT_ID = "hold_music"
SECONDS = 6.0
RATE = 8000
# C major, A minor, F major, G major: one chord a second and a half, each note a plucked-string decay
_CHORDS = ((261.63, 329.63, 392.00), (220.00, 261.63, 329.63), (174.61, 220.00, 261.63), (196.00, 246.94, 293.66))


def samples(seconds: float = SECONDS) -> list[int]:
    out = []
    chord_len = seconds / len(_CHORDS)
    note_len = chord_len / 3
    for i in range(int(seconds * RATE)):
        t = i / RATE
        chord = _CHORDS[min(int(t / chord_len), len(_CHORDS) - 1)]
        in_chord = t % chord_len
        value = 0.0
        for k, freq in enumerate(chord):
            since = in_chord - k * note_len  # notes enter one after another and ring on
            if since >= 0:
                value += math.sin(2 * math.pi * freq * t) * math.exp(-2.5 * since)
        out.append(int(max(-1.0, min(1.0, value / 3)) * 9000))
    return out


def _ulaw(sample: int) -> int:
    """G.711 mu-law of a 16-bit sample (ITU-T G.711's segment encoding)."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = max(0, magnitude.bit_length() - 8)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def render(base: Path, seconds: float = SECONDS) -> Path:
    """Write base.wav and base.ulaw (if not there yet); returns base, as Prompts.path does."""
    wav, ulaw = base.with_name(base.name + ".wav"), base.with_name(base.name + ".ulaw")
    if wav.is_file() and ulaw.is_file():
        return base
    base.parent.mkdir(parents=True, exist_ok=True)
    pcm = samples(seconds)
    tmp = base.with_name(f".{base.name}.{os.getpid()}")
    with wave.open(str(tmp) + ".wav", "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(struct.pack(f"<{len(pcm)}h", *pcm))
    Path(str(tmp) + ".ulaw").write_bytes(bytes(_ulaw(s) for s in pcm))
    os.replace(str(tmp) + ".ulaw", ulaw)  # .wav last: both present means complete, as in the TTS cache
    os.replace(str(tmp) + ".wav", wav)
    return base
