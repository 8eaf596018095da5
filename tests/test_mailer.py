"""The mail outbox against a real SMTP server (aiosmtpd) and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path

import psycopg
import pytest
from aiosmtpd.controller import Controller
from psycopg.rows import dict_row

from shopcall import db
from shopcall.config import MailConfig
from shopcall.mailer import MAX_BACKOFF_SECONDS, backoff_seconds, deliver_due, enqueue

WAV = Path(__file__).parent / "data" / "audio" / "callback_en_8k.wav"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sink:
    """An SMTP server on 127.0.0.1 that keeps what it receives; `refuse` maps an address to a reply."""

    def __init__(self, port: int, delay: float = 0.0) -> None:
        self.port = port
        self.delay = delay
        self.refuse: dict[str, str] = {}
        self.received: list[tuple[str, list[str], EmailMessage]] = []
        self._lock = threading.Lock()
        self.controller: Controller | None = None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.delay:
            await asyncio.sleep(self.delay)
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self._lock:
            self.received.append((envelope.mail_from, list(envelope.rcpt_tos), msg))
        return "250 OK queued"

    def start(self) -> Sink:
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


@pytest.fixture
def smtp() -> Iterator[Sink]:
    sink = Sink(free_port()).start()
    yield sink
    sink.stop()


def mail_config(port: int, **kw) -> MailConfig:
    return MailConfig(smtp_host="127.0.0.1", smtp_port=port, sender="shopcall@shop.example", timeout=5.0, **kw)


async def outbox(conn, id: int) -> dict:
    cur = await conn.execute("SELECT *, next_try_at - now() AS wait FROM outbox WHERE id = %s", (id,))
    row = await cur.fetchone()
    assert row is not None
    return row


async def test_mail_arrives_with_the_audio_and_cyrillic_intact(conn, pool, smtp, tmp_path):
    wav = tmp_path / "vm-1.wav"
    wav.write_bytes(WAV.read_bytes())
    subject = "Голосовое сообщение от +7 916 123-45-67"
    body = "Расшифровка:\nперезвоните мне, пожалуйста — заказ № 123"
    mid = await enqueue(conn, "owner@shop.example", subject, body, [wav])

    assert await deliver_due(pool, mail_config(smtp.port)) == (1, 0)

    [(sender, rcpts, msg)] = smtp.received
    assert sender == "shopcall@shop.example" and rcpts == ["owner@shop.example"]
    assert msg["Subject"] == subject
    assert msg.get_body(("plain",)).get_content().rstrip("\n") == body
    [part] = list(msg.iter_attachments())
    assert part.get_content_type() == "audio/wav"
    assert part.get_filename() == "vm-1.wav"
    assert part.get_content() == WAV.read_bytes()
    assert msg["Message-ID"].startswith(f"<outbox-{mid}.")
    row = await outbox(conn, mid)
    assert row["status"] == "sent" and row["sent_at"] is not None and row["attempts"] == 1
    assert row["last_error"] is None
    # nothing left to send
    assert await deliver_due(pool, mail_config(smtp.port)) == (0, 0)
    assert len(smtp.received) == 1


async def test_smtp_down_keeps_the_mail_and_sends_it_once_when_back(conn, pool, tmp_path):
    port = free_port()  # nothing listens here yet
    config = mail_config(port, retry_seconds=60)
    mid = await enqueue(conn, "owner@shop.example", "Тест", "тело", [WAV])

    assert await deliver_due(pool, config) == (0, 1)
    row = await outbox(conn, mid)
    assert row["status"] == "pending" and row["attempts"] == 1 and row["sent_at"] is None
    assert "refused" in row["last_error"].lower()
    assert timedelta(seconds=55) < row["wait"] <= timedelta(seconds=60)

    sink = Sink(port).start()
    try:
        # back up, but the retry is not due yet: nothing is sent early
        assert await deliver_due(pool, config) == (0, 0)
        assert sink.received == []
        await conn.execute("UPDATE outbox SET next_try_at = now() WHERE id = %s", (mid,))  # time passes
        assert await deliver_due(pool, config) == (1, 0)
        assert await deliver_due(pool, config) == (0, 0)
        assert len(sink.received) == 1
        assert sink.received[0][2]["Subject"] == "Тест"
    finally:
        sink.stop()
    row = await outbox(conn, mid)
    assert row["status"] == "sent" and row["attempts"] == 2
    assert "refused" in row["last_error"].lower()  # the history of the failed try stays visible


async def test_retries_back_off_exponentially(conn, pool):
    config = mail_config(free_port(), retry_seconds=10)
    mid = await enqueue(conn, "owner@shop.example", "s", "b")
    for attempt, expected in ((1, 10), (2, 20), (3, 40)):
        await conn.execute("UPDATE outbox SET next_try_at = now() WHERE id = %s", (mid,))
        assert await deliver_due(pool, config) == (0, 1)
        row = await outbox(conn, mid)
        assert row["attempts"] == attempt
        assert timedelta(seconds=expected - 5) < row["wait"] <= timedelta(seconds=expected)


def test_backoff_is_capped():
    assert [backoff_seconds(60, n) for n in (1, 2, 3)] == [60, 120, 240]
    assert backoff_seconds(60, 40) == MAX_BACKOFF_SECONDS
    assert backoff_seconds(7200, 5) == 7200  # a retry interval above the cap is kept as configured


async def test_one_server_failure_does_not_spend_the_whole_queue(conn, pool):
    """With the server down the first mail fails and the others wait for the next round, untouched."""
    config = mail_config(free_port())
    ids = [await enqueue(conn, "owner@shop.example", f"m{i}", "b") for i in range(5)]
    assert await deliver_due(pool, config) == (0, 1)
    cur = await conn.execute("SELECT count(*) AS n FROM outbox WHERE attempts = 0 AND status = 'pending'")
    assert (await cur.fetchone())["n"] == 4
    assert ids


@pytest.fixture
async def own_db(pg_url: str) -> AsyncIterator[str]:
    """A database of this test's own on the test server. Every `shopcall serve` runs a mail sender, and in
    full CI runs (twice in this stop) something on the shared database claimed rows this test counts."""
    name = f"mail_two_senders_{os.getpid()}"
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
        await admin.execute(f"DROP DATABASE IF EXISTS {name}")
        await admin.execute(f"CREATE DATABASE {name}")
    url = psycopg.conninfo.make_conninfo(pg_url, dbname=name)
    await db.migrate_url(url)
    try:
        yield url
    finally:
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_two_senders_never_send_a_mail_twice(own_db, tmp_path):
    sink = Sink(free_port(), delay=0.05).start()  # slow server: both senders are busy at the same time
    n = 12
    conn = await psycopg.AsyncConnection.connect(own_db, autocommit=True, row_factory=dict_row)
    try:
        for i in range(n):
            await enqueue(conn, f"owner{i}@shop.example", f"сообщение {i}", "b", [WAV])
        config = mail_config(sink.port)
        # two pools stand for two shopcall processes
        async with db.open_pool(own_db, min_size=1, max_size=2) as p1, \
                db.open_pool(own_db, min_size=1, max_size=2) as p2:
            (s1, f1), (s2, f2) = await asyncio.gather(deliver_due(p1, config), deliver_due(p2, config))
        assert (f1, f2) == (0, 0)
        assert s1 + s2 == n
        assert s1 > 0 and s2 > 0, "the two senders did not overlap; the test proves nothing"
        subjects = [msg["Subject"] for _, _, msg in sink.received]
        assert sorted(subjects) == sorted(f"сообщение {i}" for i in range(n))
        ids = [msg["Message-ID"] for _, _, msg in sink.received]
        assert len(set(ids)) == n
        cur = await conn.execute("SELECT count(*) AS n FROM outbox WHERE status = 'sent' AND attempts = 1")
        assert (await cur.fetchone())["n"] == n
    finally:
        sink.stop()
        await conn.close()


async def test_permanent_refusal_is_failed_and_the_rest_still_go(conn, pool, smtp):
    smtp.refuse["gone@shop.example"] = "550 5.1.1 no such user"
    bad = await enqueue(conn, "gone@shop.example", "s", "b")
    good = await enqueue(conn, "owner@shop.example", "s", "b")
    assert await deliver_due(pool, mail_config(smtp.port)) == (1, 1)
    assert (await outbox(conn, bad))["status"] == "failed"
    assert "550" in (await outbox(conn, bad))["last_error"]
    assert (await outbox(conn, good))["status"] == "sent"
    assert await deliver_due(pool, mail_config(smtp.port)) == (0, 0)  # not retried


async def test_temporary_refusal_is_retried(conn, pool, smtp):
    smtp.refuse["full@shop.example"] = "452 4.2.2 mailbox full"
    mid = await enqueue(conn, "full@shop.example", "s", "b")
    assert await deliver_due(pool, mail_config(smtp.port)) == (0, 1)
    row = await outbox(conn, mid)
    assert row["status"] == "pending" and "452" in row["last_error"]
    del smtp.refuse["full@shop.example"]
    await conn.execute("UPDATE outbox SET next_try_at = now()")
    assert await deliver_due(pool, mail_config(smtp.port)) == (1, 0)


async def test_missing_attachment_still_sends_the_notice(conn, pool, smtp, tmp_path):
    gone = tmp_path / "purged.wav"
    await enqueue(conn, "owner@shop.example", "s", "тело", [gone])
    assert await deliver_due(pool, mail_config(smtp.port)) == (1, 0)
    msg = smtp.received[0][2]
    assert list(msg.iter_attachments()) == []
    assert "вложение не найдено" in msg.get_body(("plain",)).get_content()


async def test_enqueue_joins_the_callers_transaction(conn):
    try:
        async with conn.transaction():
            await enqueue(conn, "owner@shop.example", "s", "b")
            raise RuntimeError("rolled back")
    except RuntimeError:
        pass
    cur = await conn.execute("SELECT count(*) AS n FROM outbox")
    assert (await cur.fetchone())["n"] == 0


async def test_unbuildable_mail_is_failed_not_retried_forever(conn, pool, smtp):
    mid = await enqueue(conn, "owner@shop.example\nBcc: x@evil.example", "s", "b")
    ok = await enqueue(conn, "owner@shop.example", "Тема\r\nс переводом строки", "b")
    assert await deliver_due(pool, mail_config(smtp.port)) == (1, 1)
    row = await outbox(conn, mid)
    assert row["status"] == "failed" and "cannot build" in row["last_error"]
    assert (await outbox(conn, ok))["status"] == "sent"
    assert smtp.received[0][2]["Subject"] == "Тема с переводом строки"
