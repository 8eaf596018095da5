"""Webhooks to the shop (robot-call results, customer messages, finished calls) through the PostgreSQL
`webhook_outbox`.

A webhook is a row first, committed with whatever produced it, and an HTTP POST later, so a shop that is
down only delays it. Rows are retried with capped exponential back-off until the shop answers 2xx; they
never give up, since a lost call result cannot be recomputed.

Several processes may run `send_due`. A row is claimed by pushing its next_try_at past the request timeout
(a lease) in one short statement; no transaction stays open during HTTP. If a sender dies or the database
fails after the POST, the lease expires and the row is posted again: delivery is at least once, and the
`X-Shopcall-Delivery` header (the outbox id) lets the shop drop a repeat.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
from typing import Any

import aiohttp
import psycopg
from psycopg.rows import dict_row, tuple_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from shopcall.config import Config, WebhooksConfig
from shopcall.outboxes import Pruner

log = logging.getLogger("shopcall.webhooks")

KINDS = ("result", "message", "call")
BASE_BACKOFF_SECONDS = 5
LEASE_MARGIN_SECONDS = 60  # on top of the request timeout: a claimed row is not taken by another sender
_ERROR_BODY_CHARS = 200
_warned_unsigned = False

# One statement: the rows SKIP LOCKED takes get their lease in the same short transaction.
_CLAIM = """
WITH due AS (
    SELECT id FROM webhook_outbox
    WHERE status = 'pending' AND next_try_at <= now() AND kind = ANY(%(kinds)s)
    ORDER BY next_try_at, id LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE webhook_outbox w SET next_try_at = now() + make_interval(secs => %(lease)s)
FROM due WHERE w.id = due.id
RETURNING w.id, w.kind, w.url, w.body, w.attempts
"""


async def enqueue(
    conn: psycopg.AsyncConnection, kind: str, url: str, body: dict, dedupe_key: str | None = None
) -> int | None:
    """Queue a webhook inside the caller's transaction; returns its id, or None if dedupe_key was queued
    before (a replayed settlement posts once)."""
    if kind not in KINDS:
        raise ValueError(f"webhook kind must be one of {', '.join(KINDS)}, not {kind!r}")
    cur = conn.cursor(row_factory=tuple_row)  # whatever row factory the caller's connection has
    await cur.execute(
        """INSERT INTO webhook_outbox (kind, url, body, dedupe_key) VALUES (%s, %s, %s, %s)
           ON CONFLICT (dedupe_key) DO NOTHING RETURNING id""",
        (kind, url, Jsonb(body), dedupe_key),
    )
    row = await cur.fetchone()
    return None if row is None else int(row[0])


def encode(body: Any) -> bytes:
    """The exact bytes posted and signed: canonical (sorted keys, no spaces) so a re-post signs the same."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def backoff_seconds(attempts: int, max_backoff: int) -> float:
    """Delay after the `attempts`-th failure (1-based): 5 s, 10 s, 20 s, ... capped, ±10% jitter so rows
    that failed together (the shop was down) do not all come back in the same second."""
    delay = min(BASE_BACKOFF_SECONDS * 2 ** min(max(attempts - 1, 0), 30), max_backoff)
    return delay * random.uniform(0.9, 1.1)


def _headers(row: dict, payload: bytes, secret: str) -> dict[str, str]:
    global _warned_unsigned
    headers = {
        "Content-Type": "application/json",
        "X-Shopcall-Delivery": str(row["id"]),
        "X-Shopcall-Kind": row["kind"],
    }
    if secret:
        headers["X-Shopcall-Signature"] = sign(secret, payload)
    elif not _warned_unsigned:
        _warned_unsigned = True
        log.warning("webhooks.secret is not set: webhooks are posted unsigned")
    return headers


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts are asyncio.TimeoutError, i.e. TimeoutError
        return f"timed out after {timeout:g} s"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


async def post(session: aiohttp.ClientSession, row: dict, config: WebhooksConfig) -> str | None:
    """POST one row; None when acknowledged (2xx), else a short error for last_error."""
    payload = encode(row["body"])
    try:
        async with session.post(
            row["url"], data=payload, headers=_headers(row, payload, config.secret),
            timeout=aiohttp.ClientTimeout(total=config.timeout),
            allow_redirects=False,  # a redirect is not an acknowledgement (and would turn the POST into GET)
        ) as resp:
            if 200 <= resp.status < 300:
                return None
            start = await resp.content.read(4 * _ERROR_BODY_CHARS)  # never the whole of a big error page
            text = " ".join(start.decode("utf-8", "replace").split())[:_ERROR_BODY_CHARS]
            return f"HTTP {resp.status}: {text}" if text else f"HTTP {resp.status}"
    except Exception as exc:  # refused, reset, DNS, timeout, bad URL: all retried later
        return _describe(exc, config.timeout)


async def _deliver(pool: AsyncConnectionPool, session: aiohttp.ClientSession, row: dict,
                   config: WebhooksConfig) -> bool:
    error = await post(session, row, config)
    async with pool.connection() as conn, conn.transaction():
        if error is None:
            await conn.execute(
                """UPDATE webhook_outbox SET status = 'sent', attempts = attempts + 1, sent_at = now(),
                   last_error = NULL WHERE id = %s""",
                (row["id"],),
            )
            log.info("webhook %s (%s) delivered to %s", row["id"], row["kind"], row["url"])
            return True
        attempts = row["attempts"] + 1
        delay = backoff_seconds(attempts, config.max_backoff_seconds)
        await conn.execute(
            """UPDATE webhook_outbox SET attempts = attempts + 1, last_error = %s,
               next_try_at = now() + make_interval(secs => %s) WHERE id = %s AND status = 'pending'""",
            (error, delay, row["id"]),
        )
    log.warning("webhook %s (%s) to %s not delivered (attempt %d): %s; retry in %.0f s",
                row["id"], row["kind"], row["url"], attempts, error, delay)
    return False


def configured_kinds(hooks: WebhooksConfig) -> tuple[str, ...]:
    """The kinds a process has a URL for: the only ones it posts (and signs with its secret)."""
    urls = {"result": hooks.results_url, "message": hooks.messages_url, "call": hooks.calls_url}
    return tuple(kind for kind in KINDS if urls[kind])


async def send_due(
    pool: AsyncConnectionPool, config: Config | WebhooksConfig, *,
    session: aiohttp.ClientSession | None = None, limit: int = 50, kinds: tuple[str, ...] = KINDS,
) -> int:
    """Post the webhooks of `kinds` that are due; returns how many the shop acknowledged. Safe in several
    processes."""
    hooks = config.webhooks if isinstance(config, Config) else config
    async with pool.connection() as conn, conn.transaction():  # committed before any POST
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(_CLAIM, {"limit": limit, "lease": hooks.timeout + LEASE_MARGIN_SECONDS,
                                   "kinds": list(kinds)})
        rows = sorted(await cur.fetchall(), key=lambda r: r["id"])
    if not rows:
        return 0
    own = session is None
    if session is None:
        session = aiohttp.ClientSession()
    try:
        # concurrently: every claimed row is posted within one timeout of its claim, well inside the lease
        done = await asyncio.gather(*(_deliver(pool, session, row, hooks) for row in rows),
                                    return_exceptions=True)
    finally:
        if own:
            await session.close()
    for row, outcome in zip(rows, done, strict=True):
        if isinstance(outcome, BaseException):  # the database failed after the POST: posted again later
            log.error("webhook %s: outcome not recorded: %s", row["id"], outcome)
    return sum(outcome is True for outcome in done)


async def run_forever(pool: AsyncConnectionPool, config: Config | WebhooksConfig) -> None:
    """Post due webhooks every poll_seconds until cancelled; outages are logged and waited out."""
    hooks = config.webhooks if isinstance(config, Config) else config
    limit = 50
    # a process posts only what it was configured for: one that knows the CRM's URL alone (an ESL-only
    # box, say) does not post robot results, signed with its own secret, to wherever their rows point
    kinds = configured_kinds(hooks)
    pruner = Pruner(pool, "webhook_outbox", hooks.keep_sent_days)
    async with aiohttp.ClientSession() as session:
        while True:
            delivered = 0
            try:
                delivered = await send_due(pool, hooks, session=session, limit=limit, kinds=kinds)
                await pruner.maybe()
            except (psycopg.OperationalError, PoolTimeout) as exc:
                log.error("webhooks: database unavailable (%s); trying again in %g s", exc, hooks.poll_seconds)
            except Exception:
                log.exception("webhook delivery failed")
            if delivered < limit:  # a full batch means a backlog: go on at once
                await asyncio.sleep(hooks.poll_seconds)
