"""Text to telephone audio (espeak-ng + sox), cached on disk by content hash.

Each cached sound is a base path with two files beside it:
  <base>.wav   8 kHz mono signed 16-bit PCM (Asterisk "wav", FreeSWITCH)
  <base>.ulaw  raw G.711 mu-law 8 kHz (streamed to ulaw calls without transcoding)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import tempfile
import wave
from collections.abc import Mapping, Sequence
from pathlib import Path

# Bump when the audio pipeline changes so old cache entries are not reused.
FORMAT_VERSION = 1
DEFAULT_VOICES = {"ru": "ru", "en": "en-us"}
COMMAND_TIMEOUT = 60.0


class TtsError(RuntimeError):
    """The engine or sox is missing, failed or hung; message carries its stderr."""


class Tts:
    def __init__(
        self,
        cache_dir: Path,
        voices: Mapping[str, str] | None = None,
        speed: int = 150,
        engine: str = "espeak-ng",
        sox: str = "sox",
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.voices = dict(DEFAULT_VOICES if voices is None else voices)
        self.speed = speed
        self.engine = engine
        self.sox = sox
        self._inflight: dict[str, asyncio.Task[Path]] = {}

    def cache_base(self, text: str, lang: str) -> Path:
        """Where `text` in `lang` is (or would be) cached, without extension."""
        key = json.dumps(
            [FORMAT_VERSION, self.engine, self._voice(lang), self.speed, text], ensure_ascii=False
        )
        return self.cache_dir / hashlib.sha256(key.encode()).hexdigest()

    def is_cached(self, text: str, lang: str) -> bool:
        base = self.cache_base(text, lang)
        return with_ext(base, "wav").is_file() and with_ext(base, "ulaw").is_file()

    async def synth(self, text: str, lang: str) -> Path:
        """Return the cached base path for `text`, synthesising it on a miss."""
        if not text.strip():
            raise ValueError("nothing to say: empty text")
        base = self.cache_base(text, lang)
        if self.is_cached(text, lang):
            return base
        # One synthesis per key in this process; other processes are kept safe by os.replace.
        task = self._inflight.get(base.name)
        if task is None:
            task = asyncio.ensure_future(self._synth(text, self._voice(lang), base))
            self._inflight[base.name] = task
            task.add_done_callback(lambda t, k=base.name: self._done(k, t))
        return await asyncio.shield(task)

    def _done(self, key: str, task: asyncio.Task[Path]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # mark retrieved: the caller may have been cancelled meanwhile

    def _voice(self, lang: str) -> str:
        try:
            return self.voices[lang]
        except KeyError:
            raise ValueError(f"no TTS voice for language {lang!r} (have: {', '.join(self.voices)})") from None

    async def _synth(self, text: str, voice: str, base: Path) -> Path:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tts-", dir=self.cache_dir))
        try:
            raw, wav, ulaw = tmp / "raw.wav", tmp / "out.wav", tmp / "out.ulaw"
            # Text goes on stdin so a leading "-" or any other content is never parsed as an option.
            await _run([self.engine, "-v", voice, "-s", str(self.speed), "-w", str(raw), "--stdin"], text)
            await asyncio.gather(
                _run(
                    [
                        self.sox,
                        str(raw),
                        "-r",
                        "8000",
                        "-c",
                        "1",
                        "-b",
                        "16",
                        "-e",
                        "signed-integer",
                        str(wav),
                    ]
                ),
                _run([self.sox, str(raw), "-r", "8000", "-c", "1", "-t", "ul", str(ulaw)]),
            )
            # .ulaw first: a hit needs both files, and .wav landing last completes the entry.
            os.replace(ulaw, with_ext(base, "ulaw"))
            os.replace(wav, with_ext(base, "wav"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return base


async def _run(argv: Sequence[str], stdin_text: str | None = None) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin_text is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as e:
        raise TtsError(f"{argv[0]} not found: install it or fix the engine path") from e
    data = stdin_text.encode() if stdin_text is not None else None
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(data), COMMAND_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise TtsError(f"{argv[0]} timed out after {COMMAND_TIMEOUT:.0f}s") from None
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.kill()
        raise
    if proc.returncode != 0:
        msg = stderr.decode(errors="replace").strip() or "(no stderr)"
        raise TtsError(f"{argv[0]} exited with {proc.returncode}: {msg}")


def duration_seconds(base: Path) -> float:
    """Length of `<base>.wav` in seconds, from its header."""
    with wave.open(str(with_ext(base, "wav")), "rb") as w:
        return w.getnframes() / w.getframerate()


def with_ext(base: Path, ext: str) -> Path:
    """`base` + "." + ext; unlike with_suffix it keeps any dot already in the name."""
    base = Path(base)
    return base.with_name(f"{base.name}.{ext}")
