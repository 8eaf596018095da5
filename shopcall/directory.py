"""The shop's directory as the flows need it: which greeting, hours, menu and group a dialled number has."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from psycopg_pool import AsyncConnectionPool

from shopcall.call import DialStrategy
from shopcall.hours import Schedule

log = logging.getLogger("shopcall.directory")

DEFAULT_MENU_OPTIONS = {"1": "sales", "2": "delivery", "3": "accounting"}
CATCH_ALL_NUMBER = "default"  # a numbers row that serves every number without a row of its own


@dataclass(frozen=True)
class Member:
    employee_id: int
    name: str
    endpoint: str


@dataclass(frozen=True)
class Group:
    id: int
    name: str
    strategy: str
    ring_timeout: int
    members: tuple[Member, ...]  # available ones (logged in, not paused), in ring order

    @property
    def dial_strategy(self) -> DialStrategy:
        return DialStrategy.RINGALL if self.strategy == "ringall" else DialStrategy.HUNT


@dataclass(frozen=True)
class Menu:
    prompt: str = "main_menu"
    options: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_MENU_OPTIONS))
    default_choice: str = "1"
    timeout: float = 5.0
    retries: int = 2


@dataclass(frozen=True)
class NumberRoute:
    number: str
    greeting: str
    recording_notice: bool
    language: str
    schedule: Schedule
    menu: Menu | None
    group_name: str | None  # the number's own group: taken when it has no menu
    category: str | None


class Directory:
    def __init__(self, pool: AsyncConnectionPool, *, timezone: str, default_menu: Menu) -> None:
        self.pool = pool
        self.timezone = timezone
        self.default_menu = default_menu

    async def route(self, dialled: str) -> NumberRoute:
        """The number's row, else the catch-all row, else the defaults (Mon–Fri 9–18, the standard menu)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """
                SELECT n.*, s.timezone, s.weekly, s.holiday_country, s.closed_dates, s.open_dates,
                       s.override, s.override_until, s.id AS schedule_row,
                       m.prompt AS menu_prompt, m.options AS menu_options, m.default_choice,
                       m.timeout AS menu_timeout, m.retries AS menu_retries, m.id AS menu_row,
                       g.name AS group_name
                  FROM numbers n
                  LEFT JOIN schedules s ON s.id = n.schedule_id
                  LEFT JOIN menus m ON m.id = n.menu_id
                  LEFT JOIN groups g ON g.id = n.group_id
                 WHERE n.number = ANY(%s)
                 ORDER BY n.number = %s DESC
                 LIMIT 1
                """,
                ([dialled, CATCH_ALL_NUMBER], dialled),
            )
            row = await cur.fetchone()
        if row is None:
            log.info("number %r has no row and there is no %r row: using defaults", dialled, CATCH_ALL_NUMBER)
            return NumberRoute(dialled, "greeting", True, "ru", Schedule.default(self.timezone),
                               self.default_menu, None, None)
        schedule = Schedule.from_row(row) if row["schedule_row"] else Schedule.default(self.timezone)
        menu = None
        if row["menu_row"]:
            menu = Menu(row["menu_prompt"], {str(k): str(v) for k, v in row["menu_options"].items()},
                        row["default_choice"], float(row["menu_timeout"]), int(row["menu_retries"]))
        elif not row["group_name"]:
            menu = self.default_menu
        return NumberRoute(row["number"], row["greeting"], row["recording_notice"], row["language"],
                           schedule, menu, row["group_name"], row["category"])

    async def group(self, name: str) -> Group | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT * FROM groups WHERE name = %s", (name,))
            g = await cur.fetchone()
            if g is None:
                return None
            order = {
                "leastrecent": "e.last_call_at NULLS FIRST, gm.position, e.id",
            }.get(g["strategy"], "gm.position, e.id")
            cur = await conn.execute(
                f"""
                SELECT e.id, e.name, e.endpoint FROM group_members gm
                  JOIN employees e ON e.id = gm.employee_id
                 WHERE gm.group_id = %s AND e.logged_in AND NOT e.paused
                 ORDER BY {order}
                """,
                (g["id"],),
            )
            members = [Member(r["id"], r["name"], r["endpoint"]) for r in await cur.fetchall()]
            if g["strategy"] == "roundrobin" and members:
                # start after the member who was offered the last call, and remember who starts next time
                start = g["rr_position"] % len(members)
                members = members[start:] + members[:start]
                await conn.execute("UPDATE groups SET rr_position = rr_position + 1 WHERE id = %s", (g["id"],))
        return Group(g["id"], g["name"], g["strategy"], g["ring_timeout"], tuple(members))

    async def employee_by_endpoint(self, endpoint: str) -> int | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT id FROM employees WHERE endpoint = %s", (endpoint,))
            row = await cur.fetchone()
        return row["id"] if row else None
