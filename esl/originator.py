"""The dialler's FreeSWITCH side: `bgapi originate` through the inbound event socket (esl/client.py) into
the robot context of the rendered dialplan, which hands the answered call to our outbound-socket server.

The customer's number reaches the dial string only after `check_number`; the channel's uuid is ours
(origination_uuid), so a restarted dialler asks `uuid_exists` whether the call is still up. A campaign
with `amd` sets `shopcall_amd=1` on the call: once it is answered, our outbound-socket side runs mod_avmd
before the robot speaks (EslCall.detect_machine), and a beep makes the flow settle it as "machine", as
AMD() does on Asterisk. Without mod_avmd that side says so once in its log and the call goes on.
"""

from __future__ import annotations

from esl.call import AMD_VARIABLE
from esl.client import EslClient
from shopcall.call import PbxError, check_number
from shopcall.config import Config
from shopcall.dialler import DialOutcome, OutcomeUnknown

# hangup causes of a failed originate → our outcome
_CAUSE_OUTCOME = {
    "USER_BUSY": "busy", "CALL_REJECTED": "busy",
    "NO_ANSWER": "no_answer", "NO_USER_RESPONSE": "no_answer", "ORIGINATOR_CANCEL": "no_answer",
    "ALLOTTED_TIMEOUT": "no_answer", "PROGRESS_TIMEOUT": "no_answer",
}


async def originate_outcome(client: EslClient, dial_string: str, *, variables: dict[str, str], timeout: int,
                            destination: str, uuid: str | None = None) -> DialOutcome:
    """`bgapi originate`, its end as our outcome: answered, busy, no_answer or failed (the cause as detail)."""
    try:
        result = await client.originate(dial_string, uuid=uuid, variables=variables, timeout=timeout,
                                        destination=destination)
    except PbxError as exc:  # the connection dropped with the job running: it may be ringing
        raise OutcomeUnknown(str(exc)) from exc
    if result.ok:
        return DialOutcome("answered", result.reply)
    return DialOutcome(_CAUSE_OUTCOME.get(result.cause, "failed"), result.cause)


class FreeswitchOriginator:
    def __init__(self, client: EslClient, config: Config) -> None:
        self.client = client
        self.trunk_template = config.freeswitch.trunk_template
        self.destination = f"outbound XML {config.freeswitch.context}-robot"

    async def originate(self, phone: str, *, action_id: str, uniqueid: str, caller_id: str | None,
                        ring_seconds: int, variables: dict[str, str]) -> DialOutcome:
        dial_string = self.trunk_template.format(number=check_number(phone))
        # the robot context's socket call passes shopcall_arg_* to the flow as its arguments
        pairs = {"shopcall_arg_attempt": variables["SHOPCALL_ATTEMPT"], "shopcall_action_id": action_id}
        if variables.get("SHOPCALL_AMD") == "1":
            pairs[AMD_VARIABLE] = "1"
        if caller_id:
            pairs["origination_caller_id_number"] = check_number(caller_id)
        return await originate_outcome(self.client, dial_string, uuid=uniqueid, variables=pairs, timeout=ring_seconds,
                                       destination=self.destination)

    async def exists(self, uniqueid: str) -> bool:
        try:
            return (await self.client.api(f"uuid_exists {uniqueid}")).strip() == "true"
        except PbxError as exc:
            raise OutcomeUnknown(str(exc)) from exc
