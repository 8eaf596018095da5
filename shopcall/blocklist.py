"""Callers the shop takes no calls from: the block list the inbound flow checks in its lookup, edited from
the CLI (`shopcall block`) and the API (`/api/v1/blocked`)."""

from __future__ import annotations

import psycopg
from psycopg.rows import dict_row

REASON_MAX = 200
DAYS_MAX = 36500


class BlockError(ValueError):
    """A value the block list cannot take; `field` names it (reason, days)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def check_reason(reason: str) -> str:
    reason = " ".join(reason.split())  # one line: it is printed in lists and logs
    if len(reason) > REASON_MAX:
        raise BlockError("reason", f"at most {REASON_MAX} characters")
    return reason


async def block(conn: psycopg.AsyncConnection, e164: str, *, reason: str = "", days: float | None = None,
                source: str) -> dict:
    """Block (or re-block, replacing reason and end) a caller for `days` (None: until unblocked)."""
    if days is not None and not 0 < days <= DAYS_MAX:  # also NaN
        raise BlockError("days", f"more than 0 and at most {DAYS_MAX}")
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        """INSERT INTO blocked_callers (phone, reason, until, source)
           VALUES (%(phone)s, %(reason)s, now() + make_interval(secs => %(seconds)s::float8), %(source)s)
           ON CONFLICT (phone) DO UPDATE SET reason = EXCLUDED.reason, until = EXCLUDED.until,
                                             source = EXCLUDED.source, created_at = now()
           RETURNING phone, reason, until, source, created_at""",
        {"phone": e164, "reason": check_reason(reason), "seconds": None if days is None else days * 86400,
         "source": source},
    )
    row = await cur.fetchone()
    assert row is not None
    return row


async def unblock(conn: psycopg.AsyncConnection, e164: str) -> bool:
    cur = await conn.execute("DELETE FROM blocked_callers WHERE phone = %s", (e164,))
    return cur.rowcount > 0


async def entries(conn: psycopg.AsyncConnection) -> list[dict]:
    """The entries still in force, oldest first (one whose `until` has passed is no longer listed)."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute("""SELECT phone, reason, until, source, created_at FROM blocked_callers
                          WHERE until IS NULL OR until > now() ORDER BY created_at, phone""")
    return await cur.fetchall()
