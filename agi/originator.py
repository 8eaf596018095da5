"""The dialler's Asterisk side: AMI Originate of a customer's number into the robot context.

The number reaches the dial string only after `check_number` (digits and a leading +), through the
admin's `asterisk.trunk_template`; the channel's uniqueid is ours (ChannelId), so a restarted dialler can
ask Asterisk whether the call still exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from agi.ami import AmiClient, AmiConnectionLost, AmiError, AmiTimeout
from shopcall.call import check_number
from shopcall.config import Config
from shopcall.dialler import DialOutcome, OutcomeUnknown

log = logging.getLogger("shopcall.originator")

# OriginateResponse Reason → our outcome. 1 (hangup) is the far end rejecting the call while it rang.
_OUTCOME = {4: "answered", 5: "busy", 3: "no_answer", 1: "no_answer", 8: "failed", 0: "failed"}
# Asterisk 22 reports Reason 0 for most failures of an Originate into a context; the channel's Hangup
# event (found by our uniqueid) carries the real Q.850 cause
_CAUSE_OUTCOME = {"17": "busy", "21": "busy", "18": "no_answer", "19": "no_answer", "16": "no_answer",
                  "1": "failed", "3": "failed", "27": "failed", "34": "failed", "38": "failed", "41": "failed",
                  "42": "failed"}
HANGUP_WAIT = 2.0  # seconds for the Hangup event after a failed OriginateResponse


def caller_id_header(number: str | None) -> str | None:
    if not number:
        return None
    return f"<{check_number(number)}>"


class AsteriskOriginator:
    def __init__(self, ami: AmiClient, config: Config) -> None:
        self.ami = ami
        self.trunk_template = config.asterisk.trunk_template
        self.context = f"{config.asterisk.context_prefix}-robot"
        self.timeout = config.agi.command_timeout
        self._hangups: dict[str, asyncio.Future[str]] = {}
        ami.add_listener(self._on_hangup, "Hangup")

    def _on_hangup(self, msg: dict[str, str]) -> None:
        fut = self._hangups.get(msg.get("Uniqueid", ""))
        if fut is not None and not fut.done():
            fut.set_result(msg.get("Cause", ""))

    async def originate(self, phone: str, *, action_id: str, uniqueid: str, caller_id: str | None,
                        ring_seconds: int, variables: dict[str, str]) -> DialOutcome:
        channel = self.trunk_template.format(number=check_number(phone))
        hangup: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._hangups[uniqueid] = hangup  # before sending: the event may beat the OriginateResponse
        try:
            try:
                result = await self.ami.originate(
                    channel, context=self.context, exten="s", ring_seconds=ring_seconds, variables=variables,
                    caller_id=caller_id_header(caller_id), timeout=self.timeout, action_id=action_id,
                    channel_id=uniqueid)
            except (AmiConnectionLost, AmiTimeout) as exc:
                raise OutcomeUnknown(str(exc)) from exc
            except AmiError as exc:
                return DialOutcome("failed", str(exc))
            if result.message:  # Asterisk refused the Originate itself (bad channel, no such context)
                return DialOutcome("failed", result.message)
            if result.success:
                return DialOutcome("answered", f"reason {result.reason} ({result.reason_text})")
            cause = ""
            with contextlib.suppress(TimeoutError):
                cause = await asyncio.wait_for(asyncio.shield(hangup), HANGUP_WAIT)
            outcome = _CAUSE_OUTCOME.get(cause) or _OUTCOME.get(result.reason, "failed")
            return DialOutcome(outcome, f"reason {result.reason} ({result.reason_text}), cause {cause or '?'}")
        finally:
            self._hangups.pop(uniqueid, None)

    async def exists(self, uniqueid: str) -> bool:
        try:
            return await self.ami.channel_exists(uniqueid)
        except (AmiConnectionLost, AmiTimeout) as exc:
            raise OutcomeUnknown(str(exc)) from exc
