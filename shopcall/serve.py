"""`shopcall serve`: every part in one process by default, or one part with --only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import psycopg

from shopcall import db
from shopcall.app import App
from shopcall.config import Config
from shopcall.flows import load_all
from shopcall.screen_pop import ScreenPop

log = logging.getLogger("shopcall.serve")

PARTS = ("agi", "esl", "api", "dialler")
AVAILABLE = PARTS


class PartUnavailable(Exception):
    pass


async def open_database(config: Config) -> tuple[str, object]:
    """Resolve the URL (starting the embedded server if none is configured), migrate, open the pool.

    A database that is down does not stop the FastAGI server: calls fall back to the dialplan's default
    group and their rows wait in the spool; the pool keeps trying to reconnect.
    """
    url = await db.resolve_url(config.database.url, config.pgdata)
    try:
        applied = await db.migrate_url(url)
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
    except psycopg.OperationalError as exc:
        log.error("database unreachable at start-up (%s): serving calls with the dialplan fallback", exc)
    pool = db.open_pool(
        url,
        min_size=config.database.pool_min,
        max_size=config.database.pool_max,
        timeout=config.database.connect_timeout,
    )
    await pool.open(wait=False)
    return url, pool


async def serve(config: Config, only: str | None = None, ready: asyncio.Event | None = None) -> None:
    parts = [only] if only else list(AVAILABLE)
    for part in parts:
        if part not in AVAILABLE:
            raise PartUnavailable(f"--only {part}: this part is not built yet (available: {', '.join(AVAILABLE)})")

    url, pool = await open_database(config)
    app = App.build(config, pool)
    summary = await app.prompts.build_all()
    log.info("prompts ready: %s", summary)

    servers: list = []  # FastAGI (Asterisk) and the event socket server (FreeSWITCH), as asked
    for part in ("agi", "esl"):
        if part not in parts:
            continue
        if part == "agi":
            from agi.routes import agi_routes as routes
            from agi.server import FastAgiServer as server_class
        else:
            from esl.routes import esl_routes as routes
            from esl.server import EslServer as server_class
        section = getattr(config, part)  # [agi] and [esl] have the same listening keys
        server = server_class(routes(app, load_all()), host=section.listen, port=section.port,
                              allow=section.allow, command_timeout=section.command_timeout,
                              backlog=section.backlog)
        await server.start()
        servers.append(server)
    api = None
    live_task = None
    if "api" in parts:
        from shopcall.api import LivePhones, start_api

        phones = LivePhones()
        api = await start_api(config, pool, phones)
        if pbx_for_live := live_pbx(config, parts):
            live_task = asyncio.create_task(serve_live_phones(config, pbx_for_live, phones), name="live-phones")
    from shopcall import mailer, voicemail

    background = [
        asyncio.create_task(app.calllog.replay_forever(), name="call-spool-replay"),
        asyncio.create_task(mailer.run_forever(pool, config), name="mail-outbox"),
        asyncio.create_task(_every(30, voicemail.replay_spool, pool, config), name="voicemail-spool-replay"),
    ]
    if {"agi", "esl"} & set(parts) and config.database.cache_groups:  # the calls' processes ask for groups
        from shopcall.group_cache import watch

        background.append(asyncio.create_task(
            watch(app.directory.group_cache, url, connect_timeout=config.database.connect_timeout),
            name="group-cache"))
    if live_task:
        background.append(live_task)
    pbx = callback_pbx(config, parts)
    if pbx:  # callback requests are offered to agents of the PBX whose calls this process serves
        background.append(asyncio.create_task(serve_callbacks(pool, config, pbx, url, app.screen_pop), name="callback-worker"))
    if "esl" in parts and config.freeswitch.report_fallback:
        from esl.hangup_report import FLOW, serve_fallback_reports

        background.append(asyncio.create_task(serve_fallback_reports(app, load_all()[FLOW]),
                                              name="freeswitch-fallback-reports"))
    if "dialler" in parts:
        background.append(asyncio.create_task(serve_dialler(pool, config), name="dialler"))
    hooks = config.webhooks
    # results of robot calls, product links and finished calls to the shop, from the processes configured
    # for them (one without the URLs does not know the secret either, and must not post rows unsigned)
    if hooks.results_url or hooks.messages_url or hooks.calls_url:
        from shopcall import webhooks

        background.append(asyncio.create_task(webhooks.run_forever(pool, config), name="webhooks"))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if ready:
        ready.set()
    log.info("shopcall serving: %s", ", ".join(parts))
    try:
        await stop.wait()
    finally:
        log.info("shutting down: letting live calls finish (up to 5 s)")
        for task in background:
            task.cancel()
        await asyncio.wait(background, timeout=5)  # their own clean-up (closing sockets, reports in flight)
        for server in servers:
            await server.stop(grace=5.0)
        if api is not None:
            await api.stop()
        if app.tasks:  # voicemails being stored: let them finish (each is spooled if the DB is gone)
            await asyncio.wait(app.tasks, timeout=30)
        if app.screen_pop is not None:
            await app.screen_pop.close()
        await pool.close()


def callback_pbx(config: Config, parts: list[str] | tuple[str, ...]) -> str | None:
    """Where this process rings agents for callback requests (callbacks.pbx), None when it serves no calls."""
    pbx = config.callbacks.pbx
    if pbx != "auto":
        return pbx if {"agi", "esl"} & set(parts) else None
    fs = config.freeswitch
    if "agi" in parts and config.asterisk.ami_secret:
        return "asterisk"
    # FreeSWITCH's event socket is in use when only its calls are served or another part already talks to it
    if "esl" in parts and ("agi" not in parts or fs.dialler_enabled or fs.report_fallback):
        return "freeswitch"
    return "asterisk" if "agi" in parts else None  # which says, once, that asterisk.ami_secret is empty


def live_pbx(config: Config, parts: list[str] | tuple[str, ...]) -> str | None:
    """Which PBX the live view (GET /api/v1/live) asks about agents' phones: callbacks.pbx when it is set,
    else Asterisk when AMI is configured, else FreeSWITCH when this process talks to its event socket anyway
    (as for callbacks: its calls alone, its dialler or its fallback reports), else none: an Asterisk shop
    without AMI is not sent looking for a FreeSWITCH it does not have, and Asterisk without
    asterisk.ami_secret is not asked at all (by the API process nor by `shopcall live`)."""
    if config.callbacks.pbx == "asterisk" and not config.asterisk.ami_secret:
        log.info("live view: phones not asked: asterisk.ami_secret is empty")
        return None
    if config.callbacks.pbx != "auto":
        return config.callbacks.pbx
    if config.asterisk.ami_secret:
        return "asterisk"
    fs = config.freeswitch
    if fs.dialler_enabled or fs.report_fallback or ("esl" in parts and "agi" not in parts):
        return "freeswitch"
    return None


async def open_live_phones(config: Config, pbx: str, *, wait: bool = True):
    """The live view's phone states and the link they are asked over, (phones, link): waits out a PBX not
    there yet (the API process), or with wait=False tries once and raises (`shopcall live`)."""
    if pbx == "asterisk":
        from agi.agent_phones import AsteriskAgentPhones
        from agi.ami import open_ami

        link = await open_ami(config, "live view", wait=wait)
        return AsteriskAgentPhones(link, config), link
    from esl.agent_phones import FreeswitchAgentPhones
    from esl.client import open_event_socket

    link = await open_event_socket(config, "live view", wait=wait)
    return FreeswitchAgentPhones(link, config), link


async def serve_live_phones(config: Config, pbx: str, holder) -> None:
    """The live view's own link to the PBX, kept open (both clients reconnect by themselves): a slow answer
    about phones must not hold up a call's or the callback worker's command on a shared link."""
    holder.phones, link = await open_live_phones(config, pbx)
    log.info("live view: agents' phones asked of %s", pbx)
    try:
        await asyncio.Event().wait()
    finally:
        holder.phones = None
        await link.close()


async def serve_callbacks(pool, config: Config, pbx: str, url: str, pop: ScreenPop | None = None) -> None:
    """The callback worker (shopcall/callbacks.py) with the agents' PBX: Asterisk through AMI (needs
    asterisk.ami_secret), FreeSWITCH through its inbound event socket. A click to call wakes it (NOTIFY);
    `pop` (the process's screen pop, webhooks.ringing_url) tells the CRM whose phone it rings."""
    from shopcall import callbacks
    from shopcall.notify import wake_on

    if not config.callbacks.enabled:
        log.info("callback worker off (callbacks.enabled = false)")
        return
    if pbx == "asterisk":
        if not config.asterisk.ami_secret:
            log.info("callback worker off: asterisk.ami_secret is empty (or set callbacks.pbx = \"freeswitch\")")
            return
        from agi.agent_phones import AsteriskAgentPhones
        from agi.ami import open_ami

        link = await open_ami(config, "callbacks")
        phones = AsteriskAgentPhones(link, config)
    else:
        from esl.agent_phones import FreeswitchAgentPhones
        from esl.client import open_event_socket

        link = await open_event_socket(config, "callbacks")
        phones = FreeswitchAgentPhones(link, config)
    log.info("callback worker on: agents' phones on %s", pbx)
    wake = asyncio.Event()
    listener = asyncio.create_task(wake_on(url, callbacks.CHANNEL, wake, purpose="callback worker",
                                           connect_timeout=config.database.connect_timeout),
                                   name="callback-wake")
    try:
        await callbacks.run_forever(pool, config, phones, wake, pop)
    finally:
        listener.cancel()
        await link.close()


async def serve_dialler(pool, config: Config) -> None:
    """The dialler, with a connection to each PBX that is configured: Asterisk through AMI (needs
    asterisk.ami_secret), FreeSWITCH through its inbound event socket (freeswitch.dialler_enabled).
    A campaign names its PBX (campaigns.pbx)."""
    from shopcall.dialler import Dialler

    if not config.dialler.enabled:
        log.info("dialler off (dialler.enabled = false)")
        return
    originators: dict = {}
    closers = []
    if config.asterisk.ami_secret:
        from agi.ami import open_ami
        from agi.originator import AsteriskOriginator

        ami = await open_ami(config, "dialler")
        originators["asterisk"] = AsteriskOriginator(ami, config)
        closers.append(ami.close)
    if config.freeswitch.dialler_enabled:
        from esl.client import open_event_socket
        from esl.originator import FreeswitchOriginator

        client = await open_event_socket(config, "dialler")
        originators["freeswitch"] = FreeswitchOriginator(client, config)
        closers.append(client.close)
    if not originators:
        log.info("dialler off: no PBX to dial through (set asterisk.ami_secret or freeswitch.dialler_enabled)")
        return
    log.info("dialler on: %s", ", ".join(originators))
    try:
        await Dialler(pool, config, originators).run_forever()
    finally:
        for close in closers:
            await close()


async def _every(seconds: float, fn, *args) -> None:
    while True:
        try:
            await fn(*args)
        except Exception:
            log.exception("%s failed", getattr(fn, "__name__", fn))
        await asyncio.sleep(seconds)
