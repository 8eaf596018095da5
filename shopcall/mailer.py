"""Outgoing mail through a PostgreSQL outbox: a notice is a row first and an SMTP exchange later, so a
mail server that is down only delays it.

Several processes may run `deliver_due`: each row is claimed with ``FOR UPDATE SKIP LOCKED`` and stays
locked until it is marked sent, so no two senders ever hold it at once. The row is committed after the
server has accepted the mail: if the database fails in between, the mail is sent again later (at least
once, never lost). The fixed Message-ID lets a mail client fold such a duplicate.

SMTP is stdlib `smtplib` run in a thread: notices are a few an hour, the socket has a timeout, and it
needs no extra dependency.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import socket
import ssl
from collections.abc import Iterable, Sequence
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from shopcall.config import Config, MailConfig
from shopcall.outboxes import Pruner

log = logging.getLogger("shopcall.mailer")

MAX_BACKOFF_SECONDS = 3600  # a mail server back after a long outage gets the queue within the hour
_MIME = {
    ".wav": ("audio", "wav"),
    ".mp3": ("audio", "mpeg"),
    ".ogg": ("audio", "ogg"),
    ".gsm": ("audio", "x-gsm"),
    ".txt": ("text", "plain"),
}


async def enqueue(
    conn: psycopg.AsyncConnection,
    to: str,
    subject: str,
    body: str,
    attachments: Iterable[str | Path] = (),
    *,
    voicemail_id: int | None = None,
) -> int:
    """Queue a mail (inside the caller's transaction, if any); returns the outbox id."""
    cur = await conn.execute(
        """INSERT INTO outbox (to_addr, subject, body, attachments, voicemail_id)
           VALUES (%s, %s, %s, %s, %s) RETURNING id""",
        (to, subject, body, Jsonb([str(p) for p in attachments]), voicemail_id),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row["id"] if isinstance(row, dict) else row[0])


def backoff_seconds(retry_seconds: int, attempts: int) -> int:
    """Delay after the `attempts`-th failure (1-based): retry_seconds * 2^(attempts-1), capped."""
    cap = max(retry_seconds, MAX_BACKOFF_SECONDS)
    return min(cap, retry_seconds * 2 ** min(max(attempts - 1, 0), 30))


def build_message(
    *, sender: str, to: str, subject: str, body: str, attachments: Sequence[str | Path],
    message_id: str | None = None, date: datetime | None = None,
) -> EmailMessage:
    msg = EmailMessage()  # policy "default": non-ASCII headers become RFC 2047 words, bodies get a charset
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = " ".join("".join(c if c.isprintable() else " " for c in subject).split())
    msg["Date"] = format_datetime(date) if date else format_datetime(datetime.now().astimezone())
    if message_id:
        msg["Message-ID"] = message_id
    missing = [Path(p) for p in attachments if not Path(p).is_file()]
    if missing:
        # purged or moved: the notice still goes out, saying what is gone
        body += "\n\n" + "\n".join(f"(вложение не найдено: {p})" for p in missing)
    # base64 rather than 8bit: a server without 8BITMIME must not mangle the Cyrillic
    msg.set_content(body, charset="utf-8", cte="base64")
    for p in map(Path, attachments):
        if p in missing:
            continue
        maintype, subtype = _MIME.get(p.suffix.lower(), ("application", "octet-stream"))
        msg.add_attachment(p.read_bytes(), maintype=maintype, subtype=subtype, filename=p.name)
    return msg


class PermanentError(Exception):
    """The server refused this mail for good (5xx for the recipient or the content)."""


class _Session:
    """One SMTP connection, opened on first use and reused for the batch; all calls run in a thread."""

    def __init__(self, config: MailConfig) -> None:
        self.config = config
        self.smtp: smtplib.SMTP | None = None

    def _open(self) -> smtplib.SMTP:
        c = self.config
        smtp = smtplib.SMTP(c.smtp_host, c.smtp_port, timeout=c.timeout)
        try:
            if c.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if c.username:
                smtp.login(c.username, c.password)
        except BaseException:
            smtp.close()
            raise
        return smtp

    def send(self, msg: EmailMessage, to: str) -> None:
        if self.smtp is None:
            self.smtp = self._open()
        try:
            self.smtp.send_message(msg, from_addr=self.config.sender, to_addrs=[to])
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            if codes and all(code >= 500 for code in codes):
                raise PermanentError(_describe(exc)) from exc
            raise
        except smtplib.SMTPDataError as exc:
            if exc.smtp_code >= 500:
                raise PermanentError(_describe(exc)) from exc
            raise
        except (smtplib.SMTPServerDisconnected, OSError):
            self.close()  # the next mail opens a fresh connection
            raise

    def close(self) -> None:
        if self.smtp is not None:
            try:
                self.smtp.quit()
            except (smtplib.SMTPException, OSError):
                self.smtp.close()
            self.smtp = None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "; ".join(f"{rcpt}: {code} {_text(msg)}" for rcpt, (code, msg) in exc.recipients.items())
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"{exc.smtp_code} {_text(exc.smtp_error)}"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


_CLAIM = """
SELECT id, to_addr, subject, body, attachments, attempts, created_at, voicemail_id
FROM outbox WHERE status = 'pending' AND next_try_at <= now()
ORDER BY next_try_at, id LIMIT 1 FOR UPDATE SKIP LOCKED
"""


async def deliver_due(pool: AsyncConnectionPool, config: MailConfig, *, limit: int = 50) -> tuple[int, int]:
    """Send the mails that are due; returns (sent, failed attempts). Safe to run in several processes."""
    sent = failed = 0
    session = _Session(config)
    domain = config.sender.rpartition("@")[2] or "localhost"
    try:
        for _ in range(limit):
            async with pool.connection() as conn, conn.transaction():
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(_CLAIM)
                row = await cur.fetchone()
                if row is None:
                    break
                outcome = await _send_one(conn, session, row, config, domain)
            sent, failed = sent + (outcome == "sent"), failed + (outcome != "sent")
            if outcome == "retry" and session.smtp is None:
                break  # no connection to the server: the rest waits for the next round, not a timeout each
    finally:
        await asyncio.to_thread(session.close)
    return sent, failed


async def _send_one(conn, session: _Session, row: dict, config: MailConfig, domain: str) -> str:
    """Send one claimed row and record the outcome: "sent", "failed" (for good) or "retry"."""
    rid = row["id"]
    try:
        try:
            msg = await asyncio.to_thread(
                build_message, sender=config.sender, to=row["to_addr"], subject=row["subject"],
                body=row["body"], attachments=row["attachments"],
                message_id=f"<outbox-{rid}.{int(row['created_at'].timestamp())}@{domain}>",
            )
        except ValueError as exc:  # a header email refuses (an address with a newline): no retry helps
            raise PermanentError(f"cannot build the message: {exc}") from exc
        await asyncio.to_thread(session.send, msg, row["to_addr"])
    except PermanentError as exc:
        log.error("mail %s to %s refused for good: %s", rid, row["to_addr"], exc)
        await conn.execute(
            "UPDATE outbox SET status = 'failed', attempts = attempts + 1, last_error = %s WHERE id = %s",
            (str(exc), rid),
        )
        await _mark_voicemail(conn, row["voicemail_id"], "mail_failed")
        return "failed"
    except Exception as exc:  # server down, refused, timed out, auth: all retried later
        attempts = row["attempts"] + 1
        delay = backoff_seconds(config.retry_seconds, attempts)
        error = _describe(exc)
        log.warning("mail %s to %s not sent (attempt %d): %s; retry in %d s", rid, row["to_addr"], attempts,
                    error, delay)
        await conn.execute(
            """UPDATE outbox SET attempts = %s, last_error = %s,
                                 next_try_at = now() + make_interval(secs => %s) WHERE id = %s""",
            (attempts, error, delay, rid),
        )
        return "retry"
    await conn.execute(
        "UPDATE outbox SET status = 'sent', attempts = attempts + 1, sent_at = now() WHERE id = %s", (rid,)
    )
    await _mark_voicemail(conn, row["voicemail_id"], "notified")
    log.info("mail %s sent to %s", rid, row["to_addr"])
    return "sent"


async def _mark_voicemail(conn, voicemail_id: int | None, status: str) -> None:
    if voicemail_id is not None:
        await conn.execute("UPDATE voicemails SET status = %s WHERE id = %s", (status, voicemail_id))


async def run_forever(pool: AsyncConnectionPool, config: Config | MailConfig, interval: float = 5.0) -> None:
    """Deliver due mail every `interval` seconds until cancelled; a database outage is logged and waited out."""
    mail = config.mail if isinstance(config, Config) else config
    pruner = Pruner(pool, "outbox", mail.keep_sent_days)
    while True:
        try:
            await deliver_due(pool, mail)
            await pruner.maybe()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            log.error("outbox: database unavailable (%s); trying again in %g s", exc, interval)
        except Exception:
            log.exception("outbox delivery failed")
        await asyncio.sleep(interval)
