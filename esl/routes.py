"""Every registered flow as an outbound-socket route: the dialplan names the flow in `shopcall_flow`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime

from agi.routes import path_mapper
from esl.call import AMD_VARIABLE, EslCall
from esl.modules import Modules
from esl.protocol import Event, sip_unescape
from esl.server import Handler
from esl.session import OutboundSession
from shopcall.app import App
from shopcall.call import CallInfo
from shopcall.flows import Flow

ARG = "shopcall_arg_"
_NO_VALUE = {"", "_undef_", "0000000000"}  # 0000000000: FreeSWITCH's number when there is none


def created_at(channel: Event) -> datetime | None:
    """The channel's creation time from FreeSWITCH's own clock (microseconds since the epoch)."""
    value = channel.get("Caller-Channel-Created-Time")
    return datetime.fromtimestamp(int(value) / 1e6, UTC) if value.isdigit() and int(value) > 0 else None


def call_info(channel: Event, flow: str) -> CallInfo:
    # a leg we originated (a robot call, an agent's phone rung for a callback): FreeSWITCH flips its caller ID
    # to the callee's on answer ("Outbound Call" <context>); the one we originated it with, which Asterisk
    # keeps as the CALLERID of an Originate, stays in the Orig fields
    cid = "Caller-Orig-Caller-ID-" if channel.get("Caller-Logical-Direction") == "outbound" \
        and channel.get("Caller-Orig-Caller-ID-Number") else "Caller-Caller-ID-"
    number = channel.get(cid + "Number")
    name = channel.get(cid + "Name")
    if channel.get("Channel-Name").startswith("sofia/"):  # a SIP display name, escapes and all
        name = sip_unescape(name)
    dialled = channel.var("shopcall_number") or channel.get("Caller-Destination-Number")
    return CallInfo(
        uniqueid=channel.get("Unique-ID"),
        pbx="freeswitch",
        caller_number="" if number in _NO_VALUE else number,
        caller_name="" if name in _NO_VALUE else name,
        dialled_number=dialled,
        channel=channel.get("Channel-Name"),
        # a registered phone of ours (an agent's, dialling a feature code) is authenticated as a user; an
        # agent's phone we rang (a callback, esl/agent_phones.py) is the user dialled
        caller_endpoint=channel.var("user_name") or channel.var("dialed_user") or "",
        created_at=created_at(channel),
        language=channel.var("shopcall_language") or channel.var("default_language") or "ru",
        script=flow,
        # the dialplan passes arguments as shopcall_arg_NAME (e.g. the agent feature code's action)
        args={"number": dialled} | {k[len(ARG):]: v for k, v in channel.variables.items() if k.startswith(ARG)},
        extra=dict(channel.headers),
    )


def esl_routes(app: App, flows: Mapping[str, Flow]) -> dict[str, Handler]:
    config = app.config
    # the same directories as FreeSWITCH sees them (another host, a chroot): record and record_session
    # write where we later read the file, as asterisk.recordings_path does for MixMonitor
    to_pbx = path_mapper(
        (config.sounds_dir, config.freeswitch.sounds_path or config.sounds_dir),
        (config.recordings_dir, config.freeswitch.recordings_path or config.recordings_dir),
    )

    modules = Modules()  # one view of FreeSWITCH's optional modules for every call of this server

    def route(name: str, flow: Flow) -> Handler:
        async def handle(session: OutboundSession, channel: Event) -> None:
            call = EslCall(
                session,
                call_info(channel, name),
                app.prompts,
                endpoint_template=config.freeswitch.endpoint_template,
                trunk_template=config.freeswitch.trunk_template,
                pbx_path=to_pbx,
                max_call_seconds=config.agi.max_call_seconds,
                say=config.freeswitch.say,
                timezone=config.shop.timezone,
                modules=modules,
            )
            if channel.var(AMD_VARIABLE) == "1":  # a campaign with amd (esl/originator.py)
                verdict = await call.detect_machine(config.freeswitch.amd_seconds)
                if verdict:  # the flow reads it as on Asterisk, where AMD() gives outbound?amd=...
                    call.info = replace(call.info, args={**call.info.args, "amd": verdict})
            await flow(call, app)

        return handle

    return {name: route(name, fn) for name, fn in flows.items()}
