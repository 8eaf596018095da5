"""The Call vocabulary over FastAGI (Asterisk)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from agi.protocol import command, quote
from agi.session import AgiSession
from shopcall.call import (
    Call,
    CallEnded,
    CallInfo,
    DialResult,
    DialStatus,
    DialStrategy,
    RecordResult,
    SoundSource,
    check_number,
    check_var_name,
    is_endpoint,
)
from shopcall.prompts import sound_seconds

log = logging.getLogger("shopcall.agi")

_DIALSTATUS = {
    "ANSWER": DialStatus.ANSWERED,
    "NOANSWER": DialStatus.NOANSWER,
    "BUSY": DialStatus.BUSY,
    "CANCEL": DialStatus.CALLER_GONE,
}
# ANSWEREDTIME counts from the *caller's* answer since Asterisk 13 (greeting, menu and ringing included), so
# the agent's answer comes from the Dial's U() routine of the rendered include (SHOPCALL_ANSWERED_AT, on
# Asterisk's clock like the "now" beside it); ANSWEREDTIME is the fallback without it
_DIAL_OUTCOME = quote("${DIALSTATUS}|${DIALEDPEERNAME}|${ANSWEREDTIME}|${SHARED(SHOPCALL_ANSWERED_AT)}|"
                      "${STRFTIME(,,%s.%3q)}")
_CHANNEL = re.compile(r"[A-Za-z0-9/_.@:;+-]{1,120}\Z")  # nothing that ends a Dial option or its argument
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.+:@-]*\Z")
_DEVICE = re.compile(r"[A-Za-z0-9_./@+:-]+\Z")  # nothing that ends DEVICE_STATE's argument or the list
# device states of a phone that is talking (its own call, one on hold, a second one ringing on top):
# app_queue's ringinuse = no skips the same ones, but not RINGING, so two callers can ring one free agent
IN_USE_STATES = frozenset({"INUSE", "BUSY", "ONHOLD", "RINGINUSE"})
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_./+-]+\Z")  # nothing Playback splits on (&, ",") or quoting changes
# Q.850 causes for the few ways a flow ends a call
_CAUSES = {"normal": 16, "busy": 17, "noanswer": 19, "rejected": 21, "congestion": 34}


def _seconds(text: str) -> float:
    return float(text) if text and text.replace(".", "", 1).isdigit() else 0.0


class AgiCall(Call):
    def __init__(
        self,
        session: AgiSession,
        info: CallInfo,
        sounds: SoundSource,
        *,
        endpoint_template: str = "PJSIP/{endpoint}",
        trunk_template: str = "PJSIP/{number}@trunk",
        pbx_path: Callable[[Path], str] = str,
        max_call_seconds: int = 14400,
        answered_routine: str | None = None,
    ) -> None:
        super().__init__(info, sounds)
        self.session = session
        # the include's [<prefix>-answered]: run on the agent's channel when it answers (Dial option U)
        self.answered_routine = answered_routine if answered_routine and _CHANNEL.match(info.channel) else None
        self.endpoint_template = endpoint_template
        self.trunk_template = trunk_template  # asterisk.trunk_template: a customer's number via the trunk
        self.pbx_path = pbx_path  # our path of a file → the path Asterisk sees (chroot, other host)
        self.max_call_seconds = max_call_seconds
        self.dial_options = "g"  # g: when the agent hangs up, come back to us (log the call, the survey)
        self._answered = False
        self._answer_due = False  # answer() was called and nothing has answered the channel yet

    async def _send(self, *parts: str, timeout: float | None = None, answers: bool = False):
        """One command on a live channel; a due answer goes first, unless the command (`answers`) answers
        the channel itself."""
        if self.session.hung_up:
            raise CallEnded("caller hung up")
        await self._answer_if_due(skip=answers)
        return await self.session.send(command(*parts), timeout=timeout)

    async def _answer_if_due(self, *, skip: bool = False) -> None:
        if self._answer_due:
            self._answer_due = False
            if not skip:
                await self.session.send(b"ANSWER\n")

    async def answer(self) -> None:
        # Sent with the next command, or not at all when that is a Playback, which answers the channel
        # itself: the greeting of most calls then costs one round trip instead of two.
        if not self._answered:
            self._answered = self._answer_due = True

    async def play_files(self, sounds: Sequence[Path]) -> None:
        """One Playback for the whole list (files joined by "&"), unless a path holds a character Playback
        would read as a separator or an option; Playback answers the channel if the call has not been."""
        paths = [self.pbx_path(sound) for sound in sounds]
        if not paths or not all(_PLAIN_PATH.match(p) for p in paths):
            await super().play_files(sounds)
            return
        await self._send("EXEC", "Playback", quote("&".join(paths)), answers=True,
                         timeout=sum(sound_seconds(s) for s in sounds) + self.session.command_timeout)

    async def stream(self, sound: Path, *, escape: str = "") -> str | None:
        reply = await self._send(
            "STREAM FILE", quote(self.pbx_path(sound)), quote(escape),
            timeout=sound_seconds(sound) + self.session.command_timeout,
        )
        code = reply.result_int
        if code > 0:
            return chr(code)
        if code < 0 and not self.session.hung_up:
            log.warning("%s: could not play %s", self.info.uniqueid, sound)
        return None

    async def collect(self, sound: Path | None, *, max_digits: int, timeout: float) -> str | None:
        if sound is None:
            if max_digits == 1:
                reply = await self._send(
                    "WAIT FOR DIGIT", str(int(timeout * 1000)), timeout=timeout + self.session.command_timeout
                )
                return chr(reply.result_int) if reply.result_int > 0 else None
            sound_arg, length = "silence/1", 1.0
        else:
            sound_arg, length = self.pbx_path(sound), sound_seconds(sound)
        reply = await self._send(
            "GET DATA", quote(sound_arg), str(int(timeout * 1000)), str(int(max_digits)),
            timeout=length + timeout + self.session.command_timeout,
        )
        digits = reply.result if reply.result and not reply.result.startswith("-") else ""
        return digits or None

    async def ring(
        self, names: list[str], *, strategy: DialStrategy, timeout: int, caller_name: str | None,
        caller_number: str | None = None,
    ) -> DialResult:
        # the agents' legs inherit the caller's name as Asterisk holds it: a PJSIP display name keeps its
        # escapes there (`\\"`), which PJSIP would escape again, so agents saw backslashes; set it
        # whenever what they are to see is not that raw name
        shown = caller_name if caller_name is not None else self.info.caller_name
        if shown and shown != self.info.extra.get("agi_calleridname", shown):
            await self.set_var("CALLERID(name)", shown)
        if caller_number is not None:  # an originated channel keeps the Originate's caller ID otherwise
            await self.set_var("CALLERID(num)", caller_number)
        if strategy == DialStrategy.RINGALL:
            return await self._dial_once(names, timeout)
        result = DialResult(DialStatus.NOANSWER)
        for name in names:  # hunt: each in turn for the full timeout
            result = await self._dial_once([name], timeout)
            if result.status in (DialStatus.ANSWERED, DialStatus.CALLER_GONE):
                break
        return result

    async def busy(self, names: list[str]) -> frozenset[str]:
        """Every device's state in one GET FULL VARIABLE (states hold no comma)."""
        devices = {n: self.endpoint_template.format(endpoint=n) for n in names}
        asked = [n for n, d in devices.items() if _DEVICE.match(d)]
        if not asked:
            return frozenset()
        reply = await self._send("GET FULL VARIABLE",
                                 quote(",".join(f"${{DEVICE_STATE({devices[n]})}}" for n in asked)))
        states = (reply.data or "").split(",") if reply.result == "1" else []
        if len(states) != len(asked):
            log.warning("%s: DEVICE_STATE of %s: unexpected answer %r", self.info.uniqueid, asked, reply.data)
            return frozenset()
        return frozenset(n for n, state in zip(asked, states, strict=True) if state in IN_USE_STATES)

    async def dial_number(self, number: str, *, timeout: int = 30) -> DialResult:
        return await self._dial_once([], timeout, target=self.trunk_template.format(number=check_number(number)))

    async def _dial_once(self, names: list[str], timeout: int, *, target: str = "") -> DialResult:
        target = target or "&".join(self.endpoint_template.format(endpoint=n) for n in names)
        options = self.dial_options
        if self.answered_routine:
            options += f"U({self.answered_routine}^{self.info.channel})"
        started = time.monotonic()
        await self._send(
            "EXEC", "Dial", quote(f"{target},{int(timeout)},{options}"),
            timeout=timeout + self.max_call_seconds + self.session.command_timeout,
        )
        status, peer, talk = await self._dial_outcome()
        answered = None
        for n in names:
            if peer.startswith(self.endpoint_template.format(endpoint=n) + "-"):
                answered = n
        log.info(
            "%s: Dial %s -> %s %s (%.1f s)", self.info.uniqueid, target, status, peer, time.monotonic() - started
        )
        return DialResult(_DIALSTATUS.get(status, DialStatus.FAILED), answered, talk, status)

    async def last_dial(self) -> DialResult:
        """The dialplan's own Dial (the rendered fallback): the peer's channel name, less the endpoint
        template's prefix and the channel's sequence suffix, is the endpoint; a name that is not one (the
        template does not match, odd characters) is left out rather than guessed."""
        status, peer, talk = await self._dial_outcome()
        prefix = self.endpoint_template.partition("{endpoint}")[0]
        name, sep, _ = peer.removeprefix(prefix).rpartition("-")
        answered = name if status == "ANSWER" and sep and peer.startswith(prefix) and is_endpoint(name) else None
        talk = talk if status == "ANSWER" else 0.0
        return DialResult(_DIALSTATUS.get(status, DialStatus.FAILED), answered, talk, status)

    async def _dial_outcome(self) -> tuple[str, str, float]:
        """DIALSTATUS, DIALEDPEERNAME and the talk seconds in one round trip. Neither the status nor the
        numbers can hold a "|", so the peer's channel name is whatever lies between the first and the last
        three."""
        reply = await self.session.send(command("GET FULL VARIABLE", _DIAL_OUTCOME))
        text = (reply.data or "") if reply.result == "1" else ""
        status, _, rest = text.partition("|")
        fields = rest.rsplit("|", 3)
        if len(fields) < 4:  # no answer (a dead session): nothing is known
            return status, rest, 0.0
        peer, answered_time, answered_at, now = fields
        if answered_at and _seconds(now) >= _seconds(answered_at) > 0:
            return status, peer, _seconds(now) - _seconds(answered_at)
        return status, peer, _seconds(answered_time)

    async def record(
        self, path: Path, *, max_seconds: int = 120, silence_seconds: int = 5, beep: bool = True
    ) -> RecordResult:
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        # Asterisk adds the format's extension to the name it is given
        parts = ["RECORD FILE", quote(self.pbx_path(path.with_suffix(""))), "wav", quote("#"),
                 str(max_seconds * 1000), "0"]
        if beep:
            parts.append("BEEP")
        if silence_seconds:
            parts.append(f"s={int(silence_seconds)}")
        reply = await self._send(*parts, timeout=max_seconds + self.session.command_timeout + 5)
        ended_by = {"timeout": "maxtime", "dtmf": "dtmf", "hangup": "hangup"}.get(reply.data or "", "silence")
        return RecordResult(path.with_suffix(".wav"), time.monotonic() - started, ended_by)

    async def start_recording(self, path: Path, *, on_demand: bool = False) -> None:
        target = self.pbx_path(path)
        if any(ch in target for ch in ',|"\\\n'):
            raise ValueError(f"recording path {target!r} would change the MixMonitor arguments")
        path.parent.mkdir(parents=True, exist_ok=True)
        if on_demand:
            # the agent starts it with the automixmon feature code (features.conf); Dial gets option x
            await self.set_var("TOUCH_MIXMONITOR", target.removesuffix(".wav"))
            await self.set_var("TOUCH_MIXMONITOR_FORMAT", "wav")
            self.dial_options += "x"
            return
        # b: write only while bridged, so the greeting and the ringing are not in the file
        await self._send("EXEC", "MixMonitor", quote(f"{target},b"))

    async def stop_recording(self) -> None:
        await self._send("EXEC", "StopMixMonitor", quote(""))

    async def set_var(self, name: str, value: str) -> None:
        await self._send("SET VARIABLE", check_var_name(name), quote(value))

    async def set_vars(self, values: Mapping[str, str]) -> None:
        """Plain names and values (a flow's outcome, ids) in one MSet instead of a SET VARIABLE each; anything
        MSet's argument parsing could read differently (a comma, a quote, a function) goes one by one."""
        if len(values) > 1 and all(_PLAIN_NAME.match(n) and _PLAIN_VALUE.match(v) for n, v in values.items()):
            await self._send("EXEC", "MSet", quote(",".join(f"{n}={v}" for n, v in values.items())))
            return
        await super().set_vars(values)

    async def get_var(self, name: str) -> str | None:
        await self._answer_if_due()  # not _send: GET VARIABLE also works on a dead channel
        reply = await self.session.send(command("GET VARIABLE", check_var_name(name)))
        return reply.data if reply.result == "1" else None

    async def hangup(self, cause: str = "normal") -> None:
        self._answer_due = False  # a call hung up before anything was played is not answered first
        if self.session.hung_up:
            return
        await self._send("EXEC", "Hangup", str(_CAUSES.get(cause, 16)))
