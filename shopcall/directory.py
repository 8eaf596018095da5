"""The shop's directory as the flows need it: which greeting, hours, menu and group a dialled number has."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from psycopg_pool import AsyncConnectionPool

from shopcall.batch import Batcher
from shopcall.call import DialStrategy
from shopcall.group_cache import GroupCache, is_absent
from shopcall.hours import Schedule

log = logging.getLogger("shopcall.directory")

DEFAULT_MENU_OPTIONS = {"1": "sales", "2": "delivery", "3": "accounting"}
CATCH_ALL_NUMBER = "default"  # a numbers row that serves every number without a row of its own


@dataclass(frozen=True)
class Member:
    employee_id: int
    name: str
    endpoint: str
    recording_policy: str = "always"


@dataclass(frozen=True)
class Group:
    id: int
    name: str
    strategy: str
    ring_timeout: int
    members: tuple[Member, ...]  # available ones (logged in, not paused), in ring order
    survey: bool = False
    recording_policy: str | None = None
    skip_busy: bool = False  # agents on a call are not rung (the PBX is asked at ring time)
    hold_seconds: int = 0  # with skip_busy: a caller who finds them all busy waits in line this long

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
    category_title: str = ""  # shown to agents as "[title] caller"
    category_group: str | None = None  # a call-tracking number rings its category's group first
    sticky: bool = True
    sticky_seconds: int = 15
    by_last_category: bool = True
    language_menu: bool = False
    overflow_robot: bool = False
    overflow_seconds: int | None = None
    recording_policy: str | None = None


@dataclass(frozen=True)
class Caller:
    """What we know of the caller before routing: are they a customer, whose, what did they buy last."""

    customer_id: int | None = None
    language: str | None = None  # chosen on an earlier call
    manager: Member | None = None  # the last manager, when logged in and not paused
    manager_state: str = "none"  # none | available | logged_out | paused
    last_category: str | None = None
    last_category_group: str | None = None
    blocked: str | None = None  # on the block list, with this reason ("" when none was given)


@dataclass(frozen=True)
class Order:
    number: str
    status: str
    total: object
    currency: str
    delivery_date: object


# A call's route and caller, one row per (dialled number, caller's E.164) key: the number's own row else the
# catch-all row (route_row NULL: neither), and under caller_* what we know of the caller.
_LOOKUP = """
SELECT k.k_dialled, k.k_phone, r.*, cl.*, bl.*
  FROM {keys}
  LEFT JOIN LATERAL (
       SELECT n.*, n.number AS route_row,
              s.timezone, s.weekly::text AS weekly, s.holiday_country, s.closed_dates, s.open_dates,
              s.override, s.override_until, s.id AS schedule_row,
              m.prompt AS menu_prompt, m.options AS menu_options, m.default_choice,
              m.timeout AS menu_timeout, m.retries AS menu_retries, m.id AS menu_row,
              g.name AS group_name, cat.title AS category_title, cg.name AS category_group
         FROM numbers n
         LEFT JOIN schedules s ON s.id = n.schedule_id
         LEFT JOIN menus m ON m.id = n.menu_id
         LEFT JOIN groups g ON g.id = n.group_id
         LEFT JOIN categories cat ON cat.name = n.category
         LEFT JOIN groups cg ON cg.id = cat.group_id
        WHERE n.number IN (k.k_dialled, %s)
        ORDER BY n.number <> k.k_dialled  -- the number's own row before the catch-all
        LIMIT 1) r ON true
  LEFT JOIN LATERAL (
       SELECT c.id AS caller_id, c.language AS caller_language, e.id AS caller_emp_id,
              e.name AS caller_emp_name, e.endpoint AS caller_endpoint, e.logged_in AS caller_logged_in,
              e.paused AS caller_paused, e.recording_policy AS caller_recording_policy,
              last.category AS caller_last_category, lg.name AS caller_last_category_group
         FROM customers c
         LEFT JOIN employees e ON e.id = c.last_manager_id
         LEFT JOIN LATERAL (
              SELECT item->>'category' AS category FROM orders o, jsonb_array_elements(o.items) item
               WHERE o.customer_id = c.id AND item ? 'category'
               ORDER BY o.created_at DESC, o.id DESC LIMIT 1) last ON true
         LEFT JOIN categories lcat ON lcat.name = last.category
         LEFT JOIN groups lg ON lg.id = lcat.group_id
        WHERE c.phone = k.k_phone) cl ON true
  LEFT JOIN LATERAL (
       SELECT b.reason AS caller_blocked FROM blocked_callers b
        WHERE b.phone = k.k_phone AND (b.until IS NULL OR b.until > now())) bl ON true
"""
# A batch of one names its key in plain parameters: for unnest() of array parameters PostgreSQL's generic
# plan looks a hundred times dearer than one made for the given arrays, so it planned the statement anew on
# every execution (about 1 ms of its CPU a call). A burst's batch pays that once for all its calls.
_LOOKUP_ONE = _LOOKUP.format(keys="(SELECT %s::text AS k_dialled, %s::text AS k_phone) AS k")
_LOOKUP_MANY = _LOOKUP.format(keys="unnest(%s::text[], %s::text[]) AS k(k_dialled, k_phone)")


class Directory:
    def __init__(self, pool: AsyncConnectionPool, *, timezone: str, default_menu: Menu) -> None:
        self.pool = pool
        self.timezone = timezone
        self.default_menu = default_menu
        self.default_schedule = Schedule.default(timezone)
        # parsed schedules by their columns: parsing the weekly JSON and checking the holiday country was a
        # tenth of a routing request's CPU, and a shop has a handful of schedules that rarely change
        self._schedules: dict[tuple, Schedule] = {}
        self._lookups: Batcher[tuple[str, str | None], dict] = Batcher(self._lookup_rows)  # a burst of calls: one query
        self.group_cache = GroupCache()  # used while group_cache.watch() listens (shopcall serve starts it)

    def _schedule(self, row: Mapping) -> Schedule:
        if not row["schedule_row"]:
            return self.default_schedule
        key = (row["timezone"], row["weekly"], row["holiday_country"], tuple(row["closed_dates"] or ()),
               tuple(row["open_dates"] or ()), row["override"], row["override_until"])
        schedule = self._schedules.get(key)
        if schedule is None:
            if len(self._schedules) >= 256:
                self._schedules.clear()
            schedule = self._schedules[key] = Schedule.from_row(row)
        return schedule

    async def _lookup_rows(self, keys: list[tuple[str, str | None]]) -> dict[tuple[str, str | None], dict]:
        """The _LOOKUP rows of a batch of keys, in one statement: route and caller were two round trips of
        the four a call makes."""
        if len(keys) == 1:
            sql, params = _LOOKUP_ONE, [*keys[0], CATCH_ALL_NUMBER]
        else:
            sql, params = _LOOKUP_MANY, [[d for d, _ in keys], [p for _, p in keys], CATCH_ALL_NUMBER]
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, params)
            rows = await cur.fetchall()
            if rows and cur.pgresult is not None and len(rows[0]) != cur.pgresult.nfields:
                # dict rows keep one of two equal column names: a migration gave numbers a name used here
                names = [c.name for c in cur.description or ()]
                dup = sorted({n for n in names if names.count(n) > 1})
                raise RuntimeError(f"route lookup: duplicate column names {dup}")
        return {(r["k_dialled"], r["k_phone"]): r for r in rows}

    async def lookup(self, dialled: str, e164: str | None) -> tuple[NumberRoute, Caller]:
        """The dialled number's route and what we know of the caller, in one round trip (batched with the
        other calls arriving meanwhile)."""
        row = await self._lookups.get((dialled, e164))
        return self._route(dialled, row), self._caller(row)

    async def route(self, dialled: str) -> NumberRoute:
        return (await self.lookup(dialled, None))[0]

    def _route(self, dialled: str, row: Mapping | None) -> NumberRoute:
        """The number's row, else the catch-all row, else the defaults (Mon–Fri 9–18, the standard menu)."""
        if row is None or row["route_row"] is None:
            log.info("number %r has no row and there is no %r row: using defaults", dialled, CATCH_ALL_NUMBER)
            return NumberRoute(dialled, "greeting", True, "ru", self.default_schedule, self.default_menu, None, None)
        schedule = self._schedule(row)
        menu = None
        if row["menu_row"]:
            menu = Menu(row["menu_prompt"], {str(k): str(v) for k, v in row["menu_options"].items()},
                        row["default_choice"], float(row["menu_timeout"]), int(row["menu_retries"]))
        elif not row["group_name"] and not row["category_group"]:
            menu = self.default_menu
        return NumberRoute(
            row["number"], row["greeting"], row["recording_notice"], row["language"], schedule, menu,
            row["group_name"], row["category"], row["category_title"] or row["category"] or "",
            row["category_group"], row["sticky"], row["sticky_seconds"], row["by_last_category"],
            row["language_menu"], row["overflow_robot"], row["overflow_seconds"], row["recording_policy"],
        )

    @staticmethod
    def _caller(row: Mapping | None) -> Caller:
        if row is None:
            return Caller()
        if row["caller_id"] is None:
            return Caller(blocked=row["caller_blocked"])
        manager, state = None, "none"
        if row["caller_emp_id"]:
            state = ("logged_out" if not row["caller_logged_in"] else "paused" if row["caller_paused"]
                     else "available")
            if state == "available":
                manager = Member(row["caller_emp_id"], row["caller_emp_name"], row["caller_endpoint"],
                                 row["caller_recording_policy"])
        return Caller(row["caller_id"], row["caller_language"], manager, state, row["caller_last_category"],
                      row["caller_last_category_group"], row["caller_blocked"])

    async def remember_language(self, e164: str, language: str) -> None:
        """A caller's language choice is kept for their next call (a customer row is made if needed)."""
        async with self.pool.connection() as conn:
            await conn.execute(
                """INSERT INTO customers (phone, language) VALUES (%s, %s)
                   ON CONFLICT (phone) DO UPDATE SET language = EXCLUDED.language""",
                (e164, language),
            )

    async def orders(self, e164: str, limit: int = 5) -> list[Order]:
        """Open orders first (newest first); if there is none, the latest order whatever its state."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """
                SELECT o.number, o.status, o.total, o.currency, o.delivery_date,
                       o.status IN ('delivered', 'cancelled') AS closed
                  FROM orders o JOIN customers c ON c.id = o.customer_id
                 WHERE c.phone = %s
                 ORDER BY closed, o.created_at DESC, o.id DESC
                 LIMIT %s
                """,
                (e164, limit),
            )
            rows = await cur.fetchall()
        open_rows = [r for r in rows if not r["closed"]] or rows[:1]
        return [Order(r["number"], r["status"], r["total"], r["currency"], r["delivery_date"]) for r in open_rows]

    async def set_agent_state(self, endpoint: str, *, logged_in: bool | None = None,
                              paused: bool | None = None) -> tuple[bool, bool] | None:
        """Log an agent in/out or (un)pause them; returns the new (logged_in, paused), None if unknown."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """UPDATE employees SET logged_in = COALESCE(%s, logged_in),
                          paused = CASE WHEN %s::boolean IS NULL THEN paused ELSE %s::boolean END
                    WHERE endpoint = %s RETURNING logged_in, paused""",
                (logged_in, paused, paused, endpoint),
            )
            row = await cur.fetchone()
        return (row["logged_in"], row["paused"]) if row else None

    async def in_wrapup(self, seconds: int) -> frozenset[str]:
        """Endpoints of the agents whose last call ended less than `seconds` ago (inbound.wrapup_seconds)."""
        if seconds <= 0:
            return frozenset()
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT endpoint FROM employees WHERE last_call_ended_at > "
                                     "now() - make_interval(secs => %s)", (seconds,))
            return frozenset(r["endpoint"] for r in await cur.fetchall())

    async def group(self, name: str) -> Group | None:
        """The group and its members who can take a call now, in ringing order: kept in memory while the
        database tells us of every change (shopcall/group_cache.py), else one query."""
        cached = self.group_cache.get(name)
        if not is_absent(cached):
            return cached
        generation = self.group_cache.generation
        group = await self._query_group(name)
        self.group_cache.put(name, group, generation)
        return group

    async def _query_group(self, name: str) -> Group | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """
                SELECT g.*, e.id AS emp_id, e.name AS emp_name, e.endpoint AS emp_endpoint,
                       e.recording_policy AS emp_recording_policy
                  FROM groups g
                  LEFT JOIN (group_members gm JOIN employees e
                             ON e.id = gm.employee_id AND e.logged_in AND NOT e.paused)
                    ON gm.group_id = g.id
                 WHERE g.name = %s
                 ORDER BY (CASE WHEN g.strategy = 'leastrecent' THEN e.last_call_at END) NULLS FIRST,
                          gm.position, e.id
                """,
                (name,),
            )
            rows = await cur.fetchall()
            if not rows:
                return None
            g = rows[0]
            members = [Member(r["emp_id"], r["emp_name"], r["emp_endpoint"], r["emp_recording_policy"])
                       for r in rows if r["emp_id"] is not None]
            if g["strategy"] == "roundrobin" and members:
                # start after the member who was offered the last call, and remember who starts next time
                start = g["rr_position"] % len(members)
                members = members[start:] + members[:start]
                await conn.execute("UPDATE groups SET rr_position = rr_position + 1 WHERE id = %s", (g["id"],))
        return Group(g["id"], g["name"], g["strategy"], g["ring_timeout"], tuple(members), g["survey_enabled"],
                     g["recording_policy"], g["skip_busy"], g["hold_seconds"])

    async def employee_by_endpoint(self, endpoint: str) -> int | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT id FROM employees WHERE endpoint = %s", (endpoint,))
            row = await cur.fetchone()
        return row["id"] if row else None
