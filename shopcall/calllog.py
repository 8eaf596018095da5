"""One row per call in `calls`, plus the callback request a missed call leaves.

A row is written once, when the flow ends, as an upsert on the PBX's uniqueid, so a retry never makes a
second row; a later report on the same call (the dialplan's fallback, flows/fallback.py) completes it
without blanking what the first one knew (menu choice, group, language).
If PostgreSQL is unreachable the row goes to a local spool file and is replayed later.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from shopcall import webhooks
from shopcall.phone import is_mobile, to_e164

if TYPE_CHECKING:
    from shopcall.call import CallInfo

log = logging.getLogger("shopcall.calllog")


def now() -> datetime:
    return datetime.now(UTC)


@dataclass
class CallRecord:
    uniqueid: str
    pbx: str
    caller_number: str
    caller_name: str
    dialled_number: str
    caller_e164: str | None = None
    started_at: datetime = field(default_factory=now)
    direction: str = "inbound"
    group_name: str | None = None
    menu_choice: str | None = None
    robot_choice: str | None = None
    language: str | None = None
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    answered_endpoint: str | None = None
    outcome: str = "abandoned"
    missed: bool = True
    recording_path: str | None = None
    callback_reason: str | None = None  # set → a callback request is created with the row
    survey_answer: int | None = None
    callback_request_id: int | None = None  # the callback or click to call this call served
    route_log: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of_caller(cls, info: CallInfo, country: str, **values: Any) -> CallRecord:
        """The row of an inbound call, from what the PBX said about its caller."""
        return cls(uniqueid=info.uniqueid, pbx=info.pbx, caller_number=info.caller_number,
                   caller_name=info.caller_name, dialled_number=info.dialled_number,
                   caller_e164=to_e164(info.caller_number, country), **values)

    def step(self, what: str, **details: Any) -> None:
        """Note a routing step; the list is stored with the row to answer "why did it go there"."""
        self.route_log.append({"at": now().isoformat(timespec="milliseconds"), "step": what, **details})

    def to_json(self) -> str:
        data = asdict(self)
        for key in ("started_at", "answered_at", "ended_at"):
            if data[key] is not None:
                data[key] = data[key].isoformat()
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> CallRecord:
        data = json.loads(text)
        for key in ("started_at", "answered_at", "ended_at"):
            if data.get(key):
                data[key] = datetime.fromisoformat(data[key])
        return cls(**data)


_UPSERT = """
INSERT INTO calls (uniqueid, pbx, direction, caller_number, caller_e164, caller_name, dialled_number,
                   customer_id, group_id, menu_choice, started_at, answered_at, ended_at, answered_by,
                   answered_endpoint, outcome, missed, recording_path, route_log, robot_choice, language,
                   callback_request_id)
VALUES (%(uniqueid)s, %(pbx)s, %(direction)s, %(caller_number)s, %(caller_e164)s, %(caller_name)s,
        %(dialled_number)s,
        (SELECT id FROM customers WHERE phone = %(caller_e164)s),
        (SELECT id FROM groups WHERE name = %(group_name)s),
        %(menu_choice)s, %(started_at)s, %(answered_at)s, %(ended_at)s,
        (SELECT id FROM employees WHERE endpoint = %(answered_endpoint)s),
        %(answered_endpoint)s, %(outcome)s, %(missed)s, %(recording_path)s, %(route_log)s, %(robot_choice)s,
        %(language)s, %(callback_request_id)s)
ON CONFLICT (uniqueid) DO UPDATE SET
    {merge}
RETURNING {returning}
"""
# A second report on one call (a retry, the dialplan's fallback) merges into the row. The report that
# ended later says how the call ended, whichever of them reaches the database first (a spooled row is
# replayed late); what only the other one knew (a menu choice, the group, the language) is kept, and the
# route log holds both reports' steps in the order they happened.
_LATER = "calls.ended_at > EXCLUDED.ended_at"  # the stored row is the later report
_NEWER_WINS = ("answered_at", "ended_at", "answered_by", "answered_endpoint", "outcome", "missed")
_KEPT = ("group_id", "menu_choice", "recording_path", "robot_choice", "language", "callback_request_id")
_MERGE = ",\n    ".join(
    [f"{c} = CASE WHEN {_LATER} THEN calls.{c} ELSE EXCLUDED.{c} END" for c in _NEWER_WINS]
    + [f"{c} = CASE WHEN {_LATER} THEN COALESCE(calls.{c}, EXCLUDED.{c}) ELSE COALESCE(EXCLUDED.{c}, calls.{c}) END"
       for c in _KEPT]
    + [f"route_log = CASE WHEN {_LATER} THEN EXCLUDED.route_log || calls.route_log "
       "ELSE calls.route_log || EXCLUDED.route_log END"]
)
_UPSERT = _UPSERT.replace("{merge}", _MERGE)


def _save_statement(*, post: bool) -> str:
    """One statement, so atomic without BEGIN/COMMIT round trips: the row, and who answered it becomes the
    employee's last call and the customer's manager (sticky routing); with `post`, the row as stored (merged
    with an earlier report) is queued for the shop's calls_url in the same commit."""
    # the post is built from the whole row as stored; the plain save needs only the ids
    upsert = _UPSERT.strip().replace("{returning}", "*" if post else "id, customer_id, group_id, answered_by")
    hook = f""",
     posted AS (INSERT INTO webhook_outbox (kind, url, body)
                SELECT 'call', %(calls_url)s, jsonb_build_object({_CALL_BODY})
                FROM saved LEFT JOIN groups g ON g.id = saved.group_id
                           LEFT JOIN employees e ON e.id = saved.answered_by)""" if post else ""
    return f"""
WITH saved AS ({upsert}),
     employee AS (UPDATE employees e SET last_call_at = %(answered_at)s, last_call_ended_at = %(ended_at)s
                  FROM saved WHERE e.id = saved.answered_by),
     customer AS (UPDATE customers c SET last_manager_id = saved.answered_by FROM saved
                   WHERE c.id = saved.customer_id AND saved.answered_by IS NOT NULL){hook}
SELECT id, customer_id, group_id, answered_by FROM saved
"""


# A call's wait and talk in seconds, for a calls table aliased {t} (the webhook's, the call history's).
# answered_at is the end less the PBX's talk time: never before the start, whatever the clocks say.
WAIT_SECONDS = ("greatest(round(extract(epoch FROM coalesce({t}.answered_at, {t}.ended_at) - {t}.started_at), 1), 0)")
TALK_SECONDS = "round(extract(epoch FROM {t}.ended_at - {t}.answered_at), 1)"

# What the shop's CRM gets for a call (README, "Calls to your CRM"): every key, null when not known.
_CALL_BODY = ", ".join(f"'{k}', {v}" for k, v in {
    "event": "'call_ended'",
    "call_id": "saved.id",
    "uniqueid": "saved.uniqueid",
    "pbx": "saved.pbx",
    "direction": "saved.direction",
    "caller_number": "saved.caller_number",
    "caller_e164": "saved.caller_e164",
    "caller_name": "saved.caller_name",
    "customer_id": "saved.customer_id",
    "dialled_number": "saved.dialled_number",
    "group": "g.name",
    "menu_choice": "saved.menu_choice",
    "robot_choice": "saved.robot_choice",
    "language": "saved.language",
    "outcome": "saved.outcome",
    "missed": "saved.missed",
    "started_at": "saved.started_at",
    "answered_at": "saved.answered_at",
    "ended_at": "saved.ended_at",
    "wait_seconds": WAIT_SECONDS.format(t="saved"),
    "talk_seconds": TALK_SECONDS.format(t="saved"),
    "agent_endpoint": "saved.answered_endpoint",
    "agent_name": "e.name",
    "recording_path": "saved.recording_path",
    # the API's link to the file (absolute with api.public_url); fetched with a bearer token
    "recording_url": "CASE WHEN saved.recording_path IS NOT NULL "
                     "THEN replace(%(recording_link)s, '{}', saved.id::text) END",
    "callback_requested": "%(callback_requested)s::boolean",
    "survey_answer": "%(survey_answer)s::integer",
    # a callback's or a click to call's request, and the CRM's own id for it (POST /api/v1/calls)
    "callback_request_id": "saved.callback_request_id",
    "crm_ref": "(SELECT external_ref FROM callback_requests cr WHERE cr.id = saved.callback_request_id)",
    "saved_at": "now()",
}.items())
RECORDING_LINK = "/api/v1/calls/{}/recording"  # the API's (shopcall/api.py), with the call's id
_SAVE = _save_statement(post=False)
_SAVE_POSTED = _save_statement(post=True)


@dataclass(frozen=True)
class MissedCallSms:
    """A text to a missed caller's mobile (inbound.missed_call_sms), queued for webhooks.messages_url in the
    transaction that opens their callback request, once per request (a caller who tries five times while
    the request is open gets one message)."""

    url: str
    texts: dict[str, str]  # by language; "ru" when the call's language has none
    shop: str

    def body(self, rec: CallRecord, request_id: int) -> dict[str, Any]:
        text = self.texts.get(rec.language or "ru") or self.texts["ru"]
        return {"event": "message", "channel": "sms", "reason": "missed_call", "phone": rec.caller_e164,
                "text": text.replace("{shop}", self.shop), "language": rec.language or "ru",
                "uniqueid": rec.uniqueid, "callback_request_id": request_id}


class CallLog:
    def __init__(self, pool: AsyncConnectionPool, spool_dir: Path, *, calls_url: str = "",
                 api_url: str = "", missed_sms: MissedCallSms | None = None) -> None:
        self.pool = pool
        self.missed_sms = missed_sms
        self.calls_url = calls_url  # empty: calls are not posted
        self.recording_link = api_url.rstrip("/") + RECORDING_LINK
        self.spool = spool_dir / "calls.jsonl"
        self._spool_lock = asyncio.Lock()

    async def save(self, rec: CallRecord) -> bool:
        """Write the row (and callback request); on a database failure spool it. True if it reached the DB."""
        try:
            await self._write(rec)
            return True
        except (psycopg.OperationalError, PoolTimeout, OSError) as exc:
            log.error("%s: database unavailable (%s): call row kept in %s", rec.uniqueid, exc, self.spool)
            await self._append_spool(rec)
            return False

    async def _write(self, rec: CallRecord) -> None:
        if rec.recording_path and not await asyncio.to_thread(Path(rec.recording_path).exists):
            rec.step("recording_missing", path=rec.recording_path)  # on demand and never started
            rec.recording_path = None
        # shallow: asdict() deep-copies the route log, a sixth of a call's CPU
        params = {f.name: getattr(rec, f.name) for f in fields(rec)}
        params["route_log"] = Jsonb(rec.route_log)
        callback = bool(rec.callback_reason and rec.caller_e164)
        save = _SAVE
        if self.calls_url:
            save = _SAVE_POSTED
            params.update(calls_url=self.calls_url, callback_requested=callback, recording_link=self.recording_link)
        if not rec.survey_answer and not callback:
            async with self.pool.connection() as conn:
                await conn.execute(save, params)
            return
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(save, params)
            row = await cur.fetchone()
            assert row is not None
            if rec.survey_answer:
                await conn.execute(
                    """INSERT INTO survey_answers (call_id, employee_id, group_id, answer) VALUES (%s, %s, %s, %s)
                       ON CONFLICT (call_id) DO UPDATE SET answer = EXCLUDED.answer""",
                    (row["id"], row["answered_by"], row["group_id"], rec.survey_answer),
                )
            if callback:
                # one open request per phone (a partial unique index): a repeat caller refreshes it
                cur = await conn.execute(
                    """
                    INSERT INTO callback_requests (call_id, phone, customer_id, group_id, reason)
                    VALUES (%s, %s, %s, %s, %s)
                    ON CONFLICT (phone) WHERE status IN ('pending', 'in_progress')
                    DO UPDATE SET call_id = EXCLUDED.call_id, reason = EXCLUDED.reason
                    RETURNING id
                    """,
                    (row["id"], rec.caller_e164, row["customer_id"], row["group_id"], rec.callback_reason),
                )
                request = await cur.fetchone()
                if self.missed_sms and request and rec.caller_e164 and is_mobile(rec.caller_e164):
                    await webhooks.enqueue(conn, "message", self.missed_sms.url,
                                           self.missed_sms.body(rec, request["id"]), f"message:callback:{request['id']}")

    async def _append_spool(self, rec: CallRecord) -> None:
        async with self._spool_lock:
            await asyncio.to_thread(self._append_sync, rec.to_json())

    def _append_sync(self, line: str) -> None:
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        with self.spool.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    async def replay_spool(self) -> int:
        """Write spooled rows to the database; rows that still fail stay in the spool. Returns rows written."""
        async with self._spool_lock:
            if not self.spool.exists():
                return 0
            lines = [ln for ln in self.spool.read_text(encoding="utf-8").splitlines() if ln.strip()]
            kept: list[str] = []
            written = 0
            for i, line in enumerate(lines):
                try:
                    rec = CallRecord.from_json(line)
                except (ValueError, TypeError) as exc:
                    log.error("spool line %d is unreadable (%s); moved to calls.bad", i + 1, exc)
                    with self.spool.with_suffix(".bad").open("a", encoding="utf-8") as bad:
                        bad.write(line + "\n")
                    continue
                try:
                    await self._write(rec)
                    written += 1
                except (psycopg.OperationalError, PoolTimeout, OSError):
                    kept = lines[i:]
                    break
            tmp = self.spool.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
            os.replace(tmp, self.spool)
            if written:
                log.info("replayed %d spooled call rows (%d left)", written, len(kept))
            return written

    async def replay_forever(self, interval: float = 30.0) -> None:
        while True:
            try:
                await self.replay_spool()
            except Exception:
                log.exception("spool replay failed")
            await asyncio.sleep(interval)
