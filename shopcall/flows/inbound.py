"""The shop's number: greeting → office hours → menu → the department's group → missed-call handling.

The flow tells the dialplan how it ended through SHOPCALL_DONE: "1" once the call has been dealt with.
Anything else (our server down, the database gone, a bug) leaves it unset and the dialplan rings the
fallback group itself, so no call is lost because of us.
"""

from __future__ import annotations

import asyncio
import logging
import wave
from datetime import timedelta
from pathlib import Path

from shopcall import hold, hours, recording, routing, speech
from shopcall.app import App
from shopcall.call import Call, CallEnded, DialResult, DialStatus, presentable
from shopcall.calllog import CallRecord, now
from shopcall.dialplan import fallback_group
from shopcall.flows import flow
from shopcall.flows.robot import confirm_callback, overflow_robot
from shopcall.phone import is_withheld
from shopcall.voicemail import store_voicemail

log = logging.getLogger("shopcall.inbound")

CLOSED_PROMPT = {"holiday": "holiday_closed", "closed_date": "holiday_closed"}


@flow("inbound")
async def inbound(call: Call, app: App) -> None:
    info = call.info
    rec = CallRecord.of_caller(info, app.config.shop.country)
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
    route, caller = await app.directory.lookup(rec.dialled_number, rec.caller_e164)
    call.language = caller.language or route.language
    rec.step("number", number=route.number, menu=route.menu is not None, group=route.group_name,
             category=route.category, customer=caller.customer_id)
    refused = caller.blocked if caller.blocked is not None else (
        "anonymous" if app.config.inbound.block_anonymous and is_withheld(call.info.caller_number) else None)
    if refused is not None:
        # not answered: the caller hears the PBX's rejection (SIP 403 on Asterisk, CALL_REJECTED on
        # FreeSWITCH); the row is neither answered nor missed, and asks for no callback
        rec.outcome, rec.missed = "blocked", False
        rec.step("blocked", reason=refused)
        rec.ended_at = now()
        await call.hangup("rejected")
        return

    await call.answer()
    if route.language_menu and caller.language is None:
        await _choose_language(call, app, rec)
    rec.language = call.language
    greeting = [route.greeting] + (["recording_notice"] if route.recording_notice else [])
    # a caller who knows the menu may press the key during the greeting (without a menu no key is listened for)
    early_key = await call.play(*greeting, interruptible=route.menu is not None)

    clock = app.clock()
    decision = hours.check(route.schedule, clock)
    rec.step("hours", open=decision.open, reason=decision.reason)
    if not decision.open:
        rec.outcome = "holiday" if decision.reason in CLOSED_PROMPT else "after_hours"
        closed: list[str | Path] = [CLOSED_PROMPT.get(decision.reason, "after_hours")]
        opens = hours.next_opening(route.schedule, clock) if app.config.inbound.say_next_opening else None
        if opens is not None:  # the number's own hours, not a sentence recorded for one shop's week
            rec.step("opens", at=opens.isoformat(timespec="minutes"))
            try:
                closed.append(await call.sounds.say_text(speech.opening_text(opens, clock, call.language),
                                                         call.language))
            except Exception:  # the TTS failed: the caller still hears that we are closed
                log.exception("%s: could not say when we open", call.info.uniqueid)
        await call.play(*closed)
        if app.config.voicemail.after_hours:
            await _voicemail(call, app, rec, route)
        await _finish(call, rec)
        return

    menu_group = None
    if route.menu is not None:
        menu = route.menu
        choice = await call.menu(
            menu.prompt, menu.options, default=menu.default_choice, timeout=menu.timeout,
            retries=menu.retries, first_key=early_key,
        )
        assert choice is not None  # a default is always given
        rec.menu_choice = choice.choice
        rec.step("menu", choice=choice.choice, how=choice.how, attempts=choice.attempts)
        menu_group = menu.options[choice.choice]

    resting = await app.directory.in_wrapup(app.config.inbound.wrapup_seconds)
    steps, skipped = await routing.plan(app.directory, route, caller, menu_group=menu_group, in_wrapup=resting)
    for skip in skipped:
        rec.step("skip", **skip)
    rec.group_name = next((st.group.name for st in reversed(steps) if st.group), menu_group or route.group_name)

    shown = presentable(call.info.caller_name)
    if route.category_title:
        shown = f"[{presentable(route.category_title)}] {shown}".strip()
    rang = False
    recording_to: Path | None = None

    async def ring(step: routing.RingStep) -> DialResult:
        nonlocal rang, recording_to
        rang = True
        rec.step("ring", reason=step.reason, target=step.label, endpoints=list(step.endpoints),
                 strategy=str(step.strategy), timeout=step.timeout)
        policy = recording.resolve(route.recording_policy, step.group.recording_policy if step.group else None,
                                   [m.recording_policy for m in step.members])
        if policy != "never" and recording_to is None:
            recording_to = recording.path_for(app.config.recordings_dir, rec.uniqueid, rec.started_at)
            await call.start_recording(recording_to, on_demand=policy == "on_demand")
            rec.step("recording", policy=policy)
        if app.screen_pop is not None:
            app.screen_pop.ringing(_ringing_body(rec, route, caller, step, shown), f"{rec.uniqueid}/{len(rec.route_log)}")
        result = await call.dial(list(step.endpoints), strategy=step.strategy, timeout=step.timeout,
                                 caller_name=shown if shown != call.info.caller_name else None)
        rec.step("dial", status=str(result.status), answered=result.answered_endpoint, detail=result.detail)
        return result

    for step in steps:
        free = await _free_agents(call, step, rec) if step.skip_busy else step
        if free is None and step.group is not None and step.group.hold_seconds:
            waited = await hold.wait_in_line(call, app.pool, rec, step, ring)
            if waited.how == "callback":  # a missed call all the same, with its request
                rec.outcome = "missed_no_answer"
                await confirm_callback(call, rec, "hold")
                await _finish(call, rec)
                return
            result = waited.result
        elif free is None:
            continue
        else:
            if not rang:
                await call.play("connecting")
            result = await ring(free)
        if result is None:
            continue
        if result.status == DialStatus.ANSWERED:
            if step.group:
                rec.group_name = step.group.name
            rec.outcome, rec.missed = "answered", False
            rec.answered_endpoint = result.answered_endpoint
            rec.answered_at = now() - timedelta(seconds=result.talk_seconds)
            agent = next((m for m in step.members if m.endpoint == result.answered_endpoint), None)
            if recording_to is not None:
                keep = recording.keep_for(route.recording_policy, step.group.recording_policy if step.group else None,
                                          agent.recording_policy if agent else "always")
                await _settle_recording(call, rec, recording_to, keep=keep)
            if step.group.survey if step.group else any(st.group and st.group.survey for st in steps):
                await _survey(call, app, rec)
            await _finish(call, rec)
            return
        if result.status == DialStatus.CALLER_GONE:
            rec.outcome, rec.callback_reason = "abandoned", "abandoned"
            raise CallEnded("caller hung up while the group rang")
    if not rang:
        rec.step("dial", status="nobody_available")

    rec.outcome, rec.callback_reason = "missed_no_answer", "no_answer"
    if route.overflow_robot:
        rec.callback_reason = None  # the robot asks whether they want one
        rec.outcome = "robot"
        await overflow_robot(call, app, rec)
    else:
        await call.play("nobody_answered")
        if app.config.voicemail.on_no_answer:
            await _voicemail(call, app, rec, route)
    await _finish(call, rec)


async def _free_agents(call: Call, step: routing.RingStep, rec: CallRecord) -> routing.RingStep | None:
    """The step without its agents who are on a call (asked just before it rings, so a sticky step's
    seconds are not stale); None when nobody in it is free. A PBX that cannot tell rings them all."""
    talking = await call.on_a_call(step.endpoints)
    if not talking:
        return step
    rec.step("skip", ring=step.reason, skipped="busy", agents=sorted(talking))
    free = routing.without(step, talking)
    return free if free.endpoints else None


def _ringing_body(rec: CallRecord, route, caller, step: routing.RingStep, shown: str) -> dict:
    """What the CRM's screen pop gets (README, "Calls to your CRM"): who calls, whose phones ring, why."""
    return {
        "event": "call_ringing", "direction": "inbound", "uniqueid": rec.uniqueid, "pbx": rec.pbx, "caller_number": rec.caller_number,
        "caller_e164": rec.caller_e164, "caller_name": rec.caller_name, "shown_to_agents": shown,
        "customer_id": caller.customer_id, "dialled_number": rec.dialled_number, "category": route.category,
        "group": step.group.name if step.group else None, "reason": step.reason, "menu_choice": rec.menu_choice,
        "agents": [{"endpoint": m.endpoint, "name": m.name} for m in step.members]
                  or [{"endpoint": e, "name": None} for e in step.endpoints],
        "ring_seconds": step.timeout, "started_at": rec.started_at.isoformat(), "at": now().isoformat(),
    }


async def _voicemail(call: Call, app: App, rec: CallRecord, route) -> None:
    """Record a message for the group's owner; keeping, transcribing and mailing it happen after the
    call, in the background, so the caller is not held and a slow transcription loses nothing."""
    group = rec.group_name or route.group_name or route.category_group
    if group is None and route.menu is not None:
        group = route.menu.options.get(route.menu.default_choice)
    group = group or fallback_group(app.config, call.info.pbx)
    path = recording.path_for(app.config.recordings_dir / "voicemail", rec.uniqueid, rec.started_at)
    await call.play("voicemail_prompt")
    try:
        result = await call.record(path, max_seconds=app.config.voicemail.max_seconds, silence_seconds=5)
    except CallEnded:
        result = None  # hanging up is how most callers end a message: keep what was recorded
    seconds = await asyncio.to_thread(_wav_seconds, path)
    rec.step("voicemail", seconds=round(seconds, 1), group=group, ended_by=result.ended_by if result else "hangup")
    info = call.info
    app.spawn(
        store_voicemail(app.pool, call_uniqueid=rec.uniqueid, caller_number=info.caller_number,
                        caller_name=info.caller_name, caller_e164=rec.caller_e164, group_name=group,
                        path=path, seconds=seconds, config=app.config),
        name=f"voicemail {rec.uniqueid}",
    )


def _wav_seconds(path: Path) -> float:
    try:
        with wave.open(str(path)) as w:
            return w.getnframes() / float(w.getframerate() or 8000)
    except (OSError, EOFError, wave.Error):
        return 0.0


async def _settle_recording(call: Call, rec: CallRecord, path: Path, *, keep: bool) -> None:
    if keep:
        rec.recording_path = str(path)  # an on-demand file may not exist: the path is cleared at save
        return
    # an agent who is never recorded answered a step that recorded for the others: discard it
    await call.stop_recording()
    await asyncio.to_thread(path.unlink, missing_ok=True)
    rec.step("recording_discarded", reason="agent policy never")


async def _survey(call: Call, app: App, rec: CallRecord) -> None:
    """After the agent hangs up (Dial returns to us), the caller rates the call: 1, 2 or 3."""
    choice = await call.menu("survey_question", ("1", "2", "3"), default=None,
                             timeout=app.config.inbound.menu_timeout, retries=1)
    rec.step("survey", answer=choice.choice if choice else None)
    if choice:
        rec.survey_answer = int(choice.choice)
        await call.play("survey_thanks")


async def _choose_language(call: Call, app: App, rec: CallRecord) -> None:
    choice = await call.menu("language_menu", ("1", "2"), default="1", timeout=app.config.inbound.menu_timeout,
                             retries=1, invalid_prompt=None)
    assert choice is not None
    call.language = "en" if choice.choice == "2" else "ru"
    rec.step("language", language=call.language, how=choice.how)
    if rec.caller_e164 and choice.how == "pressed":
        await app.directory.remember_language(rec.caller_e164, call.language)


async def _finish(call: Call, rec: CallRecord) -> None:
    """Tell the dialplan the call has been dealt with; it hangs up on SHOPCALL_DONE=1 (both rendered
    dialplans do), so the flow does not spend a command of its own on the hangup."""
    rec.ended_at = now()
    await call.set_vars({"SHOPCALL_DONE": "1", "SHOPCALL_OUTCOME": rec.outcome})
