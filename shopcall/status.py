"""What an admin or a monitoring check asks first ("is anything stuck?"): migrations, agents, the callback
queue, the webhook and mail outboxes, and this machine's spools of rows kept while the database was down.
`problems` says in words what needs a look; `shopcall status` exits 1 when there are any."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from shopcall import db
from shopcall.config import Config

STUCK_MINUTES = 15  # an outbox row or a due callback older than this is a problem worth naming

_AGENTS = """SELECT count(*) AS total, count(*) FILTER (WHERE logged_in) AS logged_in,
                    count(*) FILTER (WHERE logged_in AND paused) AS paused FROM employees"""
_CALLBACKS = """SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                       count(*) FILTER (WHERE status = 'pending' AND due_at <= now()) AS due,
                       count(*) FILTER (WHERE status = 'in_progress') AS in_progress,
                       min(due_at) FILTER (WHERE status = 'pending' AND due_at <= now()) AS oldest_due_at
                  FROM callback_requests"""
# per kind (and URL: a wrong URL is the usual reason); the last error of the row that failed last
_WEBHOOKS = """SELECT kind, url, count(*) AS pending, count(*) FILTER (WHERE attempts > 0) AS failing,
                      min(created_at) AS oldest_at,
                      (array_agg(last_error ORDER BY next_try_at DESC) FILTER (WHERE last_error IS NOT NULL))[1]
                        AS last_error
                 FROM webhook_outbox WHERE status = 'pending' GROUP BY kind, url ORDER BY kind, url"""
_MAIL = """SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                  count(*) FILTER (WHERE status = 'failed') AS failed,
                  min(created_at) FILTER (WHERE status = 'pending') AS oldest_at,
                  (array_agg(last_error ORDER BY next_try_at DESC)
                     FILTER (WHERE status = 'pending' AND last_error IS NOT NULL))[1] AS last_error
             FROM outbox"""


async def collect(conn: psycopg.AsyncConnection, config: Config) -> dict[str, Any]:
    cur = await conn.execute("SELECT version FROM schema_migrations")
    done = {r["version"] for r in await cur.fetchall()}
    pending_migrations = [m.name for m in db.list_migrations() if m.version not in done]
    agents = await (await conn.execute(_AGENTS)).fetchone()
    queue = await (await conn.execute(_CALLBACKS)).fetchone()
    hooks = await (await conn.execute(_WEBHOOKS)).fetchall()
    mail = await (await conn.execute(_MAIL)).fetchone()
    now = await (await conn.execute("SELECT now() AS now")).fetchone()
    spools = await asyncio.to_thread(_spools, config.spool_dir)
    report = {
        "migrations": {"applied": len(done), "pending": pending_migrations},
        "agents": {**agents, "available": agents["logged_in"] - agents["paused"]},
        "callbacks": queue, "webhooks": hooks, "mail": mail, "spool": spools,
    }
    report["problems"] = _problems(report, now["now"])
    return report


def _spools(spool_dir: Path) -> dict[str, int]:
    """Rows waiting on this machine for the database (calls, voicemails), and lines set aside as unreadable."""
    out = {}
    for name in ("calls.jsonl", "voicemails.jsonl", "calls.bad"):
        path = spool_dir / name
        try:
            with path.open("rb") as f:
                out[name] = sum(1 for line in f if line.strip())
        except FileNotFoundError:
            out[name] = 0
    return out


def _minutes(since: datetime | None, now: datetime) -> float:
    return 0.0 if since is None else (now - since).total_seconds() / 60


def _problems(r: dict[str, Any], now: datetime) -> list[str]:
    out = []
    if r["migrations"]["pending"]:
        out.append(f"migrations not applied: {', '.join(r['migrations']['pending'])} (run shopcall db migrate)")
    q = r["callbacks"]
    if q["due"] and _minutes(q["oldest_due_at"], now) > STUCK_MINUTES:
        out.append(f"{q['due']} callback requests due, the oldest for {_minutes(q['oldest_due_at'], now):.0f} min "
                   f"({r['agents']['available']} agents available)")
    for h in r["webhooks"]:
        age = _minutes(h["oldest_at"], now)
        if h["failing"] and age > STUCK_MINUTES:
            out.append(f"{h['pending']} {h['kind']} webhooks to {h['url']} undelivered, the oldest for {age:.0f} min: "
                       f"{h['last_error'] or 'no answer yet'}")
    m = r["mail"]
    if m["pending"] and _minutes(m["oldest_at"], now) > STUCK_MINUTES:
        out.append(f"{m['pending']} mails unsent, the oldest for {_minutes(m['oldest_at'], now):.0f} min: "
                   f"{m['last_error'] or 'no attempt yet'}")
    if m["failed"]:
        out.append(f"{m['failed']} mails refused for good by the SMTP server (outbox status failed)")
    s = r["spool"]
    if s["calls.jsonl"] or s["voicemails.jsonl"]:
        out.append(f"rows kept while the database was down, not replayed yet: {s['calls.jsonl']} calls, "
                   f"{s['voicemails.jsonl']} voicemails")
    if s["calls.bad"]:
        out.append(f"{s['calls.bad']} unreadable call-spool lines set aside in calls.bad")
    return out


def as_text(r: dict[str, Any]) -> str:
    a, q, m, s = r["agents"], r["callbacks"], r["mail"], r["spool"]
    lines = [
        f"migrations  {r['migrations']['applied']} applied, {len(r['migrations']['pending'])} pending",
        f"agents      {a['total']} ({a['logged_in']} logged in, {a['paused']} paused, {a['available']} available)",
        f"callbacks   {q['pending']} pending ({q['due']} due), {q['in_progress']} in progress",
        f"mail        {m['pending']} pending, {m['failed']} failed",
        f"spool       {s['calls.jsonl']} calls, {s['voicemails.jsonl']} voicemails, {s['calls.bad']} unreadable",
    ]
    if not r["webhooks"]:
        lines.append("webhooks    nothing pending")
    for h in r["webhooks"]:
        lines.append(f"webhooks    {h['kind']} → {h['url']}: {h['pending']} pending, {h['failing']} failing")
    lines.append("")
    lines += [f"PROBLEM: {p}" for p in r["problems"]] or ["no problems"]
    return "\n".join(lines) + "\n"
