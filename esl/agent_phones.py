"""The callback worker's FreeSWITCH side, over the inbound event socket (esl/client.py).

An agent's phone is free when `show channels as json` lists no live channel of it (esl/channels.py says
whose a channel is). The phone is rung with
`originate {...}user/ENDPOINT callback XML <context>-robot`: once it is answered (ignore_early_media: a
ringing phone's early media must not count as an answer) the robot context hands the leg to our
outbound-socket server, whose callback flow reads the request's id from shopcall_arg_id and the agent from
dialed_user (set here too, for an endpoint_template other than user/).

When an originated leg enters the dialplan FreeSWITCH "flips" its caller ID to its callee ID ("Outbound Call"
<agent1> unless told otherwise), and the customer's leg the flow bridges inherits it: the customer was shown
the agent's endpoint name. The callee ID is set to the caller ID the agent sees, so the leg keeps it after
the flip and the customer is shown what Asterisk shows (the Originate's CallerID stays on the agent's leg).
"""

from __future__ import annotations

import time

from esl.channels import GONE, TALKING, belongs, channels
from esl.client import EslClient
from esl.originator import originate_outcome
from shopcall.call import check_endpoint
from shopcall.callbacks import shown_to_agent
from shopcall.config import Config
from shopcall.dialler import DialOutcome


class FreeswitchAgentPhones:
    def __init__(self, client: EslClient, config: Config, *, listing_seconds: float = 1.0) -> None:
        self.client = client
        self.endpoint_template = config.freeswitch.endpoint_template
        self.destination = f"callback XML {config.freeswitch.context}-robot"
        # a claim asks about one candidate after another: one listing of every channel serves them all
        self.listing_seconds = listing_seconds
        self._listing: tuple[float, list[dict]] = (-listing_seconds, [])

    async def is_free(self, endpoint: str) -> bool:
        name = check_endpoint(endpoint)
        return not any(belongs(row, name) and row.get("callstate") not in GONE for row in await self._channels())

    async def phone_state(self, endpoint: str) -> str:
        """on_call, ringing or free, by the phone's live channels; FreeSWITCH's listing does not say whether a
        phone without a call is registered, so "free" here means no live channel."""
        name = check_endpoint(endpoint)
        states = {row.get("callstate") for row in await self._channels() if belongs(row, name)} - GONE
        return "on_call" if states & TALKING else "ringing" if states else "free"

    async def _channels(self) -> list[dict]:
        at, rows = self._listing
        if time.monotonic() - at >= self.listing_seconds:
            rows = channels(await self.client.api("show channels as json"))
            self._listing = (time.monotonic(), rows)
        return rows

    async def ring(self, endpoint: str, *, request_id: int, phone: str, ring_seconds: int) -> DialOutcome:
        user = check_endpoint(endpoint)
        number, name = shown_to_agent(phone)
        variables = {
            "ignore_early_media": "true",
            "shopcall_arg_id": str(int(request_id)),
            "dialed_user": user,
            "origination_caller_id_number": number,
            "origination_caller_id_name": name,
            # what the leg's caller ID becomes once answered (the flip), so what the customer is shown
            "origination_callee_id_number": number,
            "origination_callee_id_name": name,
        }
        return await originate_outcome(self.client, self.endpoint_template.format(endpoint=user), variables=variables,
                                       timeout=ring_seconds, destination=self.destination)
