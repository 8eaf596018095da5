"""The Call vocabulary every flow is written in, whatever the PBX.

A PBX adapter (agi/, esl/) subclasses `Call` and implements the few primitives marked abstract: answer,
stream a sound, collect digits, dial, record, variables, hangup. Everything a flow says in words (numbers,
money, dates) and every menu is built here from those primitives, once, so a flow never sees the PBX.
"""

from __future__ import annotations

import abc
import enum
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Protocol

log = logging.getLogger("shopcall.call")

DTMF_KEYS = frozenset("0123456789*#")
# a plain variable or a dialplan function with a simple argument, e.g. CALLERID(name)
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}(\([A-Za-z0-9_-]{0,32}\))?$")
_ENDPOINT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,62}$")
_PHONE_NUMBER = re.compile(r"^\+?[0-9]{3,20}$")


class CallEnded(Exception):
    """The caller hung up or the PBX closed the session: the flow stops, its `finally` blocks still run."""


class PbxError(Exception):
    """The PBX rejected or did not answer a command (bad reply, timeout)."""


class SoundSource(Protocol):
    """Where sounds come from: prompt ids and free text turned into files (shopcall.prompts.Prompts)."""

    async def path(self, prompt_id: str, lang: str) -> Path: ...

    async def say_text(self, text: str, lang: str) -> Path: ...


@dataclass(frozen=True)
class CallInfo:
    """What the PBX told us about the call when it handed it over."""

    uniqueid: str
    pbx: str
    caller_number: str = ""
    caller_name: str = ""
    dialled_number: str = ""
    channel: str = ""
    language: str = "ru"
    script: str = ""
    caller_endpoint: str = ""  # the PBX device placing the call (an agent's phone), when it is one of ours
    created_at: datetime | None = None  # when the PBX created the channel, if it says so
    args: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, str] = field(default_factory=dict)


class DialStrategy(enum.StrEnum):
    RINGALL = "ringall"  # every endpoint at once, first to answer wins
    HUNT = "hunt"  # one after another, each for the timeout


class DialStatus(enum.StrEnum):
    ANSWERED = "answered"
    NOANSWER = "noanswer"
    BUSY = "busy"
    FAILED = "failed"  # unreachable / congestion / invalid endpoint
    CALLER_GONE = "caller_gone"  # the caller hung up while it rang


@dataclass(frozen=True)
class DialResult:
    status: DialStatus
    answered_endpoint: str | None = None  # the endpoint name (not the PBX dial string) that answered
    talk_seconds: float = 0.0
    detail: str = ""  # the PBX's own words (DIALSTATUS, hangup cause), for the logs


@dataclass(frozen=True)
class RecordResult:
    path: Path
    seconds: float
    ended_by: str  # "silence" | "maxtime" | "dtmf" | "hangup"


@dataclass(frozen=True)
class MenuResult:
    """What the caller chose and how: `how` is "pressed", "default_no_input" or "default_invalid"."""

    choice: str
    how: str
    attempts: int


def check_endpoint(name: str) -> str:
    """Endpoint names reach a dial string: allow only what cannot change its meaning."""
    if not _ENDPOINT.fullmatch(name or ""):  # fullmatch: "$" alone would let a trailing newline through
        raise ValueError(f"invalid endpoint name {name!r}: letters, digits and _.+- only")
    return name


def check_number(number: str) -> str:
    """An outside phone number reaches a dial string: digits with an optional leading + only."""
    if not _PHONE_NUMBER.fullmatch(number or ""):  # fullmatch: "$" would let a trailing "\n" through
        raise ValueError(f"invalid phone number {number!r}: digits with an optional leading + only")
    return number


def presentable(name: str, limit: int = 80) -> str:
    """A caller name as an agent's phone can show it. A control character (a carrier's garbage, a newline)
    would be copied raw into the SIP message that rings the agent, and the phone drops that message."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in name).split())[:limit]


def is_endpoint(name: str) -> bool:
    try:
        return bool(check_endpoint(name))
    except ValueError:
        return False


def check_var_name(name: str) -> str:
    if not _VAR_NAME.fullmatch(name or ""):
        raise ValueError(f"invalid channel variable name {name!r}")
    return name


class Call(abc.ABC):
    """One live call. Subclasses implement the primitives for their PBX."""

    def __init__(self, info: CallInfo, sounds: SoundSource) -> None:
        self.info = info
        self.sounds = sounds
        self.language = info.language if info.language in ("ru", "en") else "ru"
        self.ended = False

    # -- primitives each PBX implements ------------------------------------------------------------

    @abc.abstractmethod
    async def answer(self) -> None: ...

    @abc.abstractmethod
    async def stream(self, sound: Path, *, escape: str = "") -> str | None:
        """Play a sound file (path without extension); returns the key that interrupted it, if any."""

    @abc.abstractmethod
    async def collect(self, sound: Path | None, *, max_digits: int, timeout: float) -> str | None:
        """Play `sound` (interruptible) then wait `timeout` s for up to `max_digits` keys; None on no input."""

    async def dial(
        self,
        endpoints: Sequence[str],
        *,
        strategy: DialStrategy = DialStrategy.RINGALL,
        timeout: int = 20,
        caller_name: str | None = None,
        caller_number: str | None = None,
    ) -> DialResult:
        """Ring our endpoints by name. The names are checked here, once for every PBX, so nothing that is
        not an endpoint name can reach a dial string. `caller_name` and `caller_number` are what the agents'
        phones show instead of the channel's own (a robot call shows the customer, not the campaign's)."""
        names = [check_endpoint(e) for e in endpoints]
        if not names:
            return DialResult(DialStatus.FAILED, detail="no endpoints")
        number = check_number(caller_number) if caller_number is not None else None
        return await self.ring(names, strategy=strategy, timeout=timeout, caller_name=caller_name,
                               caller_number=number)

    @abc.abstractmethod
    async def ring(
        self, names: list[str], *, strategy: DialStrategy, timeout: int, caller_name: str | None,
        caller_number: str | None = None,
    ) -> DialResult:
        """Ring validated endpoint names (at least one) with the strategy; the PBX's part of `dial`."""

    async def on_a_call(self, endpoints: Sequence[str]) -> frozenset[str]:
        """Which of our endpoints are on a call now, by the PBX's own account (a group's skip_busy). The
        names are checked here as for `dial`; a PBX that cannot say answers none, so everyone still rings."""
        names = [check_endpoint(e) for e in endpoints]
        if not names:
            return frozenset()
        try:
            return await self.busy(names)
        except CallEnded:
            raise
        except Exception as exc:  # busy agents are a nicety: ringing them beats failing the call
            log.warning("%s: could not ask who is on a call (%s): ringing everyone", self.info.uniqueid, exc)
            return frozenset()

    @abc.abstractmethod
    async def busy(self, names: list[str]) -> frozenset[str]:
        """The validated names (at least one) whose phone is on a call: the PBX's part of `on_a_call`."""

    async def dial_number(self, number: str, *, timeout: int = 30) -> DialResult:
        """Dial an outside number (E.164 or digits) through the PBX's trunk and bridge it to this call;
        how the trunk is reached (the dial string) is the adapter's business, not the flow's."""
        raise NotImplementedError(f"{type(self).__name__} cannot dial outside numbers")

    async def last_dial(self) -> DialResult:
        """How the PBX's own last dial on this channel ended (the dialplan's fallback ring, which no flow
        placed), read after the fact; `answered_endpoint` is then the endpoint's name as far as the PBX's
        channel name tells it."""
        raise NotImplementedError(f"{type(self).__name__} cannot read the dialplan's own dials")

    @abc.abstractmethod
    async def record(
        self, path: Path, *, max_seconds: int = 120, silence_seconds: int = 5, beep: bool = True
    ) -> RecordResult: ...

    async def start_recording(self, path: Path, *, on_demand: bool = False) -> None:
        """Record the conversation with the agent (the bridged part only) into `path` (.wav). With
        `on_demand`, nothing is recorded until the agent asks for it with the PBX's feature code."""
        raise NotImplementedError(f"{type(self).__name__} cannot record calls")

    async def stop_recording(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot record calls")

    @abc.abstractmethod
    async def set_var(self, name: str, value: str) -> None: ...

    async def set_vars(self, values: Mapping[str, str]) -> None:
        """Several variables at once; an adapter may send them as one command."""
        for name, value in values.items():
            await self.set_var(name, value)

    @abc.abstractmethod
    async def get_var(self, name: str) -> str | None: ...

    @abc.abstractmethod
    async def hangup(self, cause: str = "normal") -> None: ...

    # -- the vocabulary flows use, built from the primitives ---------------------------------------

    async def play_files(self, sounds: Sequence[Path]) -> None:
        """Play sound files in order, no key stops them; an adapter may send them as one command."""
        for sound in sounds:
            await self.stream(sound)

    async def play(self, *prompts: str | Path, interruptible: bool = False) -> str | None:
        """Play prompt ids (str) or files (Path) in order; with `interruptible`, a key stops and is returned."""
        sounds = [p if isinstance(p, Path) else await self.sounds.path(p, self.language) for p in prompts]
        if not interruptible:
            await self.play_files(sounds)
            return None
        for sound in sounds:
            key = await self.stream(sound, escape="0123456789*#")
            if key:
                return key
        return None

    async def say(self, text: str, *, interruptible: bool = False) -> str | None:
        return await self.play(await self.sounds.say_text(text, self.language), interruptible=interruptible)

    async def say_number(self, n: int, **kw: bool) -> str | None:
        from shopcall import speech

        return await self.say(speech.number_text(n, self.language), **kw)

    async def say_digits(self, digits: str, **kw: bool) -> str | None:
        from shopcall import speech

        return await self.say(speech.digits_text(digits, self.language), **kw)

    async def say_money(self, amount: Decimal | int, currency: str = "RUB", **kw: bool) -> str | None:
        from shopcall import speech

        return await self.say(speech.money_text(amount, currency, self.language), **kw)

    async def say_date(self, d: date, **kw: bool) -> str | None:
        from shopcall import speech

        return await self.say(speech.date_text(d, self.language), **kw)

    async def ask(self, prompt: str | Path | None, *, max_digits: int = 1, timeout: float = 5.0) -> str | None:
        sound = None
        if prompt is not None:
            sound = prompt if isinstance(prompt, Path) else await self.sounds.path(prompt, self.language)
        return await self.collect(sound, max_digits=max_digits, timeout=timeout)

    async def menu(
        self,
        prompt: str | Path,
        choices: Sequence[str] | Mapping[str, object],
        *,
        default: str | None = None,
        timeout: float = 5.0,
        retries: int = 2,
        invalid_prompt: str | None = "invalid_choice",
        first_key: str | None = None,
    ) -> MenuResult | None:
        """Ask for one key among `choices`, repeating the prompt on no or invalid input.

        After `retries` repeats the `default` choice is taken (None → the menu fails and returns None).
        `first_key` is a key the caller already pressed (e.g. during the greeting).
        """
        valid = set(choices)
        last_failure = "default_no_input"
        for attempt in range(1, retries + 2):
            key = first_key if attempt == 1 and first_key else await self.ask(prompt, timeout=timeout)
            if key and key in valid:
                return MenuResult(key, "pressed", attempt)
            if key:
                last_failure = "default_invalid"
                log.info("%s: invalid menu key %r (attempt %d)", self.info.uniqueid, key, attempt)
                if invalid_prompt and attempt <= retries:
                    await self.play(invalid_prompt)
            else:
                last_failure = "default_no_input"
                log.info("%s: no menu input (attempt %d)", self.info.uniqueid, attempt)
        if default is None:
            return None
        return MenuResult(default, last_failure, retries + 1)
