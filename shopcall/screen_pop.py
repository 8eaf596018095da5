"""Ringing events for the shop's CRM (a "screen pop"): when agents' phones start ringing for a call, the CRM
is told who calls and whose phones ring, so it can open the customer's card on those agents' screens.

Posted at once from the call's process (webhooks.ringing_url), signed like the other webhooks, with a short
timeout and never retried: a card that pops a minute late is of no use, and the call's own webhook
(calls_url, through the outbox) follows reliably. A CRM that is slow or down costs the call nothing: posts
run beside it, and past MAX_IN_FLIGHT at once further ones are dropped with a log line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import aiohttp

from shopcall import webhooks
from shopcall.config import WebhooksConfig

log = logging.getLogger("shopcall.screen_pop")

MAX_IN_FLIGHT = 200


class ScreenPop:
    def __init__(self, hooks: WebhooksConfig) -> None:
        self.url = hooks.ringing_url
        # the outbox's poster, with the ringing timeout (a pop that waits 10 s is too late anyway)
        self.hooks = dataclasses.replace(hooks, timeout=hooks.ringing_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()
        self.sent = self.failed = self.dropped = 0

    def ringing(self, body: dict[str, Any], delivery: str) -> None:
        """Post `body` in the background; `delivery` (the call's uniqueid and step) spots a repeat."""
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self.dropped += 1
            log.warning("screen pop for %s dropped: %d posts to %s still waiting", delivery, len(self._tasks),
                        self.url)
            return
        if self._session is None or self._session.closed:  # here, not in the task: two posts, one session
            self._session = aiohttp.ClientSession()
        task = asyncio.create_task(self._post(self._session, body, delivery), name=f"screen-pop {delivery}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, session: aiohttp.ClientSession, body: dict[str, Any], delivery: str) -> None:
        row = {"id": delivery, "kind": "ringing", "url": self.url, "body": body}
        error = await webhooks.post(session, row, self.hooks)
        if error is None:
            self.sent += 1
        else:
            self.failed += 1
            log.warning("screen pop for %s not delivered (not retried): %s", delivery, error)

    async def close(self) -> None:
        """Let posts in flight finish (each has its timeout), then close the session."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.hooks.timeout + 1)
        if self._session is not None:
            await self._session.close()
