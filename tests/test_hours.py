from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from shopcall.hours import END_OF_DAY, HoursDecision, Schedule, check, next_opening

MSK = ZoneInfo("Europe/Moscow")


def at(y: int, m: int, d: int, hh: int = 0, mm: int = 0) -> datetime:
    return datetime(y, m, d, hh, mm, tzinfo=MSK)


@pytest.fixture
def sched() -> Schedule:
    return Schedule.default("Europe/Moscow")


# 2026-11-23 is a Monday, 2026-11-28 a Saturday.
def test_monday_morning_open(sched: Schedule) -> None:
    assert check(sched, at(2026, 11, 23, 10)) == HoursDecision(True, "in_hours")


def test_before_opening_closed(sched: Schedule) -> None:
    assert check(sched, at(2026, 11, 23, 8, 59)) == HoursDecision(False, "after_hours")


def test_end_is_exclusive(sched: Schedule) -> None:
    assert check(sched, at(2026, 11, 23, 17, 59)).open
    assert check(sched, at(2026, 11, 23, 18, 0)) == HoursDecision(False, "after_hours")


def test_saturday_closed(sched: Schedule) -> None:
    assert check(sched, at(2026, 11, 28, 12)) == HoursDecision(False, "after_hours")


@pytest.mark.parametrize("day", [date(2026, 1, 1), date(2027, 1, 1), date(2026, 11, 4), date(2027, 11, 4)])
def test_russian_holidays_closed(sched: Schedule, day: date) -> None:
    assert check(sched, datetime.combine(day, time(12), MSK)) == HoursDecision(False, "holiday")


def test_holidays_ignored_without_country() -> None:
    s = Schedule(timezone="Europe/Moscow", weekly={2: [(time(9), time(18))]}, holiday_country=None)
    assert check(s, at(2026, 11, 4, 12)) == HoursDecision(True, "in_hours")  # a Wednesday


def test_timezone_conversion(sched: Schedule) -> None:
    now = datetime(2026, 11, 23, 6, 30, tzinfo=UTC)  # 09:30 in Moscow (UTC+3)
    assert check(sched, now) == HoursDecision(True, "in_hours")
    assert not check(sched, datetime(2026, 11, 23, 5, 30, tzinfo=UTC)).open  # 08:30 MSK
    vlad = Schedule.default("Asia/Vladivostok")  # UTC+10: 06:30 UTC is 16:30 there
    assert check(vlad, now).open
    assert not check(vlad, datetime(2026, 11, 23, 8, 0, tzinfo=UTC)).open  # 18:00 there


def test_naive_now_rejected(sched: Schedule) -> None:
    with pytest.raises(ValueError, match="aware"):
        check(sched, datetime(2026, 11, 23, 10))


def test_override_open_at_night() -> None:
    s = Schedule(timezone="Europe/Moscow", weekly=Schedule.default().weekly, override="open")
    assert check(s, at(2026, 11, 28, 3)) == HoursDecision(True, "override_open")
    assert check(s, at(2026, 1, 1, 3)) == HoursDecision(True, "override_open")


def test_override_closed_in_hours() -> None:
    s = Schedule(
        timezone="Europe/Moscow",
        weekly=Schedule.default().weekly,
        override="closed",
        override_until=at(2026, 11, 23, 12),
    )
    assert check(s, at(2026, 11, 23, 10)) == HoursDecision(False, "override_closed")
    assert check(s, at(2026, 11, 23, 12)) == HoursDecision(True, "in_hours")  # until is exclusive


def test_expired_override_ignored() -> None:
    s = Schedule(
        timezone="Europe/Moscow",
        weekly=Schedule.default().weekly,
        override="open",
        override_until=at(2026, 11, 23, 20),
    )
    assert check(s, at(2026, 11, 23, 19)) == HoursDecision(True, "override_open")
    assert check(s, at(2026, 11, 23, 21)) == HoursDecision(False, "after_hours")


def test_closed_dates_beat_hours() -> None:
    s = Schedule(
        timezone="Europe/Moscow",
        weekly=Schedule.default().weekly,
        closed_dates=frozenset({date(2026, 11, 23)}),
    )
    assert check(s, at(2026, 11, 23, 10)) == HoursDecision(False, "closed_date")
    assert check(s, at(2026, 11, 24, 10)).open


def test_open_dates_use_monday_hours() -> None:
    weekly = {0: [(time(10), time(16))], 1: [(time(9), time(18))]}
    s = Schedule(
        timezone="Europe/Moscow",
        weekly=weekly,
        open_dates=frozenset({date(2026, 11, 28), date(2026, 1, 2)}),  # a Saturday and a holiday
    )
    assert check(s, at(2026, 11, 28, 11)) == HoursDecision(True, "open_date")
    assert check(s, at(2026, 11, 28, 9, 30)) == HoursDecision(False, "after_hours")
    assert check(s, at(2026, 11, 28, 16)) == HoursDecision(False, "after_hours")
    assert check(s, at(2026, 1, 2, 11)) == HoursDecision(True, "open_date")


def test_closed_date_beats_open_date() -> None:
    d = date(2026, 11, 28)
    s = Schedule(
        timezone="Europe/Moscow",
        weekly=Schedule.default().weekly,
        closed_dates=frozenset({d}),
        open_dates=frozenset({d}),
    )
    assert check(s, at(2026, 11, 28, 11)) == HoursDecision(False, "closed_date")


def test_24h_schedule() -> None:
    s = Schedule(
        timezone="Europe/Moscow",
        weekly={d: [(time(0), END_OF_DAY)] for d in range(7)},
        holiday_country=None,
    )
    for hh, mm in [(0, 0), (3, 0), (12, 0), (23, 59)]:
        assert check(s, at(2026, 11, 28, hh, mm)).open
    assert check(s, datetime(2026, 11, 28, 23, 59, 59, 999999, tzinfo=MSK)).open


def test_from_row_24h_and_defaults() -> None:
    row = {
        "id": 1,
        "name": "round the clock",
        "timezone": "Europe/Moscow",
        "weekly": {"mon": [["00:00", "24:00"]], "sat": [["10:00", "14:00"], ["20:00", "24:00"]]},
        "holiday_country": None,
        "closed_dates": [],
        "open_dates": [date(2026, 11, 29)],
        "override": None,
        "override_until": None,
    }
    s = Schedule.from_row(row)
    assert s.weekly == {0: [(time(0), END_OF_DAY)], 5: [(time(10), time(14)), (time(20), END_OF_DAY)]}
    assert s.holiday_country is None
    assert s.open_dates == frozenset({date(2026, 11, 29)})
    assert check(s, at(2026, 11, 23, 23, 59)).open
    assert check(s, at(2026, 11, 28, 23, 30)).open
    assert not check(s, at(2026, 11, 28, 15)).open
    assert check(s, at(2026, 11, 24, 12)) == HoursDecision(False, "after_hours")  # tue missing = closed


def test_from_row_json_text_and_override() -> None:
    row = {
        "timezone": "Europe/Moscow",
        "weekly": '{"mon": [["09:00", "18:00"]]}',
        "holiday_country": "RU",
        "closed_dates": None,
        "open_dates": None,
        "override": "closed",
        "override_until": datetime(2026, 11, 23, 12, tzinfo=UTC),
    }
    s = Schedule.from_row(row)
    assert check(s, at(2026, 11, 23, 10)) == HoursDecision(False, "override_closed")


@pytest.mark.parametrize(
    ("weekly", "message"),
    [
        ({"mon": [["9am", "18:00"]]}, "bad time"),
        ({"mon": [["09:00", "25:00"]]}, "bad time"),
        ({"mon": [["09:60", "18:00"]]}, "bad time"),
        ({"mon": [["18:00", "09:00"]]}, "not after start"),
        ({"mon": [["09:00", "09:00"]]}, "not after start"),
        ({"mon": [["09:00", "00:00"]]}, "24:00"),
        ({"mon": [["24:00", "24:00"]]}, "bad time"),
        ({"monday": [["09:00", "18:00"]]}, "unknown day"),
        ({"mon": [["09:00"]]}, "pair"),
        ({"mon": "09:00-18:00"}, "list"),
        (["mon"], "object"),
        ("{not json", "JSON"),
    ],
)
def test_from_row_bad_weekly(weekly: object, message: str) -> None:
    row = {"timezone": "Europe/Moscow", "weekly": weekly}
    with pytest.raises(ValueError, match=message):
        Schedule.from_row(row)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"timezone": "Mars/Olympus", "weekly": {}}, "time zone"),
        ({"timezone": None, "weekly": {}}, "timezone"),
        ({"timezone": "Europe/Moscow", "weekly": {}, "holiday_country": "XX"}, "XX"),
        ({"timezone": "Europe/Moscow", "weekly": {}, "override": "maybe"}, "override"),
        ({"timezone": "Europe/Moscow", "weekly": {}, "override_until": datetime(2026, 1, 1)}, "aware"),
        ({"timezone": "Europe/Moscow", "weekly": {}, "closed_dates": ["2026-13-01"]}, "closed_dates"),
    ],
)
def test_from_row_bad_fields(row: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule.from_row(row)


def test_next_opening(sched: Schedule) -> None:
    # Friday evening -> Monday 09:00
    assert next_opening(sched, at(2026, 11, 27, 19)) == at(2026, 11, 30, 9)
    # already open -> now
    now = at(2026, 11, 23, 10)
    assert next_opening(sched, now) == now
    # New Year: Dec 31 (substituted day off) .. Jan 8 closed in 2026/2027 -> first working day
    opening = next_opening(sched, at(2025, 12, 30, 19))
    assert opening == at(2026, 1, 12, 9)
    # Same morning
    assert next_opening(sched, at(2026, 11, 23, 7)) == at(2026, 11, 23, 9)


def test_next_opening_after_override_expires() -> None:
    s = Schedule(
        timezone="Europe/Moscow",
        weekly=Schedule.default().weekly,
        override="closed",
        override_until=at(2026, 11, 23, 11, 30),
    )
    assert next_opening(s, at(2026, 11, 23, 10)) == at(2026, 11, 23, 11, 30)


def test_next_opening_none_when_closed_for_long() -> None:
    s = Schedule(timezone="Europe/Moscow", weekly=Schedule.default().weekly, override="closed")
    assert next_opening(s, at(2026, 11, 23, 10)) is None
    never = Schedule(timezone="Europe/Moscow", weekly={})
    assert next_opening(never, at(2026, 11, 23, 10)) is None


def test_next_opening_utc_input_returns_local_zone(sched: Schedule) -> None:
    opening = next_opening(sched, datetime(2026, 11, 23, 3, 0, tzinfo=UTC))  # 06:00 MSK
    assert opening == at(2026, 11, 23, 9)
    assert opening is not None and opening.utcoffset() == timedelta(hours=3)
