"""The robot's side of an outbound campaign call, once the customer has answered.

Reached as agi://…/outbound?attempt=N&amd=${AMDSTATUS} from the [<prefix>-robot] context the dialler
originates into (FreeSWITCH: the same flow through esl/). Every call starts with the disclosure that it
is automatic; 9 at any moment puts the number on the do-not-call list at once. The scenario's words come
from the shop's scripts (shopcall/scripts.py); what the customer answered settles the attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from psycopg.types.json import Jsonb

from shopcall import dialler, events, scripts
from shopcall.app import App
from shopcall.call import Call, CallEnded, DialStatus, presentable
from shopcall.calllog import CallRecord, now
from shopcall.campaigns import Campaign
from shopcall.flows import flow

log = logging.getLogger("shopcall.outbound")


class OptedOut(Exception):
    """The customer pressed 9: the number is on the do-not-call list, the call ends."""


@dataclass
class Dialogue:
    attempt_id: int
    job: dict
    campaign: Campaign
    language: str
    segment: str
    customer_name: str
    parts: dict[str, str] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    result: str | None = None  # known before the dialogue ends: kept if the customer hangs up after it


_TAKE = """
UPDATE dial_jobs j SET status = 'in_call', updated_at = now()
  FROM dial_attempts a
 WHERE a.id = %s AND a.job_id = j.id AND a.outcome IS NULL AND j.status IN ('dialling', 'in_call')
RETURNING j.*, a.uniqueid AS attempt_uniqueid
"""


async def take(app: App, attempt_id: int, uniqueid: str) -> Dialogue | None:
    """The attempt's job becomes this call's; None when it is not an open attempt of this very channel."""
    async with app.pool.connection() as conn, conn.transaction():
        job = await (await conn.execute(_TAKE, (attempt_id,))).fetchone()
        if job is None or job["attempt_uniqueid"] != uniqueid:
            if job is not None:
                raise LookupError(f"attempt {attempt_id} belongs to channel {job['attempt_uniqueid']}, not {uniqueid}")
            return None
        await conn.execute("UPDATE dial_attempts SET answered_at = COALESCE(answered_at, now()) WHERE id = %s",
                           (attempt_id,))
        campaign_row = await (await conn.execute("SELECT * FROM campaigns WHERE name = %s",
                                                 (job["campaign"],))).fetchone()
        customer = await (await conn.execute(
            "SELECT name, segment, language FROM customers WHERE phone = %s", (job["phone"],))).fetchone()
        campaign = Campaign.from_row(campaign_row)
        language = (customer and customer["language"]) or app.config.shop.language
        segment = (customer and customer["segment"]) or "default"
        parts = await scripts.load(conn, campaign.scenario, segment, language)
    return Dialogue(attempt_id, dict(job), campaign, language, segment, (customer and customer["name"]) or "",
                    parts)


class Robot:
    """The verbs of a robot dialogue: say a script part, ask one, connect to operators; 9 opts out."""

    def __init__(self, call: Call, app: App, d: Dialogue, rec: CallRecord) -> None:
        self.call, self.app, self.d, self.rec = call, app, d, rec
        self.context: dict[str, Any] = {
            "shop_name": app.config.shop.name, "customer_name": d.customer_name, "segment": d.segment,
            "language": d.language, **d.job["context"],
        }

    def text(self, part: str) -> str:
        try:
            return scripts.render_text(self.d.parts[part], self.d.language, self.context)
        except scripts.ScriptError as exc:
            # checked when saved, but the data may still surprise it: our default says the same thing
            log.error("job %s: script %s/%s failed (%s): saying the default", self.d.job["id"],
                      self.d.campaign.scenario, part, exc)
            return scripts.render_text(scripts.default(self.d.campaign.scenario, part, self.d.language),
                                       self.d.language, self.context)

    async def disclose(self) -> None:
        if await self.call.play("robot_disclosure", interruptible=True) == "9":
            await self.opt_out()

    async def say(self, part: str) -> None:
        key = await self.call.say(self.text(part), interruptible=True)
        if key == "9":
            await self.opt_out()

    async def ask(self, part: str, keys: tuple[str, ...] = ("1", "2")) -> str | None:
        sound = await self.call.sounds.say_text(self.text(part), self.d.language)
        choice = await self.call.menu(sound, (*keys, "9"), default=None, timeout=self.app.config.dialler.answer_timeout,
                                      retries=1)
        self.rec.step("robot_ask", part=part, choice=choice.choice if choice else None,
                      how=choice.how if choice else "no_input")
        if choice and choice.choice == "9":
            await self.opt_out()
        return choice.choice if choice else None

    async def opt_out(self) -> None:
        async with self.app.pool.connection() as conn:  # committed now: a hang-up right after must not undo it
            await events.set_do_not_call(conn, self.d.job["phone"], True, source="dtmf", job_id=self.d.job["id"])
        self.rec.step("opted_out")
        log.info("job %s: %s pressed 9: on the do-not-call list", self.d.job["id"], self.d.job["phone"])
        await self.call.play("robot_opted_out")
        raise OptedOut()

    async def connect(self) -> bool:
        """Ring the campaign's operators; nobody free or nobody answering leaves a callback request."""
        group = await self.app.directory.group(self.d.campaign.group_name) if self.d.campaign.group_name else None
        if group is not None and group.members:
            # the operators see the customer's number, not the campaign's the channel was originated with
            result = await self.call.dial([m.endpoint for m in group.members], strategy=group.dial_strategy,
                                          timeout=group.ring_timeout,
                                          caller_name=presentable(f"[Робот {self.d.campaign.name}]"),
                                          caller_number=self.d.job["phone"])
            self.rec.step("dial", status=str(result.status), answered=result.answered_endpoint, detail=result.detail)
            if result.status == DialStatus.ANSWERED:
                self.rec.answered_endpoint = result.answered_endpoint
                self.d.detail["operator"] = result.answered_endpoint
                return True
            if result.status == DialStatus.CALLER_GONE:
                raise CallEnded("the customer hung up while operators rang")
        await self.callback_request()
        await self.call.play("robot_no_operator")
        return False

    async def callback_request(self) -> None:
        async with self.app.pool.connection() as conn:
            await conn.execute(
                """INSERT INTO callback_requests (phone, customer_id, group_id, reason)
                   VALUES (%s, %s, (SELECT id FROM groups WHERE name = %s), %s)
                   ON CONFLICT (phone) WHERE status IN ('pending', 'in_progress') DO NOTHING""",
                (self.d.job["phone"], self.d.job["customer_id"], self.d.campaign.group_name,
                 f"campaign:{self.d.campaign.name}"))
        self.d.detail["callback_request"] = True
        self.rec.step("callback_request", group=self.d.campaign.group_name)


Scenario = Callable[[Robot], Awaitable[str]]


async def cart_followup(robot: Robot) -> str:
    answer = await robot.ask("offer")
    if answer == "1":
        if robot.d.campaign.settings.get("yes_action") == "connect":
            await robot.say("yes_connect")
            await robot.connect()
        else:
            await robot.callback_request()
            await robot.say("yes_callback")
        return "yes"
    if answer == "2":
        await robot.say("no")
        return "refused"
    return "no_input"


async def _press_1_for_a_person(robot: Robot, part: str, *, connected: str, declined: str) -> str:
    """Say `part`, which ends "press 1 to talk to a person": 1 reaches the campaign's operators."""
    if await robot.ask(part, ("1",)) == "1":
        await robot.say("connect")
        return connected if await robot.connect() else "callback"
    await robot.say("bye")
    return declined


async def back_in_stock(robot: Robot) -> str:
    return await _press_1_for_a_person(robot, "offer", connected="connected", declined="informed")


async def order_confirmation(robot: Robot) -> str:
    order = await _order(robot)
    if order is None:
        log.warning("job %s: order %s is gone", robot.d.job["id"], robot.d.job["order_number"])
        return "order_missing"
    robot.context.update(order_number=order["number"], total=order["total"], currency=order["currency"],
                         items=order["items"])
    answer = await robot.ask("confirm")
    if answer != "1":
        # "no", or no answer: a person sorts it out
        await robot.say("operator")
        connected = await robot.connect()
        robot.d.detail["operator_connected"] = connected
        return "not_confirmed" if answer == "2" else "no_input"
    async with robot.app.pool.connection() as conn:
        await conn.execute("UPDATE orders SET status = 'awaiting_delivery', updated_at = now() WHERE id = %s",
                           (order["id"],))
    robot.rec.step("order_confirmed", order=order["number"])
    await robot.say("confirmed")
    robot.d.result = "confirmed"  # kept if they hang up during the add-on
    addon = await _addon_for(robot, order)
    if addon is not None:
        robot.context["addon"] = addon
        if await robot.ask("addon") == "1":
            total = await _add_item(robot, order, addon)
            robot.context["total"] = total
            robot.d.detail["addon"] = addon["sku"]
            await robot.say("addon_added")
        else:
            robot.d.detail["addon"] = "declined"
    await robot.say("bye")
    return "confirmed"


async def delivery_status(robot: Robot) -> str:
    return await _press_1_for_a_person(robot, "reminder", connected="operator", declined="reminded")


SCENARIOS: dict[str, Scenario] = {
    "cart_followup": cart_followup, "back_in_stock": back_in_stock,
    "order_confirmation": order_confirmation, "delivery_status": delivery_status,
}


async def _order(robot: Robot) -> dict | None:
    async with robot.app.pool.connection() as conn:
        row = await (await conn.execute("SELECT * FROM orders WHERE number = %s",
                                        (robot.d.job["order_number"],))).fetchone()
    if row is None:
        return None
    items = [scripts.order_item(i) for i in row["items"]]
    return dict(row, items=items)


async def _addon_for(robot: Robot, order: Mapping[str, Any]) -> dict | None:
    """The first configured add-on whose trigger (a category or a SKU) is in the order and whose own SKU is
    not; an up-sell is advertising, so only with the customer's ad consent."""
    rules = robot.d.campaign.settings.get("addons") or []
    skus = {i.get("sku") for i in order["items"]}
    categories = {i.get("category") for i in order["items"]}
    for rule in rules:
        if rule.get("sku") in skus:
            continue
        if rule.get("trigger_sku") in skus or rule.get("trigger_category") in categories:
            async with robot.app.pool.connection() as conn:
                consent = await (await conn.execute(
                    "SELECT granted FROM consents WHERE phone = %s AND purpose = 'ad'",
                    (robot.d.job["phone"],))).fetchone()
            if not consent or not consent["granted"]:
                robot.rec.step("addon_skipped", reason="no ad consent", sku=rule.get("sku"))
                robot.d.detail["addon"] = "no_consent"
                return None
            return {"sku": rule["sku"], "name": rule["name"], "trigger": rule.get("trigger", ""),
                    "discount_percent": rule.get("discount_percent", 0), "price": Decimal(str(rule["price"])),
                    "category": rule.get("category", "")}
    return None


async def _add_item(robot: Robot, order: Mapping[str, Any], addon: Mapping[str, Any]) -> Decimal:
    item = {"sku": addon["sku"], "name": addon["name"], "qty": 1, "price": str(addon["price"]),
            "category": addon.get("category", ""), "added_by": "robot"}
    async with robot.app.pool.connection() as conn:
        row = await (await conn.execute(
            """UPDATE orders SET items = items || %s, total = total + %s, updated_at = now()
                WHERE id = %s RETURNING total""", (Jsonb([item]), addon["price"], order["id"]))).fetchone()
    robot.rec.step("addon_added", order=order["number"], sku=addon["sku"], total=str(row["total"]))
    return row["total"]


@flow("outbound")
async def outbound(call: Call, app: App) -> None:
    info = call.info
    raw = info.args.get("attempt", "")
    d = await take(app, int(raw), info.uniqueid) if raw.isdigit() else None
    if d is None:
        # not an open attempt (settled, reconciled, a stray call): say nothing, change nothing
        log.warning("%s: attempt %r is not open: hanging up", info.uniqueid, raw)
        await call.hangup()
        return
    call.language = d.language
    rec = CallRecord(uniqueid=info.uniqueid, pbx=info.pbx, caller_number=d.job["phone"], caller_name="",
                     dialled_number=d.job["phone"], caller_e164=d.job["phone"], direction="outbound",
                     outcome="robot", missed=False, answered_at=now(), language=d.language)
    rec.step("robot_call", campaign=d.campaign.name, job=d.job["id"], attempt=d.attempt_id)
    outcome, result = "answered", None
    try:
        if info.args.get("amd") == "MACHINE":
            outcome = "machine"
            rec.step("answering_machine")
            await call.hangup()
            return
        robot = Robot(call, app, d, rec)
        await robot.disclose()
        result = await SCENARIOS[d.campaign.scenario](robot)
        await call.hangup()
    except OptedOut:
        result = "opted_out"
        await call.hangup()
    except CallEnded:
        result = result or d.result
        if result is None:
            outcome = "hangup"  # gone before they answered anything: worth another try later
        rec.step("customer_hung_up")
        raise
    except Exception as exc:
        result = result or d.result
        if result is None:
            outcome = "failed"  # our fault, not the customer's: retried after the failed delay
        rec.step("error", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        rec.outcome = f"robot_{result or outcome}"
        rec.ended_at = now()
        detail = dict(d.detail, result=result)
        await dialler.settle(app.pool, app.config, d.attempt_id, outcome=outcome,
                             result=result if outcome == "answered" else None, detail=detail, now=app.clock())
        await app.calllog.save(rec)
