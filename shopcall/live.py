"""What is happening now, for a supervisor's wall board (GET /api/v1/live, `shopcall live`): who waits in
line for which group and for how long, and each agent: logged in, paused, and their phone as the PBX sees it.

The line comes from hold_queue (every process's waiting calls); the phones are asked of the PBX at once,
each answer bounded by a timeout, so a PBX that is slow or gone makes the phones "unknown", never the
view late.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any, Protocol

from psycopg_pool import AsyncConnectionPool

from shopcall.hold import STALE_SECONDS

log = logging.getLogger("shopcall.live")

PHONE_STATES = ("free", "ringing", "on_call", "unavailable", "unknown")


class PhoneStates(Protocol):
    async def phone_state(self, endpoint: str) -> str:
        """One of PHONE_STATES, by the PBX's account; raises PbxError when the PBX cannot say."""


_WAITING = """
SELECT g.name AS "group", h.caller_number, h.uniqueid, h.joined_at,
       round(extract(epoch FROM clock_timestamp() - h.joined_at)::numeric, 1)::float AS waiting_seconds,
       row_number() OVER (PARTITION BY h.group_id ORDER BY h.joined_at, h.uniqueid)::int AS position
FROM hold_queue h JOIN groups g ON g.id = h.group_id
WHERE h.seen_at > clock_timestamp() - make_interval(secs => %s)
ORDER BY h.joined_at, h.uniqueid
"""

_AGENTS = """
SELECT e.endpoint, e.name, e.logged_in, e.paused, e.last_call_at,
       coalesce(array_agg(g.name ORDER BY g.name) FILTER (WHERE g.name IS NOT NULL), '{}') AS groups
FROM employees e LEFT JOIN group_members m ON m.employee_id = e.id LEFT JOIN groups g ON g.id = m.group_id
GROUP BY e.id ORDER BY e.endpoint
"""


async def snapshot(pool: AsyncConnectionPool, phones: PhoneStates | None, *, timeout: float = 2.0) -> dict[str, Any]:
    async with pool.connection() as conn:
        waiting = [dict(r) for r in await (await conn.execute(_WAITING, (STALE_SECONDS,))).fetchall()]
        agents = [dict(r) for r in await (await conn.execute(_AGENTS)).fetchall()]
    groups: dict[str, dict[str, Any]] = {}
    for w in waiting:
        g = groups.setdefault(w["group"], {"group": w["group"], "waiting": 0, "longest_wait_seconds": 0.0})
        g["waiting"] += 1
        g["longest_wait_seconds"] = max(g["longest_wait_seconds"], w["waiting_seconds"])
    pbx_error = None
    if phones is None:
        for a in agents:
            a["phone"] = None
    else:
        answers = await asyncio.gather(*(_ask(phones, a["endpoint"], timeout) for a in agents))
        for a, (state, error) in zip(agents, answers, strict=True):
            a["phone"] = state
            pbx_error = pbx_error or error
        if pbx_error:
            log.warning("live view: the PBX could not say every phone's state: %s", pbx_error)
    return {
        "at": datetime.now(UTC),
        "waiting": waiting,
        "groups": sorted(groups.values(), key=lambda g: g["group"]),
        "agents": agents,
        "phones_asked": phones is not None,
        "pbx_error": pbx_error,
    }


async def _ask(phones: PhoneStates, endpoint: str, timeout: float) -> tuple[str, str | None]:
    try:
        state = await asyncio.wait_for(phones.phone_state(endpoint), timeout)
    except TimeoutError:
        return "unknown", f"no answer about {endpoint} within {timeout:g} s"
    except Exception as exc:  # a wall board shows what it knows; the PBX's trouble is said once, beside it
        return "unknown", f"{endpoint}: {type(exc).__name__}: {exc}"
    return (state if state in PHONE_STATES else "unknown"), None


def as_text(view: dict[str, Any]) -> str:
    """The view for a terminal (`shopcall live`)."""
    lines = []
    if view["waiting"]:
        lines.append("waiting in line:")
        for w in view["waiting"]:
            lines.append(f"  {w['group']:16} #{w['position']:<3} {w['waiting_seconds']:7.1f} s  "
                         f"{w['caller_number'] or 'unknown number'}")
    else:
        lines.append("nobody is waiting in line")
    lines.append("agents:")
    for a in view["agents"]:
        state = "paused" if a["paused"] else "available" if a["logged_in"] else "logged out"
        phone = a["phone"] or "-"
        lines.append(f"  {a['endpoint']:16} {state:11} {phone:12} {a['name']}  ({', '.join(a['groups']) or 'no group'})")
    if view["pbx_error"]:
        lines.append(f"phones: {view['pbx_error']}")
    elif not view["phones_asked"]:
        lines.append("phones: not asked (no PBX link: asterisk.ami_secret, or the FreeSWITCH event socket)")
    return "\n".join(lines)
