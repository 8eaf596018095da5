"""Callers the shop takes no calls from: the block list the inbound flow checks in its lookup, edited from
the CLI (`shopcall block`) and the API (`/api/v1/blocked`)."""

from __future__ import annotations

import psycopg
from psycopg.rows import dict_row

REASON_MAX = 200
DAYS_MAX = 36500
# what PBXes and carriers put where a withheld number would be
ANONYMOUS = frozenset({"", "anonymous", "unknown", "restricted", "private", "unavailable", "withheld"})


def is_anonymous(caller_number: str) -> bool:
    return caller_number.strip().lower() in ANONYMOUS


def check_reason(reason: str) -> str:
    reason = " ".join(reason.split())  # one line: it is printed in lists and logs
    if len(reason) > REASON_MAX:
        raise ValueError(f"reason: at most {REASON_MAX} characters")
    return reason


async def block(conn: psycopg.AsyncConnection, e164: str, *, reason: str = "", days: float | None = None,
                source: str) -> dict:
    """Block (or re-block, replacing reason and end) a caller for `days` (None: until unblocked)."""
    if days is not None and not 0 < days <= DAYS_MAX:  # also NaN
        raise ValueError(f"days: more than 0 and at most {DAYS_MAX}")
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
