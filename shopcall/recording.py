"""Which calls are recorded: the number's policy, else the group's, else the agents' own."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path

from psycopg_pool import AsyncConnectionPool

log = logging.getLogger("shopcall.recording")

POLICIES = ("always", "never", "on_demand")


def resolve(number_policy: str | None, group_policy: str | None, agent_policies: Iterable[str]) -> str:
    """One policy for a ring step. Agents differ? Record if any of them records always; the file of a
    call answered by a "never" agent is deleted right after the call (see `keep_for`)."""
    if number_policy:
        return number_policy
    if group_policy:
        return group_policy
    agents = set(agent_policies) or {"never"}
    if "always" in agents:
        return "always"
    return "on_demand" if "on_demand" in agents else "never"


def keep_for(number_policy: str | None, group_policy: str | None, agent_policy: str) -> bool:
    return resolve(number_policy, group_policy, [agent_policy]) != "never"


def path_for(recordings_dir: Path, uniqueid: str, started: datetime) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in uniqueid)
    return recordings_dir / f"{started:%Y/%m/%d}" / f"{safe}.wav"


async def purge(pool: AsyncConnectionPool, days: int) -> tuple[int, int]:
    """Delete recordings of calls older than `days`; returns (files deleted, rows cleared)."""
    cutoff = datetime.now().astimezone() - timedelta(days=days)
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT id, recording_path FROM calls WHERE recording_path IS NOT NULL AND started_at < %s",
            (cutoff,),
        )
        rows = await cur.fetchall()
        deleted = 0
        for row in rows:
            path = Path(row["recording_path"])
            try:
                await asyncio.to_thread(path.unlink)
                deleted += 1
            except FileNotFoundError:
                log.info("recording %s was already gone", path)
            except OSError as exc:
                log.error("cannot delete recording %s: %s (row kept)", path, exc)
                continue
            await conn.execute(
                "UPDATE calls SET recording_path = NULL, recording_purged_at = now() WHERE id = %s", (row["id"],))
    return deleted, len(rows)
