"""The dialler: claims due robot-call jobs, checks every rule, dials through the PBX, settles outcomes.

Life of a job: pending --claim--> dialling --answered--> in_call (the outbound flow talks) --> done
                                             --busy/no answer/failed/machine--> pending (retry) | failed
Several dialler processes on several machines may run at once. A job is claimed with FOR UPDATE SKIP
LOCKED and its attempt row (with the ActionID and the channel's uniqueid we choose) is committed *before*
the Originate is sent, so no two workers ever dial one job. A campaign's row is locked while its jobs are
claimed, so its concurrency cap and its calls-per-second slot hold across all workers.

A dialler that dies mid-dial leaves the job "dialling". `reconcile` (run by every worker) asks the PBX
whether a channel with the attempt's uniqueid still exists; once it does not and the ring time plus a
grace has passed, the attempt is settled as "lost" and the job retried later like any failed dial: a job
is never dialled twice at the same time, and never re-dialled while its first call may still ring.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from shopcall import campaigns, webhooks
from shopcall.campaigns import Campaign
from shopcall.config import Config

log = logging.getLogger("shopcall.dialler")

Clock = Callable[[], datetime]


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class DialOutcome:
    """What the PBX said about a dial: answered, or why not (busy, no_answer, failed)."""

    outcome: str
    detail: str = ""


class Originator(Protocol):
    """The PBX side of the dialler (agi/originator.py for Asterisk, esl/originator.py for FreeSWITCH)."""

    async def originate(self, phone: str, *, action_id: str, uniqueid: str, caller_id: str | None,
                        ring_seconds: int, variables: dict[str, str]) -> DialOutcome:
        """Dial `phone` into the robot context; return once it is answered or has failed. Raises
        OutcomeUnknown when the PBX connection broke with the call possibly ringing."""

    async def exists(self, uniqueid: str) -> bool:
        """Is a channel with this uniqueid up on the PBX? Raises OutcomeUnknown if the PBX cannot say."""


class OutcomeUnknown(Exception):
    """The PBX may or may not be ringing the number: leave the attempt to reconcile, never re-send."""


@dataclass(frozen=True)
class Dial:
    job_id: int
    attempt_id: int
    number: int  # the attempt's number within the job
    phone: str
    campaign: Campaign
    action_id: str
    uniqueid: str
    slot: datetime  # not before this (calls per second)


_DUE = """
SELECT id, campaign, phone, attempts FROM dial_jobs
 WHERE status = 'pending' AND due_at <= %(now)s
 ORDER BY due_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
"""


async def claim(pool: AsyncConnectionPool, config: Config, *, now: datetime, worker: str,
                limit: int | None = None) -> list[Dial]:
    """Take due jobs that may be called now, within each campaign's caps; others are put off or ended."""
    limit = limit or config.dialler.batch
    fallback_tz = config.dialler.default_timezone or config.shop.timezone
    dials: list[Dial] = []
    async with pool.connection() as conn, conn.transaction():
        jobs = await (await conn.execute(_DUE, {"now": now, "limit": limit})).fetchall()
        locked: dict[str, Campaign | None] = {}
        full: set[str] = set()
        for job in jobs:
            name = job["campaign"]
            if name in full:
                continue
            if name not in locked:
                # held until commit: the caps below are counted by one worker at a time per campaign
                row = await (await conn.execute("SELECT * FROM campaigns WHERE name = %s FOR UPDATE",
                                                (name,))).fetchone()
                locked[name] = Campaign.from_row(row) if row else None
            campaign = locked[name]
            if campaign is None:
                await _end(conn, job["id"], "cancelled", "campaign_missing")
                continue
            if job["attempts"] >= campaign.max_attempts:
                await _end(conn, job["id"], "failed", "max_attempts")
                continue
            verdict = await campaigns.may_call(conn, campaign, job["phone"], now=now, fallback_tz=fallback_tz,
                                               job_id=job["id"])
            if not verdict.ok:
                if verdict.retry_at is not None:
                    await conn.execute(
                        "UPDATE dial_jobs SET due_at = %s, reason = %s, updated_at = now() WHERE id = %s",
                        (verdict.retry_at, verdict.reason, job["id"]))
                else:
                    await _end(conn, job["id"], "cancelled", verdict.reason)
                log.info("job %s (%s %s): not now: %s%s", job["id"], name, job["phone"], verdict.reason,
                         f", due {verdict.retry_at.isoformat()}" if verdict.retry_at else "")
                continue
            busy = (await (await conn.execute(
                "SELECT count(*) AS n FROM dial_jobs WHERE campaign = %s AND status IN ('dialling', 'in_call')",
                (name,))).fetchone())["n"]
            if busy >= campaign.max_concurrent:
                full.add(name)
                continue
            dials.append(await _start(conn, job, campaign, worker, now))
    return dials


async def _start(conn, job: dict, campaign: Campaign, worker: str, now: datetime) -> Dial:
    real_now = utcnow()  # the rate is real time, whatever clock decides what is due
    slot_row = await (await conn.execute(
        """UPDATE campaigns SET next_dial_at = GREATEST(COALESCE(next_dial_at, %(now)s), %(now)s)
                                              + make_interval(secs => 1.0 / calls_per_second)
            WHERE name = %(name)s
           RETURNING next_dial_at - make_interval(secs => 1.0 / calls_per_second) AS slot""",
        {"now": real_now, "name": campaign.name})).fetchone()
    row = await (await conn.execute(
        """UPDATE dial_jobs SET status = 'dialling', attempts = attempts + 1, claimed_at = %s, claimed_by = %s,
                  reason = NULL, updated_at = now()
            WHERE id = %s RETURNING attempts""", (real_now, worker, job["id"]))).fetchone()
    # a UUID: Asterisk takes any ChannelId, FreeSWITCH's origination_uuid must be one
    uniqueid = str(uuid.uuid4())
    action_id = f"shopcall-dial-{job['id']}-{row['attempts']}-{uniqueid[:8]}"
    # started_at on the dialler's clock (the same as real time, but for tests that set the clock)
    attempt = await (await conn.execute(
        """INSERT INTO dial_attempts (job_id, number, worker, action_id, uniqueid, started_at)
           VALUES (%s, %s, %s, %s, %s, %s) RETURNING id""",
        (job["id"], row["attempts"], worker, action_id, uniqueid, now + (slot_row["slot"] - real_now)))).fetchone()
    return Dial(job["id"], attempt["id"], row["attempts"], job["phone"], campaign, action_id, uniqueid,
                slot_row["slot"])


async def _end(conn, job_id: int, status: str, reason: str) -> None:
    await conn.execute(
        """UPDATE dial_jobs SET status = %s, reason = %s, finished_at = now(), updated_at = now()
            WHERE id = %s""", (status, reason, job_id))


async def dial(pool: AsyncConnectionPool, config: Config, originator: Originator, d: Dial, *,
               clock: Clock = utcnow) -> str:
    """Wait for the slot, send the Originate, settle what the PBX said (an answer is the flow's to settle)."""
    delay = (d.slot - utcnow()).total_seconds()
    if delay > 0:
        await asyncio.sleep(delay)
    variables = {"SHOPCALL_ATTEMPT": str(d.attempt_id), "SHOPCALL_AMD": "1" if d.campaign.amd else "0"}
    try:
        result = await originator.originate(
            d.phone, action_id=d.action_id, uniqueid=d.uniqueid, caller_id=d.campaign.caller_id,
            ring_seconds=d.campaign.ring_seconds, variables=variables)
    except OutcomeUnknown as exc:
        log.warning("job %s attempt %s: outcome unknown (%s): left to reconcile", d.job_id, d.attempt_id, exc)
        return "unknown"
    except (ValueError, OSError) as exc:
        result = DialOutcome("failed", f"{type(exc).__name__}: {exc}")
    log.info("job %s attempt %s (%s %s): %s %s", d.job_id, d.attempt_id, d.campaign.name, d.phone,
             result.outcome, result.detail)
    if result.outcome == "answered":
        await _retrying(lambda: _mark_answered(pool, d.attempt_id), f"attempt {d.attempt_id} answered")
        return "answered"
    await _retrying(lambda: settle(pool, config, d.attempt_id, outcome=result.outcome,
                                   detail={"pbx": result.detail}, now=clock()), f"attempt {d.attempt_id} settle")
    return result.outcome


async def _retrying(fn: Callable[[], Any], what: str, *, limit: float = 600.0) -> Any:
    """The PBX has spoken; keep its word until the database takes it (a restart is a few seconds)."""
    delay, waited = 0.5, 0.0
    while True:
        try:
            return await fn()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            if waited >= limit:
                log.error("%s: database still unavailable after %.0f s (%s): left to reconcile", what, waited, exc)
                return None
            log.warning("%s: database unavailable (%s); again in %.1f s", what, exc, delay)
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 10.0)


async def _mark_answered(pool: AsyncConnectionPool, attempt_id: int) -> None:
    async with pool.connection() as conn:
        await conn.execute("UPDATE dial_attempts SET answered_at = COALESCE(answered_at, now()) WHERE id = %s",
                           (attempt_id,))


async def settle(pool: AsyncConnectionPool, config: Config, attempt_id: int, *, outcome: str,
                 result: str | None = None, detail: dict | None = None, now: datetime | None = None) -> str | None:
    """Record how an attempt ended and decide the job: done (a final result), pending again after the
    outcome's retry delay, or failed when attempts are used up. Returns the job's new status, or None if
    the attempt was already settled (a replay, or a reconcile that raced the flow)."""
    now = now or utcnow()
    async with pool.connection() as conn, conn.transaction():
        att = await (await conn.execute(
            """UPDATE dial_attempts SET outcome = %s, result = %s, ended_at = %s,
                      detail = detail || %s, answered_at = CASE WHEN %s = 'answered'
                                                           THEN COALESCE(answered_at, %s) END
                WHERE id = %s AND outcome IS NULL
               RETURNING job_id, number, started_at, answered_at, uniqueid""",
            (outcome, result, now, Jsonb(detail or {}), outcome, now, attempt_id))).fetchone()
        if att is None:
            return None
        job = await (await conn.execute(
            "SELECT j.*, c.scenario FROM dial_jobs j JOIN campaigns c ON c.name = j.campaign WHERE j.id = %s "
            "FOR UPDATE OF j", (att["job_id"],))).fetchone()
        campaign = await campaigns.get(conn, job["campaign"])
        assert campaign is not None
        if outcome == "answered":  # the robot spoke to the customer: whatever they said, the job is done
            status, reason, due = "done", None, None
        else:
            delay = campaign.retry_delay(outcome)
            if delay is None:
                status, reason, due = "failed", outcome, None
            elif job["attempts"] >= campaign.max_attempts:
                status, reason, due = "failed", "max_attempts", None
            else:
                status, reason, due = "pending", f"retry_after_{outcome}", now + delay
        await conn.execute(
            """UPDATE dial_jobs SET status = %s, reason = %s, result = COALESCE(%s, result),
                      due_at = COALESCE(%s, due_at), finished_at = CASE WHEN %s = 'pending' THEN NULL ELSE %s END,
                      claimed_at = NULL, claimed_by = NULL, updated_at = now()
                WHERE id = %s""",
            (status, reason, result, due, status, now, job["id"]))
        await _report(conn, config, job, campaign, att, attempt_id, outcome, result, status, detail or {})
    log.info("job %s attempt %s: %s/%s → %s%s", job["id"], attempt_id, outcome, result, status,
             f" (due {due.isoformat()})" if due else "")
    return status


async def _report(conn, config: Config, job: dict, campaign: Campaign, att: dict, attempt_id: int, outcome: str,
                  result: str | None, status: str, detail: dict) -> None:
    """The finished attempt to the shop's results webhook, in the same transaction as the settlement."""
    if config.webhooks.results_url:
        body = {
            "event": "call_attempt_finished", "attempt_id": attempt_id, "attempt": att["number"],
            "job_id": job["id"], "campaign": campaign.name, "scenario": campaign.scenario, "phone": job["phone"],
            "order_number": job["order_number"], "sku": job["sku"], "outcome": outcome, "result": result,
            "job_status": status, "started_at": att["started_at"].isoformat(),
            "answered_at": att["answered_at"].isoformat() if att["answered_at"] else None,
            "details": {k: v for k, v in detail.items() if k != "pbx"},
        }
        await webhooks.enqueue(conn, "result", config.webhooks.results_url, body, f"attempt:{attempt_id}")
    if status != "pending" and campaign.scenario == "back_in_stock" and config.webhooks.messages_url \
            and job["context"].get("product_url"):
        body = {"event": "message", "channel": "sms", "phone": job["phone"], "job_id": job["id"],
                "text": f"{job['context'].get('product', '')}: {job['context']['product_url']}",
                "product_url": job["context"]["product_url"], "sku": job["sku"]}
        await webhooks.enqueue(conn, "message", config.webhooks.messages_url, body, f"message:job:{job['id']}")


async def reconcile(pool: AsyncConnectionPool, config: Config, originator: Originator, *,
                    now: datetime | None = None) -> list[int]:
    """Settle attempts left open by a dialler or flow that died: no channel on the PBX and older than the
    ring time plus the grace (or the longest call). Returns the attempt ids settled as lost."""
    now = now or utcnow()
    grace = config.dialler.lost_grace_seconds
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            """SELECT a.id, a.uniqueid, a.answered_at, j.status FROM dial_attempts a
                 JOIN dial_jobs j ON j.id = a.job_id JOIN campaigns c ON c.name = j.campaign
                WHERE a.outcome IS NULL AND j.status IN ('dialling', 'in_call')
                  AND a.started_at < %s - make_interval(secs => c.ring_seconds + %s)""",
            (now, grace))).fetchall()
    lost = []
    for row in rows:
        try:
            if await originator.exists(row["uniqueid"]):
                continue  # still ringing or talking: its own worker or flow will settle it
        except OutcomeUnknown as exc:
            log.warning("reconcile: the PBX cannot say about %s (%s): later", row["uniqueid"], exc)
            return lost
        # answered but no flow settled it (our AGI server was down): the customer heard nothing, retry
        status = await settle(pool, config, row["id"], outcome="lost",
                              detail={"reconciled": True, "answered": row["answered_at"] is not None}, now=now)
        if status is not None:
            lost.append(row["id"])
    if lost:
        log.warning("reconcile: attempts left open by a dead dialler or flow settled: %s", lost)
    return lost


class Dialler:
    """One worker: every poll, reconcile and claim; each claimed dial runs as its own task."""

    def __init__(self, pool: AsyncConnectionPool, config: Config, originators: dict[str, Originator], *,
                 clock: Clock = utcnow, worker: str | None = None) -> None:
        self.pool, self.config, self.originators, self.clock = pool, config, originators, clock
        self.worker = worker or worker_name()
        self.tasks: set[asyncio.Task] = set()
        self.dialled = 0

    async def round(self) -> list[Dial]:
        now = self.clock()
        for originator in self.originators.values():
            await reconcile(self.pool, self.config, originator, now=now)
        dials = await claim(self.pool, self.config, now=now, worker=self.worker)
        for d in dials:
            originator = self.originators.get(d.campaign.pbx)
            if originator is None:
                log.error("campaign %s wants pbx %s, which this dialler has no connection to", d.campaign.name,
                          d.campaign.pbx)
                await settle(self.pool, self.config, d.attempt_id, outcome="failed",
                             detail={"pbx": f"no {d.campaign.pbx} connection"}, now=now)
                continue
            task = asyncio.create_task(dial(self.pool, self.config, originator, d, clock=self.clock),
                                       name=f"dial-{d.attempt_id}")
            self.tasks.add(task)
            task.add_done_callback(self._done)
            self.dialled += 1
        return dials

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("dial failed", exc_info=task.exception())

    async def run_forever(self) -> None:
        try:
            while True:
                try:
                    dials = await self.round()
                except (psycopg.OperationalError, PoolTimeout) as exc:
                    log.warning("dialler paused: database unavailable (%s)", exc)
                    dials = []
                except Exception:
                    log.exception("dialler round failed")
                    dials = []
                # a full batch means more are due: go on at once (the slots keep the rate)
                if len(dials) < self.config.dialler.batch:
                    await asyncio.sleep(self.config.dialler.poll_seconds)
        finally:
            for task in self.tasks:
                task.cancel()

    async def drain(self, timeout: float = 60.0) -> None:
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=timeout)

