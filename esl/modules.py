"""Which optional FreeSWITCH modules are loaded, asked with `api module_exists` (answers `true`/`false`), and
whether `say` can speak a language.

Used before an application that belongs to one: FreeSWITCH hangs a channel up (DESTINATION_OUT_OF_ORDER)
when it is told to run an application no loaded module provides (mod_avmd's avmd_start), and its `say`
plays nothing for a language whose mod_say_* is missing, whose <language> its configuration lacks, or whose
sound files are not installed (no sound pack ships with FreeSWITCH's sources: seen on 1.10.12, `say` then
plays silence). The answer is kept for a while (a module or sound pack installed later is picked up) and a
missing one is logged once, with what its absence costs, not per call.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("shopcall.esl")

_MODULE = re.compile(r"^mod_[a-z0-9_]{1,60}$")
_LANGUAGE = re.compile(r"^[a-z]{2,8}$")
_PREFIX = re.compile(r'\ssound[-_](prefix|path)="([^"]*)"')
_PATH = re.compile(r"^[\w./@:+-]{1,1000}$")  # a path we pass to file_exists: no spaces, nothing expanded
RECHECK_SECONDS = 300.0


class Modules:
    def __init__(self, *, recheck: float = RECHECK_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.recheck, self.clock = recheck, clock
        self._known: dict[str, tuple[float, bool]] = {}  # module -> (when asked, loaded)

    async def loaded(self, api: Callable[[str], Awaitable[str]], name: str, *, without: str) -> bool:
        """Is module `name` loaded? `api` runs an API command (the call's own socket); `without` says,
        for the log, what happens while it is missing."""
        if not _MODULE.match(name):
            raise ValueError(f"invalid FreeSWITCH module name {name!r}")

        async def ask() -> str:
            present = (await api(f"module_exists {name}")).strip() == "true"
            return "" if present else "not loaded (load it in autoload_configs/modules.conf.xml)"

        return await self._known_or_ask(name, name, ask, without)

    async def speaks(self, api: Callable[[str], Awaitable[str]], language: str, *, without: str) -> bool:
        """Can `say` speak `language`: its mod_say_<language> loaded, the language in FreeSWITCH's
        languages (or legacy phrases) section, and a number's sound file under its sound-prefix?"""
        if not _LANGUAGE.match(language):
            raise ValueError(f"invalid language {language!r}")
        module = f"mod_say_{language}"
        if not await self.loaded(api, module, without=without):
            return False

        async def ask() -> str:
            found = ""
            for section in ("languages", "phrases"):
                found = await api(f"xml_locate {section} language name {language}")
                if found.lstrip().startswith("<language"):
                    break
            m = _PREFIX.search(found)
            if not found.lstrip().startswith("<language"):
                return "has no <language> in its configuration"
            if m is None:
                return "has no sound-prefix for it"
            prefix = m.group(2)
            for sample in (f"{prefix}/digits/1.wav", f"{prefix}/digits/8000/1.wav"):
                if _PATH.match(sample) and (await api(f"file_exists {sample}")).strip() == "true":
                    return ""
            return f"has no sound files under {prefix} (install the {language} sound pack)"

        return await self._known_or_ask(f"say:{language}", f"say {language}", ask, without)

    async def _known_or_ask(self, key: str, what: str, ask: Callable[[], Awaitable[str]], without: str) -> bool:
        """The cached answer, or `ask` (which returns why it is missing, "" when present)."""
        known = self._known.get(key)
        if known is not None and self.clock() - known[0] < self.recheck:
            return known[1]
        why = await ask()
        present = not why
        if not present and (known is None or known[1]):
            log.warning("FreeSWITCH %s: %s: %s", what, why, without)
        elif present and known is not None and not known[1]:
            log.info("FreeSWITCH %s is there now", what)
        self._known[key] = (self.clock(), present)
        return present
