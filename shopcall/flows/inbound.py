"""The shop's number: greeting → office hours → menu → the department's group → missed-call handling.

The flow tells the dialplan how it ended through SHOPCALL_DONE: "1" once the call has been dealt with.
Anything else (our server down, the database gone, a bug) leaves it unset and the dialplan rings the
fallback group itself, so no call is lost because of us.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from shopcall import hours
from shopcall.app import App
from shopcall.call import Call, CallEnded, DialStatus, presentable
from shopcall.calllog import CallRecord, now
from shopcall.flows import flow
from shopcall.phone import to_e164

log = logging.getLogger("shopcall.inbound")

CLOSED_PROMPT = {"holiday": "holiday_closed", "closed_date": "holiday_closed"}


@flow("inbound")
async def inbound(call: Call, app: App) -> None:
    info = call.info
    rec = CallRecord(
        uniqueid=info.uniqueid,
        pbx=info.pbx,
        caller_number=info.caller_number,
        caller_name=info.caller_name,
        dialled_number=info.dialled_number,
        caller_e164=to_e164(info.caller_number, app.config.shop.country),
    )
    try:
        await _run(call, app, rec)
    except CallEnded:
        if rec.ended_at is None:
            rec.step("caller_hung_up")
            if rec.outcome == "abandoned" and rec.answered_at is None:
                rec.callback_reason = "abandoned"
        raise
    except Exception as exc:
        # the dialplan takes over (fallback group); the row says so, and who answered is not ours to know
        rec.outcome, rec.missed = "fallback", False
        rec.step("error", error=f"{type(exc).__name__}: {exc}")
        log.exception("%s: inbound flow failed, handing the call back to the dialplan", info.uniqueid)
        try:
            await call.set_var("SHOPCALL_DONE", "0")
        except Exception as set_exc:  # the PBX is gone too: the dialplan fallback still applies
            log.warning("%s: could not tell the dialplan: %s", info.uniqueid, set_exc)
    finally:
        rec.ended_at = rec.ended_at or now()
        await app.calllog.save(rec)


async def _run(call: Call, app: App, rec: CallRecord) -> None:
    route = await app.directory.route(rec.dialled_number)
    call.language = route.language
    rec.step("number", number=route.number, menu=route.menu is not None, group=route.group_name)

    await call.answer()
    greeting = [route.greeting] + (["recording_notice"] if route.recording_notice else [])
    # a caller who knows the menu may press the key during the greeting
    early_key = await call.play(*greeting, interruptible=True)

    decision = hours.check(route.schedule, app.clock())
    rec.step("hours", open=decision.open, reason=decision.reason)
    if not decision.open:
        rec.outcome = "holiday" if decision.reason in CLOSED_PROMPT else "after_hours"
        await call.play(CLOSED_PROMPT.get(decision.reason, "after_hours"))
        await _finish(call, rec)
        return

    group_name = route.group_name
    if route.menu is not None:
        menu = route.menu
        choice = await call.menu(
            menu.prompt, menu.options, default=menu.default_choice, timeout=menu.timeout,
            retries=menu.retries, first_key=early_key,
        )
        assert choice is not None  # a default is always given
        rec.menu_choice = choice.choice
        rec.step("menu", choice=choice.choice, how=choice.how, attempts=choice.attempts)
        group_name = menu.options[choice.choice]

    group = await app.directory.group(group_name) if group_name else None
    if group is None:
        raise LookupError(f"group {group_name!r} does not exist")
    rec.group_name = group.name
    rec.step("group", group=group.name, strategy=group.strategy,
             members=[m.endpoint for m in group.members])

    if group.members:
        await call.play("connecting")
        shown = presentable(call.info.caller_name)
        result = await call.dial(
            [m.endpoint for m in group.members], strategy=group.dial_strategy, timeout=group.ring_timeout,
            caller_name=shown if shown != call.info.caller_name else None,
        )
    else:
        result = None
    rec.step("dial", status=result.status if result else "nobody_available",
             answered=result.answered_endpoint if result else None)

    if result and result.status == DialStatus.ANSWERED:
        rec.outcome, rec.missed = "answered", False
        rec.answered_endpoint = result.answered_endpoint
        rec.answered_at = now() - timedelta(seconds=result.talk_seconds)
        await _finish(call, rec)
        return
    if result and result.status == DialStatus.CALLER_GONE:
        rec.outcome, rec.callback_reason = "abandoned", "abandoned"
        raise CallEnded("caller hung up while the group rang")

    rec.outcome, rec.callback_reason = "missed_no_answer", "no_answer"
    await call.play("nobody_answered")
    await _finish(call, rec)


async def _finish(call: Call, rec: CallRecord) -> None:
    rec.ended_at = now()
    await call.set_var("SHOPCALL_DONE", "1")
    await call.set_var("SHOPCALL_OUTCOME", rec.outcome)
    await call.hangup()
