"""PostgreSQL's LISTEN/NOTIFY for processes that must hear of a change at once: its own connection
(notifications need one that is not returned to a pool), with keepalives so a vanished server is noticed."""

from __future__ import annotations

import asyncio
import logging

import psycopg

log = logging.getLogger("shopcall.notify")


async def listen_connection(conninfo: str, channel: str, *, connect_timeout: float, purpose: str
                            ) -> psycopg.AsyncConnection:
    conn = await psycopg.AsyncConnection.connect(
        conninfo, autocommit=True, connect_timeout=max(1, int(connect_timeout)),
        # a peer that vanished without a reset is noticed by TCP itself (or by the caller's own pings)
        keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
        application_name=f"shopcall {purpose}",
    )
    try:
        await conn.execute(f"LISTEN {channel}")  # channel names are our constants, never input
    except BaseException:
        await conn.close()
        raise
    return conn


async def wake_on(conninfo: str, channel: str, wake: asyncio.Event, *, purpose: str,
                  connect_timeout: float = 5.0, retry_seconds: float = 5.0) -> None:
    """Set `wake` on every notification on `channel` until cancelled; reconnects when the database goes
    away (the waiter's own polling covers what is missed meanwhile)."""
    while True:
        try:
            async with await listen_connection(conninfo, channel, connect_timeout=connect_timeout,
                                               purpose=purpose) as conn:
                log.info("%s: listening on %s", purpose, channel)
                async for _ in conn.notifies():
                    wake.set()
        except (psycopg.Error, OSError) as exc:
            log.warning("%s: not listening on %s (%s); polling only, retrying in %g s",
                        purpose, channel, exc, retry_seconds)
        await asyncio.sleep(retry_seconds)
