"""The Call vocabulary over FreeSWITCH's Event Socket (outbound socket, `async full`).

Facts from the captured transcripts that shape this file:
- play_and_get_digits answers `_none_`; the digits are in `variable_<var>` with `read_result=success`.
- `call_timeout` inside a bridge's `{}` is ignored (the bridge waited the default 60 s): it is set on
  our channel with `set` before the bridge.
- A failed bridge hangs up the calling channel unless the cause is NO_ANSWER (or `continue_on_fail` is
  set): a per-leg `leg_timeout` gives ALLOTTED_TIMEOUT and killed the socket's own channel. We set
  `continue_on_fail=true` once per call, so no dial outcome costs us the caller.
- The bridge outcome is spelled differently in two variables (`originate_disposition=NO_ANSWER`,
  `DIALSTATUS=NOANSWER`); who answered is `last_bridge_to`, the uuid of the answering leg, which we
  choose ourselves per leg (`[origination_uuid=...]`) to know the endpoint.
- `record` reports `record_ms` of audio actually written, not wall time (1 s of tone in a 6 s record).
- `say` (mod_dptools) takes `<lang> <type> <method> <text>`; mod_say_ru/en read at most nine digits, no
  sign for a count, money as `12.50` (roubles or dollars in Russian, dollars only in English), a date as
  an epoch in the channel's `timezone`; keys end it as they end a playback (playback_terminators).
- mod_avmd (source, not captured): `avmd_start` reads the customer's side of our outbound channel, sets
  `avmd_detect=TRUE` and fires CUSTOM `avmd::beep` (outside myevents: subscribed with `event plain`). An
  application whose module is not loaded hangs the channel up (DESTINATION_OUT_OF_ORDER), so
  `module_exists` is asked first (esl/modules.py).
- Prompt files: mod_sndfile opens raw .ulaw/.alaw/.gsm by their extension (its source lists them beside
  the libsndfile formats), so a recording stored only in Asterisk's formats plays without conversion.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import date, datetime
from datetime import time as dt_time
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

from esl import protocol
from esl.channels import channels, talking
from esl.modules import Modules
from esl.protocol import Event
from esl.session import OutboundSession
from shopcall.call import (
    Call,
    CallEnded,
    CallInfo,
    DialResult,
    DialStatus,
    DialStrategy,
    PbxError,
    RecordResult,
    SoundSource,
    check_number,
)
from shopcall.prompts import CUSTOM_EXTS, sound_seconds
from shopcall.tts import with_ext

log = logging.getLogger("shopcall.esl")

_CAUSES = {
    "normal": "NORMAL_CLEARING",
    "busy": "USER_BUSY",
    "noanswer": "NO_ANSWER",
    "rejected": "CALL_REJECTED",
    "congestion": "NORMAL_CIRCUIT_CONGESTION",
}
# originate_disposition (or DIALSTATUS, spelled differently) -> our status
_DISPOSITION = {
    "SUCCESS": DialStatus.ANSWERED,
    "NO_ANSWER": DialStatus.NOANSWER,
    "NOANSWER": DialStatus.NOANSWER,
    "ALLOTTED_TIMEOUT": DialStatus.NOANSWER,
    "NO_USER_RESPONSE": DialStatus.NOANSWER,
    "RECOVERY_ON_TIMER_EXPIRE": DialStatus.NOANSWER,
    "USER_BUSY": DialStatus.BUSY,
    "BUSY": DialStatus.BUSY,
    "ORIGINATOR_CANCEL": DialStatus.CALLER_GONE,
    "CANCEL": DialStatus.CALLER_GONE,
}
ALL_KEYS = "0123456789*#"
SILENCE = "silence_stream://250"
BEEP = "tone_stream://%(250,0,1000)"
RINGBACK = "%(1000,4000,425)"  # what the caller hears while agents ring (our channel is answered)
DIGITS_VAR = "shopcall_digits"
RECORD_THRESHOLD = 200  # energy below which a frame counts as silence
ON_DEMAND_KEY = "2"  # with FreeSWITCH's meta key: the agent dials *2 to start recording
# mod_sndfile (in every FreeSWITCH) opens .wav by its header and raw .ulaw/.alaw/.gsm (8 kHz, G.711 and
# GSM 6.10, the files Asterisk uses) by extension; .sln/.sln16/.g722/.wav16 it does not know
PLAYABLE = ("wav", "ulaw", "alaw", "gsm")
_unplayable: set[Path] = set()  # prompts already warned about
SAY_MAX = 999_999_999  # mod_say_ru/en read at most nine digits of a number (and of roubles, dollars)
SAY_SECONDS = 20.0  # a say plays a handful of short files; a date, the longest, takes ~5 s
_DIGITS = re.compile(r"[0-9]{1,64}")
# the languages we speak through mod_say, and the currencies each one names (its `currency` variable)
_SAY_CURRENCY = {"ru": {"RUB": "ruble", "USD": "dollar"}, "en": {"USD": ""}}
AGENT_VARIABLE = "shopcall_agent"  # on each agent's leg of our bridges: whose phone it is
AMD_VARIABLE = "shopcall_amd"  # "1": the dialler's originate asks for AMD (the campaign's amd)
AVMD_BEEP = "avmd::beep"  # mod_avmd's CUSTOM event (Beep-Status: DETECTED); it also sets avmd_detect=TRUE
AMD_SILENCE_FRAMES = 40  # 20 ms frames: 0.8 s of silence after speech ends the wait (AMD's afterGreetingSilence)
AMD_SPEECH_FRAMES = 5  # 0.1 s of sound before the silence counts
_AMOUNT = re.compile(r"-?[0-9]{1,9}(\.[0-9]{2})?")
_MULTISET_DELIMITERS = "|~!;#@"  # multiset splits at one of these that no value holds


class EslCall(Call):
    def __init__(
        self,
        session: OutboundSession,
        info: CallInfo,
        sounds: SoundSource,
        *,
        endpoint_template: str = "user/{endpoint}",
        trunk_template: str = "sofia/gateway/trunk/{number}",
        pbx_path: Callable[[Path], str] = str,
        max_call_seconds: int = 14400,
        say: str = "tts",
        timezone: str = "Europe/Moscow",
        modules: Modules | None = None,
    ) -> None:
        super().__init__(info, sounds)
        self.session = session
        self.endpoint_template = endpoint_template
        self.trunk_template = trunk_template  # freeswitch.trunk_template: a customer's number via the gateway
        self.pbx_path = pbx_path  # our path of a file -> the path FreeSWITCH sees
        self.max_call_seconds = max_call_seconds
        self.say_engine = say  # freeswitch.say: "tts" (the shared prompts) or "mod_say"
        self.timezone = timezone  # the day a date names is taken in this zone (shop.timezone)
        self.modules = modules or Modules()
        self._set: dict[str, str] = {}  # channel variables we set, to skip repeating a `set`
        self._recording = ""  # the record_session file, for stop_record_session

    @property
    def _slack(self) -> float:
        return self.session.command_timeout

    async def _run(self, app: str, arg: str = "", *, timeout: float) -> Event:
        """Execute an application; a caller who hung up meanwhile ends the flow."""
        ev = await self.session.execute(app, arg, timeout=timeout)
        if self.session.hung_up:
            raise CallEnded(f"caller hung up during {app}")
        return ev

    async def _ensure(self, name: str, value: str) -> None:
        await self._ensure_all({name: value})

    async def _ensure_all(self, values: dict[str, str]) -> None:
        """Set what is not set to these values already: one `set`, or one `multiset` for several (every
        application FreeSWITCH runs for us costs a round trip and a completion event carrying all the
        channel's variables). Names are checked, values already made inert (app_text)."""
        todo = {name: value for name, value in values.items() if self._set.get(name) != value}
        # multiset splits at its delimiter (^^X picks X: one that no value holds) and takes quotes as
        # grouping, dropping them (an agent saw `Мария Маша` for `Мария 'Маша'`): such values go one by one
        together = {n: v for n, v in todo.items() if "'" not in v and '"' not in v}
        delimiter = next((d for d in _MULTISET_DELIMITERS if not any(d in v for v in together.values())), None)
        if len(together) > 1 and delimiter is not None:
            await self._run("multiset", f"^^{delimiter}" + delimiter.join(f"{n}={v}" for n, v in together.items()),
                            timeout=self._slack)
        else:
            together = {}
        for name, value in todo.items():
            if name not in together:
                await self._run("set", f"{name}={value}", timeout=self._slack)
        self._set.update(todo)

    def _file(self, sound: Path) -> str:
        """The file of a sound (a base path) FreeSWITCH plays: the first of the formats its mod_sndfile
        opens by extension that is there (a recorded prompt may be only .ulaw or .gsm)."""
        ext = next((e for e in PLAYABLE if with_ext(sound, e).is_file()), None)
        if ext is None:
            stored = [e for e in CUSTOM_EXTS if with_ext(sound, e).is_file()]
            if stored and sound not in _unplayable:
                _unplayable.add(sound)
                log.warning("%s: FreeSWITCH cannot play %s as stored (.%s): add a .wav, .ulaw, .alaw or .gsm",
                            self.info.uniqueid, sound, ", .".join(stored))
            ext = "wav"  # what we synthesise; also for a path only FreeSWITCH's side has
        return protocol.check_file(f"{self.pbx_path(sound)}.{ext}")

    # -- primitives -----------------------------------------------------------------------------

    async def answer(self) -> None:
        await self._run("answer", timeout=self._slack)

    async def stream(self, sound: Path, *, escape: str = "") -> str | None:
        return await self._play("playback", self._file(sound), escape, timeout=sound_seconds(sound) + self._slack)

    async def _play(self, app: str, arg: str, escape: str, *, timeout: float) -> str | None:
        """playback or say: both stop on a key listed in playback_terminators (FreeSWITCH's default "*")."""
        await self._ensure("playback_terminators", _key_set(escape) or "none")
        started = len(self.session.dtmf)
        ev = await self._run(app, arg, timeout=timeout)
        response = ev.get("Application-Response")
        if response not in ("FILE PLAYED", "", "_none_"):
            log.warning("%s: %s %s: %s", self.info.uniqueid, app, arg, response)
        if not escape:
            return None
        key = ev.var("playback_terminator_used") or ""
        if not key:  # fall back to the DTMF events seen while it played
            key = next((d for d in self.session.dtmf[started:] if d in escape), "")
        return key[:1] or None

    # -- say: FreeSWITCH's mod_say when freeswitch.say = "mod_say", else the shared TTS words --------
    # Only values mod_say reads right reach it, checked and formatted here (nothing is pasted); anything
    # else (a negative count, an order number with letters, roubles in English) is said by the TTS.

    async def say_number(self, n: int, **kw: bool) -> str | None:
        value = str(n) if type(n) is int and 0 <= n <= SAY_MAX else None  # mod_say reads 9 digits at most
        if value and await self._mod_say():
            return await self._say("number pronounced", value, **kw)
        return await super().say_number(n, **kw)

    async def say_digits(self, digits: str, **kw: bool) -> str | None:
        if _DIGITS.fullmatch(digits) and await self._mod_say():
            return await self._say("number iterated", digits, **kw)
        return await super().say_digits(digits, **kw)

    async def say_money(self, amount: Decimal | int, currency: str = "RUB", **kw: bool) -> str | None:
        # mod_say_ru knows roubles and dollars (channel variable `currency`), mod_say_en dollars only
        unit = _SAY_CURRENCY.get(self.language, {}).get(currency)
        value = _money(amount) if unit is not None else None
        if value and await self._mod_say():
            if unit:
                await self._ensure("currency", unit)
            return await self._say("currency pronounced", value, **kw)
        return await super().say_money(amount, currency, **kw)

    async def say_date(self, d: date, **kw: bool) -> str | None:
        if await self._mod_say():
            # mod_say reads a date from an epoch, in the channel's `timezone`: noon there names the day
            await self._ensure("timezone", self.timezone)
            noon = datetime.combine(date(d.year, d.month, d.day), dt_time(12), ZoneInfo(self.timezone))
            return await self._say("current_date pronounced", str(int(noon.timestamp())), **kw)
        return await super().say_date(d, **kw)

    async def _mod_say(self) -> bool:
        if self.say_engine != "mod_say" or self.language not in _SAY_CURRENCY or self.session.hung_up \
                or self.session.conn.closed:
            return False
        return await self.modules.speaks(self.session.api, self.language,
                                         without=f"freeswitch.say = mod_say speaks {self.language} with our TTS")

    async def _say(self, what: str, value: str, *, interruptible: bool = False) -> str | None:
        escape = ALL_KEYS if interruptible else ""
        return await self._play("say", f"{self.language} {what} {value}", escape, timeout=SAY_SECONDS + self._slack)

    # -- AMD: mod_avmd hears a voicemail's beep --------------------------------------------------

    async def detect_machine(self, seconds: int) -> str:
        """Before the robot speaks, as AMD() does on Asterisk: mod_avmd listens to the callee while
        wait_for_silence waits for them to speak and pause (a person's "Алло?"), or for a voicemail's
        greeting, its beep and the silence of its recording, `seconds` at most. A beep heard means
        MACHINE; otherwise NOTSURE (mod_avmd tells beeps, not voices); HANGUP when the callee left; ""
        when mod_avmd is not loaded, and the call goes on without AMD (running its application there
        would make FreeSWITCH hang the call up). Detection stops before the robot speaks."""
        try:
            if not await self.modules.loaded(self.session.api, "mod_avmd",
                                             without="AMD is unavailable on FreeSWITCH, robot calls go on without it"):
                return ""
            await self.session.subscribe("CUSTOM", AVMD_BEEP)  # not part of myevents
            # the customer's audio: the read side of our originated (outbound) channel
            await self._run("avmd_start", "inbound_channel=0,outbound_channel=1", timeout=self._slack)
            listened = await self._run("wait_for_silence", f"{RECORD_THRESHOLD} {AMD_SILENCE_FRAMES} "
                                       f"{AMD_SPEECH_FRAMES} {int(seconds) * 1000}", timeout=seconds + self._slack)
            stopped = await self._run("avmd_stop", timeout=self._slack)
        except CallEnded:
            return "HANGUP"
        except PbxError as exc:  # the robot still talks to the customer, only without AMD
            log.warning("%s: AMD failed, the call goes on without it: %s", self.info.uniqueid, exc)
            return ""
        beep = "TRUE" in (listened.var("avmd_detect"), stopped.var("avmd_detect")) or any(
            ev.get("Event-Subclass") == AVMD_BEEP for ev in self.session.custom)
        verdict = "MACHINE" if beep else "NOTSURE"
        log.info("%s: AMD (mod_avmd, %d s): %s", self.info.uniqueid, seconds, verdict)
        return verdict

    async def collect(self, sound: Path | None, *, max_digits: int, timeout: float) -> str | None:
        prompt = self._file(sound) if sound is not None else SILENCE
        ms = max(1000, int(timeout * 1000))  # FreeSWITCH raises anything shorter to 1 s
        length = sound_seconds(sound) if sound is not None else 0.25
        # min max tries timeout terminators prompt invalid-prompt var regex digit-timeout
        arg = f"1 {int(max_digits)} 1 {ms} # {prompt} {SILENCE} {DIGITS_VAR} ^[0-9*]+$ {ms}"
        ev = await self._run("play_and_get_digits", arg, timeout=length + timeout * max_digits + self._slack + 1)
        if ev.var("read_result") != "success":
            return None
        return ev.var(DIGITS_VAR) or None

    async def ring(
        self, names: list[str], *, strategy: DialStrategy, timeout: int, caller_name: str | None,
        caller_number: str | None = None,
    ) -> DialResult:
        legs = {str(uuid.uuid4()): n for n in names}
        if strategy == DialStrategy.RINGALL:
            ring_for = int(timeout)
            target = ",".join(self._leg(u, n) for u, n in legs.items())
        else:  # hunt: one after another, each for the timeout
            ring_for = int(timeout) * len(names)
            target = "|".join(self._leg(u, n, leg_timeout=int(timeout)) for u, n in legs.items())
        channel = self._bridge_vars(ring_for)
        # each leg inherits the caller's raw name unless told otherwise, and sofia cannot dial a name with a
        # quote in it: what agents see is set whenever it is not that raw name already
        shown = protocol.display_name(caller_name if caller_name is not None else self.info.caller_name)
        if shown and shown != self.session.channel.get("Caller-Caller-ID-Name"):
            channel["effective_caller_id_name"] = shown
        if caller_number is not None:
            channel["effective_caller_id_number"] = caller_number
        await self._ensure_all(channel)
        return await self._bridge(target, legs, ring_seconds=timeout * len(names))

    async def busy(self, names: list[str]) -> frozenset[str]:
        """One `show channels as json` on this call's own socket: which of them has an answered channel."""
        if self.session.hung_up:
            raise CallEnded("caller hung up")
        return talking(channels(await self.session.api("show channels as json")), names)

    async def dial_number(self, number: str, *, timeout: int = 30) -> DialResult:
        await self._ensure_all(self._bridge_vars(int(timeout)))
        leg = str(uuid.uuid4())
        target = f"[origination_uuid={leg}]" + self.trunk_template.format(number=check_number(number))
        result = await self._bridge(target, {leg: number}, ring_seconds=timeout)
        return replace(result, answered_endpoint=None)  # an outside number is nobody's endpoint

    @staticmethod
    def _bridge_vars(ring_seconds: int) -> dict[str, str]:
        return {
            "continue_on_fail": "true",  # a failed bridge must not hang up the caller
            "hangup_after_bridge": "false",  # the other side hangs up -> back to the flow
            "ringback": RINGBACK,
            "call_timeout": str(ring_seconds),  # on the channel: FreeSWITCH ignores it inside the bridge's {}
        }

    async def _bridge(self, target: str, legs: dict[str, str], *, ring_seconds: int) -> DialResult:
        started = time.monotonic()
        ev = await self.session.execute(
            "bridge", "{ignore_early_media=true}" + target,
            timeout=ring_seconds + self.max_call_seconds + self._slack,
        )
        result = self._dial_result(ev, legs)
        log.info("%s: bridge %s -> %s %s (%.1f s)", self.info.uniqueid, target, result.detail,
                 result.answered_endpoint or "-", time.monotonic() - started)
        return result

    def _leg(self, leg_uuid: str, name: str, *, leg_timeout: int = 0) -> str:
        # shopcall_agent names the agent on the leg itself: its hangup event tells a fallback report (our
        # process gone mid-bridge) who answered, whatever the endpoint template
        extra = f",leg_timeout={leg_timeout}" if leg_timeout else ""
        return f"[origination_uuid={leg_uuid},{AGENT_VARIABLE}={name}{extra}]" + \
            self.endpoint_template.format(endpoint=name)

    def _dial_result(self, ev: Event, legs: dict[str, str]) -> DialResult:
        disposition, status = bridge_status(ev)
        if status != DialStatus.ANSWERED:
            # the caller left while it rang (a channel killed by the failed bridge itself has the
            # bridge's cause as its hangup cause, e.g. ALLOTTED_TIMEOUT without continue_on_fail)
            if self.session.hung_up and self.session.hangup_cause != disposition:
                status = DialStatus.CALLER_GONE
            return DialResult(status, None, 0.0, disposition or self.session.hangup_cause)
        answered = None
        for key in (ev.var("last_bridge_to"), ev.var("bridge_uuid"), ev.get("Other-Leg-Unique-ID")):
            if key in legs:
                answered = legs[key]
                break
        else:
            other = ev.get("Other-Leg-Destination-Number")
            answered = other if other in legs.values() else (next(iter(legs.values())) if len(legs) == 1 else None)
        return DialResult(DialStatus.ANSWERED, answered, talk_seconds(ev), disposition)

    async def record(
        self, path: Path, *, max_seconds: int = 120, silence_seconds: int = 5, beep: bool = True
    ) -> RecordResult:
        path.parent.mkdir(parents=True, exist_ok=True)
        target = path if path.suffix == ".wav" else path.with_name(path.name + ".wav")
        if beep:
            await self._ensure("playback_terminators", "none")
            await self._run("playback", BEEP, timeout=self._slack + 1)
        await self._ensure("playback_terminators", "#")  # as on Asterisk: # ends a recording
        arg = protocol.check_file(self.pbx_path(target)) + f" {int(max_seconds)}"
        if silence_seconds:
            arg += f" {RECORD_THRESHOLD} {int(silence_seconds)}"
        started = time.monotonic()
        ev = await self.session.execute("record", arg, timeout=max_seconds + self._slack + 5)
        wall = time.monotonic() - started
        if self.session.hung_up:
            ended_by = "hangup"
        elif ev.var("playback_terminator_used"):
            ended_by = "dtmf"
        elif ev.var("silence_hits_exhausted") == "true":
            ended_by = "silence"
        else:
            ended_by = "maxtime"
        # record_ms counts the audio written, not the time spent (silence is not written)
        ms = ev.var("record_ms") or ""
        seconds = int(ms) / 1000 if ms.isdigit() else wall
        return RecordResult(target, seconds, ended_by)

    async def start_recording(self, path: Path, *, on_demand: bool = False) -> None:
        target = protocol.check_file(self.pbx_path(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        if on_demand:
            # the agent presses *2 (FreeSWITCH's record-on-demand binding: listen on the B leg, act on it)
            await self._run("bind_meta_app", f"{ON_DEMAND_KEY} b s record_session::{target}", timeout=self._slack)
            return
        await self._ensure("RECORD_BRIDGE_REQ", "true")  # only while bridged, like MixMonitor's b option
        await self._run("record_session", target, timeout=self._slack)
        self._recording = target

    async def stop_recording(self) -> None:
        if self._recording:
            await self._run("stop_record_session", self._recording, timeout=self._slack)
            self._recording = ""

    async def set_var(self, name: str, value: str) -> None:
        await self.set_vars({name: value})

    async def set_vars(self, values: Mapping[str, str]) -> None:
        safe = {}
        for name, value in values.items():
            text = protocol.app_text(value)
            if text != value:
                log.warning("%s: value of %s changed to be safe in FreeSWITCH: %r", self.info.uniqueid, name, text)
            safe[protocol.check_var(name)] = text
        self._set = {k: v for k, v in self._set.items() if k not in safe}  # the flow's own: always sent
        await self._ensure_all(safe)

    async def get_var(self, name: str) -> str | None:
        protocol.check_var(name)
        if not (self.session.hung_up or self.session.conn.closed):
            value = await self.session.api(f"uuid_getvar {self.session.uuid} {name}")
            if not value.startswith("-ERR"):
                return None if value in ("_undef_", "") else value
        return self.session.variables.get(name)  # after the hangup: as of the last event

    async def hangup(self, cause: str = "normal") -> None:
        await self.session.hangup(_CAUSES.get(cause, "NORMAL_CLEARING"))


def _money(amount: Decimal | int) -> str | None:
    """12.5 -> "12.50", 12 -> "12" (mod_say_en would add "and zero cents"); None beyond 9 digits."""
    value = Decimal(str(amount)) if isinstance(amount, float) else Decimal(amount)
    if not value.is_finite() or abs(value) >= SAY_MAX + 1:  # whole units: nine digits at most
        return None
    value = abs(value) if value == 0 else value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    text = f"{value:.0f}" if value == value.to_integral_value() else f"{value:.2f}"
    return text if _AMOUNT.fullmatch(text) else None


def _key_set(escape: str) -> str:
    return "".join(k for k in ALL_KEYS if k in escape)


def bridge_status(ev: Event) -> tuple[str, DialStatus]:
    """A bridge's outcome in FreeSWITCH's words and ours, from the variables an event carries."""
    disposition = ev.var("originate_disposition") or ev.var("DIALSTATUS") or ""
    return disposition, _DISPOSITION.get(disposition, DialStatus.FAILED)


def talk_seconds(ev: Event) -> float:
    """From FreeSWITCH's own clock: the event's time minus when the bridge began (both microseconds)."""
    try:
        bridged = int(ev.get("Caller-Channel-Bridged-Time", "0"))
        now = int(ev.get("Event-Date-Timestamp", "0"))
    except ValueError:
        return 0.0
    return max(0.0, (now - bridged) / 1e6) if bridged and now else 0.0
