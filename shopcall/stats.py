"""Call statistics for a date range: missed calls by hour, group and number, answer rate, average wait,
callbacks, survey scores by agent. One query per table, in the shop's time zone."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[str, ...]
    rows: list[tuple]


# "wait" is from the start of the call to the answer: greeting, menu and ringing, as the caller lived it.
# Calls refused by the block list are counted apart (summary "blocked"): spam is not a missed customer.
QUERIES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "summary": ("Summary", ("calls", "answered", "missed", "answer_rate_%", "avg_wait_s", "robot", "blocked"), """
        SELECT count(*) FILTER (WHERE outcome <> 'blocked'), count(*) FILTER (WHERE outcome = 'answered'),
               count(*) FILTER (WHERE missed),
               round(100.0 * count(*) FILTER (WHERE outcome = 'answered')
                     / NULLIF(count(*) FILTER (WHERE outcome <> 'blocked'), 0), 1),
               round(avg(extract(epoch FROM answered_at - started_at))::numeric, 1),
               count(*) FILTER (WHERE outcome = 'robot'), count(*) FILTER (WHERE outcome = 'blocked')
          FROM calls WHERE started_at >= %(start)s AND started_at < %(end)s AND direction = 'inbound'"""),
    "missed_by_hour": ("Missed calls by hour", ("hour", "calls", "missed"), """
        SELECT extract(hour FROM started_at AT TIME ZONE %(tz)s)::int AS hour, count(*),
               count(*) FILTER (WHERE missed)
          FROM calls WHERE started_at >= %(start)s AND started_at < %(end)s AND direction = 'inbound'
           AND outcome <> 'blocked'
         GROUP BY hour ORDER BY hour"""),
    "by_group": ("By group", ("group", "calls", "answered", "missed", "answer_rate_%", "avg_wait_s"), """
        SELECT coalesce(g.name, '-'), count(*), count(*) FILTER (WHERE c.outcome = 'answered'),
               count(*) FILTER (WHERE c.missed),
               round(100.0 * count(*) FILTER (WHERE c.outcome = 'answered') / NULLIF(count(*), 0), 1),
               round(avg(extract(epoch FROM c.answered_at - c.started_at))::numeric, 1)
          FROM calls c LEFT JOIN groups g ON g.id = c.group_id
         WHERE c.started_at >= %(start)s AND c.started_at < %(end)s AND c.direction = 'inbound'
           AND c.outcome <> 'blocked'
         GROUP BY 1 ORDER BY 1"""),
    "by_number": ("By dialled number", ("number", "calls", "answered", "missed", "answer_rate_%"), """
        SELECT dialled_number, count(*), count(*) FILTER (WHERE outcome = 'answered'),
               count(*) FILTER (WHERE missed),
               round(100.0 * count(*) FILTER (WHERE outcome = 'answered') / NULLIF(count(*), 0), 1)
          FROM calls WHERE started_at >= %(start)s AND started_at < %(end)s AND direction = 'inbound'
           AND outcome <> 'blocked'
         GROUP BY 1 ORDER BY 1"""),
    # who took the calls: inbound answered, outbound ones (callbacks, clicks to call, the robot's handed
    # over) by the agent on them, and their talk time
    "by_agent": ("By agent", ("agent", "name", "answered", "inbound", "outbound", "talk_min", "avg_talk_s",
                              "avg_wait_s"), """
        SELECT e.endpoint, e.name, count(*), count(*) FILTER (WHERE c.direction = 'inbound'),
               count(*) FILTER (WHERE c.direction = 'outbound'),
               round(sum(extract(epoch FROM c.ended_at - c.answered_at))::numeric / 60, 1),
               round(avg(extract(epoch FROM c.ended_at - c.answered_at))::numeric, 1),
               round(avg(extract(epoch FROM c.answered_at - c.started_at))
                     FILTER (WHERE c.direction = 'inbound')::numeric, 1)
          FROM calls c JOIN employees e ON e.id = c.answered_by
         WHERE c.started_at >= %(start)s AND c.started_at < %(end)s AND c.outcome = 'answered'
         GROUP BY e.endpoint, e.name ORDER BY 1"""),
    # every ring step of an inbound call against the dial that ended it (the nth ring of a route log is
    # ended by its nth dial): a step nobody answered counts for each agent it rang, a hunt someone answered
    # for those before them; a ring-all someone answered, or a caller who hung up, counts for nobody
    "rings_by_agent": ("Rings not answered, by agent", ("agent", "name", "rung", "not_answered",
                                                         "not_answered_%"), """
        WITH steps AS (
            SELECT c.id, s.entry, s.entry->>'step' AS kind,
                   row_number() OVER (PARTITION BY c.id, s.entry->>'step' ORDER BY s.n) AS k
              FROM calls c, jsonb_array_elements(c.route_log) WITH ORDINALITY AS s(entry, n)
             WHERE c.started_at >= %(start)s AND c.started_at < %(end)s AND c.direction = 'inbound'
               AND jsonb_typeof(c.route_log) = 'array' AND s.entry->>'step' IN ('ring', 'dial')
               AND s.entry->>'status' IS DISTINCT FROM 'nobody_available'
        ), rung AS (
            SELECT a.endpoint, a.n, d.entry->>'status' AS status, r.entry->>'strategy' AS strategy,
                   (SELECT min(x.n) FROM jsonb_array_elements_text(r.entry->'endpoints') WITH ORDINALITY
                        AS x(endpoint, n) WHERE x.endpoint = d.entry->>'answered') AS answered_n
              FROM steps r JOIN steps d ON d.id = r.id AND d.k = r.k AND d.kind = 'dial'
                   CROSS JOIN jsonb_array_elements_text(r.entry->'endpoints') WITH ORDINALITY AS a(endpoint, n)
             WHERE r.kind = 'ring' AND jsonb_typeof(r.entry->'endpoints') = 'array'
        ), counted AS (
            SELECT endpoint,
                   status <> 'answered' OR strategy <> 'hunt' OR n <= coalesce(answered_n, n) AS was_rung,
                   status IN ('noanswer', 'busy', 'failed')
                       OR (status = 'answered' AND strategy = 'hunt' AND n < answered_n) AS missed
              FROM rung
        )
        SELECT c.endpoint, e.name, count(*) FILTER (WHERE was_rung), count(*) FILTER (WHERE missed),
               round(100.0 * count(*) FILTER (WHERE missed) / NULLIF(count(*) FILTER (WHERE was_rung), 0), 1)
          FROM counted c LEFT JOIN employees e ON e.endpoint = c.endpoint
         GROUP BY c.endpoint, e.name ORDER BY 1"""),
    "callbacks": ("Callback requests", ("status", "requests"), """
        SELECT status, count(*) FROM callback_requests
         WHERE created_at >= %(start)s AND created_at < %(end)s GROUP BY 1 ORDER BY 1"""),
    "survey_by_agent": ("Survey by agent (1 solved, 2 called several times, 3 not solved)",
                        ("agent", "answers", "solved", "several_calls", "not_solved", "solved_%"), """
        SELECT coalesce(e.endpoint, '-'), count(*), count(*) FILTER (WHERE s.answer = 1),
               count(*) FILTER (WHERE s.answer = 2), count(*) FILTER (WHERE s.answer = 3),
               round(100.0 * count(*) FILTER (WHERE s.answer = 1) / NULLIF(count(*), 0), 1)
          FROM survey_answers s LEFT JOIN employees e ON e.id = s.employee_id
         WHERE s.created_at >= %(start)s AND s.created_at < %(end)s GROUP BY 1 ORDER BY 1"""),
}


def day_range(first: date, last: date, timezone: str) -> tuple[datetime, datetime]:
    """Whole days in the shop's zone, `last` included."""
    if last < first:
        raise ValueError(f"the range ends ({last}) before it starts ({first})")
    zone = ZoneInfo(timezone)
    return datetime.combine(first, time(), zone), datetime.combine(last + timedelta(days=1), time(), zone)


async def collect(pool: AsyncConnectionPool, first: date, last: date, timezone: str) -> list[Table]:
    start, end = day_range(first, last, timezone)
    params = {"start": start, "end": end, "tz": timezone}
    tables = []
    async with pool.connection() as conn:
        for title, columns, sql in QUERIES.values():
            # tuples: the pool's dict rows would fold the several unnamed count(*) columns into one
            async with conn.cursor(row_factory=tuple_row) as cur:
                await cur.execute(sql, params)
                tables.append(Table(title, columns, list(await cur.fetchall())))
    return tables


def _cell(value: object) -> str:
    return "" if value is None else str(value)


def as_text(tables: list[Table]) -> str:
    out = []
    for t in tables:
        cells = [list(t.columns)] + [[_cell(v) for v in row] for row in t.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(t.columns))]
        out.append(t.title)
        for n, r in enumerate(cells):
            out.append("  " + "  ".join(c.rjust(w) if n else c.ljust(w) for c, w in zip(r, widths, strict=True)))
            if n == 0:
                out.append("  " + "  ".join("-" * w for w in widths))
        if not t.rows:
            out.append("  (none)")
        out.append("")
    return "\n".join(out)


def as_csv(tables: list[Table]) -> str:
    """One CSV: a `table` column says which table a row belongs to, so a spreadsheet can filter on it."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    for t in tables:
        key = next(k for k, v in QUERIES.items() if v[0] == t.title)
        writer.writerow(["table", *t.columns])
        for row in t.rows:
            writer.writerow([key, *(_cell(v) for v in row)])
    return buf.getvalue()
