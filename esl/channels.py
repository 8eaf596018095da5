"""FreeSWITCH's `show channels as json`, read for whose phone has a live channel.

A channel is an agent's when its presence_id is the endpoint's (FreeSWITCH's directory puts
`presence_id=USER@DOMAIN` in every user's dial-string, and a registered phone's own calls carry it), or when
its name is the endpoint's sofia contact (`sofia/PROFILE/USER@HOST`) or loopback leg (`loopback/USER-a`).
"""

from __future__ import annotations

import json
import re

from shopcall.call import PbxError

GONE = frozenset({"HANGUP", "DOWN"})  # callstate of a channel on its way out, or not yet placed
TALKING = frozenset({"ACTIVE", "HELD", "UNHELD"})  # answered: not merely ringing for another caller


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


def talking(rows: list[dict], endpoints: list[str]) -> frozenset[str]:
    """The endpoints with an answered channel among the rows."""
    return frozenset(e for e in endpoints if any(belongs(r, e) and r.get("callstate") in TALKING for r in rows))
