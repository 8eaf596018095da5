"""What FreeSWITCH needed beyond the shared flows (issue 5): the paths FreeSWITCH sees for our recordings,
prompt files it can play as stored, mod_say for numbers/money/dates, and AMD with mod_avmd. Each runs a
flow through `esl_routes` (the config decides) against the scripted FreeSWITCH of tests/esl_peer.py."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import date, datetime
from datetime import time as dt_time
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

from esl.routes import esl_routes
from shopcall.config import Config, FreeswitchConfig, PathsConfig
from tests.esl_peer import SOUNDS, VANILLA_MODULES, Caller, FsPeer, call_once
from tests.scripted import PromptNames


def fs_config(tmp_path: Path, **freeswitch) -> Config:
    return replace(Config.default(), paths=PathsConfig(data_dir=tmp_path),
                   freeswitch=FreeswitchConfig(**freeswitch))


async def on_route(config: Config, flow, caller: Caller | None = None, *, prompts=None,
                   **peer) -> tuple[FsPeer, object]:
    """One call from the peer to `flow(call, app)` routed as production routes it; returns the peer and
    what the flow returned."""
    out: dict[str, object] = {}

    async def named(call, app):
        out["value"] = await flow(call, app)

    app = SimpleNamespace(config=config, prompts=prompts or PromptNames())
    variables = {"shopcall_flow": "t"} | peer.pop("variables", {})
    fs = await call_once(esl_routes(app, {"t": named}), caller, variables=variables, command_timeout=2, **peer)
    return fs, out.get("value")


def args_of(peer: FsPeer, app: str) -> list[str]:
    return [arg for name, arg in peer.apps if name == app]


# -- 4. freeswitch.recordings_path ---------------------------------------------------------------------


async def test_recordings_are_written_where_freeswitch_sees_our_recordings_dir(tmp_path):
    config = fs_config(tmp_path, recordings_path=Path("/srv/fs/rec"))
    local = config.recordings_dir

    async def flow(call, app):
        result = await call.record(local / "voicemail" / "2026" / "m.wav", max_seconds=5, beep=False)
        await call.start_recording(local / "2026" / "11" / "25" / "c.wav")
        return result

    peer, result = await on_route(config, flow)
    assert args_of(peer, "record") == ["/srv/fs/rec/voicemail/2026/m.wav 5 200 5"]
    assert args_of(peer, "record_session") == ["/srv/fs/rec/2026/11/25/c.wav"]
    assert result.path == local / "voicemail" / "2026" / "m.wav"  # we read it back from our side
    assert (local / "voicemail" / "2026").is_dir()


async def test_without_recordings_path_freeswitch_uses_our_path(tmp_path):
    config = fs_config(tmp_path)
    target = config.recordings_dir / "x.wav"
    peer, _ = await on_route(config, lambda call, app: call.start_recording(target))
    assert args_of(peer, "record_session") == [str(target)]


# -- 2. prompt files FreeSWITCH can play as they are stored -----------------------------------------------


class Recorded(PromptNames):
    """Prompt ids resolve to a custom recordings folder, as Prompts.path() returns a recording's base."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    async def path(self, prompt_id: str, lang: str) -> Path:
        return self.folder / lang / prompt_id


async def test_recorded_prompts_play_in_the_format_they_are_stored(tmp_path, caplog):
    custom = tmp_path / "custom"
    (custom / "ru").mkdir(parents=True)
    for name, exts in {"greeting": ["ulaw"], "goodbye": ["gsm"], "connecting": ["alaw", "ulaw"],
                       "main_menu": ["wav", "ulaw", "gsm"], "after_hours": ["sln16"]}.items():
        for ext in exts:
            (custom / "ru" / f"{name}.{ext}").write_bytes(b"\xff" * 800)
    config = fs_config(tmp_path)

    async def flow(call, app):
        await call.play("greeting", "goodbye", "connecting", "main_menu", "after_hours", "after_hours")
        await call.ask("greeting")

    peer, _ = await on_route(config, flow, prompts=Recorded(custom))
    played = [Path(a).name for a in args_of(peer, "playback")]
    # mod_sndfile opens raw .ulaw/.alaw/.gsm by extension: no conversion, the recording plays as stored
    assert played == ["greeting.ulaw", "goodbye.gsm", "connecting.ulaw", "main_menu.wav",
                      "after_hours.wav", "after_hours.wav"]
    assert args_of(peer, "play_and_get_digits")[0].split(" ")[5] == str(custom / "ru" / "greeting.ulaw")
    warned = [r.getMessage() for r in caplog.records if "cannot play" in r.getMessage()]
    assert len(warned) == 1 and "after_hours" in warned[0] and ".sln16" in warned[0]  # once, naming the fix


async def test_synthesised_prompts_keep_playing_the_wav(tmp_path):
    sounds = tmp_path / "sounds"
    (sounds / "ru").mkdir(parents=True)
    for ext in ("wav", "ulaw"):  # what `shopcall prompts build` writes
        (sounds / "ru" / f"greeting.{ext}").write_bytes(b"\x00" * 800)
    config = fs_config(tmp_path, sounds_path=Path("/usr/share/freeswitch/sounds/shopcall"))
    peer, _ = await on_route(config, lambda call, app: call.play("greeting"), prompts=Recorded(sounds))
    assert args_of(peer, "playback") == ["/usr/share/freeswitch/sounds/shopcall/ru/greeting.wav"]


# -- 1. say via mod_say -------------------------------------------------------------------------------------


class Spoken(PromptNames):
    """The TTS side: remembers the texts it was asked to synthesise (files named by hash, as the cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    async def say_text(self, text: str, lang: str) -> Path:
        self.texts.append(text)
        return Path(f"/tts/{lang}/{hashlib.sha1(text.encode()).hexdigest()}")


def noon_in_moscow(d: date) -> str:
    return str(int(datetime.combine(d, dt_time(12), ZoneInfo("Europe/Moscow")).timestamp()))


async def test_mod_say_speaks_numbers_digits_money_and_dates_in_russian(tmp_path):
    config = fs_config(tmp_path, say="mod_say")

    async def flow(call, app):
        await call.say_number(42)
        await call.say_digits("0123")
        await call.say_money(Decimal("12.5"))
        await call.say_money(1500)
        await call.say_date(date(2026, 12, 3))
        await call.say_money(Decimal("7.05"), "USD")

    tts = Spoken()
    peer, _ = await on_route(config, flow, prompts=tts, modules=VANILLA_MODULES | {"mod_say_ru"})
    assert peer.said == ["ru number pronounced 42", "ru number iterated 0123", "ru currency pronounced 12.50",
                         "ru currency pronounced 1500",
                         f"ru current_date pronounced {noon_in_moscow(date(2026, 12, 3))}",
                         "ru currency pronounced 7.05"]
    # mod_say_ru takes the currency and the date's zone from channel variables, set once each
    assert args_of(peer, "set") == ["playback_terminators=none", "currency=ruble", "timezone=Europe/Moscow",
                                    "currency=dollar"]
    assert tts.texts == [] and args_of(peer, "playback") == []
    assert [c for c in peer.commands if c.startswith("api")] == [  # asked once: the module, its language, a file
        "api module_exists mod_say_ru", "api xml_locate languages language name ru",
        f"api file_exists {SOUNDS}/ru/digits/1.wav"]


async def test_mod_say_in_english_and_what_it_cannot_say_goes_to_the_tts(tmp_path):
    config = fs_config(tmp_path, say="mod_say")

    async def flow(call, app):
        await call.say_number(7)
        await call.say_money(Decimal("12.50"), "USD")
        await call.say_money(Decimal("990"), "RUB")  # mod_say_en knows dollars only
        await call.say_number(-3)  # mod_say reads no sign
        await call.say_number(1_000_000_000)  # nor ten digits
        await call.say_digits("12-34")  # nor a dash: only plain digits are handed over
        await call.say_digits("١٢3")  # Arabic-Indic digits are digits to Python, not to mod_say
        await call.say_money(Decimal("5"), "EUR")

    tts = Spoken()
    peer, _ = await on_route(config, flow, prompts=tts, variables={"shopcall_language": "en"})
    assert peer.said == ["en number pronounced 7", "en currency pronounced 12.50"]
    assert tts.texts == ["nine hundred and ninety roubles", "minus three", "one billion", "one two, three four",
                         "three", "five euro"]
    assert "currency=" not in " ".join(args_of(peer, "set"))


async def test_tts_stays_the_default_and_mod_say_is_never_asked(tmp_path):
    tts = Spoken()
    peer, _ = await on_route(fs_config(tmp_path), lambda call, app: call.say_number(42), prompts=tts)
    assert tts.texts == ["сорок два"] and args_of(peer, "say") == []
    assert not [c for c in peer.commands if c.startswith("api")]


async def test_a_missing_say_module_falls_back_to_the_tts_and_is_logged_once(tmp_path, caplog):
    async def flow(call, app):
        await call.say_number(1)
        await call.say_date(date(2026, 1, 7))

    tts = Spoken()
    peer, _ = await on_route(fs_config(tmp_path, say="mod_say"), flow, prompts=tts)  # vanilla: no mod_say_ru
    assert args_of(peer, "say") == [] and tts.texts == ["один", "седьмое января"]
    warned = [r.getMessage() for r in caplog.records if "mod_say_ru" in r.getMessage()]
    assert len(warned) == 1 and "TTS" in warned[0]


async def test_mod_say_without_its_sound_files_falls_back_to_the_tts_and_is_logged_once(tmp_path, caplog):
    # no sound pack ships with FreeSWITCH: its `say` would play silence
    async def flow(call, app):
        await call.say_number(1)
        await call.say_number(2)

    tts = Spoken()
    peer, _ = await on_route(fs_config(tmp_path, say="mod_say"), flow, prompts=tts,
                             modules=VANILLA_MODULES | {"mod_say_ru"}, sounds=set())
    assert args_of(peer, "say") == [] and tts.texts == ["один", "два"]
    warned = [r.getMessage() for r in caplog.records if "sound files" in r.getMessage()]
    assert len(warned) == 1 and "TTS" in warned[0] and f"{SOUNDS}/ru" in warned[0], warned


async def test_a_key_interrupts_mod_say_like_a_prompt(tmp_path):
    config = fs_config(tmp_path, say="mod_say")
    peer, key = await on_route(config, lambda call, app: call.say_number(42, interruptible=True),
                               Caller(greeting_key="5"), modules=VANILLA_MODULES | {"mod_say_ru"})
    assert key == "5" and args_of(peer, "set")[0] == "playback_terminators=0123456789*#"
