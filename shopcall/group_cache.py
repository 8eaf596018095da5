"""Groups and their available members in memory, for as long as PostgreSQL tells us of every change.

Every inbound call asked for its group: one of the three statements a call makes, for an answer that
changes when an admin edits a group or an agent logs in or pauses. sql/007's triggers NOTIFY
`shopcall_directory` on those changes; `watch` LISTENs on a connection of its own and empties the cache on
each notification. The cache is used only while that connection is known to be alive (it is pinged when
quiet): without it every call asks the database, as before. Round-robin and least-recent groups are never
kept, their order moves with every call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import psycopg

from shopcall.notify import listen_connection

log = logging.getLogger("shopcall.group_cache")

CHANNEL = "shopcall_directory"
TRIGGERS = 5  # sql/007's
# also the ping: a database not yet migrated, or whose triggers were disabled, turns the cache off
_TRIGGERS_READY = """SELECT count(*) FROM pg_trigger
                      WHERE tgfoid = to_regproc('shopcall_directory_changed') AND tgenabled <> 'D'"""
CACHED_STRATEGIES = frozenset({"ringall", "hunt"})
_ABSENT = object()


class GroupCache:
    def __init__(self, *, max_age: float = 60.0) -> None:
        # max_age bounds what a notification lost in ways a ping cannot see would cost (a trigger disabled
        # by a restore with session_replication_role = replica): a minute of a stale group
        self.max_age = max_age
        self.live = False  # set by watch() while its LISTEN connection is up
        self.generation = 0  # moves on every invalidation: a lookup begun before one must not be stored
        self._entries: dict[str, tuple[float, Any]] = {}
        self.hits = self.misses = 0

    def get(self, name: str) -> Any:
        """The cached group (None: known not to exist), or _ABSENT when the database must be asked."""
        if not self.live:
            return _ABSENT
        entry = self._entries.get(name)
        if entry is None or time.monotonic() - entry[0] > self.max_age:
            self.misses += 1
            return _ABSENT
        self.hits += 1
        return entry[1]

    def put(self, name: str, group: Any, generation: int) -> None:
        if not self.live or generation != self.generation:
            return  # the directory changed while the database was asked: the answer may predate it
        if group is not None and group.strategy not in CACHED_STRATEGIES:
            return
        if len(self._entries) >= 1024:
            self._entries.clear()
        self._entries[name] = (time.monotonic(), group)

    def invalidate(self) -> None:
        self.generation += 1
        self._entries.clear()

    def set_live(self, live: bool) -> None:
        self.invalidate()  # whatever was kept while nobody listened may be stale
        self.live = live


def is_absent(value: Any) -> bool:
    return value is _ABSENT


async def watch(cache: GroupCache, conninfo: str, *, connect_timeout: float = 5.0, quiet_seconds: float = 15.0,
                retry_seconds: float = 5.0) -> None:
    """LISTEN for the directory's changes until cancelled; reconnects when the database goes away."""
    delay = 1.0
    while True:
        try:
            conn = await listen_connection(conninfo, CHANNEL, connect_timeout=connect_timeout,
                                           purpose="group cache")
        except (psycopg.Error, OSError) as exc:
            log.warning("group cache off: cannot listen for changes (%s); retrying in %.0f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, retry_seconds * 12)
            continue
        try:
            async with conn:
                while not await _triggers_ready(conn, connect_timeout):
                    log.warning("group cache off: the directory's triggers are missing or disabled "
                                "(shopcall db migrate applies sql/007); checking again in %.0f s", quiet_seconds)
                    await asyncio.sleep(quiet_seconds)
                cache.set_live(True)
                delay = 1.0
                log.info("group cache on: listening for directory changes")
                while True:
                    async for _ in conn.notifies(timeout=quiet_seconds):
                        cache.invalidate()
                    # quiet for a while: make sure the connection still is one and the triggers still fire
                    # (notifications that arrive meanwhile are kept by psycopg for the next notifies())
                    if not await _triggers_ready(conn, connect_timeout):
                        raise LookupError("the directory's triggers are gone or disabled")
        except (psycopg.Error, OSError, TimeoutError, LookupError) as exc:
            log.warning("group cache off: %s; every call asks the database", exc)
        finally:
            cache.set_live(False)
        await asyncio.sleep(retry_seconds)


async def _triggers_ready(conn: psycopg.AsyncConnection, timeout: float) -> bool:
    cur = await asyncio.wait_for(conn.execute(_TRIGGERS_READY), timeout)
    row = await cur.fetchone()
    return row is not None and row[0] >= TRIGGERS
