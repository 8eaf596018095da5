"""Offering callback requests to agents: ring a free agent first, then the callback flow
(shopcall/flows/callback.py) dials the customer on the agent's answered leg.

The PBX's part is an `AgentPhones`: is an agent's phone free, and ring it into the callback flow.
Asterisk's (agi/agent_phones.py) asks AMI for the device state and Originates into [<prefix>-callback];
FreeSWITCH's (esl/agent_phones.py) reads `show channels` and originates into the robot context's
`callback` extension over the inbound event socket. Which one a process uses is `callbacks.pbx`.

Life of a request: pending --claim--> in_progress --agent answers--> (flow) done | pending | failed
                                                  --agent does not--> pending (due later) | failed
Several workers (processes, hosts) may run this at once: a request is claimed with FOR UPDATE SKIP LOCKED
and the agent under an advisory lock, and the claim is committed before the Originate, so a request is
never dialled twice at the same time and an agent never gets two callbacks at once. A request whose
worker died (in_progress too long) is given back by `reconcile`. A round shares all due requests out at once
(`claim_due`), so a request of a group gets a free member of it even when an older request is due too.

A click to call (the CRM's POST /api/v1/calls, `click_to_call`) is a request for one agent (agent_wanted),
offered before the others as soon as that agent's phone is free; a NOTIFY wakes the workers. One the CRM
created is tried once; a pending callback the agent took over goes back to the queue if it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg
from psycopg_pool import AsyncConnectionPool

from shopcall.call import PbxError, check_endpoint, check_number, presentable
from shopcall.config import Config
from shopcall.dialler import DialOutcome, OutcomeUnknown
from shopcall.phone import to_e164
from shopcall.screen_pop import ScreenPop

log = logging.getLogger("shopcall.callbacks")

RING_GRACE_SECONDS = 60  # after the agent's ring time, an Originate has surely given up
CHANNEL = "shopcall_callbacks"  # NOTIFYed by a click to call: the workers offer it at once
CLICK_TO_CALL = "click_to_call"  # the reason of a request the CRM created: tried once
AGENT_LOCK = 72616003  # advisory lock class: one decision about an agent at a time
REF_MAX = 200  # the CRM's own id for a click to call (sql/010's CHECK)


class AgentPhones(Protocol):
    """A PBX's part of offering a callback."""

    async def is_free(self, endpoint: str) -> bool:
        """Whether the agent's phone is idle; PbxError or ValueError when the PBX cannot tell."""
        ...

    async def ring(self, endpoint: str, *, request_id: int, phone: str, ring_seconds: int) -> DialOutcome:
        """Ring the agent; once answered the PBX runs the callback flow with the request's id. Raises
        OutcomeUnknown when the phone may be ringing (never re-send), PbxError/ValueError when refused."""
        ...


@dataclass(frozen=True)
class Offer:
    request_id: int
    phone: str
    endpoint: str
    attempt: int  # attempts after this claim: guards every later update against a stale worker
    reason: str = "no_answer"
    customer_id: int | None = None
    external_ref: str | None = None


@dataclass(frozen=True)
class Request:
    id: int
    phone: str
    status: str
    attempts: int
    group_name: str | None
    agent_endpoint: str | None
    reason: str = "no_answer"
    asked_by_agent: bool = False  # a click to call: the agent knows whom they call


class CallbackError(Exception):
    """A click to call that cannot be taken, or a request that cannot be cancelled: `status` is the HTTP
    status the API answers with, `field` what is wrong."""

    def __init__(self, status: int, message: str, field: str) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


# the due requests a round may share out, a click to call first (the agent is waiting for it), then the
# oldest due; many more than a round gives out, so that a group's request is seen behind older ones, but
# bounded, so that a large backlog is not locked whole every round
_DUE = """
SELECT id, phone, group_id, agent_wanted, reason, customer_id, external_ref FROM callback_requests
WHERE status = 'pending' AND due_at <= now()
ORDER BY (agent_wanted IS NULL), due_at, id LIMIT %s FOR UPDATE SKIP LOCKED
"""
DUE_PER_OFFER = 10  # requests looked at per offer a round may make
# agents who may take a queued request, least recently called first, a row per group they are in;
# agents already ringing for (or talking on) a callback are out (_AGENT_BUSY)
_AGENTS = """
SELECT e.endpoint, gm.group_id, gm.position FROM employees e
LEFT JOIN group_members gm ON gm.employee_id = e.id
WHERE e.logged_in AND NOT e.paused
  AND (e.last_call_ended_at IS NULL OR e.last_call_ended_at <= now() - make_interval(secs => %s))
ORDER BY e.last_call_at NULLS FIRST, e.id
"""
_AGENT_BUSY = "SELECT 1 FROM callback_requests WHERE status = 'in_progress' AND agent_endpoint = %s"
# what the API shows of a request (GET /api/v1/callbacks, a click to call's answer)
REQUEST_COLUMNS = """r.id, r.phone, r.reason, r.status, r.attempts, r.last_result,
       (SELECT name FROM groups g WHERE g.id = r.group_id) AS "group", r.agent_endpoint, r.agent_wanted,
       r.external_ref, r.call_id, r.customer_id, r.created_at, r.due_at, r.done_at"""
# a request is tried again later unless its attempts are used up or the CRM asked for it (tried once);
# a callback the agent took over with a click to call goes back to the queue, for any agent
_SPENT = f"(attempts >= %(max)s OR reason = '{CLICK_TO_CALL}')"
_GIVE_BACK = f"""status = CASE WHEN {_SPENT} THEN 'failed' ELSE 'pending' END,
                 done_at = CASE WHEN {_SPENT} THEN now() END,
                 agent_wanted = CASE WHEN reason = '{CLICK_TO_CALL}' THEN agent_wanted END,
                 claimed_at = NULL, agent_endpoint = NULL, connected_at = NULL"""


def shown_to_agent(phone: str) -> tuple[str, str]:
    """The caller number and name an agent's phone shows for a callback: the customer's number, checked
    (it reaches the PBX's originate), and "Callback <number>"."""
    number = check_number(phone)
    return number, presentable("Callback " + number)


async def claim(pool: AsyncConnectionPool, phones: AgentPhones, *, wrapup: int = 0) -> Offer | None:
    """One due request and a free agent for it (claim_due with a limit of one); None when there is none."""
    offers = await claim_due(pool, phones, limit=1, wrapup=wrapup)
    return offers[0] if offers else None


async def claim_due(pool: AsyncConnectionPool, phones: AgentPhones, *, limit: int = 20,
                    wrapup: int = 0) -> list[Offer]:
    """Share the due requests out among the free agents, at most `limit`, and claim them (committed on return).
    A click to call goes first, to its agent only; while that phone is busy the other requests still go.
    Then each queued request gets a free member of its group whenever one exists, even if an older request
    is due (oldest first among one group's); the rest, oldest first, take the agents left. Agents whose
    last call ended less than `wrapup` seconds ago are not offered a queued request."""
    async with pool.connection() as conn, conn.transaction():
        due = await (await conn.execute(_DUE, (limit * DUE_PER_OFFER,))).fetchall()
        rows = await (await conn.execute(_AGENTS, (wrapup,))).fetchall() if due else []
        known: dict[str, bool] = {}

        async def free(endpoint: str) -> bool:  # the PBX is asked about a phone once a round, when needed
            if endpoint not in known:
                known[endpoint] = await _agent_free(conn, phones, endpoint)
            return known[endpoint]

        given: dict[str, dict] = {}  # agent → request
        for row in due:
            wanted = row["agent_wanted"]  # asked for by the agent: logged out, paused or resting does not matter
            if wanted and len(given) < limit and wanted not in given and await free(wanted):
                given[wanted] = row
        clicked = set(given)
        members: dict[int, list[str]] = {}  # the group's line: position, then least recently called
        for r in sorted((r for r in rows if r["group_id"] is not None), key=lambda r: r["position"]):
            members.setdefault(r["group_id"], []).append(r["endpoint"])

        async def to_member(row: dict, seen: set[str]) -> bool:
            # a free member of the request's group; one an older request holds changes hands if that request
            # can move to another member of its own group (an agent may be in several)
            for endpoint in members.get(row["group_id"], []):
                if endpoint not in seen:
                    seen.add(endpoint)
                    if await free(endpoint) and (endpoint not in given or await to_member(given[endpoint], seen)):
                        given[endpoint] = row
                        return True
            return False

        queued = [row for row in due if not row["agent_wanted"]]
        for row in queued:
            if len(given) < limit:
                await to_member(row, set(clicked))
        # a group request left over has no free member left, so the agents left are nobody's last hope
        placed = {row["id"] for row in given.values()}
        spare = list(dict.fromkeys(r["endpoint"] for r in rows if r["endpoint"] not in given))
        for row in (row for row in queued if row["id"] not in placed):
            if len(given) >= limit:
                break
            while spare and not await free(spare[0]):
                spare.pop(0)
            if not spare:
                break  # any free agent may take any queued request: none for this one, none for the rest
            given[spare.pop(0)] = row
        offers = []
        for endpoint, row in given.items():
            upd = await (await conn.execute(
                """UPDATE callback_requests SET status = 'in_progress', attempts = attempts + 1,
                   claimed_at = now(), agent_endpoint = %s, connected_at = NULL
                   WHERE id = %s RETURNING attempts""", (endpoint, row["id"]))).fetchone()
            assert upd is not None
            offers.append(Offer(row["id"], row["phone"], endpoint, upd["attempts"], row["reason"],
                                row["customer_id"], row["external_ref"]))
        return offers


async def _agent_free(conn: psycopg.AsyncConnection, phones: AgentPhones, endpoint: str) -> bool:
    # one worker at a time decides about an agent (held until commit, when its claim is visible)
    got = await (await conn.execute(
        "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s)) AS ok", (AGENT_LOCK, endpoint))).fetchone()
    if not got or not got["ok"]:
        return False
    if await (await conn.execute(_AGENT_BUSY, (endpoint,))).fetchone():
        return False
    try:
        return await phones.is_free(endpoint)
    except (PbxError, ValueError) as exc:
        log.warning("whether %s is free is unknown (%s): not offering", endpoint, exc)
        return False


_OPEN_FOR_PHONE = """SELECT id, status, agent_wanted FROM callback_requests
                     WHERE phone = %s AND status IN ('pending', 'in_progress') FOR UPDATE"""
_AGENT_TAKEN = """SELECT id FROM callback_requests
                  WHERE (status = 'in_progress' AND agent_endpoint = %(agent)s)
                     OR (status = 'pending' AND agent_wanted = %(agent)s) LIMIT 1"""


async def click_to_call(pool: AsyncConnectionPool, endpoint: str, phone: str, *, ref: str | None = None,
                        country: str = "RU") -> dict[str, Any]:
    """The CRM asks for a call: `endpoint`'s phone rings as soon as it is free (within
    callbacks.click_wait_seconds), then `phone` (E.164, or as dialled in `country`) is dialled. A pending
    callback request for the number is taken over (done if the customer answers). Returns the request as
    the API shows it; CallbackError when the agent, number or ref is not one (422), the agent is unknown
    (404) or busy with another request, or the number is being called (409)."""
    try:
        endpoint = check_endpoint(endpoint)
    except ValueError as exc:
        raise CallbackError(422, f"agent: {exc}", "agent") from None
    raw, phone = phone, to_e164(phone, country) or ""
    if not phone:
        raise CallbackError(422, f"phone: not a phone number: {raw[:40]!r}", "phone")
    if ref is not None and len(ref) > REF_MAX:
        raise CallbackError(422, f"ref: at most {REF_MAX} characters", "ref")
    try:
        async with pool.connection() as conn, conn.transaction():
            if await (await conn.execute("SELECT 1 FROM employees WHERE endpoint = %s", (endpoint,))).fetchone() is None:
                raise CallbackError(404, f"no employee has endpoint {endpoint!r}", "agent")
            await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (AGENT_LOCK, endpoint))
            taken = await (await conn.execute(_AGENT_TAKEN, {"agent": endpoint})).fetchone()
            if taken:
                raise CallbackError(409, f"{endpoint} is already being rung for request {taken['id']}", "agent")
            found = await (await conn.execute(_OPEN_FOR_PHONE, (phone,))).fetchone()
            if found and (found["status"] != "pending" or found["agent_wanted"]):
                raise CallbackError(409, f"{phone} is being called already (request {found['id']})", "phone")
            if found:
                cur = await conn.execute(
                    """UPDATE callback_requests SET agent_wanted = %s, wanted_at = now(), due_at = now(),
                              external_ref = COALESCE(%s, external_ref) WHERE id = %s RETURNING id""",
                    (endpoint, ref, found["id"]))
            else:
                cur = await conn.execute(
                    """INSERT INTO callback_requests (phone, customer_id, reason, agent_wanted, wanted_at, external_ref)
                       VALUES (%s, (SELECT id FROM customers WHERE phone = %s), %s, %s, now(), %s) RETURNING id""",
                    (phone, phone, CLICK_TO_CALL, endpoint, ref))
            rid = (await cur.fetchone())["id"]
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(rid)))  # sent at commit
            return await request_row(conn, rid)
    except psycopg.errors.UniqueViolation:  # another click for the number committed first
        raise CallbackError(409, f"{phone} is being called already", "phone") from None


async def cancel(pool: AsyncConnectionPool, request_id: int) -> dict[str, Any] | None:
    """The CRM closes a pending request (the customer was reached some other way): done, `cancelled`.
    None if there is no such request; CallbackError if it is ringing now or already settled."""
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute("SELECT status FROM callback_requests WHERE id = %s FOR UPDATE", (request_id,))
        row = await cur.fetchone()
        if row is None:
            return None
        if row["status"] != "pending":  # in progress: the agent's phone rings or they are talking
            raise CallbackError(409, f"request {request_id} is {row['status']}: only a pending one can be cancelled",
                                "status")
        await conn.execute("""UPDATE callback_requests SET status = 'done', done_at = now(), last_result = 'cancelled'
                              WHERE id = %s""", (request_id,))
        return await request_row(conn, request_id)


async def request_row(conn: psycopg.AsyncConnection, request_id: int) -> dict[str, Any] | None:
    cur = await conn.execute(f"SELECT {REQUEST_COLUMNS} FROM callback_requests r WHERE r.id = %s", (request_id,))
    return await cur.fetchone()


def ringing_body(offer: Offer, ring_seconds: int) -> dict[str, Any]:
    """The CRM's screen pop (webhooks.ringing_url) as the agent's phone rings for a callback or a click."""
    return {"event": "call_ringing", "direction": "outbound", "uniqueid": None,
            "reason": "click_to_call" if offer.reason == CLICK_TO_CALL else "callback", "phone": offer.phone,
            "customer_id": offer.customer_id, "callback_request_id": offer.request_id, "crm_ref": offer.external_ref,
            "agents": [{"endpoint": offer.endpoint, "name": None}], "ring_seconds": ring_seconds,
            "at": datetime.now(UTC).isoformat()}


async def dial(pool: AsyncConnectionPool, config: Config, phones: AgentPhones, offer: Offer,
               pop: ScreenPop | None = None) -> str:
    """Ring the agent; on answer the dialplan runs the callback flow, which owns the request from then on.
    Returns the outcome: answered, no_answer/busy/failed/… (released), or unknown (left for reconcile)."""
    if pop is not None:
        pop.ringing(ringing_body(offer, config.callbacks.agent_ring_seconds),
                    f"callback-{offer.request_id}/{offer.attempt}")
    try:
        result = await phones.ring(offer.endpoint, request_id=offer.request_id, phone=offer.phone,
                                   ring_seconds=config.callbacks.agent_ring_seconds)
    except OutcomeUnknown as exc:
        # the agent's phone may be ringing right now: re-dialling would double-ring. If the agent answers,
        # the flow takes over; otherwise reconcile() gives the request back after the ring time.
        log.warning("callback %s: originate outcome unknown (%s); left in progress", offer.request_id, exc)
        return "unknown"
    except (PbxError, ValueError) as exc:
        log.error("callback %s: originate refused: %s", offer.request_id, exc)
        await release(pool, config, offer.request_id, "originate_error", attempt=offer.attempt)
        return "originate_error"
    if result.outcome == "answered":
        # connected_at is left to the flow: if our AGI server is down when the agent answers, the request
        # is given back after the ring time instead of waiting for the longest call
        async with pool.connection() as conn:
            await conn.execute(
                """UPDATE callback_requests SET last_result = 'agent_answered'
                   WHERE id = %s AND status = 'in_progress' AND attempts = %s""",
                (offer.request_id, offer.attempt))
        log.info("callback %s: agent %s answered", offer.request_id, offer.endpoint)
        return "answered"
    status = await release(pool, config, offer.request_id, f"agent_{result.outcome}", attempt=offer.attempt)
    log.info("callback %s: agent %s %s %s → %s", offer.request_id, offer.endpoint, result.outcome,
             result.detail, status)
    return result.outcome


async def offer_due(pool: AsyncConnectionPool, config: Config, phones: AgentPhones, *, limit: int = 20,
                    pop: ScreenPop | None = None) -> list[Offer]:
    """Claim due requests while free agents last, ring them all at once, and wait for every outcome."""
    offers = await claim_due(pool, phones, limit=limit, wrapup=config.inbound.wrapup_seconds)
    if offers:
        await asyncio.gather(*(dial(pool, config, phones, o, pop) for o in offers))
    return offers


async def release(pool: AsyncConnectionPool, config: Config, request_id: int, result: str, *,
                  attempt: int | None = None) -> str | None:
    """Back to pending (due after retry_minutes), or failed once max_attempts are used. Returns the new
    status, or None if the request was no longer ours (done, reconciled, claimed again)."""
    async with pool.connection() as conn:
        row = await (await conn.execute(
            f"""UPDATE callback_requests SET
                 due_at = CASE WHEN {_SPENT} THEN due_at ELSE now() + make_interval(mins => %(retry)s) END,
                 {_GIVE_BACK}, last_result = %(result)s
               WHERE id = %(id)s AND status = 'in_progress' AND (%(attempt)s::int IS NULL OR attempts = %(attempt)s)
               RETURNING status""",
            {"max": config.callbacks.max_attempts, "retry": config.callbacks.retry_minutes, "result": result,
             "id": request_id, "attempt": attempt})).fetchone()
    return row["status"] if row else None


async def connected(pool: AsyncConnectionPool, request_id: int, endpoint: str) -> Request | None:
    """The agent answered (called by the flow): the request is the flow's now. None if it is not ours."""
    async with pool.connection() as conn:
        row = await (await conn.execute(
            """UPDATE callback_requests r SET connected_at = COALESCE(connected_at, now())
               WHERE id = %s AND status = 'in_progress' AND agent_endpoint = %s
               RETURNING r.id, r.phone, r.status, r.attempts, r.agent_endpoint, r.reason,
                         r.agent_wanted IS NOT NULL AS asked_by_agent,
                         (SELECT name FROM groups g WHERE g.id = r.group_id) AS group_name""",
            (request_id, endpoint))).fetchone()
    if row is None:
        return None
    return Request(row["id"], row["phone"], row["status"], row["attempts"], row["group_name"],
                   row["agent_endpoint"], row["reason"], row["asked_by_agent"])


async def complete(pool: AsyncConnectionPool, request_id: int) -> bool:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """UPDATE callback_requests SET status = 'done', done_at = now(), last_result = 'answered'
               WHERE id = %s AND status = 'in_progress'""", (request_id,))
        return cur.rowcount == 1


async def reconcile(pool: AsyncConnectionPool, config: Config, *, ring_grace: float | None = None,
                    call_grace: float | None = None) -> list[int]:
    """Give back requests stuck in_progress by a crash: not connected after the ring time (+ grace), or
    connected for longer than a call may last. Returns their ids."""
    ring = ring_grace if ring_grace is not None else config.callbacks.agent_ring_seconds + RING_GRACE_SECONDS
    talk = call_grace if call_grace is not None else config.agi.max_call_seconds + RING_GRACE_SECONDS
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            f"""UPDATE callback_requests SET due_at = now(), {_GIVE_BACK}, last_result = 'stale'
               WHERE status = 'in_progress' AND (claimed_at IS NULL
                     OR (connected_at IS NULL AND claimed_at < now() - make_interval(secs => %(ring)s))
                     OR connected_at < now() - make_interval(secs => %(talk)s))
               RETURNING id""",
            {"max": config.callbacks.max_attempts, "ring": ring, "talk": talk})).fetchall()
        # a click to call whose agent stayed busy: the CRM's own fails, a taken-over callback is queued again
        waited = await (await conn.execute(
            f"""UPDATE callback_requests SET {_GIVE_BACK}, last_result = 'agent_not_free'
               WHERE status = 'pending' AND agent_wanted IS NOT NULL
                 AND wanted_at < now() - make_interval(secs => %(wait)s)
               RETURNING id""", {"max": config.callbacks.max_attempts,
                                 "wait": config.callbacks.click_wait_seconds})).fetchall()
    if waited:
        log.warning("click to call given up, the agent's phone stayed busy: %s", [r["id"] for r in waited])
    ids = [r["id"] for r in rows]
    if ids:
        log.warning("callback requests stuck in progress given back: %s", ids)
    return ids


async def run_forever(pool: AsyncConnectionPool, config: Config, phones: AgentPhones,
                      wake: asyncio.Event | None = None, pop: ScreenPop | None = None) -> None:
    """Every poll_seconds, or when `wake` is set (a click to call): reconcile, then offer due requests.
    Rounds overlap (an agent ringing for 20 s does not hold back the others); claims keep them apart."""
    rounds: set[asyncio.Task] = set()
    try:
        while True:
            try:
                await reconcile(pool, config)
                if len(rounds) < 10:
                    task = asyncio.create_task(offer_due(pool, config, phones, pop=pop), name="callback-offers")
                    rounds.add(task)
                    task.add_done_callback(_round_done(rounds))
            except Exception:
                log.exception("callback worker round failed")
            if wake is None:
                await asyncio.sleep(config.callbacks.poll_seconds)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), config.callbacks.poll_seconds)
            wake.clear()
    finally:
        for task in rounds:
            task.cancel()


def _round_done(rounds: set[asyncio.Task]):
    def done(task: asyncio.Task) -> None:
        rounds.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("callback offers failed", exc_info=task.exception())
    return done
