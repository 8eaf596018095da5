"""The IVR's fixed prompts: texts from sounds/prompts.toml, synthesised or replaced by recordings."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import string
import time
import tomllib
from pathlib import Path

from shopcall import hold_music
from shopcall.tts import Tts, with_ext

# Prompt ids the call flow relies on; a texts file lacking one fails at load, not mid-call.
PROMPT_IDS = (
    "greeting",
    "recording_notice",
    "main_menu",
    "invalid_choice",
    "connecting",
    "nobody_answered",
    "after_hours",
    "holiday_closed",
    "goodbye",
    "technical_problem",
)
REQUIRED_LANGS = ("ru", "en")
# Formats a recording may come in; Asterisk picks the cheapest one for the call's codec.
CUSTOM_EXTS = ("wav", "ulaw", "alaw", "gsm", "sln", "sln16", "g722", "wav16")
BUILT_EXTS = ("wav", "ulaw")
_ID_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _mtime_ns(directory: Path) -> int:
    try:
        return directory.stat().st_mtime_ns
    except OSError:
        return -1


class PromptTextError(ValueError):
    """prompts.toml is malformed: missing text, unknown placeholder, bad id."""


class Prompts:
    def __init__(
        self,
        tts: Tts,
        texts_file: Path,
        out_dir: Path,
        custom_dir: Path | None,
        variables: dict[str, str],
    ) -> None:
        self.tts = tts
        self.texts_file = Path(texts_file)
        self.out_dir = Path(out_dir)
        self.custom_dir = Path(custom_dir) if custom_dir is not None else None
        self.variables = dict(variables)
        self._texts: dict[str, dict[str, str]] | None = None
        # (prompt, lang) -> (the two directories' mtimes, the path chosen): one stat per directory per
        # prompt played instead of ten; adding, removing or renaming a file changes its directory's mtime
        self._resolved: dict[tuple[str, str], tuple[tuple[int, int], Path]] = {}

    def load_texts(self) -> dict[str, dict[str, str]]:
        """Parse and render prompts.toml -> {prompt_id: {lang: text}}; raises PromptTextError."""
        where = str(self.texts_file)
        try:
            with self.texts_file.open("rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise PromptTextError(f"{where}: {e}") from e
        texts: dict[str, dict[str, str]] = {}
        for prompt_id, table in data.items():
            if not _ID_RE.match(prompt_id):
                raise PromptTextError(
                    f"{where}: prompt id {prompt_id!r} must be lowercase letters, digits, _"
                )
            if not isinstance(table, dict):
                raise PromptTextError(f"{where}: [{prompt_id}] must be a table with ru = ... and en = ...")
            for lang in REQUIRED_LANGS:
                if not isinstance(table.get(lang), str) or not table[lang].strip():
                    raise PromptTextError(f"{where}: [{prompt_id}] has no {lang} text")
            texts[prompt_id] = {
                lang: self._render(text, f"{where}: [{prompt_id}] {lang}")
                for lang, text in table.items()
                if isinstance(text, str)
            }
        missing = [p for p in PROMPT_IDS if p not in texts]
        if missing:
            raise PromptTextError(f"{where}: missing prompts: {', '.join(missing)}")
        self._texts = texts
        return texts

    def _render(self, template: str, where: str) -> str:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        except ValueError as e:  # stray "{" or "}"
            raise PromptTextError(f"{where}: {e} (write {{{{ or }}}} for a literal brace)") from e
        for name in fields:
            if name not in self.variables:
                known = ", ".join(sorted(self.variables)) or "none"
                raise PromptTextError(f"{where}: unknown placeholder {{{name}}} (known: {known})")
        return template.format_map(self.variables)

    @property
    def texts(self) -> dict[str, dict[str, str]]:
        if self._texts is None:
            self.load_texts()
        assert self._texts is not None
        return self._texts

    def text(self, prompt_id: str, lang: str) -> str:
        if prompt_id not in self.texts:
            raise KeyError(f"unknown prompt id {prompt_id!r} (not in {self.texts_file})")
        if lang not in self.texts[prompt_id] or lang not in self.tts.voices:
            raise ValueError(f"prompt {prompt_id!r} has no {lang!r} version (text and TTS voice needed)")
        return self.texts[prompt_id][lang]

    def custom_base(self, prompt_id: str, lang: str) -> Path | None:
        """A recorded replacement `<custom_dir>/<lang>/<prompt_id>.<any format>`, if present."""
        if self.custom_dir is None:
            return None
        base = self.custom_dir / lang / prompt_id
        return base if any(with_ext(base, ext).is_file() for ext in CUSTOM_EXTS) else None

    async def path(self, prompt_id: str, lang: str) -> Path:
        """Base path (no extension) to play: a recording if any, else the synthesised prompt."""
        if prompt_id == hold_music.PROMPT_ID:  # music, not a text: made once, for every language
            return self.custom_base(prompt_id, lang) or await asyncio.to_thread(
                hold_music.render, self.out_dir / prompt_id)
        text = self.text(prompt_id, lang)
        stamp = (_mtime_ns(self.custom_dir / lang) if self.custom_dir else 0, _mtime_ns(self.out_dir / lang))
        hit = self._resolved.get((prompt_id, lang))
        if hit is not None and hit[0] == stamp:
            return hit[1]
        custom = self.custom_base(prompt_id, lang)
        if custom is not None:
            self._resolved[prompt_id, lang] = (stamp, custom)
            return custom
        built = self.out_dir / lang / prompt_id
        if all(with_ext(built, ext).is_file() for ext in BUILT_EXTS):
            self._resolved[prompt_id, lang] = (stamp, built)
            return built
        await self._build_one(prompt_id, lang, text)
        return built  # not remembered: building it changed the directory's mtime anyway

    async def say_text(self, text: str, lang: str) -> Path:
        """Free text (amounts, dates, order numbers) -> cached TTS base path."""
        return await self.tts.synth(text, lang)

    async def build_all(self, langs: tuple[str, ...] = REQUIRED_LANGS) -> dict[str, int]:
        """Synthesise every prompt into out_dir/<lang>/<id>.{wav,ulaw}.

        Returns counts: generated (TTS ran), cached (TTS cache hit), custom (a recording
        exists, nothing built), updated (prompt files in out_dir written or replaced).
        """
        texts = self.load_texts()  # re-read: build_all is how edits to prompts.toml are picked up
        jobs = [(p, lang) for p in texts for lang in langs]
        for prompt_id, lang in jobs:
            self.text(prompt_id, lang)  # validate every lang before any work
        summary = {"generated": 0, "cached": 0, "custom": 0, "updated": 0}
        sem = asyncio.Semaphore(os.cpu_count() or 2)

        async def one(prompt_id: str, lang: str) -> None:
            if self.custom_base(prompt_id, lang) is not None:
                summary["custom"] += 1
                return
            text = texts[prompt_id][lang]
            summary["cached" if self.tts.is_cached(text, lang) else "generated"] += 1
            async with sem:
                if await self._build_one(prompt_id, lang, text):
                    summary["updated"] += 1

        await asyncio.gather(*(one(p, lang) for p, lang in jobs))
        await asyncio.to_thread(hold_music.render, self.out_dir / hold_music.PROMPT_ID)
        return summary

    async def _build_one(self, prompt_id: str, lang: str, text: str) -> bool:
        """Place the TTS of `text` at out_dir/<lang>/<id>; False if it was already there unchanged."""
        src = await self.tts.synth(text, lang)
        dst = self.out_dir / lang / prompt_id
        dst.parent.mkdir(parents=True, exist_ok=True)
        changed = False
        for ext in BUILT_EXTS:
            changed |= _place(with_ext(src, ext), with_ext(dst, ext))
        return changed


def _place(src: Path, dst: Path) -> bool:
    """Hardlink (or copy across filesystems) src to dst atomically; skip if dst already matches."""
    if dst.is_file() and (os.path.samefile(src, dst) or _same_bytes(src, dst)):
        return False
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # other filesystem, or links not allowed
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return True


def _same_bytes(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


_SOUND_FORMATS = ((".wav", 16000), (".ulaw", 8000), (".alaw", 8000), (".sln", 16000), (".gsm", 1650))
_SOUND_SECONDS_TTL = 5.0  # a prompt re-recorded meanwhile is measured again this soon
_sound_seconds: dict[Path, tuple[float, float]] = {}  # base -> (measured at, seconds)


def sound_seconds(base: Path) -> float:
    """How long a sound plays, from its size; used only to size the command timeout (which adds its own
    margin), so a length measured a few seconds ago will do: two stat calls a prompt were 3 % of a call."""
    now = time.monotonic()
    hit = _sound_seconds.get(base)
    if hit is not None and now - hit[0] < _SOUND_SECONDS_TTL:
        return hit[1]
    seconds = 30.0
    for ext, bytes_per_s in _SOUND_FORMATS:
        try:
            size = base.with_name(base.name + ext).stat().st_size
        except OSError:
            continue
        seconds = max(0.0, (size - 44) / bytes_per_s)
        break
    if len(_sound_seconds) >= 4096:  # one-off files (a said order number) do not pile up
        _sound_seconds.clear()
    _sound_seconds[base] = (now, seconds)
    return seconds
