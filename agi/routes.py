"""Every registered flow as a FastAGI route: agi://host:port/<flow name>[?number=...]."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from agi.call import AgiCall
from agi.protocol import Script
from agi.server import Handler
from agi.session import AgiSession
from shopcall.app import App
from shopcall.call import CallInfo
from shopcall.dialplan import ASTERISK_INCLUDE_VERSION
from shopcall.flows import Flow

_NO_VALUE = {"unknown", "<unknown>", ""}  # what Asterisk writes when it has no caller number or name


_SIP_QUOTED_PAIR = re.compile(r"\\(.)", re.S)


def sip_display_name(name: str, channel: str) -> str:
    """PJSIP hands over a display name with its SIP quoted-pairs still escaped (`\\"` for a quote):
    undo them for SIP channels so the name is stored as the caller's phone showed it."""
    if channel.startswith(("PJSIP/", "SIP/")) and "\\" in name:
        return _SIP_QUOTED_PAIR.sub(r"\1", name)
    return name


def channel_endpoint(channel: str) -> str:
    """PJSIP/agent1-0000000a → agent1: the device behind a channel name."""
    _, _, rest = channel.partition("/")
    return rest.rsplit("-", 1)[0] if "-" in rest else rest


def call_info(env: Mapping[str, str], script: Script) -> CallInfo:
    number = env.get("agi_callerid", "")
    name = sip_display_name(env.get("agi_calleridname", ""), env.get("agi_channel", ""))
    return CallInfo(
        uniqueid=env.get("agi_uniqueid", ""),
        pbx="asterisk",
        caller_number="" if number in _NO_VALUE else number,
        caller_name="" if name in _NO_VALUE else name,
        # the dialplan may pass the dialled number explicitly when the extension is rewritten before us
        dialled_number=script.args.get("number") or env.get("agi_extension", ""),
        channel=env.get("agi_channel", ""),
        caller_endpoint=channel_endpoint(env.get("agi_channel", "")),
        language=env.get("agi_language", "ru"),
        script=script.name,
        args=script.args,
        extra=dict(env),
    )


def path_mapper(*roots: tuple[Path, Path]):
    """Files under our sounds and recordings dirs are seen by Asterisk under other roots (another host,
    a chroot): each pair is (our directory, the same directory as Asterisk sees it)."""
    pairs = [(str(local).rstrip("/"), str(remote).rstrip("/")) for local, remote in roots]

    def to_pbx(path: Path) -> str:
        text = str(path)
        for local, remote in pairs:
            if text == local or text.startswith(local + "/"):
                return remote + text[len(local):]
        return text

    return to_pbx


# the include versions (dp=N in its AGI calls, shopcall.dialplan) that have the [<prefix>-answered] routine
NEW_INCLUDES = frozenset(str(v) for v in range(2, ASTERISK_INCLUDE_VERSION + 1))


def agi_routes(app: App, flows: Mapping[str, Flow]) -> dict[str, Handler]:
    to_pbx = path_mapper(
        (app.config.sounds_dir, app.config.asterisk_sounds_path),
        (app.config.recordings_dir, app.config.asterisk_recordings_path),
    )

    answered_routine = f"{app.config.asterisk.context_prefix}-answered"

    def route(flow: Flow) -> Handler:
        async def handle(session: AgiSession, env: dict[str, str], script: Script) -> None:
            call = AgiCall(
                session,
                call_info(env, script),
                app.prompts,
                endpoint_template=app.config.asterisk.endpoint_template,
                trunk_template=app.config.asterisk.trunk_template,
                pbx_path=to_pbx,
                max_call_seconds=app.config.agi.max_call_seconds,
                answered_routine=answered_routine if script.args.get("dp", "") in NEW_INCLUDES else None,
            )
            await flow(call, app)

        return handle

    return {name: route(fn) for name, fn in flows.items()}
