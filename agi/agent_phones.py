"""The callback worker's Asterisk side: an agent's phone is free when AMI's DeviceStateGet says
NOT_INUSE, and it is rung with an Originate into [<prefix>-callback], whose AGI runs the callback flow.

The endpoint reaches the channel only after `check_endpoint`, through `asterisk.endpoint_template`; the
customer's number is shown to the agent as the caller (shopcall.callbacks.shown_to_agent).
"""

from __future__ import annotations

from agi.ami import AmiClient, AmiConnectionLost, AmiError, AmiTimeout
from shopcall.call import PbxError, check_endpoint
from shopcall.callbacks import shown_to_agent
from shopcall.config import Config
from shopcall.dialler import DialOutcome, OutcomeUnknown

FREE_STATES = frozenset({"NOT_INUSE"})
# Asterisk's device states as the live view's (shopcall/live.py): RINGINUSE is a call and one more ringing
LIVE_STATES = {"NOT_INUSE": "free", "INUSE": "on_call", "BUSY": "on_call", "ONHOLD": "on_call",
               "RINGINUSE": "on_call", "RINGING": "ringing", "UNAVAILABLE": "unavailable", "INVALID": "unavailable"}


class AsteriskAgentPhones:
    def __init__(self, ami: AmiClient, config: Config) -> None:
        self.ami = ami
        self.endpoint_template = config.asterisk.endpoint_template
        self.context = f"{config.asterisk.context_prefix}-callback"

    def device(self, endpoint: str) -> str:
        return self.endpoint_template.format(endpoint=check_endpoint(endpoint))

    async def is_free(self, endpoint: str) -> bool:
        try:
            return await self.ami.device_state(self.device(endpoint)) in FREE_STATES
        except AmiError as exc:
            raise PbxError(str(exc)) from exc

    async def phone_state(self, endpoint: str) -> str:
        try:
            state = await self.ami.device_state(self.device(endpoint))
        except AmiError as exc:
            raise PbxError(str(exc)) from exc
        return LIVE_STATES.get(state, "unknown")

    async def ring(self, endpoint: str, *, request_id: int, phone: str, ring_seconds: int) -> DialOutcome:
        number, name = shown_to_agent(phone)
        try:
            result = await self.ami.originate(
                self.device(endpoint), context=self.context, exten="s", ring_seconds=ring_seconds,
                variables={"SHOPCALL_CALLBACK_ID": request_id}, caller_id=f'"{name}" <{number}>')
        except (AmiConnectionLost, AmiTimeout) as exc:
            raise OutcomeUnknown(str(exc)) from exc
        except AmiError as exc:
            raise PbxError(str(exc)) from exc
        return DialOutcome("answered" if result.success else result.reason_text, result.message)
