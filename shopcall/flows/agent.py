"""Agent feature codes: log in or out, pause or resume, from the agent's own phone."""

from __future__ import annotations

import logging

from shopcall.app import App
from shopcall.call import Call, check_endpoint
from shopcall.flows import flow

log = logging.getLogger("shopcall.agent")

ACTIONS = {
    "login": ({"logged_in": True}, "agent_logged_in"),
    "logout": ({"logged_in": False}, "agent_logged_out"),
    "pause": ({"paused": True}, "agent_paused"),
    "unpause": ({"paused": False}, "agent_unpaused"),
}


@flow("agent")
async def agent(call: Call, app: App) -> None:
    action = call.info.args.get("action", "")
    # the device that is calling; a dialplan may name the agent instead (hot desking: *72 + agent number)
    endpoint = call.info.args.get("endpoint") or call.info.caller_endpoint
    await call.answer()
    if action not in ACTIONS:
        log.error("%s: unknown agent action %r (known: %s)", call.info.uniqueid, action, ", ".join(ACTIONS))
        await call.play("technical_problem")
        await call.set_var("SHOPCALL_DONE", "1")
        await call.hangup()
        return
    try:
        state = await app.directory.set_agent_state(check_endpoint(endpoint), **ACTIONS[action][0])
    except ValueError:
        state = None
    if state is None:
        log.warning("%s: agent %s from an unknown endpoint %r", call.info.uniqueid, action, endpoint)
        await call.play("agent_unknown")
    else:
        log.info("agent %s: %s (logged_in=%s paused=%s)", endpoint, action, *state)
        await call.play(ACTIONS[action][1])
    await call.set_var("SHOPCALL_DONE", "1")
    await call.hangup()
