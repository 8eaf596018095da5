"""Sent rows of the mail outbox and the webhook outbox are deleted after keep_sent_days; rows still to
deliver and mail refused for good stay. Against a real PostgreSQL."""

from __future__ import annotations

import pytest

from shopcall import outboxes
from shopcall.config import Config
from shopcall.outboxes import Pruner, prune_sent


async def seed(conn) -> None:
    for status, sent_days_ago in (("sent", 40), ("sent", 5), ("pending", None), ("failed", None)):
        sent = f"now() - interval '{sent_days_ago} days'" if sent_days_ago else "NULL"
        await conn.execute(
            f"INSERT INTO outbox (to_addr, subject, body, status, sent_at, created_at) "
            f"VALUES ('a@example.org', %s, '', %s, {sent}, now() - interval '60 days')", (status, status))
        if status != "failed":  # webhook rows are pending or sent
            await conn.execute(
                f"INSERT INTO webhook_outbox (kind, url, body, status, sent_at, created_at) "
                f"VALUES ('result', 'http://shop.example/hook', '{{}}', %s, {sent}, now() - interval '60 days')",
                (status,))


async def left(conn, table: str) -> list[tuple]:
    cur = await conn.execute(
        f"SELECT status, round(extract(epoch FROM now() - sent_at) / 86400) FROM {table} ORDER BY id")
    return [tuple(r.values()) for r in await cur.fetchall()]  # conn has dict rows


async def test_sent_rows_older_than_the_setting_go_the_rest_stay(conn, pool):
    await conn.execute("TRUNCATE outbox, webhook_outbox RESTART IDENTITY CASCADE")
    await seed(conn)
    assert await prune_sent(pool, "outbox", 30) == 1
    assert await prune_sent(pool, "webhook_outbox", 30) == 1
    assert await left(conn, "outbox") == [("sent", 5), ("pending", None), ("failed", None)]
    assert await left(conn, "webhook_outbox") == [("sent", 5), ("pending", None)]
    assert await prune_sent(pool, "outbox", 30) == 0  # again: nothing more
    assert await prune_sent(pool, "webhook_outbox", 3) == 1  # a shorter setting takes the 5-day-old row


async def test_only_the_outboxes_can_be_pruned(pool):
    with pytest.raises(ValueError, match="not an outbox"):
        await prune_sent(pool, "calls", 1)


async def test_the_pruner_runs_at_most_once_an_hour(conn, pool, monkeypatch):
    await conn.execute("TRUNCATE outbox, webhook_outbox RESTART IDENTITY CASCADE")
    clock = [1000.0]
    monkeypatch.setattr(outboxes.time, "monotonic", lambda: clock[0])
    pruner = Pruner(pool, "outbox", 30)
    await seed(conn)
    await pruner.maybe()
    assert len(await left(conn, "outbox")) == 3
    await seed(conn)
    clock[0] += 60
    await pruner.maybe()  # a minute later: not yet
    assert len(await left(conn, "outbox")) == 7
    clock[0] += outboxes.PRUNE_EVERY_SECONDS
    await pruner.maybe()
    assert len(await left(conn, "outbox")) == 6


def test_keep_sent_days_is_a_setting_of_both_senders():
    config = Config.default()
    assert (config.webhooks.keep_sent_days, config.mail.keep_sent_days) == (30, 30)
