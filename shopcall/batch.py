"""Lookups that arrive together go to PostgreSQL together.

When many calls arrive at once (a burst after a TV spot, a trunk coming back), each routing request used
to be its own query: a pool checkout and a round trip, most of the CPU a request costs us. A Batcher
gathers the keys asked for and fetches them in one query; every caller still gets rows read for it,
never a cached copy. A lone request waits for nothing: its batch of one is sent as soon as the current
turn of the loop ends. While a batch is at the database, the keys asked for meanwhile wait for it and go
together as the next batch: under load the batches grow by themselves (one turn of the loop alone held
1.1 requests on average at 4,000 requests/s). A batch that takes longer than `stall` seconds (a slow or
vanished database) stops holding the others back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Batcher(Generic[K, V]):
    def __init__(self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]], *, max_batch: int = 200,
                 stall: float = 0.05) -> None:
        self.fetch = fetch  # keys -> {key: value}; a key left out of the answer gets None
        self.max_batch = max_batch
        self.stall = stall
        self._waiting: dict[K, list[asyncio.Future[V | None]]] = {}
        self._in_flight = 0  # batches at the database that still hold the next one back (2 once one was full)
        self._scheduled = False  # a _flush is due at the end of this turn of the loop
        self._tasks: set[asyncio.Task] = set()

    async def get(self, key: K) -> V | None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[V | None] = loop.create_future()
        self._waiting.setdefault(key, []).append(fut)
        if len(self._waiting) >= self.max_batch:
            self._send()
        elif not self._in_flight:
            self._schedule()
        return await fut

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)  # after every callback ready in this turn

    def _flush(self) -> None:
        self._scheduled = False
        if self._waiting and not self._in_flight:
            self._send()

    def _send(self) -> None:
        batch, self._waiting = self._waiting, {}
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)  # a reference, so the task is not collected mid-query
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: dict[K, list[asyncio.Future[V | None]]]) -> None:
        holding = True

        def release() -> None:
            nonlocal holding
            if holding:
                holding = False
                self._in_flight -= 1
                if self._waiting:
                    self._schedule()

        timer = asyncio.get_running_loop().call_later(self.stall, release)
        try:
            found = await self.fetch(list(batch))
        except BaseException as exc:  # the database is gone: every waiter sees the error, as it would alone
            for futs in batch.values():
                for fut in futs:
                    if fut.done():
                        continue
                    if isinstance(exc, asyncio.CancelledError):
                        fut.cancel()  # shutting down: the waiters are cancelled too, not failed
                    else:
                        fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            timer.cancel()
            release()
        for key, futs in batch.items():
            for fut in futs:
                if not fut.done():  # a waiter whose call was cancelled meanwhile
                    fut.set_result(found.get(key))
