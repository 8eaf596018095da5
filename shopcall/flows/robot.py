"""The overflow robot: when no operator answers, the caller can hear their order status or ask for a call
back. Runs inside the inbound flow, and on its own as the "robot" flow (agi://host/robot)."""

from __future__ import annotations

import logging

from shopcall.app import App
from shopcall.call import Call
from shopcall.calllog import CallRecord, now
from shopcall.flows import flow

log = logging.getLogger("shopcall.robot")

KNOWN_STATUSES = ("new", "paid", "shipped", "awaiting_delivery", "at_pickup_point", "delivered", "cancelled")
NO_DATE_STATUSES = ("delivered", "cancelled")


async def overflow_robot(call: Call, app: App, rec: CallRecord) -> None:
    """Order status (1) or a call back (2); no input means a call back, so a silent caller is not lost."""
    choice = await call.menu("robot_menu", ("1", "2"), default="2", timeout=app.config.inbound.menu_timeout,
                             retries=1)
    assert choice is not None
    rec.robot_choice = choice.choice
    rec.step("robot", choice=choice.choice, how=choice.how)
    if choice.choice == "1":
        said_any = await say_orders(call, app, rec)
        if said_any:
            await call.play("goodbye")
            return
        # nothing to tell: offer the call back instead
        again = await call.menu("robot_menu", ("1", "2"), default="2", timeout=app.config.inbound.menu_timeout,
                                retries=0)
        if again and again.choice == "1":
            await call.play("goodbye")
            return
    await confirm_callback(call, rec, "robot")


async def confirm_callback(call: Call, rec: CallRecord, reason: str) -> None:
    """The caller asked to be called back (the robot's 2, key 1 in line): a request with the row, if their
    number is one we can call."""
    if rec.caller_e164:
        rec.callback_reason = reason
        await call.play("callback_confirmed")
    else:
        rec.step(f"{reason}_callback_impossible", reason="caller number is not a phone number")
        await call.play("goodbye")


async def say_orders(call: Call, app: App, rec: CallRecord) -> bool:
    orders = await app.directory.orders(rec.caller_e164) if rec.caller_e164 else []
    if not orders:
        rec.step("robot_orders", found=0)
        await call.play("no_orders")
        return False
    if len(orders) > 1:
        await call.play("several_orders")
    for order in orders:
        status = order.status if order.status in KNOWN_STATUSES else "unknown"
        await call.play("order_intro")
        if order.number.isdigit():
            await call.say_digits(order.number)
        else:
            await call.say(order.number)
        await call.play(f"order_status_{status}")
        if order.delivery_date and status not in NO_DATE_STATUSES:
            await call.play("order_delivery_date")
            await call.say_date(order.delivery_date)
        rec.step("robot_said", order=order.number, status=order.status,
                 delivery_date=str(order.delivery_date) if order.delivery_date else None)
    return True


@flow("robot")
async def robot(call: Call, app: App) -> None:
    """The robot on its own, for a dialplan that sends overflow here itself."""
    info = call.info
    rec = CallRecord.of_caller(info, app.config.shop.country, outcome="robot")
    try:
        await call.answer()
        await overflow_robot(call, app, rec)
        rec.ended_at = now()
        await call.set_var("SHOPCALL_DONE", "1")
        await call.hangup()
    finally:
        rec.ended_at = rec.ended_at or now()
        await app.calllog.save(rec)
