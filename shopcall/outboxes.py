"""Delivered rows of the two outboxes (mail `outbox`, `webhook_outbox`) are deleted once they are older
than the configured number of days, so a shop that runs for years does not keep every notice and result
it ever sent. Rows not yet delivered, and mail refused for good (`failed`, for an admin to look at), stay.
"""

from __future__ import annotations

import logging
import time

from psycopg import sql
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger("shopcall.outboxes")

TABLES = ("outbox", "webhook_outbox")
PRUNE_EVERY_SECONDS = 3600.0


async def prune_sent(pool: AsyncConnectionPool, table: str, keep_days: int) -> int:
    """Delete `table`'s rows sent more than `keep_days` days ago; returns how many."""
    if table not in TABLES:
        raise ValueError(f"not an outbox: {table!r}")
    async with pool.connection() as conn:
        cur = await conn.execute(
            sql.SQL("DELETE FROM {} WHERE status = 'sent' AND sent_at < now() - make_interval(days => %s)")
            .format(sql.Identifier(table)), (int(keep_days),))
        deleted = cur.rowcount
    if deleted:
        log.info("%s: deleted %d rows sent more than %d days ago", table, deleted, keep_days)
    return deleted


class Pruner:
    """Prunes one outbox at most once an hour, from its sender's loop (each sender process does its own:
    the DELETE is idempotent)."""

    def __init__(self, pool: AsyncConnectionPool, table: str, keep_days: int) -> None:
        self.pool, self.table, self.keep_days = pool, table, keep_days
        self._last = float("-inf")

    async def maybe(self) -> None:
        if time.monotonic() - self._last < PRUNE_EVERY_SECONDS:
            return
        self._last = time.monotonic()
        await prune_sent(self.pool, self.table, self.keep_days)
