"""The CLI's outbound commands: `shopcall import`, `shopcall dnc`, `shopcall campaigns`."""

from __future__ import annotations

import sys
from pathlib import Path

from psycopg_pool import AsyncConnectionPool

from shopcall import contacts_import, events
from shopcall.phone import cli_phone


async def import_file(pool: AsyncConnectionPool, path: Path, region: str) -> int:
    try:
        summary = await contacts_import.import_contacts(pool, path, region=region,
                                                        progress=contacts_import.progress_bar())
    except (contacts_import.ContactsFileError, OSError) as exc:
        print(f"shopcall: {path}: {exc}", file=sys.stderr)
        return 1
    print(summary.report())
    return 0


async def dnc(pool: AsyncConnectionPool, action: str, phone: str | None, region: str) -> int:
    async with pool.connection() as conn:
        if action == "list":
            rows = await (await conn.execute(
                "SELECT phone, source, created_at FROM do_not_call ORDER BY created_at")).fetchall()
            for r in rows:
                print(f"{r['phone']:16} {r['source']:8} {r['created_at']:%Y-%m-%d %H:%M}")
            return 0
        e164 = cli_phone(phone, region, f"dnc {action}")
        if e164 is None:
            return 2
        await events.set_do_not_call(conn, e164, action == "add", source="cli")
    print(f"{e164}: {'on' if action == 'add' else 'off'} the do-not-call list")
    return 0


async def campaigns(pool: AsyncConnectionPool) -> int:
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            """SELECT c.name, c.scenario, c.purpose, c.enabled, c.caller_id, c.group_name,
                      count(j.*) FILTER (WHERE j.status = 'pending') AS pending,
                      count(j.*) FILTER (WHERE j.status IN ('dialling', 'in_call')) AS live,
                      count(j.*) FILTER (WHERE j.status = 'done') AS done,
                      count(j.*) FILTER (WHERE j.status IN ('failed', 'cancelled')) AS ended
                 FROM campaigns c LEFT JOIN dial_jobs j ON j.campaign = c.name
                GROUP BY c.name ORDER BY c.name""")).fetchall()
    print(f"{'campaign':20} {'scenario':19} {'purpose':7} {'on':3} {'pending':>7} {'live':>5} {'done':>6} "
          f"{'ended':>6}  caller id / group")
    for r in rows:
        print(f"{r['name']:20} {r['scenario']:19} {r['purpose']:7} {'yes' if r['enabled'] else 'no':3} "
              f"{r['pending']:>7} {r['live']:>5} {r['done']:>6} {r['ended']:>6}  "
              f"{r['caller_id'] or '-'} / {r['group_name'] or '-'}")
    return 0
