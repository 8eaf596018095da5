"""Load a directory file (employees, groups, schedules, menus, numbers) into the database.

Idempotent: every entry is upserted by its natural key (endpoint, group name, schedule name, menu name,
number), so an admin keeps the shop's set-up in one TOML file and loads it again after each edit.
A group's member list is replaced by the file's.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from shopcall.call import check_endpoint
from shopcall.hours import Schedule
from shopcall.phone import require_e164

KNOWN = ("employees", "groups", "schedules", "menus", "categories", "numbers", "customers", "orders")


class DirectoryError(ValueError):
    pass


def read(path: Path) -> dict[str, list[dict[str, Any]]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise DirectoryError(f"{path}: {exc}") from None
    unknown = set(data) - set(KNOWN)
    if unknown:
        raise DirectoryError(f"{path}: unknown tables {sorted(unknown)} (known: {', '.join(KNOWN)})")
    return {k: list(data.get(k, [])) for k in KNOWN}


def _need(entry: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in entry:
        raise DirectoryError(f"{where}: {key!r} is required")
    return entry[key]


def _flag(entry: Mapping[str, Any], key: str, where: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):  # bool("false") is True: a quoted value must not turn a switch on
        raise DirectoryError(f"{where}: {key!r} must be true or false, not {value!r}")
    return value


def _hold_seconds(group: Mapping[str, Any], where: str) -> int:
    value = group.get("hold_seconds", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 3600:
        raise DirectoryError(f"{where}: 'hold_seconds' must be whole seconds from 0 to 3600, not {value!r}")
    if value and group.get("skip_busy") is not True:
        # callers wait for a free agent only where the PBX is asked who is free
        raise DirectoryError(f"{where}: 'hold_seconds' needs skip_busy = true")
    return value


async def load(conn: psycopg.AsyncConnection, data: Mapping[str, list[dict[str, Any]]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    async with conn.transaction():
        for i, e in enumerate(data.get("employees", [])):
            where = f"employees[{i}]"
            try:
                endpoint = check_endpoint(_need(e, "endpoint", where))
                mobile = require_e164(e["mobile"]) if e.get("mobile") else None
            except ValueError as exc:
                raise DirectoryError(f"{where}: {exc}") from None
            await conn.execute(
                """INSERT INTO employees (name, endpoint, mobile, email, language, recording_policy, categories,
                                          logged_in, paused)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (endpoint) DO UPDATE SET name = EXCLUDED.name, mobile = EXCLUDED.mobile,
                     email = EXCLUDED.email, language = EXCLUDED.language,
                     recording_policy = EXCLUDED.recording_policy, categories = EXCLUDED.categories,
                     logged_in = EXCLUDED.logged_in, paused = EXCLUDED.paused""",
                (e.get("name", endpoint), endpoint, mobile, e.get("email"), e.get("language", "ru"),
                 e.get("recording_policy", "always"), list(e.get("categories", [])),
                 bool(e.get("logged_in", True)), bool(e.get("paused", False))),
            )
        counts["employees"] = len(data.get("employees", []))

        for i, s in enumerate(data.get("schedules", [])):
            where = f"schedules[{i}]"
            row = {
                "timezone": s.get("timezone", "Europe/Moscow"),
                "weekly": s.get("weekly", Schedule_default_weekly()),
                "holiday_country": s.get("holiday_country", "RU") or None,
                "closed_dates": s.get("closed_dates", []),
                "open_dates": s.get("open_dates", []),
                "override": s.get("override") or None,
                "override_until": s.get("override_until"),
            }
            try:
                Schedule.from_row(row)  # the flow must never meet a schedule it cannot read
            except (ValueError, KeyError) as exc:
                raise DirectoryError(f"{where}: {exc}") from None
            await conn.execute(
                """INSERT INTO schedules (name, timezone, weekly, holiday_country, closed_dates, open_dates,
                                          override, override_until)
                   VALUES (%s, %s, %s, %s, %s::date[], %s::date[], %s, %s)
                   ON CONFLICT (name) DO UPDATE SET timezone = EXCLUDED.timezone, weekly = EXCLUDED.weekly,
                     holiday_country = EXCLUDED.holiday_country, closed_dates = EXCLUDED.closed_dates,
                     open_dates = EXCLUDED.open_dates, override = EXCLUDED.override,
                     override_until = EXCLUDED.override_until""",
                (_need(s, "name", where), row["timezone"], Jsonb(row["weekly"]), row["holiday_country"],
                 [str(d) for d in row["closed_dates"]], [str(d) for d in row["open_dates"]],
                 row["override"], row["override_until"]),
            )
        counts["schedules"] = len(data.get("schedules", []))

        for i, g in enumerate(data.get("groups", [])):
            where = f"groups[{i}]"
            cur = await conn.execute(
                """INSERT INTO groups (name, title, strategy, ring_timeout, category, survey_enabled, skip_busy,
                                     hold_seconds)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (name) DO UPDATE SET title = EXCLUDED.title, strategy = EXCLUDED.strategy,
                     ring_timeout = EXCLUDED.ring_timeout, category = EXCLUDED.category,
                     survey_enabled = EXCLUDED.survey_enabled, skip_busy = EXCLUDED.skip_busy,
                     hold_seconds = EXCLUDED.hold_seconds
                   RETURNING id""",
                (_need(g, "name", where), g.get("title", ""), g.get("strategy", "ringall"),
                 int(g.get("ring_timeout", 20)), g.get("category"), bool(g.get("survey", False)),
                 _flag(g, "skip_busy", where), _hold_seconds(g, where)),
            )
            gid = (await cur.fetchone())["id"]
            await conn.execute("DELETE FROM group_members WHERE group_id = %s", (gid,))
            for pos, endpoint in enumerate(g.get("members", [])):
                cur = await conn.execute(
                    """INSERT INTO group_members (group_id, employee_id, position)
                       SELECT %s, id, %s FROM employees WHERE endpoint = %s RETURNING employee_id""",
                    (gid, pos, endpoint),
                )
                if await cur.fetchone() is None:
                    raise DirectoryError(f"{where}: member {endpoint!r} is not an employee endpoint")
            if g.get("owner"):
                await conn.execute(
                    "UPDATE groups SET owner_employee_id = (SELECT id FROM employees WHERE endpoint = %s)"
                    " WHERE id = %s", (g["owner"], gid),
                )
        counts["groups"] = len(data.get("groups", []))

        for i, m in enumerate(data.get("menus", [])):
            where = f"menus[{i}]"
            options = {str(k): str(v) for k, v in _need(m, "options", where).items()}
            default = str(m.get("default_choice", next(iter(options), "1")))
            if default not in options:
                raise DirectoryError(f"{where}: default_choice {default!r} is not one of the options")
            for key, group in options.items():
                if key not in "0123456789*#" or len(key) != 1:
                    raise DirectoryError(f"{where}: option key {key!r} is not a single phone key")
                cur = await conn.execute("SELECT 1 FROM groups WHERE name = %s", (group,))
                if await cur.fetchone() is None:
                    raise DirectoryError(f"{where}: option {key} names unknown group {group!r}")
            await conn.execute(
                """INSERT INTO menus (name, prompt, options, default_choice, timeout, retries)
                   VALUES (%s, %s, %s, %s, %s, %s)
                   ON CONFLICT (name) DO UPDATE SET prompt = EXCLUDED.prompt, options = EXCLUDED.options,
                     default_choice = EXCLUDED.default_choice, timeout = EXCLUDED.timeout,
                     retries = EXCLUDED.retries""",
                (_need(m, "name", where), m.get("prompt", "main_menu"), Jsonb(options), default,
                 float(m.get("timeout", 5)), int(m.get("retries", 2))),
            )
        counts["menus"] = len(data.get("menus", []))

        for i, c in enumerate(data.get("categories", [])):
            where = f"categories[{i}]"
            await _need_row(conn, "groups", c.get("group"), f"{where}: group")
            await conn.execute(
                """INSERT INTO categories (name, title, group_id)
                   VALUES (%s, %s, (SELECT id FROM groups WHERE name = %s))
                   ON CONFLICT (name) DO UPDATE SET title = EXCLUDED.title, group_id = EXCLUDED.group_id""",
                (_need(c, "name", where), c.get("title", ""), c.get("group")),
            )
        counts["categories"] = len(data.get("categories", []))

        for i, n in enumerate(data.get("numbers", [])):
            where = f"numbers[{i}]"
            await _need_row(conn, "categories", n.get("category"), f"{where}: category")
            await conn.execute(
                """INSERT INTO numbers (number, title, greeting, recording_notice, language, category,
                                        group_id, schedule_id, menu_id, sticky, sticky_seconds,
                                        by_last_category, language_menu, overflow_robot, overflow_seconds)
                   VALUES (%s, %s, %s, %s, %s, %s,
                           (SELECT id FROM groups WHERE name = %s),
                           (SELECT id FROM schedules WHERE name = %s),
                           (SELECT id FROM menus WHERE name = %s), %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (number) DO UPDATE SET title = EXCLUDED.title, greeting = EXCLUDED.greeting,
                     recording_notice = EXCLUDED.recording_notice, language = EXCLUDED.language,
                     category = EXCLUDED.category, group_id = EXCLUDED.group_id,
                     schedule_id = EXCLUDED.schedule_id, menu_id = EXCLUDED.menu_id, sticky = EXCLUDED.sticky,
                     sticky_seconds = EXCLUDED.sticky_seconds, by_last_category = EXCLUDED.by_last_category,
                     language_menu = EXCLUDED.language_menu, overflow_robot = EXCLUDED.overflow_robot,
                     overflow_seconds = EXCLUDED.overflow_seconds""",
                (str(_need(n, "number", where)), n.get("title", ""), n.get("greeting", "greeting"),
                 bool(n.get("recording_notice", True)), n.get("language", "ru"), n.get("category"),
                 n.get("group"), n.get("schedule"), n.get("menu"), bool(n.get("sticky", True)),
                 int(n.get("sticky_seconds", 15)), bool(n.get("by_last_category", True)),
                 bool(n.get("language_menu", False)), bool(n.get("overflow_robot", False)),
                 n.get("overflow_seconds")),
            )
            for ref, table in (("group", "groups"), ("schedule", "schedules"), ("menu", "menus")):
                if n.get(ref):
                    cur = await conn.execute(f"SELECT 1 FROM {table} WHERE name = %s", (n[ref],))
                    if await cur.fetchone() is None:
                        raise DirectoryError(f"{where}: unknown {ref} {n[ref]!r}")
        counts["numbers"] = len(data.get("numbers", []))

        for i, c in enumerate(data.get("customers", [])):
            where = f"customers[{i}]"
            try:
                phone = require_e164(str(_need(c, "phone", where)))
            except ValueError as exc:
                raise DirectoryError(f"{where}: {exc}") from None
            await _need_row(conn, "employees", c.get("last_manager"), f"{where}: last_manager", key="endpoint")
            await conn.execute(
                """INSERT INTO customers (phone, name, email, segment, language, timezone, last_manager_id)
                   VALUES (%s, %s, %s, %s, %s, %s, (SELECT id FROM employees WHERE endpoint = %s))
                   ON CONFLICT (phone) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email,
                     segment = EXCLUDED.segment, language = EXCLUDED.language, timezone = EXCLUDED.timezone,
                     last_manager_id = EXCLUDED.last_manager_id""",
                (phone, c.get("name", ""), c.get("email"), c.get("segment", "default"), c.get("language"),
                 c.get("timezone"), c.get("last_manager")),
            )
        counts["customers"] = len(data.get("customers", []))

        for i, o in enumerate(data.get("orders", [])):
            where = f"orders[{i}]"
            try:
                phone = require_e164(str(_need(o, "customer", where)))
            except ValueError as exc:
                raise DirectoryError(f"{where}: {exc}") from None
            await _need_row(conn, "customers", phone, f"{where}: customer", key="phone")
            await conn.execute(
                """INSERT INTO orders (number, customer_id, status, items, total, currency, delivery_date)
                   VALUES (%s, (SELECT id FROM customers WHERE phone = %s), %s, %s, %s, %s, %s)
                   ON CONFLICT (number) DO UPDATE SET customer_id = EXCLUDED.customer_id,
                     status = EXCLUDED.status, items = EXCLUDED.items, total = EXCLUDED.total,
                     currency = EXCLUDED.currency, delivery_date = EXCLUDED.delivery_date, updated_at = now()""",
                (str(_need(o, "number", where)), phone, o.get("status", "new"), Jsonb(o.get("items", [])),
                 str(o.get("total", "0")), o.get("currency", "RUB"), o.get("delivery_date")),
            )
        counts["orders"] = len(data.get("orders", []))
    return counts


async def _need_row(conn: psycopg.AsyncConnection, table: str, value: Any, where: str, key: str = "name") -> None:
    if value is None:
        return
    cur = await conn.execute(f"SELECT 1 FROM {table} WHERE {key} = %s", (value,))
    if await cur.fetchone() is None:
        raise DirectoryError(f"{where} {value!r} does not exist")


def Schedule_default_weekly() -> dict[str, list[list[str]]]:
    day = [["09:00", "18:00"]]
    return {"mon": day, "tue": day, "wed": day, "thu": day, "fri": day, "sat": [], "sun": []}
