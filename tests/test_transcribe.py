"""Offline transcription: real audio through the real engines, and every way a file or engine can fail."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
import wave
from pathlib import Path

import pytest

from shopcall.config import VoicemailConfig
from shopcall.transcribe import Transcript, read_pcm, transcribe, vosk_language

AUDIO = Path(__file__).parent / "data" / "audio"
# espeak-ng -v en-us -s 130 "please call me back about my order", then
# sox ... -r 8000 -c 1 -b 16 -e signed-integer callback_en_8k.wav pad 0.5 0.5  (phone quality, as a PBX records)
# Kept as a file, not made at test time, so a new espeak-ng voice cannot change what the engine hears.
CALLBACK_EN = AUDIO / "callback_en_8k.wav"
SPOKEN = {"please", "call", "me", "back", "about", "my", "order"}

SPHINX = VoicemailConfig(transcriber="pocketsphinx")


def words(t: Transcript) -> set[str]:
    return set(t.text.lower().split())


async def test_pocketsphinx_hears_an_english_message():
    t = await transcribe(CALLBACK_EN, SPHINX)
    assert t.error is None, t.error
    assert t.engine == "pocketsphinx" and t.language == "en"
    # A synthetic voice at 8 kHz through the generic US-English model comes out approximate
    # ("you all we know about my order" with pocketsphinx 5.1.1): the content words at the end
    # survive, the start does not, so only some of the spoken words are required.
    assert len(words(t) & SPOKEN) >= 2, t.text
    assert {"my", "order"} & words(t), t.text
    assert t.audio_seconds == pytest.approx(4.0, abs=0.1)
    assert 0 < t.seconds < 30


async def test_pocketsphinx_says_it_is_english_only():
    t = await transcribe(CALLBACK_EN, SPHINX)
    assert t.language == "en"
    assert t.note and "Russian" in t.note


async def test_wideband_wav_is_used_as_is(tmp_path):
    # 16 kHz mono PCM skips sox; silence gives empty text, not an error
    path = tmp_path / "silence16k.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 16000)
    assert len(read_pcm(path)) == 32000
    t = await transcribe(path, SPHINX)
    assert t.error is None and t.text == ""


def test_phone_audio_is_upsampled_to_16k():
    pcm = read_pcm(CALLBACK_EN)
    with wave.open(str(CALLBACK_EN)) as w:
        frames = w.getnframes()
    assert abs(len(pcm) // 2 - 2 * frames) < 100


@pytest.mark.parametrize(
    "content, expect",
    [
        (b"", "empty (0 bytes)"),
        (b"RIFF\x24\x00\x00\x00WAVEjunkjunkjunk" + bytes(range(256)) * 4, "corrupt"),
        (b"this is not audio at all" * 50, "corrupt"),
    ],
    ids=["empty", "bad-wav", "text"],
)
async def test_bad_audio_gives_an_error_not_an_exception(tmp_path, content, expect):
    path = tmp_path / "message.wav"
    path.write_bytes(content)
    t = await transcribe(path, SPHINX)
    assert t.text == ""
    assert t.error and expect in t.error, t.error


async def test_truncated_wav_header(tmp_path):
    path = tmp_path / "cut.wav"
    path.write_bytes(CALLBACK_EN.read_bytes()[:30])
    t = await transcribe(path, SPHINX)
    assert t.error, t


async def test_wav_without_samples(tmp_path):
    path = tmp_path / "nothing.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
    t = await transcribe(path, SPHINX)
    assert t.error and "no samples" in t.error


async def test_missing_file(tmp_path):
    t = await transcribe(tmp_path / "gone.wav", SPHINX)
    assert t.error and "not readable" in t.error


async def test_event_loop_keeps_running_while_decoding():
    """pocketsphinx holds the GIL in a thread; in a child process the loop never stalls."""
    worst = 0.0
    stop = False

    async def ticker():
        nonlocal worst
        while not stop:
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            worst = max(worst, time.perf_counter() - t0 - 0.01)

    task = asyncio.create_task(ticker())
    t = await transcribe(CALLBACK_EN, SPHINX)
    stop = True
    await task
    assert t.error is None
    assert worst < 0.3, f"event loop stalled for {worst:.2f} s"


async def test_timeout_kills_the_worker():
    t = await transcribe(CALLBACK_EN, SPHINX, timeout=0.05)
    assert t.error and "timed out" in t.error


# --------------------------------------------------------------------------- vosk


def test_vosk_language_from_model_name():
    assert vosk_language("/models/vosk-model-small-ru-0.22") == "ru"
    assert vosk_language("/models/vosk-model-en-us-0.22-lgraph") == "en"
    assert vosk_language("/models/mine") is None


async def test_vosk_without_a_model_path():
    t = await transcribe(CALLBACK_EN, VoicemailConfig(transcriber="vosk", vosk_model=""))
    assert t.engine == "vosk"
    assert t.error and ("vosk_model is not set" in t.error or "not installed" in t.error)


async def test_vosk_with_a_missing_model_dir(tmp_path):
    t = await transcribe(CALLBACK_EN, VoicemailConfig(transcriber="vosk", vosk_model=str(tmp_path / "none")))
    assert t.error and ("not found" in t.error or "not installed" in t.error)


async def test_vosk_with_a_broken_model_dir(tmp_path):
    """The real vosk library is asked to load a directory without model files; no model can be downloaded
    here, so the success path is not exercised — this proves the library loads and its failure is reported."""
    pytest.importorskip("vosk")
    model = tmp_path / "vosk-model-small-ru-0.22"
    (model / "am").mkdir(parents=True)
    (model / "am" / "final.mdl").write_bytes(b"not a model")
    t = await transcribe(CALLBACK_EN, VoicemailConfig(transcriber="vosk", vosk_model=str(model)))
    assert t.error and "cannot load the vosk model" in t.error, t.error
    assert t.language == "ru"


# --------------------------------------------------------------------------- command and none


def command(tmp_path: Path, script: str) -> VoicemailConfig:
    prog = tmp_path / "stt.py"
    prog.write_text(script, encoding="utf-8")
    return VoicemailConfig(transcriber="command", command=f"{sys.executable} {prog}")


async def test_command_gets_the_path_and_its_stdout_is_the_text(tmp_path):
    config = command(tmp_path, "import sys, os\nprint('перезвоните мне', os.path.basename(sys.argv[-1]))\n")
    t = await transcribe(CALLBACK_EN, config)
    assert t.error is None
    assert t.text == "перезвоните мне callback_en_8k.wav"
    assert t.engine == "command"


async def test_command_path_with_spaces_is_one_argument(tmp_path):
    path = tmp_path / "a message with spaces.wav"
    shutil.copy(CALLBACK_EN, path)
    config = command(tmp_path, "import sys\nprint(len(sys.argv) - 1, sys.argv[-1])\n")
    t = await transcribe(path, config)
    assert t.text == f"1 {path}"


async def test_command_is_not_run_through_a_shell(tmp_path):
    marker = tmp_path / "pwned"
    config = VoicemailConfig(transcriber="command", command=f"echo hi; touch {marker}")
    t = await transcribe(CALLBACK_EN, config)
    assert not marker.exists()
    assert t.error is None and "; touch" in t.text  # echo printed its arguments verbatim


async def test_command_failure_reports_exit_code_and_stderr(tmp_path):
    config = command(tmp_path, "import sys\nsys.stderr.write('no model loaded')\nsys.exit(3)\n")
    t = await transcribe(CALLBACK_EN, config)
    assert t.error and "code 3" in t.error and "no model loaded" in t.error


async def test_command_timeout(tmp_path):
    config = command(tmp_path, "import time\ntime.sleep(30)\n")
    started = time.monotonic()
    t = await transcribe(CALLBACK_EN, config, timeout=0.5)
    assert t.error and "timed out" in t.error
    assert time.monotonic() - started < 5


async def test_command_missing_or_empty(tmp_path):
    t = await transcribe(CALLBACK_EN, VoicemailConfig(transcriber="command", command="/nonexistent/stt"))
    assert t.error and "cannot run /nonexistent/stt" in t.error
    t = await transcribe(CALLBACK_EN, VoicemailConfig(transcriber="command", command=""))
    assert t.error and "empty" in t.error


async def test_none_transcribes_nothing():
    t = await transcribe(CALLBACK_EN, VoicemailConfig(transcriber="none"))
    assert t == Transcript("", "none", 0.0, note=t.note)
    assert t.error is None


@pytest.fixture
def five_seconds(tmp_path) -> Path:
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.skip("espeak-ng and sox make this audio")
    raw, path = tmp_path / "raw.wav", tmp_path / "five.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "130", "-w", str(raw),
                    "please call me back about my order"], check=True)
    subprocess.run(["sox", str(raw), "-r", "8000", "-c", "1", "-b", "16", str(path), "pad", "0.5", "1.5"],
                   check=True)
    return path


async def test_fresh_espeak_audio_five_seconds(five_seconds):
    """A 5 s message made now by espeak-ng; the timing is what a voicemail costs on this machine."""
    t = await transcribe(five_seconds, SPHINX)
    assert t.error is None
    assert 4.5 < (t.audio_seconds or 0) < 6
    assert words(t) & SPOKEN, t.text
    print(f"\n5 s message: {t.seconds:.2f} s with pocketsphinx: {t.text!r}")
