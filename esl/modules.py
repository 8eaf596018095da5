"""Which optional FreeSWITCH modules are loaded, asked with `api module_exists` (answers `true`/`false`).

Used before an application that belongs to one: FreeSWITCH hangs a channel up (DESTINATION_OUT_OF_ORDER)
when it is told to run an application no loaded module provides (mod_avmd's avmd_start), and its `say`
plays nothing for a language whose mod_say_* is missing. The answer is kept for a while (a module loaded
later is picked up) and a missing module is logged once, with what its absence costs, not per call.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("shopcall.esl")

_MODULE = re.compile(r"^mod_[a-z0-9_]{1,60}$")
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
        known = self._known.get(name)
        if known is not None and self.clock() - known[0] < self.recheck:
            return known[1]
        present = (await api(f"module_exists {name}")).strip() == "true"
        if not present and (known is None or known[1]):
            log.warning("FreeSWITCH has no %s loaded: %s (load it in autoload_configs/modules.conf.xml)",
                        name, without)
        elif present and known is not None and not known[1]:
            log.info("FreeSWITCH now has %s loaded", name)
        self._known[name] = (self.clock(), present)
        return present
