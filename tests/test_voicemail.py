"""A recorded message end to end below the PBX: row, transcript, owner's e-mail over real SMTP."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shopcall import db
from shopcall.calllog import CallLog, CallRecord
from shopcall.config import Config, MailConfig, PathsConfig, ShopConfig, VoicemailConfig
from shopcall.mailer import deliver_due
from shopcall.transcribe import Transcript
from shopcall.voicemail import Message, display_phone, replay_spool, spool_path, store_voicemail
from tests.test_mailer import Sink, free_port

WAV = Path(__file__).parent / "data" / "audio" / "callback_en_8k.wav"


def config(transcriber: str = "none", port: int = 25, data_dir: Path = Path("/nonexistent")) -> Config:
    return Config(
        paths=PathsConfig(data_dir=data_dir),
        shop=ShopConfig(timezone="Asia/Yekaterinburg"),
        voicemail=VoicemailConfig(transcriber=transcriber, min_seconds=1.0),
        mail=MailConfig(smtp_host="127.0.0.1", smtp_port=port, sender="pbx@shop.example", timeout=5.0),
    )


@pytest.fixture
def smtp() -> Iterator[Sink]:
    sink = Sink(free_port()).start()
    yield sink
    sink.stop()


@pytest.fixture
async def shop(conn):
    """sales: owner with e-mail; delivery: owner without; support: no owner."""
    cur = await conn.execute(
        """INSERT INTO employees (name, endpoint, email) VALUES
             ('Анна Смирнова', 'anna', 'anna@shop.example'), ('Борис', 'boris', NULL) RETURNING id"""
    )
    anna, boris = [r["id"] for r in await cur.fetchall()]
    await conn.execute(
        """INSERT INTO groups (name, title, owner_employee_id) VALUES
             ('sales', 'Продажи', %s), ('delivery', 'Доставка', %s), ('support', 'Поддержка', NULL)""",
        (anna, boris),
    )
    return {"anna": anna, "boris": boris}


@pytest.fixture
def message(tmp_path) -> Path:
    path = tmp_path / "spool" / "vm-1700000000.1.wav"
    path.parent.mkdir()
    shutil.copy(WAV, path)
    return path


async def voicemail(conn, vm_id: int) -> dict:
    cur = await conn.execute("SELECT * FROM voicemails WHERE id = %s", (vm_id,))
    row = await cur.fetchone()
    assert row is not None
    return row


async def outbox_rows(conn) -> list[dict]:
    cur = await conn.execute("SELECT * FROM outbox ORDER BY id")
    return await cur.fetchall()


async def test_message_is_transcribed_stored_and_mailed_to_the_owner(conn, pool, shop, smtp, message):
    cfg = config("pocketsphinx", smtp.port)
    vm_id = await store_voicemail(
        pool, call_uniqueid="1700000000.1", caller_number="89161234567", caller_name="Иван Петров",
        group_name="sales", path=message, seconds=4.0, config=cfg,
    )
    assert vm_id is not None
    row = await voicemail(conn, vm_id)
    assert row["caller_e164"] == "+79161234567" and row["caller_name"] == "Иван Петров"
    assert row["employee_id"] == shop["anna"] and row["path"] == str(message)
    assert row["transcript_engine"] == "pocketsphinx" and row["transcript_error"] is None
    assert {"my", "order"} & set(row["transcript"].split())  # see test_transcribe for why only these
    assert row["status"] == "queued"

    assert await deliver_due(pool, cfg.mail) == (1, 0)
    [(_, rcpts, msg)] = smtp.received
    assert rcpts == ["anna@shop.example"]
    assert msg["Subject"] == "Голосовое сообщение от +7 916 123-45-67 (Иван Петров)"
    body = msg.get_body(("plain",)).get_content()
    assert "От: Иван Петров, +7 916 123-45-67" in body
    assert "«Продажи» (sales)" in body
    assert "Длительность: 0:04" in body
    assert row["transcript"] in body
    assert "Asia/Yekaterinburg" in body
    local = row["created_at"].astimezone(cfg.shop.tzinfo)
    assert f"{local:%d.%m.%Y %H:%M}" in body
    [part] = msg.iter_attachments()
    assert part.get_content_type() == "audio/wav" and part.get_filename() == message.name
    assert part.get_content() == WAV.read_bytes()
    assert (await voicemail(conn, vm_id))["status"] == "notified"


async def test_short_message_is_dropped_with_its_file(conn, pool, shop, message, caplog):
    caplog.set_level("INFO", logger="shopcall.voicemail")
    vm_id = await store_voicemail(
        pool, call_uniqueid="1.2", caller_number="89161234567", group_name="sales", path=message,
        seconds=0.5, config=config(),
    )
    assert vm_id is None
    assert not message.exists()
    assert "dropped" in caplog.text and "0.5 s" in caplog.text
    cur = await conn.execute("SELECT count(*) AS n FROM voicemails")
    assert (await cur.fetchone())["n"] == 0
    assert await outbox_rows(conn) == []


async def test_corrupt_audio_is_kept_and_the_owner_still_told(conn, pool, shop, smtp, tmp_path):
    bad = tmp_path / "vm-bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage" * 100)
    cfg = config("pocketsphinx", smtp.port)
    vm_id = await store_voicemail(
        pool, call_uniqueid="1.3", caller_number="+79161234567", group_name="sales", path=bad,
        seconds=12.0, config=cfg,
    )
    assert vm_id is not None
    row = await voicemail(conn, vm_id)
    assert row["transcript"] is None
    assert "corrupt" in row["transcript_error"]
    assert await deliver_due(pool, cfg.mail) == (1, 0)
    msg = smtp.received[0][2]
    body = msg.get_body(("plain",)).get_content()
    assert "Расшифровки нет:" in body and "corrupt" in body
    assert [p.get_filename() for p in msg.iter_attachments()] == ["vm-bad.wav"]


@pytest.mark.parametrize(
    "group, status", [("delivery", "no_email"), ("support", "no_owner"), ("nonexistent", "no_group")]
)
async def test_nobody_to_tell_keeps_the_row_without_mail(conn, pool, shop, message, group, status, caplog):
    vm_id = await store_voicemail(
        pool, call_uniqueid="1.4", caller_number="89161234567", group_name=group, path=message,
        seconds=3.0, config=config(),
    )
    assert vm_id is not None
    row = await voicemail(conn, vm_id)
    assert row["status"] == status and row["group_name"] == group
    assert message.exists()
    assert await outbox_rows(conn) == []
    assert "without a notice" in caplog.text


async def test_transcription_off_says_so_in_the_mail(conn, pool, shop, message):
    await store_voicemail(
        pool, call_uniqueid="1.5", caller_number="anonymous", group_name="sales", path=message,
        seconds=3.0, config=config("none"),
    )
    [mail] = await outbox_rows(conn)
    assert mail["subject"] == "Голосовое сообщение со скрытого номера"
    assert "отключена" in mail["body"]
    assert mail["attachments"] == [str(message)]


async def test_mail_server_down_the_notice_waits(conn, pool, shop, message):
    cfg = config("none", free_port())
    vm_id = await store_voicemail(
        pool, call_uniqueid="1.6", caller_number="89161234567", group_name="sales", path=message,
        seconds=3.0, config=cfg,
    )
    assert await deliver_due(pool, cfg.mail) == (0, 1)
    [mail] = await outbox_rows(conn)
    assert mail["status"] == "pending" and mail["last_error"] and mail["voicemail_id"] == vm_id
    assert (await voicemail(conn, vm_id))["status"] == "queued"
    sink = Sink(cfg.mail.smtp_port).start()
    try:
        await conn.execute("UPDATE outbox SET next_try_at = now()")
        assert await deliver_due(pool, cfg.mail) == (1, 0)
    finally:
        sink.stop()
    assert len(sink.received) == 1
    assert (await voicemail(conn, vm_id))["status"] == "notified"


async def test_call_row_written_later_is_linked(conn, pool, shop, message, tmp_path):
    vm_id = await store_voicemail(
        pool, call_uniqueid="1700000000.7", caller_number="89161234567", group_name="sales", path=message,
        seconds=3.0, config=config(),
    )
    assert (await voicemail(conn, vm_id))["call_id"] is None
    rec = CallRecord(uniqueid="1700000000.7", pbx="asterisk", caller_number="89161234567", caller_name="",
                     dialled_number="100", caller_e164="+79161234567", group_name="sales",
                     ended_at=datetime.now(UTC), outcome="after_hours")
    assert await CallLog(pool, tmp_path).save(rec)
    cur = await conn.execute("SELECT id FROM calls WHERE uniqueid = '1700000000.7'")
    call_id = (await cur.fetchone())["id"]
    assert (await voicemail(conn, vm_id))["call_id"] == call_id


def test_display_phone():
    assert display_phone("+79161234567", "89161234567") == "+7 916 123-45-67"
    assert display_phone(None, "") == "скрытый номер"
    assert display_phone(None, "Anonymous") == "скрытый номер"
    assert display_phone(None, "101") == "101"


async def test_caller_name_with_control_characters_cannot_break_the_mail(conn, pool, shop, smtp, message):
    cfg = config("none", smtp.port)
    await store_voicemail(
        pool, call_uniqueid="1.8", caller_number="89161234567", caller_name="Eve\r\nBcc: all@shop.example",
        group_name="sales", path=message, seconds=3.0, config=cfg,
    )
    assert await deliver_due(pool, cfg.mail) == (1, 0)
    [(_, rcpts, msg)] = smtp.received
    assert rcpts == ["anna@shop.example"] and msg["Bcc"] is None
    assert msg["Subject"] == "Голосовое сообщение от +7 916 123-45-67 (Eve Bcc: all@shop.example)"


async def test_database_down_spools_the_message_and_replay_stores_it_once(conn, pool, shop, message, tmp_path):
    cfg = config("pocketsphinx", data_dir=tmp_path / "data")
    async with db.open_pool("postgresql://127.0.0.1:1/none", min_size=1, timeout=0.5) as dead:
        vm_id = await store_voicemail(
            dead, call_uniqueid="1.9", caller_number="89161234567", caller_name="Иван", group_name="sales",
            path=message, seconds=4.0, config=cfg,
        )
        assert vm_id is None
        assert await replay_spool(dead, cfg) == 0  # still down: kept
    spool = spool_path(cfg)
    assert len(spool.read_text(encoding="utf-8").splitlines()) == 1
    assert message.exists()

    assert await replay_spool(pool, cfg) == 1
    assert spool.read_text(encoding="utf-8") == ""
    cur = await conn.execute("SELECT * FROM voicemails")
    [row] = await cur.fetchall()
    assert row["path"] == str(message) and row["caller_name"] == "Иван" and row["status"] == "queued"
    assert {"my", "order"} & set(row["transcript"].split())  # transcribed before the database was needed
    [mail] = await outbox_rows(conn)
    assert mail["to_addr"] == "anna@shop.example" and mail["voicemail_id"] == row["id"]

    # a replay that died before emptying the spool runs again: nothing is stored or mailed twice
    again = Message(call_uniqueid="1.9", caller_number="89161234567", caller_name="Иван",
                    caller_e164="+79161234567", group_name="sales", path=str(message), seconds=4.0,
                    created_at=datetime.now(UTC), transcript=Transcript("x", "pocketsphinx", 1.0))
    spool.write_text(again.to_json() + "\n", encoding="utf-8")
    assert await replay_spool(pool, cfg) == 0
    assert len(await outbox_rows(conn)) == 1
    assert spool.read_text(encoding="utf-8") == ""

