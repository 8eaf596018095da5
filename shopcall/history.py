"""The call history as a CRM or the shop's office reads it: by caller, by a range of days, or both; newest
first, in pages (the last call's id is the cursor) or as one CSV of every call in the range, streamed."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import psycopg

from shopcall.calllog import TALK_SECONDS, WAIT_SECONDS

COLUMNS = ("id", "uniqueid", "direction", "started_at", "answered_at", "ended_at", "outcome", "missed",
           "caller_number", "caller_e164", "caller_name", "dialled_number", "group", "answered_endpoint",
           "agent_name", "menu_choice", "robot_choice", "language", "wait_seconds", "talk_seconds", "recorded",
           "survey_answer", "callback_request_id")

_SELECT = f"""
SELECT c.id, c.uniqueid, c.direction, c.started_at, c.answered_at, c.ended_at, c.outcome, c.missed,
       c.caller_number, c.caller_e164, c.caller_name, c.dialled_number, g.name AS "group", c.answered_endpoint,
       e.name AS agent_name, c.menu_choice, c.robot_choice, c.language, {WAIT_SECONDS.format(t="c")} AS wait_seconds,
       {TALK_SECONDS.format(t="c")} AS talk_seconds, c.recording_path IS NOT NULL AS recorded,
       s.answer AS survey_answer, c.callback_request_id
  FROM calls c LEFT JOIN groups g ON g.id = c.group_id LEFT JOIN employees e ON e.id = c.answered_by
       LEFT JOIN survey_answers s ON s.call_id = c.id"""


def _statement(*, phone: str | None, start: datetime | None, end: datetime | None, before: int | None,
               limit: int | None) -> tuple[str, dict[str, Any]]:
    # only the filters given, so each shape gets its own plan (the caller's index, the start's index)
    where, params = [], {"phone": phone, "start": start, "end": end, "before": before, "limit": limit}
    if phone is not None:
        where.append("c.caller_e164 = %(phone)s")
    if start is not None:
        where.append("c.started_at >= %(start)s")
    if end is not None:
        where.append("c.started_at < %(end)s")
    if before is not None:  # keyset: the calls after this one in the newest-first order
        where.append("(c.started_at, c.id) < (SELECT started_at, id FROM calls WHERE id = %(before)s)")
    sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY c.started_at DESC, c.id DESC"
    if limit is not None:
        sql += " LIMIT %(limit)s"
    return sql, params


async def page(conn: psycopg.AsyncConnection, *, phone: str | None = None, start: datetime | None = None,
               end: datetime | None = None, before: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
    sql, params = _statement(phone=phone, start=start, end=end, before=before, limit=limit)
    cur = await conn.execute(sql, params)
    return await cur.fetchall()


async def csv_chunks(conn: psycopg.AsyncConnection, *, phone: str | None = None, start: datetime | None = None,
                     end: datetime | None = None, rows_per_chunk: int = 500) -> AsyncIterator[str]:
    """Every call of the range as CSV (a header, then rows), in chunks, never the whole range in memory."""
    sql, params = _statement(phone=phone, start=start, end=end, before=None, limit=None)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(COLUMNS)
    n = 0
    async with conn.cursor() as cur:
        async for row in cur.stream(sql, params):
            writer.writerow(["" if row[k] is None else _cell(row[k]) for k in COLUMNS])
            n += 1
            if n % rows_per_chunk == 0:
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
    yield buf.getvalue()


def _cell(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value
