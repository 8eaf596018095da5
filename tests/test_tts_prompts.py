import asyncio
import shutil
import tomllib
import wave
from pathlib import Path

import pytest

from shopcall import tts as tts_mod
from shopcall.prompts import PROMPT_IDS, Prompts, PromptTextError
from shopcall.tts import Tts, TtsError, duration_seconds, with_ext

REPO = Path(__file__).resolve().parent.parent
TEXTS = REPO / "sounds" / "prompts.toml"

needs_audio = pytest.mark.skipif(
    not (shutil.which("espeak-ng") and shutil.which("sox")),
    reason="espeak-ng and sox are needed (Debian packages espeak-ng, sox)",
)


@pytest.fixture
def tts(tmp_path: Path) -> Tts:
    return Tts(tmp_path / "cache")


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the programs the TTS starts."""
    calls: list[str] = []
    real = asyncio.create_subprocess_exec

    async def spy(*argv, **kw):
        calls.append(argv[0])
        return await real(*argv, **kw)

    monkeypatch.setattr(tts_mod.asyncio, "create_subprocess_exec", spy)
    return calls


def make_prompts(tmp_path: Path, tts: Tts, custom: bool = True, texts: Path = TEXTS) -> Prompts:
    return Prompts(
        tts,
        texts,
        tmp_path / "out",
        tmp_path / "custom" if custom else None,
        {"shop_name": "Ромашка"},
    )


def wav_info(path: Path) -> tuple[int, int, int, int]:
    with wave.open(str(path), "rb") as w:
        return w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()


@needs_audio
async def test_synth_formats(tts: Tts) -> None:
    base = await tts.synth("Здравствуйте! Ваш заказ готов.", "ru")
    assert base.suffix == "" and base.parent == tts.cache_dir
    rate, channels, width, frames = wav_info(with_ext(base, "wav"))
    assert (rate, channels, width) == (8000, 1, 2)
    assert frames > 8000 * 0.5  # Cyrillic was actually spoken, not skipped
    ulaw = with_ext(base, "ulaw").stat().st_size
    assert abs(ulaw - frames) <= 8  # 1 byte per sample = half the wav's data
    assert duration_seconds(base) == pytest.approx(frames / 8000)
    assert not list(tts.cache_dir.glob(".tts-*")), "temp dir left behind"


@needs_audio
async def test_cache_hit_runs_nothing(tts: Tts, spawned: list[str]) -> None:
    base = await tts.synth("Hello there", "en")
    assert spawned == ["espeak-ng", "sox", "sox"]
    mtime = with_ext(base, "wav").stat().st_mtime_ns
    assert tts.is_cached("Hello there", "en")
    assert await tts.synth("Hello there", "en") == base
    assert spawned == ["espeak-ng", "sox", "sox"]
    assert with_ext(base, "wav").stat().st_mtime_ns == mtime


@needs_audio
async def test_cache_key_includes_voice_speed_text(tmp_path: Path) -> None:
    a = Tts(tmp_path)
    b = Tts(tmp_path, speed=200)
    assert a.cache_base("один", "ru") != b.cache_base("один", "ru")
    assert a.cache_base("один", "ru") != a.cache_base("один", "en")
    assert a.cache_base("один", "ru") != a.cache_base("два", "ru")
    assert a.cache_base("один", "ru") == Tts(tmp_path).cache_base("один", "ru")


@needs_audio
async def test_text_starting_with_dash_is_spoken(tts: Tts) -> None:
    base = await tts.synth("-v --help -w /etc/passwd минус пять", "ru")
    assert duration_seconds(base) > 1.0


@needs_audio
async def test_concurrent_same_text_synthesised_once(tts: Tts, spawned: list[str]) -> None:
    results = await asyncio.gather(*(tts.synth("один и тот же текст", "ru") for _ in range(5)))
    assert len(set(results)) == 1
    assert spawned.count("espeak-ng") == 1


async def test_missing_engine_raises(tmp_path: Path) -> None:
    t = Tts(tmp_path, engine=str(tmp_path / "no-such-tts"))
    with pytest.raises(TtsError, match="not found"):
        await t.synth("привет", "ru")


async def test_failing_command_reports_stderr(tmp_path: Path) -> None:
    engine = tmp_path / "broken-tts"
    engine.write_text("#!/bin/sh\necho 'voice data missing' >&2\nexit 3\n")
    engine.chmod(0o755)
    t = Tts(tmp_path / "cache", engine=str(engine))
    with pytest.raises(TtsError, match="exited with 3: voice data missing"):
        await t.synth("привет", "ru")
    assert not list((tmp_path / "cache").iterdir()), "nothing cached, no temp dir left"


async def test_bad_input(tts: Tts) -> None:
    with pytest.raises(ValueError, match="empty"):
        await tts.synth("  ", "ru")
    with pytest.raises(ValueError, match="de"):
        await tts.synth("Hallo", "de")


def test_load_texts_renders_all_ids(tmp_path: Path, tts: Tts) -> None:
    texts = make_prompts(tmp_path, tts).load_texts()
    assert set(PROMPT_IDS) <= set(texts)
    assert texts["greeting"]["ru"] == "Здравствуйте! Вы позвонили в магазин Ромашка."
    for langs in texts.values():
        assert langs["ru"].strip() and langs["en"].strip()
        assert "{" not in langs["ru"] + langs["en"]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[greeting]\nru = "Привет"\n', "no en text"),
        ('[greeting]\nen = "Hi"\n', "no ru text"),
        ('[greeting]\nru = "Привет {shop}"\nen = "Hi"\n', r"unknown placeholder \{shop\}"),
        ('[greeting]\nru = "Привет {"\nen = "Hi"\n', "brace"),
        ('greeting = "Hi"\n', "must be a table"),
        ('[Greeting]\nru = "Привет"\nen = "Hi"\n', "id"),
        ("[greeting\n", "prompts"),
        ('[greeting]\nru = "Привет {shop_name}"\nen = "Hi"\n', "missing prompts: recording_notice"),
    ],
)
def test_load_texts_errors(tmp_path: Path, tts: Tts, toml: str, message: str) -> None:
    bad = tmp_path / "prompts.toml"
    bad.write_text(toml, encoding="utf-8")
    with pytest.raises(PromptTextError, match=message):
        make_prompts(tmp_path, tts, texts=bad).load_texts()


@needs_audio
async def test_build_all_then_unchanged(tmp_path: Path, tts: Tts, spawned: list[str]) -> None:
    prompts = make_prompts(tmp_path, tts)
    summary = await prompts.build_all()
    n = len(prompts.texts) * 2
    assert summary == {"generated": n, "cached": 0, "custom": 0, "updated": n}
    for lang in ("ru", "en"):
        for prompt_id in PROMPT_IDS:
            base = tmp_path / "out" / lang / prompt_id
            assert wav_info(with_ext(base, "wav"))[:3] == (8000, 1, 2)
            assert with_ext(base, "ulaw").stat().st_size > 1000
    spawned.clear()
    again = await prompts.build_all()
    assert again == {"generated": 0, "cached": n, "custom": 0, "updated": 0}
    assert spawned == []


@needs_audio
async def test_build_all_replaces_changed_prompt(tmp_path: Path, tts: Tts) -> None:
    prompts = make_prompts(tmp_path, tts)
    await prompts.build_all(langs=("ru",))
    greeting = tmp_path / "out" / "ru" / "greeting.wav"
    before = greeting.read_bytes()
    prompts.variables["shop_name"] = "Василёк"
    summary = await prompts.build_all(langs=("ru",))
    with_name = sum("{shop_name}" in texts["ru"] for texts in tomllib.loads(TEXTS.read_text("utf-8")).values())
    assert with_name >= 1 and summary["generated"] == summary["updated"] == with_name
    assert greeting.read_bytes() != before


@needs_audio
async def test_path_builds_on_demand(tmp_path: Path, tts: Tts) -> None:
    prompts = make_prompts(tmp_path, tts)
    base = await prompts.path("goodbye", "en")
    assert base == tmp_path / "out" / "en" / "goodbye"
    assert with_ext(base, "wav").is_file() and with_ext(base, "ulaw").is_file()
    assert await prompts.path("goodbye", "en") == base


async def test_custom_recording_wins(tmp_path: Path, tts: Tts, spawned: list[str]) -> None:
    prompts = make_prompts(tmp_path, tts)
    recorded = tmp_path / "custom" / "ru" / "greeting.gsm"
    recorded.parent.mkdir(parents=True)
    recorded.write_bytes(b"\0" * 33)
    assert await prompts.path("greeting", "ru") == tmp_path / "custom" / "ru" / "greeting"
    assert spawned == []


@needs_audio
async def test_build_all_skips_custom(tmp_path: Path, tts: Tts) -> None:
    prompts = make_prompts(tmp_path, tts)
    recorded = tmp_path / "custom" / "en" / "main_menu.wav"
    recorded.parent.mkdir(parents=True)
    recorded.write_bytes(b"RIFF")
    summary = await prompts.build_all()
    assert summary["custom"] == 1
    assert not (tmp_path / "out" / "en" / "main_menu.wav").exists()
    assert (tmp_path / "out" / "ru" / "main_menu.wav").exists()


async def test_unknown_prompt_and_lang(tmp_path: Path, tts: Tts) -> None:
    prompts = make_prompts(tmp_path, tts, custom=False)
    with pytest.raises(KeyError, match="no_such_prompt"):
        await prompts.path("no_such_prompt", "ru")
    with pytest.raises(ValueError, match="'de'"):
        await prompts.path("greeting", "de")
    with pytest.raises(ValueError):
        await prompts.build_all(langs=("ru", "de"))


@needs_audio
async def test_say_text_uses_cache(tmp_path: Path, tts: Tts, spawned: list[str]) -> None:
    prompts = make_prompts(tmp_path, tts)
    first = await prompts.say_text("двадцать один рубль пятьдесят копеек", "ru")
    second = await prompts.say_text("двадцать один рубль пятьдесят копеек", "ru")
    assert first == second and first.parent == tts.cache_dir
    assert spawned.count("espeak-ng") == 1


@needs_audio
async def test_out_dir_files_are_links_or_copies_of_cache(tmp_path: Path, tts: Tts) -> None:
    prompts = make_prompts(tmp_path, tts)
    base = await prompts.path("connecting", "ru")
    src = tts.cache_base(prompts.text("connecting", "ru"), "ru")
    for ext in ("wav", "ulaw"):
        a, b = with_ext(base, ext), with_ext(src, ext)
        assert a.samefile(b) or a.read_bytes() == b.read_bytes()
