"""A recorded message: kept (row + file), transcribed, and announced by e-mail to the group's owner.

PBX-neutral: the flow records the file and calls `store_voicemail` once the caller has hung up.
The message is transcribed first, then the row and the notice land in one transaction (both or
neither). With the database down the message goes to a local spool and `replay_spool` stores it later.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import phonenumbers
import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from shopcall import mailer
from shopcall.call import presentable
from shopcall.config import Config
from shopcall.phone import is_withheld, to_e164
from shopcall.transcribe import Transcript, transcribe

log = logging.getLogger("shopcall.voicemail")

HIDDEN = "скрытый номер"


@dataclass(frozen=True)
class Recipient:
    group_id: int | None
    group_title: str
    employee_id: int | None
    employee_name: str
    email: str | None
    status: str  # what happens when there is nobody to mail: no_group / no_owner / no_email, else queued


async def find_recipient(conn: psycopg.AsyncConnection, group_name: str) -> Recipient:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        """SELECT g.id, g.title, e.id AS employee_id, e.name, e.email
           FROM groups g LEFT JOIN employees e ON e.id = g.owner_employee_id WHERE g.name = %s""",
        (group_name,),
    )
    row = await cur.fetchone()
    if row is None:
        return Recipient(None, "", None, "", None, "no_group")
    email = (row["email"] or "").strip() or None
    status = "no_owner" if row["employee_id"] is None else ("no_email" if email is None else "queued")
    return Recipient(row["id"], row["title"], row["employee_id"], row["name"] or "", email, status)


def display_phone(e164: str | None, raw: str) -> str:
    """+79161234567 -> "+7 916 123-45-67"; what the PBX gave when it is not a phone number."""
    if e164:
        try:
            return phonenumbers.format_number(
                phonenumbers.parse(e164), phonenumbers.PhoneNumberFormat.INTERNATIONAL
            )
        except phonenumbers.NumberParseException:
            return e164
    text = presentable(raw, 40)
    return HIDDEN if is_withheld(text) else text


def _duration(seconds: float) -> str:
    total = round(seconds)
    return f"{total // 60}:{total % 60:02d}"


def subject_for(phone: str, caller_name: str) -> str:
    name = caller_name.strip()
    if phone == HIDDEN:
        return "Голосовое сообщение со скрытого номера" + (f" ({name})" if name else "")
    return f"Голосовое сообщение от {phone}" + (f" ({name})" if name and name != phone else "")


def body_for(
    *, phone: str, caller_name: str, group_name: str, group_title: str, when: datetime, timezone: str,
    seconds: float, transcript: Transcript, path: Path, call_uniqueid: str,
) -> str:
    caller = f"{caller_name.strip()}, {phone}" if caller_name.strip() else phone
    group = f"«{group_title}» ({group_name})" if group_title else group_name
    lines = [
        f"Голосовое сообщение для группы {group}.",
        "",
        f"От: {caller}",
        f"Когда: {when:%d.%m.%Y %H:%M} ({timezone})",
        f"Длительность: {_duration(seconds)}",
    ]
    if call_uniqueid:
        lines.append(f"Звонок: {call_uniqueid}")
    lines.append("")
    if transcript.error:
        lines.append(f"Расшифровки нет: {transcript.error}")
    elif transcript.engine == "none":
        lines.append("Расшифровки нет: она отключена в настройках (voicemail.transcriber = none).")
    elif not transcript.text:
        lines.append(f"Расшифровки нет: {transcript.engine} не распознал речь в записи.")
    else:
        lines.append(f"Расшифровка ({transcript.engine}, автоматическая, возможны ошибки):")
        lines.append(transcript.text)
        if transcript.language == "en":
            lines.append("(модель распознаёт только английскую речь; русская речь даёт бессмыслицу)")
    lines += ["", f"Запись во вложении: {path.name}"]
    return "\n".join(lines)


@dataclass
class Message:
    """A message ready for the database; also one line of the spool while the database is down."""

    call_uniqueid: str
    caller_number: str
    caller_name: str
    caller_e164: str | None
    group_name: str
    path: str
    seconds: float
    created_at: datetime
    transcript: Transcript

    def to_json(self) -> str:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Message:
        data = json.loads(line)
        data["created_at"] = datetime.fromisoformat(data["created_at"])
        data["transcript"] = Transcript(**data["transcript"])
        return cls(**data)


async def store_voicemail(
    pool: AsyncConnectionPool,
    *,
    call_uniqueid: str,
    caller_number: str,
    caller_name: str = "",
    caller_e164: str | None = None,
    group_name: str,
    path: str | Path,
    seconds: float,
    config: Config,
) -> int | None:
    """Keep a recorded message and queue the owner's notice; returns the voicemail id.

    None: the message was shorter than voicemail.min_seconds (its file is deleted), or the database is
    down and the message waits in the spool for `replay_spool`.
    """
    path = Path(path)
    vm = config.voicemail
    if seconds < vm.min_seconds:
        await asyncio.to_thread(path.unlink, missing_ok=True)
        log.info("%s: voicemail from %s dropped: %.1f s is shorter than voicemail.min_seconds = %g",
                 call_uniqueid, caller_number or "unknown", seconds, vm.min_seconds)
        return None
    created_at = datetime.now(UTC)
    transcript = await transcribe(path, vm)
    if transcript.error:
        log.warning("%s: voicemail from %s not transcribed: %s", call_uniqueid, caller_number, transcript.error)
    msg = Message(
        call_uniqueid=call_uniqueid, caller_number=caller_number,
        caller_name=presentable(caller_name),  # it goes into a mail header: no newlines
        caller_e164=caller_e164 or to_e164(caller_number, config.shop.country), group_name=group_name,
        path=str(path), seconds=float(seconds), created_at=created_at, transcript=transcript,
    )
    try:
        return await save(pool, msg, config)
    except (psycopg.OperationalError, PoolTimeout) as exc:
        spool = spool_path(config)
        log.error("%s: database unavailable (%s): voicemail %s kept in %s", call_uniqueid, exc, path, spool)
        await asyncio.to_thread(_append, spool, msg.to_json())
        return None


async def save(pool: AsyncConnectionPool, msg: Message, config: Config) -> int | None:
    """Row and notice in one transaction; the same message saved twice (a replay) is stored once."""
    async with pool.connection() as conn, conn.transaction():
        to = await find_recipient(conn, msg.group_name)
        t = msg.transcript
        cur = await conn.execute(
            """INSERT INTO voicemails (call_id, call_uniqueid, caller_number, caller_e164, caller_name,
                   group_id, group_name, employee_id, path, seconds, transcript, transcript_engine,
                   transcript_error, created_at, status)
               VALUES ((SELECT id FROM calls WHERE uniqueid = %s), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
                       %s, %s, %s)
               ON CONFLICT (path) DO NOTHING RETURNING id""",
            (msg.call_uniqueid, msg.call_uniqueid, msg.caller_number, msg.caller_e164, msg.caller_name,
             to.group_id, msg.group_name, to.employee_id, msg.path, msg.seconds, t.text or None, t.engine,
             t.error, msg.created_at, to.status),
        )
        row = await cur.fetchone()
        if row is None:
            log.info("%s: voicemail %s is already stored", msg.call_uniqueid, msg.path)
            return None
        vm_id = int(row["id"] if isinstance(row, dict) else row[0])
        if to.email is None:
            log.warning("%s: voicemail %s from %s kept without a notice: %s (group %r)", msg.call_uniqueid,
                        vm_id, msg.caller_number, _WHY[to.status], msg.group_name)
            return vm_id
        phone = display_phone(msg.caller_e164, msg.caller_number)
        body = body_for(
            phone=phone, caller_name=msg.caller_name, group_name=msg.group_name, group_title=to.group_title,
            when=msg.created_at.astimezone(config.shop.tzinfo), timezone=config.shop.timezone,
            seconds=msg.seconds, transcript=t, path=Path(msg.path), call_uniqueid=msg.call_uniqueid,
        )
        await mailer.enqueue(conn, to.email, subject_for(phone, msg.caller_name), body, [msg.path],
                             voicemail_id=vm_id)
    log.info("%s: voicemail %s (%.1f s) from %s stored, notice queued for %s", msg.call_uniqueid, vm_id,
             msg.seconds, msg.caller_number, to.email)
    return vm_id


# --------------------------------------------------------------------------- spool (database down)


def spool_path(config: Config) -> Path:
    return config.spool_dir / "voicemails.jsonl"


def _append(spool: Path, line: str) -> None:
    spool.parent.mkdir(parents=True, exist_ok=True)
    with spool.open("a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # other shopcall processes append to the same spool
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read(spool: Path) -> list[str]:
    if not spool.exists():
        return []
    with spool.open("r", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        return [ln for ln in f.read().splitlines() if ln.strip()]


def _remove(spool: Path, done: list[str]) -> None:
    """Drop the replayed lines, keeping any appended meanwhile."""
    with spool.open("r+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        kept = f.read().splitlines()
        for line in done:
            if line in kept:
                kept.remove(line)
        f.seek(0)
        f.truncate()
        f.write("".join(ln + "\n" for ln in kept if ln.strip()))
        f.flush()
        os.fsync(f.fileno())


async def replay_spool(pool: AsyncConnectionPool, config: Config) -> int:
    """Store the messages spooled while the database was down; returns how many were stored.
    A replay that dies half-way is safe to repeat: a message is stored once (voicemails.path is unique)."""
    spool = spool_path(config)
    lines = await asyncio.to_thread(_read, spool)
    done: list[str] = []
    stored = 0
    for line in lines:
        try:
            msg = Message.from_json(line)
        except (ValueError, TypeError, KeyError) as exc:
            log.error("voicemail spool line is unreadable (%s); moved to %s", exc, spool.with_suffix(".bad"))
            await asyncio.to_thread(_append, spool.with_suffix(".bad"), line)
            done.append(line)
            continue
        try:
            stored += await save(pool, msg, config) is not None
        except (psycopg.OperationalError, PoolTimeout):
            break  # still down: the rest stays for next time
        done.append(line)
    if done:
        await asyncio.to_thread(_remove, spool, done)
        log.info("replayed %d spooled voicemails (%d left)", stored, len(lines) - len(done))
    return stored


_WHY = {
    "no_group": "no such group",
    "no_owner": "the group has no owner (groups.owner_employee_id)",
    "no_email": "the group owner has no e-mail address",
}
