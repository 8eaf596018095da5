"""The webhook outbox against a real aiohttp server on 127.0.0.1 and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from shopcall.config import WebhooksConfig
from shopcall.webhooks import backoff_seconds, configured_kinds, encode, enqueue, run_forever, send_due, sign

SECRET = "shop-secret"
CONFIG = WebhooksConfig(secret=SECRET, timeout=2.0, max_backoff_seconds=3600)


class Shop:
    """The shop's endpoint: records every request; `statuses` is the reply to each next request."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        self.delay = 0.0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="boom: database is on fire" if status >= 500 else "ok")

    async def start(self) -> Shop:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self


@pytest.fixture
async def shop() -> AsyncIterator[Shop]:
    server = await Shop().start()
    yield server
    assert server.runner is not None
    await server.runner.cleanup()


async def outbox(conn) -> list[dict]:
    cur = await conn.execute("SELECT * FROM webhook_outbox ORDER BY id")
    return await cur.fetchall()


async def make_due(conn) -> None:
    await conn.execute("UPDATE webhook_outbox SET next_try_at = now() WHERE status = 'pending'")


async def test_delivered_signed_with_the_exact_body(conn, pool, shop):
    body = {"job_id": 7, "result": "yes", "phone": "+79161234567", "nested": {"b": 1, "a": [1, 2]}}
    rid = await enqueue(conn, "result", shop.url, body, dedupe_key="attempt:1")
    assert rid is not None
    assert await send_due(pool, CONFIG) == 1
    [(headers, raw)] = shop.requests
    assert raw == encode(body) == json.dumps(body, ensure_ascii=False, separators=(",", ":"),
                                              sort_keys=True).encode()
    expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    assert headers["X-Shopcall-Signature"] == expected == sign(SECRET, raw)
    assert headers["X-Shopcall-Delivery"] == str(rid)
    assert headers["X-Shopcall-Kind"] == "result"
    assert headers["Content-Type"] == "application/json"
    assert json.loads(raw) == body
    [row] = await outbox(conn)
    assert row["status"] == "sent" and row["sent_at"] is not None and row["attempts"] == 1
    assert await send_due(pool, CONFIG) == 0  # nothing left
    assert len(shop.requests) == 1


async def test_a_500_is_retried_until_a_200(conn, pool, shop):
    shop.statuses = [500, 200]
    await enqueue(conn, "message", shop.url, {"text": "hi"})
    assert await send_due(pool, CONFIG) == 0
    [row] = await outbox(conn)
    assert row["status"] == "pending" and row["attempts"] == 1
    assert row["last_error"].startswith("HTTP 500") and "database is on fire" in row["last_error"]
    wait = (row["next_try_at"] - row["created_at"]).total_seconds()
    assert 4 <= wait <= 7  # the first back-off is 5 s ± 10%
    assert await send_due(pool, CONFIG) == 0  # not due yet
    await make_due(conn)
    assert await send_due(pool, CONFIG) == 1
    [row] = await outbox(conn)
    assert row["status"] == "sent" and row["attempts"] == 2
    assert len(shop.requests) == 2
    assert shop.requests[0][1] == shop.requests[1][1]  # the same bytes, the same signature
    assert shop.requests[0][0]["X-Shopcall-Signature"] == shop.requests[1][0]["X-Shopcall-Signature"]


async def test_server_not_listening_stays_pending(conn, pool):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    await enqueue(conn, "result", f"http://127.0.0.1:{port}/hook", {"x": 1})
    for _ in range(3):
        assert await send_due(pool, CONFIG) == 0
        await make_due(conn)
    [row] = await outbox(conn)
    assert row["status"] == "pending" and row["attempts"] == 3 and row["sent_at"] is None
    assert "connect" in row["last_error"].lower()


async def test_timeout_is_an_error_and_retried(conn, pool, shop):
    shop.delay = 1.0
    await enqueue(conn, "result", shop.url, {"x": 1})
    assert await send_due(pool, WebhooksConfig(secret=SECRET, timeout=0.2)) == 0
    [row] = await outbox(conn)
    assert row["status"] == "pending" and row["attempts"] == 1 and "timed out" in row["last_error"]


async def test_duplicate_dedupe_key_is_one_row(conn, pool):
    first = await enqueue(conn, "result", "http://shop.example/hook", {"a": 1}, dedupe_key="attempt:17")
    again = await enqueue(conn, "result", "http://shop.example/hook", {"a": 2}, dedupe_key="attempt:17")
    assert first is not None and again is None
    assert await enqueue(conn, "result", "http://shop.example/hook", {"a": 3}) is not None  # no key: no dedupe
    assert [r["body"] for r in await outbox(conn)] == [{"a": 1}, {"a": 3}]


async def test_enqueue_commits_with_the_callers_transaction(conn):
    with pytest.raises(RuntimeError):
        async with conn.transaction():
            await enqueue(conn, "result", "http://shop.example/hook", {"a": 1})
            raise RuntimeError("the settlement failed")
    assert await outbox(conn) == []
    with pytest.raises(ValueError, match="kind"):
        await enqueue(conn, "sms", "http://shop.example/hook", {})


async def test_concurrent_senders_deliver_each_row_once(conn, pool, shop):
    shop.delay = 0.05  # long enough for the senders to overlap
    for i in range(30):
        await enqueue(conn, "result", shop.url, {"n": i})
    delivered = await asyncio.gather(*(send_due(pool, CONFIG, limit=7) for _ in range(4)))
    while sum(delivered) < 30:  # what the first round left (limit 4 x 7 < 30)
        more = await asyncio.gather(*(send_due(pool, CONFIG, limit=7) for _ in range(4)))
        assert sum(more) > 0
        delivered += more
    ids = [h["X-Shopcall-Delivery"] for h, _ in shop.requests]
    assert len(ids) == len(set(ids)) == 30
    assert sorted(json.loads(body)["n"] for _, body in shop.requests) == list(range(30))
    assert {r["status"] for r in await outbox(conn)} == {"sent"}


async def test_cyrillic_survives(conn, pool, shop):
    body = {"text": "Ваш заказ №881 готов к выдаче", "name": "Иван Петров"}
    await enqueue(conn, "message", shop.url, body)
    assert await send_due(pool, CONFIG) == 1
    [(headers, raw)] = shop.requests
    assert "Ваш заказ".encode() in raw  # UTF-8 on the wire, not \u escapes
    assert json.loads(raw.decode("utf-8")) == body
    assert headers["X-Shopcall-Signature"] == sign(SECRET, raw)


async def test_no_secret_no_signature(conn, pool, shop):
    await enqueue(conn, "result", shop.url, {"x": 1})
    assert await send_due(pool, WebhooksConfig(secret="")) == 1
    [(headers, _)] = shop.requests
    assert "X-Shopcall-Signature" not in headers


async def test_run_forever_delivers_and_survives_errors(conn, pool, shop):
    shop.statuses = [503]
    await enqueue(conn, "result", shop.url, {"x": 1})
    task = asyncio.create_task(run_forever(pool, WebhooksConfig(results_url=shop.url, secret=SECRET,
                                                                 poll_seconds=0.05)))
    try:
        for _ in range(100):
            await asyncio.sleep(0.05)
            rows = await outbox(conn)
            if rows[0]["attempts"] == 1:
                break
        assert rows[0]["status"] == "pending" and "HTTP 503" in rows[0]["last_error"]
        await make_due(conn)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if (await outbox(conn))[0]["status"] == "sent":
                break
        assert (await outbox(conn))[0]["status"] == "sent"
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_backoff_grows_is_capped_and_jittered():
    assert 4.5 <= backoff_seconds(1, 3600) <= 5.5
    assert 9 <= backoff_seconds(2, 3600) <= 11
    assert 54 <= backoff_seconds(50, 60) <= 66
    assert len({backoff_seconds(3, 3600) for _ in range(20)}) > 1


async def test_a_process_posts_only_the_kinds_it_has_a_url_for(conn, pool, shop):
    """A box configured with the CRM's URL alone leaves the robot's results to the processes that know the
    results URL (and its secret); it would otherwise sign them with its own."""
    await enqueue(conn, "result", shop.url, {"r": 1})
    await enqueue(conn, "call", shop.url, {"c": 1})
    crm_only = WebhooksConfig(calls_url=shop.url, secret=SECRET, poll_seconds=0.05)
    assert configured_kinds(crm_only) == ("call",)
    assert configured_kinds(WebhooksConfig()) == ()
    task = asyncio.create_task(run_forever(pool, crm_only))
    try:
        for _ in range(100):
            await asyncio.sleep(0.05)
            if len(shop.requests) >= 1:
                break
        await asyncio.sleep(0.2)  # another poll or two: the result row must still be left alone
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [json.loads(body) for _, body in shop.requests] == [{"c": 1}]
    assert {r["kind"]: r["status"] for r in await outbox(conn)} == {"result": "pending", "call": "sent"}
    assert await send_due(pool, CONFIG, kinds=("result",)) == 1
