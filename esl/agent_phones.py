"""The callback worker's FreeSWITCH side, over the inbound event socket (esl/client.py).

An agent's phone is free when `show channels as json` lists no live channel of it. A channel is the
agent's when its presence_id is the endpoint's (FreeSWITCH's directory puts `presence_id=USER@DOMAIN` in
every user's dial-string, and a registered phone's own calls carry it), or when its name is the endpoint's
sofia contact (`sofia/PROFILE/USER@HOST`) or loopback leg (`loopback/USER-a`). The phone is rung with
`originate {...}user/ENDPOINT callback XML <context>-robot`: once it is answered (ignore_early_media: a
ringing phone's early media must not count as an answer) the robot context hands the leg to our
outbound-socket server, whose callback flow reads the request's id from shopcall_arg_id and the agent from
dialed_user (set here too, for an endpoint_template other than user/).
"""

from __future__ import annotations

import json
import re
import time

from esl.client import EslClient
from esl.originator import originate_outcome
from shopcall.call import PbxError, check_endpoint
from shopcall.callbacks import shown_to_agent
from shopcall.config import Config
from shopcall.dialler import DialOutcome

_GONE = frozenset({"HANGUP", "DOWN"})  # callstate of a channel on its way out, or not yet placed


def channels(body: str) -> list[dict]:
    """The rows of `show channels as json` (its body: `{"row_count": 0}` when there are none)."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise PbxError(f"show channels: not JSON: {body[:80]!r}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("rows", []), list):
        raise PbxError(f"show channels: unexpected answer {body[:80]!r}")
    return [row for row in data.get("rows", []) if isinstance(row, dict)]


def belongs(row: dict, endpoint: str) -> bool:
    presence = str(row.get("presence_id", ""))
    if presence.partition("@")[0] == endpoint:
        return True
    name = str(row.get("name", ""))
    return bool(re.fullmatch(rf"sofia/[^/]+/{re.escape(endpoint)}@.*|loopback/{re.escape(endpoint)}-[ab]", name))


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
        return not any(belongs(row, name) and row.get("callstate") not in _GONE for row in await self._channels())

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
        }
        return await originate_outcome(self.client, self.endpoint_template.format(endpoint=user), variables=variables,
                                       timeout=ring_seconds, destination=self.destination)
