"""A Call that follows a script instead of a PBX, for fast flow tests. It plays the caller's part
(keys pressed, hanging up) and the agents' (dial results), and records every verb the flow used."""

from __future__ import annotations

import hashlib
import math
import struct
import wave
from collections.abc import Sequence
from pathlib import Path

from shopcall.call import Call, CallEnded, CallInfo, DialResult, DialStatus, DialStrategy, RecordResult


class PromptNames:
    """Sound source that names files after the prompt; flow tests check which prompts were played."""

    async def path(self, prompt_id: str, lang: str) -> Path:
        return Path(f"/sounds/{lang}/{prompt_id}")

    async def say_text(self, text: str, lang: str) -> Path:
        return Path(f"/tts/{lang}/{text}")


class WireSafeNames(PromptNames):
    """TTS files named by a digest of their text, as the real TTS cache names them: a text with spaces is
    no file name a PBX command takes, so calls over a wire (FreeSWITCH's, Asterisk's) get these."""

    async def say_text(self, text: str, lang: str) -> Path:
        return Path(f"/tts/{lang}/{hashlib.sha1(text.encode()).hexdigest()}")


class ScriptedCall(Call):
    def __init__(
        self,
        info: CallInfo,
        *,
        keys: Sequence[str | None] = (),
        greeting_key: str | None = None,
        dial: Sequence[DialResult] = (),
        hang_up_on: str | None = None,
        message_seconds: float = 0.0,
        on_a_call: Sequence[set[str]] = (),
        keys_on: dict[str, str] | None = None,
    ) -> None:
        super().__init__(info, PromptNames())
        self.keys = list(keys)
        self.greeting_key = greeting_key
        self.dial_results = list(dial)
        self.hang_up_on = hang_up_on  # the first verb of this name finds the caller gone
        self.message_seconds = message_seconds  # what the caller says when recorded (a 440 Hz tone)
        self.on_a_call_now = list(on_a_call)  # per question of a skip_busy step: who is talking
        self.keys_on = dict(keys_on or {})  # sound name -> the key pressed while it plays (once)
        self.actions: list[tuple] = []
        self.vars: dict[str, str] = {}

    def _do(self, verb: str, *details: object) -> None:
        if self.ended:
            raise CallEnded("caller hung up (scripted)")
        self.actions.append((verb, *details))
        if verb == self.hang_up_on:
            self.ended = True
            raise CallEnded(f"caller hung up during {verb} (scripted)")

    @property
    def played(self) -> list[str]:
        return [a[1] for a in self.actions if a[0] in ("stream", "collect") and a[1]]

    async def answer(self) -> None:
        self._do("answer")

    async def stream(self, sound: Path, *, escape: str = "") -> str | None:
        self._do("stream", sound.name)
        if escape and sound.name in self.keys_on:
            return self.keys_on.pop(sound.name)
        if escape and self.greeting_key:
            key, self.greeting_key = self.greeting_key, None
            return key
        return None

    async def collect(self, sound: Path | None, *, max_digits: int, timeout: float) -> str | None:
        self._do("collect", sound.name if sound else None, timeout)
        return self.keys.pop(0) if self.keys else None

    async def ring(self, names: list[str], *, strategy: DialStrategy, timeout: int,
                   caller_name: str | None, caller_number: str | None = None) -> DialResult:
        self._do("dial", list(names), str(strategy), timeout)
        if caller_name is not None:
            self.vars["CALLERID(name)"] = caller_name
        if caller_number is not None:
            self.vars["CALLERID(num)"] = caller_number
        return self.dial_results.pop(0) if self.dial_results else DialResult(DialStatus.NOANSWER)

    async def busy(self, names: list[str]) -> frozenset[str]:
        self._do("busy", list(names))
        talking = self.on_a_call_now.pop(0) if self.on_a_call_now else set()
        return frozenset(n for n in names if n in talking)

    async def record(self, path: Path, *, max_seconds: int = 120, silence_seconds: int = 5,
                     beep: bool = True) -> RecordResult:
        self._do("record", str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        frames = int(self.message_seconds * 8000)
        with wave.open(str(path), "wb") as w:  # what the PBX would have written
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(b"".join(
                struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / 8000))) for i in range(frames)))
        return RecordResult(path, self.message_seconds, "silence")

    async def start_recording(self, path: Path, *, on_demand: bool = False) -> None:
        self._do("start_recording", str(path), on_demand)
        if not on_demand:  # the PBX would create the file as soon as the agent is bridged
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"RIFF")

    async def stop_recording(self) -> None:
        self._do("stop_recording")

    async def set_var(self, name: str, value: str) -> None:
        self._do("set", name, value)
        self.vars[name] = value

    async def get_var(self, name: str) -> str | None:
        return self.vars.get(name)

    async def last_dial(self) -> DialResult:
        """The dialplan's own dial: the next scripted dial result (a dead channel: no verb is refused)."""
        self.actions.append(("last_dial",))
        return self.dial_results.pop(0) if self.dial_results else DialResult(DialStatus.FAILED)

    async def hangup(self, cause: str = "normal") -> None:
        self._do("hangup", cause)
        self.ended = True
