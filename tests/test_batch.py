"""shopcall.batch.Batcher: lookups of one turn of the loop share a query; errors and cancels stay per waiter."""

from __future__ import annotations

import asyncio

import pytest

from shopcall.batch import Batcher
from shopcall.directory import Directory, Menu
from shopcall.loader import load, read
from tests.test_inbound_flow import DIRECTORY


class Fetcher:
    def __init__(self, fail: Exception | None = None, delay: float = 0.0) -> None:
        self.calls: list[list[str]] = []
        self.fail, self.delay = fail, delay

    async def __call__(self, keys: list[str]) -> dict[str, str]:
        self.calls.append(keys)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise self.fail
        return {k: k.upper() for k in keys if k != "missing"}


async def test_requests_of_one_turn_share_one_fetch_and_each_gets_its_own_answer():
    fetch = Fetcher()
    batcher = Batcher(fetch)
    got = await asyncio.gather(*(batcher.get(k) for k in ["a", "b", "a", "missing"]))
    assert got == ["A", "B", "A", None]
    assert fetch.calls == [["a", "b", "missing"]]  # one query, each key once


async def test_a_lone_request_is_sent_at_once_and_later_ones_get_a_new_batch():
    fetch = Fetcher()
    batcher = Batcher(fetch)
    assert await asyncio.wait_for(batcher.get("x"), 1) == "X"
    assert await batcher.get("y") == "Y"
    assert fetch.calls == [["x"], ["y"]]


async def test_a_full_batch_is_sent_without_waiting_for_the_turn_to_end():
    fetch = Fetcher()
    batcher = Batcher(fetch, max_batch=3)
    got = await asyncio.gather(*(batcher.get(str(i)) for i in range(7)))
    assert got == [str(i) for i in range(7)]
    assert [len(c) for c in fetch.calls] == [3, 3, 1]


async def test_a_database_error_reaches_every_waiter_of_the_batch():
    batcher = Batcher(Fetcher(fail=ConnectionError("database gone")))
    results = await asyncio.gather(batcher.get("a"), batcher.get("b"), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_a_cancelled_waiter_does_not_disturb_the_others():
    batcher = Batcher(Fetcher(delay=0.05))
    gone = asyncio.ensure_future(batcher.get("a"))
    stays = asyncio.ensure_future(batcher.get("b"))
    await asyncio.sleep(0.01)
    gone.cancel()
    assert await stays == "B"
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_directory_routes_of_a_burst_match_routes_asked_one_by_one(conn, pool):
    await load(conn, read(DIRECTORY))
    directory = Directory(pool, timezone="Europe/Moscow", default_menu=Menu())
    numbers = ["100", "200", "300", "no-such-number", "100"]
    alone = [await directory.route(n) for n in numbers]
    together = await asyncio.gather(*(directory.route(n) for n in numbers))
    assert together == alone


async def test_keys_asked_while_a_batch_is_at_the_database_go_together_next():
    fetch = Fetcher(delay=0.02)
    batcher = Batcher(fetch)
    first = asyncio.ensure_future(batcher.get("a"))
    await asyncio.sleep(0.005)  # "a" is at the database now
    later = [asyncio.ensure_future(batcher.get(k)) for k in "bcd"]
    for k in "ef":
        await asyncio.sleep(0.002)  # other turns of the loop, still during the first query
        later.append(asyncio.ensure_future(batcher.get(k)))
    assert [await first, *[await f for f in later]] == list("ABCDEF")
    assert fetch.calls == [["a"], ["b", "c", "d", "e", "f"]]


async def test_a_stalled_batch_stops_holding_the_next_one_back():
    fetch = Fetcher(delay=0.5)
    batcher = Batcher(fetch, stall=0.05)
    slow = asyncio.ensure_future(batcher.get("a"))
    await asyncio.sleep(0.01)
    nxt = asyncio.ensure_future(batcher.get("b"))
    await asyncio.sleep(0.1)
    assert fetch.calls == [["a"], ["b"]]  # sent after ~0.04 s, not after the first query's 0.5 s
    assert not slow.done()
    assert await nxt == "B" and await slow == "A"
