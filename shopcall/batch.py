"""Lookups that arrive together go to PostgreSQL together.

When many calls arrive at once (a burst after a TV spot, a trunk coming back), each routing request used
to be its own query: a pool checkout and a round trip, most of the CPU a request costs us. A Batcher
gathers the keys asked for during one turn of the event loop and fetches them in one query; every caller
still gets rows read for it, never a cached copy. A lone request waits for nothing: its batch of one is
sent as soon as the current turn of the loop ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Batcher(Generic[K, V]):
    def __init__(self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]], *, max_batch: int = 200) -> None:
        self.fetch = fetch  # keys -> {key: value}; a key left out of the answer gets None
        self.max_batch = max_batch
        self._waiting: dict[K, list[asyncio.Future[V | None]]] = {}
        self._tasks: set[asyncio.Task] = set()

    async def get(self, key: K) -> V | None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[V | None] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._flush)  # after every callback that is ready in this turn of the loop
        self._waiting.setdefault(key, []).append(fut)
        if len(self._waiting) >= self.max_batch:
            self._flush()
        return await fut

    def _flush(self) -> None:
        if not self._waiting:
            return  # already sent because the batch was full
        batch, self._waiting = self._waiting, {}
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)  # a reference, so the task is not collected mid-query
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: dict[K, list[asyncio.Future[V | None]]]) -> None:
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
        for key, futs in batch.items():
            for fut in futs:
                if not fut.done():  # a waiter whose call was cancelled meanwhile
                    fut.set_result(found.get(key))
