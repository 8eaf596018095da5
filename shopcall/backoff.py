"""Waiting out a peer that is not there yet (AMI, FreeSWITCH's event socket) at start-up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("shopcall.backoff")


async def keep_trying(connect: Callable[[], Awaitable[object]], what: str, errors: tuple[type[BaseException], ...],
                      *, first: float = 1.0, most: float = 60.0) -> None:
    """Call `connect` until it succeeds, doubling the pause after each failure up to `most` seconds."""
    delay = first
    while True:
        try:
            await connect()
            return
        except errors as exc:
            log.error("%s unavailable (%s); retrying in %.0f s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, most)
