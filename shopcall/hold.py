"""Waiting in line: a caller who finds every agent of a skip_busy group on a call hears hold music and their
place in line, and is put through to the first agent who is free, for up to the group's hold_seconds.

The line is a table (hold_queue), so callers held by several shopcall processes wait in one line: a caller
rings the free agents only while fewer callers are ahead of them than agents are free, so the one who
has waited longest gets the first free agent. Each round is one play of the hold music; after it the call
refreshes its row (a row nobody refreshed for STALE_SECONDS is a call whose process died, and is not
counted) and asks the PBX who is free. Key 1 during the wait asks for a call back instead.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool

from shopcall import hold_music, routing, speech
from shopcall.call import Call, CallEnded, DialResult, DialStatus
from shopcall.calllog import CallRecord
from shopcall.prompts import sound_seconds

log = logging.getLogger("shopcall.hold")

STALE_SECONDS = 120  # past a round of music and a ring: a row not refreshed for longer is a dead process's
CALLBACK_KEY = "1"


async def join(pool: AsyncConnectionPool, uniqueid: str, group_id: int, caller_number: str = "") -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO hold_queue (uniqueid, group_id, caller_number) VALUES (%s, %s, %s)"
            " ON CONFLICT (uniqueid) DO UPDATE SET group_id = EXCLUDED.group_id, joined_at = clock_timestamp(),"
            " seen_at = clock_timestamp()",
            (uniqueid, group_id, caller_number or None))


async def ahead(pool: AsyncConnectionPool, uniqueid: str) -> int:
    """How many live callers joined this call's line before it (and keep this call's row live)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            """UPDATE hold_queue h SET seen_at = clock_timestamp() WHERE uniqueid = %s
               RETURNING (SELECT count(*) FROM hold_queue o
                           WHERE o.group_id = h.group_id AND o.joined_at < h.joined_at
                             AND o.seen_at > clock_timestamp() - make_interval(secs => %s)) AS ahead""",
            (uniqueid, STALE_SECONDS))
        row = await cur.fetchone()
    return int(row["ahead"]) if row else 0  # no row: the line lost it (the database was away), first then


async def leave(pool: AsyncConnectionPool, uniqueid: str) -> None:
    async with pool.connection() as conn:
        # the rows of calls whose process died, once nobody could still be waiting on them
        await conn.execute("DELETE FROM hold_queue WHERE uniqueid = %s OR seen_at < clock_timestamp() - "
                           "make_interval(secs => %s)", (uniqueid, 3600))


@dataclass(frozen=True)
class Waited:
    how: str  # "rang" (answered, or the caller hung up while it rang) | "timeout" | "callback" (key 1)
    result: DialResult | None = None  # the last ring's, if any


async def wait_in_line(call: Call, pool: AsyncConnectionPool, rec: CallRecord, step: routing.RingStep,
                       ring) -> Waited:
    """Hold the caller until an agent of `step` is free and their turn has come, then `ring` (the inbound
    flow's way of ringing a step, recording and screen pop included) the free ones. A ring nobody answers
    puts them back in line; at most hold_seconds in all, counted in rounds of the music so the wait is
    the same whatever the machine's speed."""
    assert step.group is not None and step.group.hold_seconds > 0
    music = await call.sounds.path(hold_music.PROMPT_ID, call.language)
    rounds = max(1, math.ceil(step.group.hold_seconds / max(1.0, sound_seconds(music))))
    deadline = time.monotonic() + step.group.hold_seconds
    started = time.monotonic()
    said_place = None
    rec.step("hold", group=step.group.name, hold_seconds=step.group.hold_seconds)
    await _db(join(pool, rec.uniqueid, step.group.id, rec.caller_number), rec)
    result: DialResult | None = None
    how, place = "timeout", 1
    try:
        key = await call.play("hold_notice", interruptible=True)
        place = 1 + (await _db(ahead(pool, rec.uniqueid), rec) or 0)
        for _ in range(rounds):
            if key is None and place > 1 and place != said_place:
                said_place = place
                key = await call.say(speech.position_text(place, call.language), interruptible=True)
            if key is None:
                key = await call.play(music, interruptible=True)
            if key == CALLBACK_KEY:
                how = "callback"
                break
            key = None  # any other key means nothing here
            free = routing.without(step, await call.on_a_call(step.endpoints))
            place = 1 + (await _db(ahead(pool, rec.uniqueid), rec) or 0)
            if free.endpoints and place <= len(free.endpoints):  # our turn: fewer ahead than agents free
                result = await ring(free)
                if result.status in (DialStatus.ANSWERED, DialStatus.CALLER_GONE):
                    how = "rang"
                    break
            if time.monotonic() >= deadline:
                break
    except CallEnded:
        how = "caller_gone"
        raise
    finally:
        await _db(leave(pool, rec.uniqueid), rec)
        rec.step("hold_end", how=how, waited=round(time.monotonic() - started, 1), place=place)
    return Waited(how, result)


async def _db(coro, rec: CallRecord):
    """The line is a courtesy: a database that went away makes this caller first in line, not a lost call."""
    try:
        return await coro
    except Exception as exc:
        log.warning("%s: hold queue: %s: %s", rec.uniqueid, type(exc).__name__, exc)
        return None
