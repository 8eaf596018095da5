"""The pool hands out the connection returned last (hot backend caches), and a connection that just came
back from a query is not pinged again on checkout, against a real PostgreSQL."""

from __future__ import annotations

import asyncio

from shopcall import db


async def _backend(conn) -> int:
    return (await (await conn.execute("SELECT pg_backend_pid() AS pid")).fetchone())["pid"]


async def test_the_connection_returned_last_is_handed_out_first(pg_url):
    async with db.open_pool(pg_url, min_size=3, max_size=3) as pool:
        await pool.wait()
        gate = asyncio.Event()
        order: list[int] = []

        async def hold(delay: float) -> None:
            async with pool.connection() as conn:
                pid = await _backend(conn)
                await gate.wait()
                await asyncio.sleep(delay)
            order.append(pid)  # returned now

        held = [asyncio.create_task(hold(d)) for d in (0.0, 0.05, 0.1)]
        await asyncio.sleep(0.1)
        gate.set()
        await asyncio.gather(*held)
        assert len(set(order)) == 3
        for _ in range(5):  # one call at a time: always the hottest, never the next in a round robin
            async with pool.connection() as conn:
                assert await _backend(conn) == order[-1]


async def test_a_fresh_connection_skips_the_ping_and_a_stale_one_is_checked(pg_url, monkeypatch):
    pings: list[int] = []
    real = db.AsyncConnectionPool.check_connection

    async def counted(conn):
        pings.append(1)
        await real(conn)

    monkeypatch.setattr(db.AsyncConnectionPool, "check_connection", staticmethod(counted))
    async with db.open_pool(pg_url, min_size=1, max_size=1) as pool:
        for _ in range(3):
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
        first = len(pings)  # the new connection was never returned: checked once
        monkeypatch.setattr(db, "FRESH_SECONDS", 0.0)
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        assert (first, len(pings)) == (1, 2)
