"""Call flows, registered by name: the dialplan reaches one as agi://host:port/NAME (or the ESL equivalent)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shopcall.app import App
    from shopcall.call import Call

Flow = Callable[["Call", "App"], Awaitable[None]]

FLOWS: dict[str, Flow] = {}


def flow(name: str) -> Callable[[Flow], Flow]:
    def register(fn: Flow) -> Flow:
        if name in FLOWS:
            raise ValueError(f"flow {name!r} registered twice")
        FLOWS[name] = fn
        return fn

    return register


def load_all() -> dict[str, Flow]:
    """Import every flow module so its @flow decorators run."""
    from shopcall.flows import agent, callback, fallback, inbound, outbound, robot  # noqa: F401

    return FLOWS
