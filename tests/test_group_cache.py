"""Groups kept in memory while PostgreSQL notifies us of their changes (sql/007, shopcall/group_cache.py),
against the throw-away PostgreSQL: what notifies, what does not, and that a stale group is never served
(a change, a lost listening connection, disabled triggers)."""

from __future__ import annotations

import asyncio
import contextlib

import psycopg

from shopcall.directory import Directory, Menu
from shopcall.group_cache import CHANNEL, GroupCache, watch


async def seed(conn, strategy: str = "ringall") -> None:
    await conn.execute("INSERT INTO employees (name, endpoint) VALUES ('Anna', 'agent1'), ('Boris', 'agent2')")
    await conn.execute("INSERT INTO groups (name, strategy) VALUES ('sales', %s)", (strategy,))
    await conn.execute("INSERT INTO group_members (group_id, employee_id, position)"
                       " SELECT g.id, e.id, e.id FROM groups g, employees e")


async def notified(url: str, change: str, *, wait: float = 0.5) -> list[str]:
    """The payloads a LISTEN connection receives for one committed statement."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as listener, \
            await psycopg.AsyncConnection.connect(url, autocommit=True) as writer:
        await listener.execute(f"LISTEN {CHANNEL}")
        await writer.execute(change)
        return [n.payload async for n in listener.notifies(timeout=wait)]


async def test_a_change_of_who_can_answer_notifies_and_the_per_call_columns_do_not(conn, pg_url):
    await seed(conn)
    assert await notified(pg_url, "UPDATE employees SET paused = true WHERE endpoint = 'agent1'") == ["employees"]
    assert await notified(pg_url, "UPDATE groups SET ring_timeout = 30") == ["groups"]
    assert await notified(pg_url, "DELETE FROM group_members WHERE position = 1") == ["group_members"]
    assert await notified(pg_url, "INSERT INTO employees (name, endpoint) VALUES ('C', 'agent3')") == ["employees"]
    # what every answered call and every round-robin call write must not empty the caches
    assert await notified(pg_url, "UPDATE employees SET last_call_at = now()", wait=0.3) == []
    assert await notified(pg_url, "UPDATE groups SET rr_position = rr_position + 1", wait=0.3) == []
    # a bulk change is one notification per table and transaction, not one per row
    assert await notified(pg_url, "UPDATE employees SET logged_in = false") == ["employees"]


@contextlib.asynccontextmanager
async def watching(pool, url: str, **kw):
    directory = Directory(pool, timezone="Europe/Moscow", default_menu=Menu())
    task = asyncio.create_task(watch(directory.group_cache, url, quiet_seconds=kw.pop("quiet", 15.0),
                                     retry_seconds=0.2, **kw))
    await until(lambda: directory.group_cache.live)
    try:
        yield directory
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert not directory.group_cache.live


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def endpoints(group) -> list[str]:
    return [m.endpoint for m in group.members]


async def test_a_group_is_served_from_memory_until_an_agent_pauses(conn, pool, pg_url):
    await seed(conn)
    async with watching(pool, pg_url) as directory:
        cache = directory.group_cache
        assert endpoints(await directory.group("sales")) == ["agent1", "agent2"]
        first = cache.misses
        for _ in range(5):
            assert endpoints(await directory.group("sales")) == ["agent1", "agent2"]
        assert (cache.hits, cache.misses) == (5, first)

        generation = cache.generation
        await conn.execute("UPDATE employees SET paused = true WHERE endpoint = 'agent1'")
        await until(lambda: cache.generation != generation)
        assert endpoints(await directory.group("sales")) == ["agent2"]
        # an answered call moves last_call_at: the cache stays
        generation = cache.generation
        await conn.execute("UPDATE employees SET last_call_at = now()")
        await asyncio.sleep(0.3)
        assert cache.generation == generation
        assert await directory.group("nosuch") is None
        await conn.execute("INSERT INTO groups (name) VALUES ('nosuch')")
        await until(lambda: cache.generation != generation)
        assert (await directory.group("nosuch")).members == ()


async def test_round_robin_groups_are_asked_every_time(conn, pool, pg_url):
    await seed(conn, "roundrobin")
    async with watching(pool, pg_url) as directory:
        orders = [endpoints(await directory.group("sales")) for _ in range(3)]
        assert orders == [["agent1", "agent2"], ["agent2", "agent1"], ["agent1", "agent2"]]
        assert directory.group_cache.hits == 0


async def test_an_answer_begun_before_a_change_is_not_kept():
    cache = GroupCache()
    cache.set_live(True)
    generation = cache.generation
    cache.invalidate()  # a notification arrived while the database was being asked
    cache.put("sales", None, generation)
    assert cache.get("sales") is not None  # the absent marker: ask again
    cache.put("sales", None, cache.generation)
    assert cache.get("sales") is None


async def test_a_lost_listening_connection_turns_the_cache_off_until_it_is_back(conn, pool, pg_url):
    await seed(conn)
    async with watching(pool, pg_url) as directory:
        cache = directory.group_cache
        await directory.group("sales")
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE application_name = 'shopcall group cache'")
        await until(lambda: not cache.live)
        # changes made while nobody listens are seen: the cache is not used, and emptied when it comes back
        await conn.execute("UPDATE employees SET logged_in = false WHERE endpoint = 'agent2'")
        assert endpoints(await directory.group("sales")) == ["agent1"]
        await until(lambda: cache.live)
        assert endpoints(await directory.group("sales")) == ["agent1"]


async def test_disabled_triggers_turn_the_cache_off(conn, pool, pg_url):
    await seed(conn)
    async with watching(pool, pg_url, quiet=0.2) as directory:
        try:
            await conn.execute("ALTER TABLE employees DISABLE TRIGGER employees_changed")
            await until(lambda: not directory.group_cache.live)
            await conn.execute("UPDATE employees SET paused = true WHERE endpoint = 'agent1'")
            assert endpoints(await directory.group("sales")) == ["agent2"]
        finally:
            await conn.execute("ALTER TABLE employees ENABLE TRIGGER employees_changed")
        await until(lambda: directory.group_cache.live)


async def test_no_database_means_no_cache_and_no_crash(pool):
    directory = Directory(pool, timezone="Europe/Moscow", default_menu=Menu())
    task = asyncio.create_task(watch(directory.group_cache, "postgresql://127.0.0.1:1/nothing", connect_timeout=1, retry_seconds=0.1))
    await asyncio.sleep(0.5)
    assert not directory.group_cache.live and not task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
