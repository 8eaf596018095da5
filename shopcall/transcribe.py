"""Offline speech-to-text of a recorded message, with a pluggable engine (``[voicemail] transcriber``).

pocketsphinx and vosk run in a child process (``python -m shopcall.transcribe``): pocketsphinx holds the
GIL while it decodes (a 7 s message stalled the event loop for 2.4 s when run in a thread), a crash in
native code must not take the call server down, and a hung engine can be killed. ``command`` runs the
configured program directly. Any failure comes back as ``Transcript.error``, never as an exception, so a
bad recording still reaches the group owner.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import wave
import weakref
from dataclasses import dataclass
from pathlib import Path

from shopcall.config import VoicemailConfig

ENGINES = ("pocketsphinx", "vosk", "command", "none")
RATE = 16000  # both engines' acoustic models want 16 kHz mono 16-bit PCM; phone audio is upsampled
POCKETSPHINX_NOTE = (
    "pocketsphinx's bundled model is US English only: Russian speech comes out as English-sounding "
    "nonsense; for Russian set transcriber = vosk with a Russian model, or a command"
)
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_STDERR_TAIL = 500


@dataclass(frozen=True)
class Transcript:
    text: str
    engine: str
    seconds: float  # wall time the transcription took (including a wait for a free engine slot)
    error: str | None = None
    language: str | None = None  # language of the engine's model ("en"), None if unknown
    note: str | None = None  # a caveat for whoever reads the text
    audio_seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def default_timeout(config: VoicemailConfig) -> float:
    # pocketsphinx here: ~0.6 s to start, then ~0.15x real time (120 s took 18 s); room for a loaded machine
    return 30.0 + 3.0 * config.max_seconds


# At most cores-1 engines at once: a burst of after-hours messages must not starve the call server.
_limits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _limit() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    if loop not in _limits:
        _limits[loop] = asyncio.Semaphore(max(1, (os.cpu_count() or 2) - 1))
    return _limits[loop]


async def transcribe(path: str | Path, config: VoicemailConfig, *, timeout: float | None = None) -> Transcript:
    """Transcribe the WAV at `path` with the configured engine; errors are returned in the Transcript."""
    engine = config.transcriber
    timeout = default_timeout(config) if timeout is None else timeout
    started = time.monotonic()
    if engine == "none":
        return Transcript("", "none", 0.0, note="transcription is switched off (voicemail.transcriber = none)")
    if engine not in ENGINES:
        return Transcript("", engine, 0.0, error=f"unknown transcriber {engine!r}")
    async with _limit():
        if engine == "command":
            result = await _run_command(config.command, Path(path), timeout)
        else:
            result = await _run_child(engine, Path(path), config.vosk_model, timeout)
    seconds = round(time.monotonic() - started, 3)
    language = result.get("language")
    return Transcript(
        text=(result.get("text") or "").strip(),
        engine=engine,
        seconds=seconds,
        error=result.get("error"),
        language=language,
        note=POCKETSPHINX_NOTE if engine == "pocketsphinx" else result.get("note"),
        audio_seconds=result.get("audio_seconds"),
    )


async def _communicate(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[
    int, bytes, bytes
]:
    """Run argv (no shell); raises TimeoutError after killing it, OSError if it cannot start."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


def _exit_text(code: int, err: bytes) -> str:
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    lines = err.decode("utf-8", "replace").strip().splitlines()
    last = lines[-1].strip()[-_STDERR_TAIL:] if lines else ""  # a traceback's last line says what went wrong
    return how + (f": {last}" if last else "")


async def _run_command(command: str, path: Path, timeout: float) -> dict:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        return {"error": f"voicemail.command cannot be parsed: {exc}"}
    if not argv:
        return {"error": "voicemail.command is empty (transcriber = command needs one)"}
    if not await asyncio.to_thread(path.is_file):
        return {"error": f"audio file not found: {path}"}
    try:
        code, out, err = await _communicate([*argv, str(path)], timeout)
    except TimeoutError:
        return {"error": f"{argv[0]} timed out after {timeout:g} s"}
    except OSError as exc:
        return {"error": f"cannot run {argv[0]}: {exc.strerror or exc}"}
    if code != 0:
        return {"error": f"{argv[0]} {_exit_text(code, err)}"}
    return {"text": out.decode("utf-8", "replace")}


async def _run_child(engine: str, path: Path, model: str, timeout: float) -> dict:
    argv = [sys.executable, "-m", "shopcall.transcribe", "--engine", engine, "--model", model, str(path)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    try:
        code, out, err = await _communicate(argv, timeout, env)
    except TimeoutError:
        return {"error": f"{engine} timed out after {timeout:g} s"}
    except OSError as exc:
        return {"error": f"cannot start the {engine} worker: {exc}"}
    try:
        result = json.loads(out.decode("utf-8").strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"{engine} worker {_exit_text(code, err)}"}
    return result if isinstance(result, dict) else {"error": f"{engine} worker gave {result!r}"}


# --------------------------------------------------------------------------- the child process


class AudioError(Exception):
    pass


def read_pcm(path: Path) -> bytes:
    """The file as 16 kHz mono signed 16-bit PCM; other rates/encodings go through sox."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise AudioError(f"audio file not readable: {exc.strerror or exc} ({path})") from exc
    if size == 0:
        raise AudioError(f"audio file is empty (0 bytes): {path}")
    try:
        with wave.open(str(path), "rb") as w:
            if (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE):
                pcm = w.readframes(w.getnframes())
                if not pcm:
                    raise AudioError(f"audio file has no samples: {path}")
                return pcm
    except Exception:  # wave.Error, EOFError, RuntimeError on odd chunks...: let sox decide
        pass
    sox = shutil.which("sox")
    if sox is None:
        raise AudioError("sox is needed to convert this audio to 16 kHz PCM but is not installed")
    argv = [sox, "-q", "-V1", str(path), "-t", "raw", "-r", str(RATE), "-c", "1", "-b", "16",
            "-e", "signed-integer", "-L", "-"]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise AudioError("sox timed out converting the audio") from exc
    if proc.returncode != 0:
        msg = proc.stderr.decode("utf-8", "replace").strip().replace(str(path), "<file>").replace(sox + " ", "")
        msg = msg[-_STDERR_TAIL:]
        raise AudioError(f"unreadable or corrupt audio ({msg or 'sox failed'}): {path}")
    if not proc.stdout:
        raise AudioError(f"audio file has no samples: {path}")
    return proc.stdout


def _pocketsphinx(pcm: bytes) -> str:
    from pocketsphinx import Decoder, Segmenter

    decoder = Decoder(samprate=RATE, loglevel="ERROR")
    words = []
    # decode speech segments one by one: a two-minute single utterance decodes worse and slower
    segmenter = Segmenter(sample_rate=RATE)
    for seg in (s.pcm for s in segmenter.segment(_Reader(pcm))):  # none: silence, and so no text
        decoder.start_utt()
        decoder.process_raw(seg, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        if hyp is not None and hyp.hypstr:
            words.append(hyp.hypstr)
    return " ".join(words)


def _vosk(pcm: bytes, model_path: str) -> str:
    try:
        import vosk
    except ImportError as exc:
        raise RuntimeError("the vosk package is not installed (pip install vosk)") from exc
    if not model_path:
        raise RuntimeError("voicemail.vosk_model is not set (transcriber = vosk needs a model directory)")
    if not Path(model_path).is_dir():
        raise RuntimeError(f"vosk model directory not found: {model_path}")
    vosk.SetLogLevel(-1)
    try:
        model = vosk.Model(model_path)
    except Exception as exc:  # vosk raises a bare Exception("Failed to create a model")
        raise RuntimeError(f"cannot load the vosk model in {model_path}: {exc}") from exc
    rec = vosk.KaldiRecognizer(model, RATE)
    parts = []
    step = RATE * 2 * 4  # 4 s of audio per call
    for i in range(0, len(pcm), step):
        if rec.AcceptWaveform(pcm[i : i + step]):
            parts.append(json.loads(rec.Result()).get("text", ""))
    parts.append(json.loads(rec.FinalResult()).get("text", ""))
    return " ".join(p for p in parts if p)


def vosk_language(model_path: str) -> str | None:
    """Guess from the usual model names (vosk-model-small-ru-0.22 → "ru")."""
    m = re.search(r"vosk-model-(?:small-)?([a-z]{2})(?:[-_]|$)", Path(model_path).name)
    return m.group(1) if m else None


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def _child(engine: str, path: Path, model: str) -> dict:
    language = "en" if engine == "pocketsphinx" else vosk_language(model)
    try:
        pcm = read_pcm(path)
    except AudioError as exc:
        return {"error": str(exc), "language": language}
    except Exception as exc:
        return {"error": f"cannot read the audio: {type(exc).__name__}: {exc}", "language": language}
    audio_seconds = round(len(pcm) / (2 * RATE), 2)
    try:
        text = _pocketsphinx(pcm) if engine == "pocketsphinx" else _vosk(pcm, model)
    except Exception as exc:  # reported to the parent; the traceback is of no use in an e-mail
        return {"error": f"{engine}: {exc}", "language": language, "audio_seconds": audio_seconds}
    return {"text": text, "language": language, "audio_seconds": audio_seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shopcall.transcribe")
    parser.add_argument("--engine", choices=("pocketsphinx", "vosk"), default="pocketsphinx")
    parser.add_argument("--model", default="", help="vosk model directory")
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    print(json.dumps(_child(args.engine, args.path, args.model), ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
