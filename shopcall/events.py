"""What the shop tells us happened, turned into customers, orders, consents and robot-call jobs.

POST /api/v1/events takes one event: {"type": ..., "idempotency_key": ..., <fields>}. The event row and
everything it causes are written in one transaction, keyed by the idempotency key: the same event sent
twice (a retry after a timeout) changes nothing and gets the first answer back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from psycopg.types.json import Jsonb

from shopcall import campaigns
from shopcall.phone import to_e164

log = logging.getLogger("shopcall.events")

MAX_ITEMS = 200
MAX_TEXT = 500
PICKUP_STATUSES = ("at_pickup_point", "arrived_at_pickup_point")


class EventError(ValueError):
    def __init__(self, message: str, field: str | None = None, status: int = 422) -> None:
        super().__init__(message)
        self.field, self.status = field, status


# ----------------------------------------------------------------------------- field checks

Check = Callable[[Any, str, str], Any]  # (value, field name, region) -> clean value


def _text(value: Any, name: str, _region: str) -> str:
    if not isinstance(value, str):
        raise EventError(f"{name}: expected a string", name)
    value = value.strip()
    if not value or len(value) > MAX_TEXT:
        raise EventError(f"{name}: expected 1..{MAX_TEXT} characters", name)
    if any(not ch.isprintable() for ch in value):
        raise EventError(f"{name}: control characters are not allowed", name)
    return value


def _phone(value: Any, name: str, region: str) -> str:
    if not isinstance(value, str):
        raise EventError(f"{name}: expected a phone number as a string", name)
    e164 = to_e164(value, region)
    if e164 is None:
        raise EventError(f"{name}: not a phone number: {value[:40]!r} (E.164 such as +79161234567)", name)
    return e164


def _bool(value: Any, name: str, _region: str) -> bool:
    if not isinstance(value, bool):
        raise EventError(f"{name}: expected true or false", name)
    return value


MAX_AMOUNT = Decimal("1e10")  # the largest amount taken; orders.total (numeric(12, 2)) stays below it


def _money(value: Any, name: str, _region: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise EventError(f"{name}: expected an amount such as 990.00", name)
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise EventError(f"{name}: expected an amount such as 990.00", name) from None
    if not amount.is_finite() or amount < 0 or amount > MAX_AMOUNT:
        raise EventError(f"{name}: expected a non-negative amount", name)
    return amount.quantize(Decimal("0.01"))


def _date(value: Any, name: str, _region: str) -> str:
    try:
        return date.fromisoformat(value).isoformat() if isinstance(value, str) else _bad_date(name)
    except ValueError:
        return _bad_date(name)


def _bad_date(name: str):
    raise EventError(f"{name}: expected a date YYYY-MM-DD", name)


def _one_of(*choices: str) -> Check:
    def check(value: Any, name: str, _region: str) -> str:
        if value not in choices:
            raise EventError(f"{name}: expected one of {', '.join(choices)}", name)
        return value
    return check


def _language(value: Any, name: str, region: str) -> str:
    return _one_of("ru", "en")(value, name, region)


def _timezone(value: Any, name: str, region: str) -> str:
    from zoneinfo import ZoneInfo

    text = _text(value, name, region)
    try:
        ZoneInfo(text)
    except (ValueError, OSError, KeyError):
        raise EventError(f"{name}: unknown time zone {text[:40]!r}", name) from None
    return text


_ITEM_FIELDS: dict[str, tuple[Check, bool]] = {
    "sku": (_text, False), "name": (_text, True), "size": (_text, False), "category": (_text, False),
    "price": (_money, False), "qty": (lambda v, n, r: _count(v, n), False),
}


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10000:
        raise EventError(f"{name}: expected a whole number 1..10000", name)
    return value


def _items(value: Any, name: str, region: str) -> list[dict]:
    if not isinstance(value, list) or not value or len(value) > MAX_ITEMS:
        raise EventError(f"{name}: expected a list of 1..{MAX_ITEMS} items", name)
    return [_fields(item, _ITEM_FIELDS, region, f"{name}[{i}].") | {"qty": item.get("qty", 1)}
            for i, item in enumerate(value)]


def _fields(data: Any, spec: Mapping[str, tuple[Check, bool]], region: str, prefix: str = "") -> dict:
    if not isinstance(data, dict):
        raise EventError(f"{prefix.rstrip('.') or 'the body'}: expected a JSON object", prefix.rstrip(".") or None)
    unknown = sorted(set(data) - set(spec))
    if unknown:
        raise EventError(f"{prefix}{unknown[0]}: unknown field (allowed: {', '.join(sorted(spec))})",
                         prefix + unknown[0])
    out = {}
    for key, (check, required) in spec.items():
        if key not in data or data[key] is None:
            if required:
                raise EventError(f"{prefix}{key}: required", prefix + key)
            continue
        out[key] = check(data[key], prefix + key, region)
    return out


def _key(value: Any, name: str, region: str) -> str:
    text = _text(value, name, region)
    if len(text) > 200:
        raise EventError(f"{name}: at most 200 characters", name)
    return text


_COMMON = {"type": (_text, True), "idempotency_key": (_key, True)}
_CUSTOMER = {"phone": (_phone, True), "customer_name": (_text, False)}
SPECS: dict[str, dict[str, tuple[Check, bool]]] = {
    "cart_abandoned": {**_COMMON, **_CUSTOMER, "product": (_text, True), "cart_id": (_text, False),
                       "product_url": (_text, False)},
    "quote_sent": {**_COMMON, **_CUSTOMER, "product": (_text, True), "quote_id": (_text, False),
                   "product_url": (_text, False)},
    "order_created": {**_COMMON, **_CUSTOMER, "order_number": (_text, True), "items": (_items, True),
                      "total": (_money, False), "currency": (_one_of("RUB", "USD", "EUR"), False),
                      "delivery_date": (_date, False)},
    "stock_subscribed": {**_COMMON, **_CUSTOMER, "sku": (_text, True), "product_name": (_text, False),
                         "product_url": (_text, False)},
    "stock_arrived": {**_COMMON, "sku": (_text, True), "product_name": (_text, False),
                      "product_url": (_text, False)},
    "shipment_status": {**_COMMON, "order_number": (_text, True), "status": (_text, True),
                        "pickup_point": (_text, False), "keep_until": (_date, False),
                        "phone": (_phone, False)},
    "customer_consent": {**_COMMON, "phone": (_phone, True), "purpose": (_one_of("ad", "service"), True),
                         "granted": (_bool, True)},
    "customer_updated": {**_COMMON, **_CUSTOMER, "segment": (_text, False), "blacklisted": (_bool, False),
                         "email": (_text, False), "language": (_language, False),
                         "timezone": (_timezone, False), "do_not_call": (_bool, False)},
}


def validate(body: Any, region: str) -> dict:
    if not isinstance(body, dict):
        raise EventError("the body must be a JSON object with type and idempotency_key")
    kind = body.get("type")
    if not isinstance(kind, str) or kind not in SPECS:
        raise EventError(f"type: expected one of {', '.join(sorted(SPECS))}", "type")
    return _fields(body, SPECS[kind], region)


# ----------------------------------------------------------------------------- effects


@dataclass
class Outcome:
    duplicate: bool
    event_id: int
    result: dict


async def ingest(pool, body: Any, *, region: str, now: datetime) -> Outcome:
    """Validate and apply one event (EventError on bad input). A repeat returns the first result."""
    event = validate(body, region)
    payload = {k: v for k, v in event.items() if k not in ("type", "idempotency_key")}
    async with pool.connection() as conn, conn.transaction():
        row = await (await conn.execute(
            """INSERT INTO events (idempotency_key, type, payload) VALUES (%s, %s, %s)
               ON CONFLICT (idempotency_key) DO NOTHING RETURNING id""",
            (event["idempotency_key"], event["type"], Jsonb(payload, dumps=_dumps)))).fetchone()
        if row is None:
            first = await (await conn.execute(
                "SELECT id, type, result FROM events WHERE idempotency_key = %s",
                (event["idempotency_key"],))).fetchone()
            if first["type"] != event["type"]:
                raise EventError(f"idempotency_key: already used by a {first['type']} event", "idempotency_key",
                                 status=409)
            return Outcome(True, first["id"], first["result"])
        result = await HANDLERS[event["type"]](conn, row["id"], event, now)
        await conn.execute("UPDATE events SET result = %s WHERE id = %s", (Jsonb(result, dumps=_dumps), row["id"]))
    log.info("event %s %s: %s", event["type"], row["id"], result)
    return Outcome(False, row["id"], result)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


async def _customer(conn, phone: str, name: str | None = None) -> int:
    row = await (await conn.execute(
        """INSERT INTO customers (phone, name) VALUES (%s, COALESCE(%s, ''))
           ON CONFLICT (phone) DO UPDATE SET name = COALESCE(NULLIF(%s, ''), customers.name), updated_at = now()
           RETURNING id""", (phone, name, name))).fetchone()
    return row["id"]


async def _jobs(conn, scenario: str, event_id: int, phone: str, key: str, context: dict, due_at: datetime,
                **extra: Any) -> list[int]:
    made = []
    for campaign in await campaigns.for_scenario(conn, scenario):
        job = await campaigns.add_job(conn, campaign, phone, dedupe_key=f"{campaign.name}:{key}",
                                      context=context, due_at=due_at, event_id=event_id, **extra)
        if job is not None:
            made.append(job)
    return made


async def cancel_jobs(conn, phone: str, reason: str, *, purpose: str | None = None,
                  scenario: str | None = None) -> int:
    cur = await conn.execute(
        """UPDATE dial_jobs j SET status = 'cancelled', reason = %s, finished_at = now(), updated_at = now()
             FROM campaigns c
            WHERE c.name = j.campaign AND j.phone = %s AND j.status = 'pending'
              AND (%s::text IS NULL OR c.purpose = %s) AND (%s::text IS NULL OR c.scenario = %s)""",
        (reason, phone, purpose, purpose, scenario, scenario))
    return cur.rowcount


async def _cart(conn, event_id: int, ev: dict, now: datetime) -> dict:
    customer = await _customer(conn, ev["phone"], ev.get("customer_name"))
    made = []
    for campaign in await campaigns.for_scenario(conn, "cart_followup"):
        delay = timedelta(hours=float(campaign.settings.get("delay_hours", 72)))
        context = {"product": ev["product"], "discount_percent": campaign.settings.get("discount_percent", 25),
                   "cart_id": ev.get("cart_id") or ev.get("quote_id") or "", "source": ev["type"],
                   "product_url": ev.get("product_url", "")}
        # one follow-up per customer at a time: a second abandoned cart does not mean a second call
        job = await campaigns.add_job(conn, campaign, ev["phone"], dedupe_key=f"{campaign.name}:{ev['phone']}",
                                      context=context, due_at=now + delay, customer_id=customer,
                                      event_id=event_id)
        if job is not None:
            made.append(job)
    return {"jobs": made}


async def _order(conn, event_id: int, ev: dict, now: datetime) -> dict:
    customer = await _customer(conn, ev["phone"], ev.get("customer_name"))
    items = [{k: (str(v) if isinstance(v, Decimal) else v) for k, v in item.items()} for item in ev["items"]]
    total = ev.get("total")
    if total is None:
        total = sum((Decimal(i.get("price", "0")) * i.get("qty", 1) for i in items), Decimal("0.00"))
    if total >= MAX_AMOUNT:  # given, or prices times quantities: orders.total would overflow
        raise EventError(f"total: the order's amount must be below {MAX_AMOUNT:.0f}", "total")
    existing = await (await conn.execute("SELECT customer_id FROM orders WHERE number = %s",
                                         (ev["order_number"],))).fetchone()
    if existing and existing["customer_id"] not in (None, customer):
        raise EventError("order_number: this order belongs to another customer", "order_number", status=409)
    await conn.execute(
        """INSERT INTO orders (number, customer_id, status, items, total, currency, delivery_date)
           VALUES (%s, %s, 'new', %s, %s, %s, %s)
           ON CONFLICT (number) DO UPDATE SET items = EXCLUDED.items, total = EXCLUDED.total,
               currency = EXCLUDED.currency, delivery_date = EXCLUDED.delivery_date, updated_at = now()""",
        (ev["order_number"], customer, Jsonb(items), total, ev.get("currency", "RUB"), ev.get("delivery_date")))
    cancelled = await cancel_jobs(conn, ev["phone"], "ordered", scenario="cart_followup")
    context = {"order_number": ev["order_number"]}
    made = await _jobs(conn, "order_confirmation", event_id, ev["phone"], ev["order_number"], context, now,
                       customer_id=customer, order_number=ev["order_number"])
    return {"jobs": made, "cart_followups_cancelled": cancelled}


async def _subscribe(conn, event_id: int, ev: dict, now: datetime) -> dict:
    await _customer(conn, ev["phone"], ev.get("customer_name"))
    await conn.execute(
        """INSERT INTO stock_subscriptions (phone, sku, product_name, product_url) VALUES (%s, %s, %s, %s)
           ON CONFLICT (phone, sku) DO UPDATE SET product_name = EXCLUDED.product_name,
               product_url = COALESCE(EXCLUDED.product_url, stock_subscriptions.product_url), notified_at = NULL""",
        (ev["phone"], ev["sku"], ev.get("product_name", ""), ev.get("product_url")))
    return {"subscribed": True}


async def _stock(conn, event_id: int, ev: dict, now: datetime) -> dict:
    subs = await (await conn.execute(
        """UPDATE stock_subscriptions SET notified_at = now() WHERE sku = %s AND notified_at IS NULL
           RETURNING phone, product_name, product_url""", (ev["sku"],))).fetchall()
    made = []
    for sub in subs:
        context = {"sku": ev["sku"], "product": ev.get("product_name") or sub["product_name"] or ev["sku"],
                   "product_url": ev.get("product_url") or sub["product_url"] or ""}
        customer = await _customer(conn, sub["phone"])
        made += await _jobs(conn, "back_in_stock", event_id, sub["phone"], f"{sub['phone']}:{ev['sku']}", context,
                            now, customer_id=customer, sku=ev["sku"])
    return {"subscribers": len(subs), "jobs": made}


async def _shipment(conn, event_id: int, ev: dict, now: datetime) -> dict:
    status = "at_pickup_point" if ev["status"] in PICKUP_STATUSES else ev["status"]
    order = await (await conn.execute(
        """UPDATE orders o SET status = %s, updated_at = now() WHERE number = %s
           RETURNING o.id, (SELECT phone FROM customers c WHERE c.id = o.customer_id) AS phone""",
        (status, ev["order_number"]))).fetchone()
    phone = (order and order["phone"]) or ev.get("phone")
    if order is None and phone is None:
        raise EventError("order_number: unknown order; send order_created first or give phone", "order_number")
    made: list[int] = []
    if status == "at_pickup_point":
        if not ev.get("pickup_point"):
            raise EventError("pickup_point: required when the order is at a pickup point", "pickup_point")
        context = {"order_number": ev["order_number"], "pickup_point": ev["pickup_point"],
                   "keep_until": ev.get("keep_until"), "status": status}
        made = await _jobs(conn, "delivery_status", event_id, phone, f"{ev['order_number']}:{status}", context,
                           now, order_number=ev["order_number"])
    return {"order_status": status, "jobs": made}


async def _consent(conn, event_id: int, ev: dict, now: datetime) -> dict:
    await conn.execute(
        """INSERT INTO consents (phone, purpose, granted, source) VALUES (%s, %s, %s, 'api')
           ON CONFLICT (phone, purpose) DO UPDATE SET granted = EXCLUDED.granted, source = 'api', updated_at = now()""",
        (ev["phone"], ev["purpose"], ev["granted"]))
    cancelled = 0 if ev["granted"] else await cancel_jobs(conn, ev["phone"], "consent_withdrawn", purpose=ev["purpose"])
    return {"consent": ev["purpose"], "granted": ev["granted"], "jobs_cancelled": cancelled}


async def _updated(conn, event_id: int, ev: dict, now: datetime) -> dict:
    customer = await _customer(conn, ev["phone"], ev.get("customer_name"))
    fields = {k: ev[k] for k in ("segment", "blacklisted", "email", "language", "timezone") if k in ev}
    if fields:
        sets = ", ".join(f"{k} = %({k})s" for k in fields)  # keys from the fixed list above, never the body
        await conn.execute(f"UPDATE customers SET {sets}, updated_at = now() WHERE id = %(id)s",
                           {**fields, "id": customer})
    cancelled = 0
    if ev.get("blacklisted"):
        cancelled = await cancel_jobs(conn, ev["phone"], "blacklisted")
    if "do_not_call" in ev:
        cancelled += await set_do_not_call(conn, ev["phone"], ev["do_not_call"], source="api")
    return {"customer": customer, "updated": sorted(fields), "jobs_cancelled": cancelled}


async def set_do_not_call(conn, phone: str, on: bool, *, source: str, job_id: int | None = None) -> int:
    """Put a number on the do-not-call list (its pending robot calls are cancelled at once; the dialler
    checks the list again before every dial) or take it off. Returns the jobs cancelled."""
    if not on:
        await conn.execute("DELETE FROM do_not_call WHERE phone = %s", (phone,))
        return 0
    await conn.execute(
        "INSERT INTO do_not_call (phone, source, job_id) VALUES (%s, %s, %s) ON CONFLICT (phone) DO NOTHING",
        (phone, source, job_id))
    return await cancel_jobs(conn, phone, "dnc")


HANDLERS = {
    "cart_abandoned": _cart, "quote_sent": _cart, "order_created": _order, "stock_subscribed": _subscribe,
    "stock_arrived": _stock, "shipment_status": _shipment, "customer_consent": _consent,
    "customer_updated": _updated,
}
