"""The agent's answered leg of a callback: say whom they call back, dial the customer, settle the request.

Reached as agi://…/callback?id=N from the [<prefix>-callback] context, where the callback worker
(shopcall/callbacks.py) sends the agent's phone with AMI Originate once it is answered. A click to call
(the CRM's POST /api/v1/calls) takes the same path; the agent asked for it, so the number is not read out.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from shopcall import callbacks
from shopcall.app import App
from shopcall.call import Call, CallEnded, DialStatus
from shopcall.calllog import CallRecord, now
from shopcall.flows import flow

log = logging.getLogger("shopcall.callback")


@flow("callback")
async def callback(call: Call, app: App) -> None:
    info = call.info
    raw_id = info.args.get("id", "")
    request = None
    if raw_id.isdigit():
        request = await callbacks.connected(app.pool, int(raw_id), info.caller_endpoint)
    if request is None:
        # not ours any more (done, reconciled, another agent): never dial a customer on a stale offer
        log.warning("%s: callback %r is not in progress for %s", info.uniqueid, raw_id, info.caller_endpoint)
        await call.hangup()
        return
    rec = CallRecord(uniqueid=info.uniqueid, pbx=info.pbx, caller_number=request.phone, caller_name="",
                     dialled_number=request.phone, caller_e164=request.phone, direction="outbound",
                     group_name=request.group_name, answered_endpoint=info.caller_endpoint,
                     outcome="click_to_call_no_answer" if request.reason == callbacks.CLICK_TO_CALL
                     else "callback_no_answer", missed=False, callback_request_id=request.id)
    rec.step("callback", request=request.id, attempt=request.attempts, agent=info.caller_endpoint,
             reason=request.reason, asked_by_agent=request.asked_by_agent)
    settled = False
    try:
        await call.answer()
        if not request.asked_by_agent:
            await call.play("callback_agent_intro")
            await call.say_digits(request.phone.lstrip("+"))
        result = await call.dial_number(request.phone, timeout=app.config.callbacks.customer_ring_seconds)
        rec.step("dial", status=str(result.status), detail=result.detail)
        if result.status == DialStatus.ANSWERED:
            rec.outcome = "answered"
            rec.answered_at = now() - timedelta(seconds=result.talk_seconds)
            await callbacks.complete(app.pool, request.id)
            settled = True
        elif result.status == DialStatus.CALLER_GONE:
            raise CallEnded("the agent hung up while the customer's phone rang")
        else:
            status = await callbacks.release(app.pool, app.config, request.id, f"customer_{result.status}")
            settled = True
            rec.step("request", status=status)
            await call.play("callback_customer_unreachable")
        rec.ended_at = now()
        await call.hangup()
    except CallEnded:
        rec.step("agent_hung_up")
        raise
    finally:
        if not settled:
            # the agent hung up or the flow failed before the customer answered: try again later
            status = await callbacks.release(app.pool, app.config, request.id, "agent_hung_up")
            rec.step("request", status=status)
        rec.ended_at = rec.ended_at or now()
        await app.calllog.save(rec)
