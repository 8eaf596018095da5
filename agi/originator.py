"""The dialler's Asterisk side: AMI Originate of a customer's number into the robot context.

The number reaches the dial string only after `check_number` (digits and a leading +), through the
admin's `asterisk.trunk_template`; the channel's uniqueid is ours (ChannelId), so a restarted dialler can
ask Asterisk whether the call still exists.
"""

from __future__ import annotations

import logging

from agi.ami import AmiClient, AmiConnectionLost, AmiError, AmiTimeout
from shopcall.call import check_number
from shopcall.config import Config
from shopcall.dialler import DialOutcome, OutcomeUnknown

log = logging.getLogger("shopcall.originator")

# OriginateResponse Reason → our outcome. 1 (hangup) is the far end rejecting the call while it rang.
_OUTCOME = {4: "answered", 5: "busy", 3: "no_answer", 1: "no_answer", 8: "failed", 0: "failed"}


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

    async def originate(self, phone: str, *, action_id: str, uniqueid: str, caller_id: str | None,
                        ring_seconds: int, variables: dict[str, str]) -> DialOutcome:
        channel = self.trunk_template.format(number=check_number(phone))
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
        outcome = "answered" if result.success else _OUTCOME.get(result.reason, "failed")
        return DialOutcome(outcome, f"reason {result.reason} ({result.reason_text})")

    async def exists(self, uniqueid: str) -> bool:
        try:
            return await self.ami.channel_exists(uniqueid)
        except (AmiConnectionLost, AmiTimeout) as exc:
            raise OutcomeUnknown(str(exc)) from exc
