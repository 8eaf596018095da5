"""Office hours: is the shop open right now, and if not, when does it open."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays

# An interval end of 00:00 means 24:00 (the end of that day): `time` cannot hold 24:00.
END_OF_DAY = time(0, 0)

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
NEXT_OPENING_DAYS = 14

Reason = Literal[
    "override_open", "override_closed", "closed_date", "holiday", "open_date", "in_hours", "after_hours"
]
Interval = tuple[time, time]

_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})$")


@dataclass(frozen=True)
class HoursDecision:
    open: bool
    reason: Reason


@dataclass(frozen=True)
class Schedule:
    timezone: str
    # weekday (0=Mon) -> open intervals [start, end); end END_OF_DAY (00:00) = 24:00
    weekly: dict[int, list[Interval]]
    holiday_country: str | None = "RU"
    closed_dates: frozenset[date] = frozenset()
    # worked days despite a weekend/holiday (RU transferred Saturdays); use Monday's hours
    open_dates: frozenset[date] = frozenset()
    override: Literal["open", "closed"] | None = None
    override_until: datetime | None = None
    zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "zone", ZoneInfo(self.timezone))
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"unknown time zone {self.timezone!r}") from e
        for day, intervals in self.weekly.items():
            if day not in range(7):
                raise ValueError(f"weekday must be 0..6 (0 = Monday), got {day!r}")
            for start, end in intervals:
                if end != END_OF_DAY and end <= start:
                    raise ValueError(f"{DAY_NAMES[day]}: interval end {end} is not after start {start}")
        if self.override not in (None, "open", "closed"):
            raise ValueError(f"override must be 'open', 'closed' or None, got {self.override!r}")
        if self.override_until is not None and self.override_until.utcoffset() is None:
            raise ValueError("override_until must be timezone-aware")
        if self.holiday_country is not None:
            _holidays(self.holiday_country, 2000)  # fail now, not during a call

    @classmethod
    def default(cls, timezone: str = "Europe/Moscow") -> Schedule:
        nine_to_six = [(time(9), time(18))]
        return cls(timezone=timezone, weekly={d: list(nine_to_six) for d in range(5)})

    @classmethod
    def from_row(cls, row: Mapping) -> Schedule:
        """Build from a `schedules` row (see sql/001_core.sql); extra columns are ignored."""
        tz = row.get("timezone")
        if not tz:
            raise ValueError("schedule row has no timezone")
        override_until = row.get("override_until")
        if isinstance(override_until, str):
            override_until = datetime.fromisoformat(override_until)
        country = row.get("holiday_country", "RU")
        return cls(
            timezone=tz,
            weekly=parse_weekly(row.get("weekly")),
            holiday_country=country or None,
            closed_dates=_dates(row.get("closed_dates"), "closed_dates"),
            open_dates=_dates(row.get("open_dates"), "open_dates"),
            override=row.get("override") or None,
            override_until=override_until,
        )


def parse_weekly(raw: object) -> dict[int, list[Interval]]:
    """Parse `{"mon": [["09:00", "18:00"]], ...}`; "24:00" is allowed as an end."""
    if isinstance(raw, str | bytes):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"weekly is not valid JSON: {e}") from e
    if not isinstance(raw, Mapping):
        raise ValueError(f'weekly must be an object like {{"mon": [["09:00", "18:00"]]}}, got {raw!r}')
    weekly: dict[int, list[Interval]] = {}
    for name, intervals in raw.items():
        key = str(name).lower()
        if key not in DAY_NAMES:
            raise ValueError(f"weekly: unknown day {name!r} (expected one of {', '.join(DAY_NAMES)})")
        if not isinstance(intervals, list):
            raise ValueError(f"weekly.{key}: expected a list of [start, end] pairs, got {intervals!r}")
        parsed: list[Interval] = []
        for pair in intervals:
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise ValueError(f"weekly.{key}: expected a [start, end] pair, got {pair!r}")
            start = _parse_time(pair[0], key, is_end=False)
            end = _parse_time(pair[1], key, is_end=True)
            if end != END_OF_DAY and end <= start:
                raise ValueError(f"weekly.{key}: end {pair[1]} is not after start {pair[0]}")
            parsed.append((start, end))
        weekly[DAY_NAMES.index(key)] = sorted(parsed)
    return weekly


def _parse_time(value: object, day: str, *, is_end: bool) -> time:
    m = _TIME_RE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"weekly.{day}: bad time {value!r}, expected HH:MM")
    hh, mm = int(m[1]), int(m[2])
    if is_end and (hh, mm) == (24, 0):
        return END_OF_DAY
    if is_end and (hh, mm) == (0, 0):
        raise ValueError(f"weekly.{day}: end 00:00 is ambiguous, write 24:00 for midnight")
    if hh > 23 or mm > 59:
        raise ValueError(f"weekly.{day}: bad time {value!r}")
    return time(hh, mm)


def _dates(values: Iterable | None, column: str) -> frozenset[date]:
    out = set()
    for v in values or ():
        if isinstance(v, datetime):
            raise ValueError(f"{column}: expected dates, got datetime {v!r}")
        if isinstance(v, str):
            try:
                v = date.fromisoformat(v)
            except ValueError as e:
                raise ValueError(f"{column}: bad date {v!r}") from e
        if not isinstance(v, date):
            raise ValueError(f"{column}: expected dates, got {v!r}")
        out.add(v)
    return frozenset(out)


@lru_cache(maxsize=64)
def _holidays(country: str, year: int) -> holidays.HolidayBase:
    try:
        return holidays.country_holidays(country, years=year)
    except NotImplementedError as e:
        raise ValueError(f"holidays package does not know country {country!r}") from e


def _in_intervals(intervals: Iterable[Interval], t: time) -> bool:
    return any(start <= t and (end == END_OF_DAY or t < end) for start, end in intervals)


def _override_active(schedule: Schedule, now: datetime) -> bool:
    return schedule.override is not None and (
        schedule.override_until is None or now < schedule.override_until
    )


def check(schedule: Schedule, now: datetime) -> HoursDecision:
    """Decide open/closed at `now` (aware). Override > closed_dates > open_dates > holiday > weekly."""
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    if _override_active(schedule, now):
        if schedule.override == "open":
            return HoursDecision(True, "override_open")
        return HoursDecision(False, "override_closed")
    local = now.astimezone(schedule.zone)
    day, t = local.date(), local.time()
    if day in schedule.closed_dates:
        return HoursDecision(False, "closed_date")
    if day in schedule.open_dates:
        if _in_intervals(schedule.weekly.get(0, ()), t):
            return HoursDecision(True, "open_date")
        return HoursDecision(False, "after_hours")
    if schedule.holiday_country and day in _holidays(schedule.holiday_country, day.year):
        return HoursDecision(False, "holiday")
    if _in_intervals(schedule.weekly.get(day.weekday(), ()), t):
        return HoursDecision(True, "in_hours")
    return HoursDecision(False, "after_hours")


def next_opening(schedule: Schedule, now: datetime) -> datetime | None:
    """First moment >= now when the shop is open (now itself if open), within 14 days; else None."""
    if check(schedule, now).open:
        return now
    local = now.astimezone(schedule.zone)
    # The decision can only flip to open at an interval start, a midnight or the override expiry.
    candidates: set[datetime] = set()
    if schedule.override_until is not None and schedule.override_until > now:
        candidates.add(schedule.override_until.astimezone(schedule.zone))
    for offset in range(NEXT_OPENING_DAYS + 1):
        day = local.date() + timedelta(days=offset)
        starts = {time(0)}
        for weekday in {day.weekday(), 0}:
            starts.update(start for start, _ in schedule.weekly.get(weekday, ()))
        for start in starts:
            moment = datetime.combine(day, start, tzinfo=schedule.zone)
            if moment > now:
                candidates.add(moment)
    for moment in sorted(candidates):
        if check(schedule, moment).open:
            return moment
    return None
