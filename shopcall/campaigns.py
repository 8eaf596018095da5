"""Campaigns and the rules every robot call obeys: whom we may call (do-not-call, blacklist, consent), when
(the calling window in the callee's own time zone), and how often (attempt caps, offers per year).

The dialler asks `may_call` right before each dial, not when a job is made: a consent withdrawn or a 9
pressed in between must stop the next call.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from phonenumbers import timezone as phone_timezone

from shopcall import hours

log = logging.getLogger("shopcall.campaigns")



@dataclass(frozen=True)
class Campaign:
    name: str
    scenario: str
    purpose: str  # ad | service
    enabled: bool = True
    pbx: str = "asterisk"
    caller_id: str | None = None
    group_name: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    max_concurrent: int = 5
    calls_per_second: float = 2.0
    max_attempts: int = 3
    max_attempts_per_day: int = 2
    retry_minutes: Mapping[str, float] = field(default_factory=dict)
    ring_seconds: int = 30
    amd: bool = False
    calling_window: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Campaign:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in row.items() if k in names})

    @functools.cached_property
    def window_weekly(self) -> dict[int, list[hours.Interval]]:
        return hours.parse_weekly(self.calling_window)

    def window(self, timezone: str) -> hours.Schedule:
        # holidays: the weekly window applies (a shop that does not call on holidays says so per date)
        return hours.Schedule(timezone=timezone, weekly=self.window_weekly, holiday_country=None)

    def retry_delay(self, outcome: str) -> timedelta | None:
        """None: this outcome ends the job (no retry configured for it)."""
        minutes = self.retry_minutes.get(outcome)
        return None if minutes is None else timedelta(minutes=float(minutes))


async def get(conn, name: str) -> Campaign | None:
    row = await (await conn.execute("SELECT * FROM campaigns WHERE name = %s", (name,))).fetchone()
    return Campaign.from_row(row) if row else None


async def for_scenario(conn, scenario: str) -> list[Campaign]:
    rows = await (await conn.execute(
        "SELECT * FROM campaigns WHERE scenario = %s AND enabled ORDER BY name", (scenario,))).fetchall()
    return [Campaign.from_row(r) for r in rows]


def callee_timezone(phone: str, customer_tz: str | None, fallback: str) -> str:
    """The customer's own zone if the shop gave one; else the number's, when the numbering plan tells a
    single zone (a Moscow landline does, a Russian mobile spans eleven); else the fallback zone."""
    if customer_tz:
        try:
            ZoneInfo(customer_tz)
            return customer_tz
        except (ZoneInfoNotFoundError, ValueError):
            log.warning("customer %s has an unknown time zone %r", phone, customer_tz)
    try:
        zones = phone_timezone.time_zones_for_number(phonenumbers.parse(phone))
    except phonenumbers.NumberParseException:
        zones = ()
    zones = tuple(z for z in zones if z != phone_timezone.UNKNOWN_TIMEZONE)
    if len(zones) == 1:
        return zones[0]
    return fallback


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""  # why not: dnc, blacklisted, no_consent, consent_withdrawn, offer_cap, window, ...
    retry_at: datetime | None = None  # window closed / daily cap: not before this


async def may_call(conn, campaign: Campaign, phone: str, *, now: datetime, fallback_tz: str,
                   job_id: int | None = None) -> Verdict:
    """Every rule, in the order an admin would look for them. `now` is the dialler's clock."""
    if not campaign.enabled:
        return Verdict(False, "campaign_disabled")
    if await (await conn.execute("SELECT 1 FROM do_not_call WHERE phone = %s", (phone,))).fetchone():
        return Verdict(False, "dnc")
    customer = await (await conn.execute(
        "SELECT id, blacklisted, timezone FROM customers WHERE phone = %s", (phone,))).fetchone()
    if customer and customer["blacklisted"]:
        return Verdict(False, "blacklisted")
    if campaign.purpose == "ad":
        consent = await (await conn.execute(
            "SELECT granted FROM consents WHERE phone = %s AND purpose = 'ad'", (phone,))).fetchone()
        if consent is None:
            return Verdict(False, "no_consent")
        if not consent["granted"]:
            return Verdict(False, "consent_withdrawn")
        cap = campaign.settings.get("offers_per_year")
        if cap is not None:
            offered = await (await conn.execute(
                """SELECT count(*) AS n FROM dial_jobs j JOIN campaigns c ON c.name = j.campaign
                    WHERE j.phone = %s AND c.purpose = 'ad' AND j.result IN ('yes', 'refused', 'no_input')
                      AND j.finished_at > %s - interval '365 days' AND j.id IS DISTINCT FROM %s""",
                (phone, now, job_id))).fetchone()
            if offered["n"] >= int(cap):
                return Verdict(False, "offer_cap")
    tz = callee_timezone(phone, customer["timezone"] if customer else None, fallback_tz)
    window = campaign.window(tz)
    if not hours.check(window, now).open:
        opens = hours.next_opening(window, now)
        return Verdict(False, "window", opens or now + timedelta(days=1))
    today = now.astimezone(ZoneInfo(tz)).replace(hour=0, minute=0, second=0, microsecond=0)
    dials = await (await conn.execute(
        """SELECT count(*) AS n FROM dial_attempts a JOIN dial_jobs j ON j.id = a.job_id
            WHERE j.phone = %s AND j.campaign = %s AND a.started_at >= %s""",
        (phone, campaign.name, today))).fetchone()
    if dials["n"] >= campaign.max_attempts_per_day:
        tomorrow = today + timedelta(days=1)
        return Verdict(False, "daily_cap", hours.next_opening(window, tomorrow) or tomorrow)
    return Verdict(True)


async def add_job(conn, campaign: Campaign, phone: str, *, dedupe_key: str, context: Mapping[str, Any],
                  due_at: datetime, customer_id: int | None = None, order_number: str | None = None,
                  sku: str | None = None, event_id: int | None = None) -> int | None:
    """A job to call `phone`; None if an open job with the same key exists (the first one stands)."""
    row = await (await conn.execute(
        """INSERT INTO dial_jobs (campaign, phone, customer_id, order_number, sku, context, event_id,
                                  dedupe_key, due_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (dedupe_key) WHERE status IN ('pending', 'dialling', 'in_call') DO NOTHING
           RETURNING id""",
        (campaign.name, phone, customer_id, order_number, sku, json.dumps(context, default=str),
         event_id, dedupe_key, due_at))).fetchone()
    return row["id"] if row else None
