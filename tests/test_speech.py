from datetime import UTC, date, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from shopcall.speech import date_text, digits_text, money_text, number_text, opening_text


@pytest.mark.parametrize(
    ("n", "ru", "en"),
    [
        (0, "ноль", "zero"),
        (1, "один", "one"),
        (2, "два", "two"),
        (5, "пять", "five"),
        (11, "одиннадцать", "eleven"),
        (21, "двадцать один", "twenty-one"),
        (22, "двадцать два", "twenty-two"),
        (101, "сто один", "one hundred and one"),
        (1000, "одна тысяча", "one thousand"),
        (2000000, "два миллиона", "two million"),
    ],
)
def test_number_text(n: int, ru: str, en: str) -> None:
    assert number_text(n, "ru") == ru
    assert number_text(n, "en") == en


def test_digits_text() -> None:
    assert digits_text("79161234567", "ru") == "семь девять один шесть один два три четыре пять шесть семь"
    assert digits_text("+7 (916) 123-45-67", "ru") == (
        "плюс семь, девять один шесть, один два три, четыре пять, шесть семь"
    )
    assert digits_text("*100#", "ru") == "звёздочка один ноль ноль решётка"
    assert digits_text("+1 202", "en") == "plus one, two zero two"
    assert digits_text("", "ru") == ""


@pytest.mark.parametrize(
    ("amount", "ru", "en"),
    [
        (1, "один рубль", "one rouble"),
        (2, "два рубля", "two roubles"),
        (5, "пять рублей", "five roubles"),
        (11, "одиннадцать рублей", "eleven roubles"),
        (21, "двадцать один рубль", "twenty-one roubles"),
        (Decimal("21.50"), "двадцать один рубль пятьдесят копеек", "twenty-one roubles and fifty kopeks"),
        (21.5, "двадцать один рубль пятьдесят копеек", "twenty-one roubles and fifty kopeks"),
        (Decimal("0.01"), "одна копейка", "one kopek"),
        (Decimal("2.02"), "два рубля две копейки", "two roubles and two kopeks"),
        (0, "ноль рублей", "zero roubles"),
        (1500, "одна тысяча пятьсот рублей", "one thousand, five hundred roubles"),
        (Decimal("-3"), "минус три рубля", "minus three roubles"),
        (Decimal("0.005"), "одна копейка", "one kopek"),  # rounded half up to kopecks
    ],
)
def test_money_rub(amount: Decimal | int | float, ru: str, en: str) -> None:
    assert money_text(amount, "RUB", "ru") == ru
    assert money_text(amount, "RUB", "en") == en


def test_money_default_is_rubles_in_russian() -> None:
    assert money_text(5) == "пять рублей"


def test_money_other_currencies() -> None:
    assert money_text(Decimal("1.01"), "USD", "en") == "one dollar and one cent"
    assert money_text(Decimal("2.50"), "USD", "ru") == "два доллара пятьдесят центов"
    assert money_text(5, "EUR", "ru") == "пять евро"
    assert money_text(Decimal("21.21"), "EUR", "en") == "twenty-one euro and twenty-one cents"


def test_money_unknown_currency() -> None:
    with pytest.raises(ValueError, match="XYZ"):
        money_text(1, "XYZ", "ru")


@pytest.mark.parametrize(
    ("d", "ru", "en"),
    [
        (date(2026, 1, 1), "первое января", "January first"),
        (date(2026, 3, 2), "второе марта", "March second"),
        (date(2026, 2, 23), "двадцать третье февраля", "February twenty-third"),
        (date(2026, 12, 31), "тридцать первое декабря", "December thirty-first"),
        (date(2026, 11, 25), "двадцать пятое ноября", "November twenty-fifth"),
        (date(2026, 5, 3), "третье мая", "May third"),
    ],
)
def test_date_text(d: date, ru: str, en: str) -> None:
    assert date_text(d, "ru") == ru
    assert date_text(d, "en") == en


def test_date_with_year() -> None:
    d = date(2026, 11, 25)
    assert date_text(d, "ru", with_year=True) == "двадцать пятое ноября две тысячи двадцать шестого года"
    assert date_text(d, "en", with_year=True) == "November twenty-fifth, twenty twenty-six"
    assert date_text(date(2000, 1, 1), "ru", with_year=True) == "первое января двухтысячного года"
    assert date_text(date(1999, 12, 31), "ru", with_year=True) == (
        "тридцать первое декабря тысяча девятьсот девяносто девятого года"
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda: number_text(1, "de"),
        lambda: digits_text("1", "RU"),
        lambda: money_text(1, "RUB", "fr"),
        lambda: date_text(date(2026, 1, 1), ""),
    ],
)
def test_unknown_language(call) -> None:
    with pytest.raises(ValueError, match="language"):
        call()


_MSK = ZoneInfo("Europe/Moscow")


@pytest.mark.parametrize(
    ("opens", "lang", "text"),
    [
        ((2026, 11, 25, 21, 0), "ru", "Мы откроемся сегодня в двадцать один час."),
        ((2026, 11, 26, 9, 0), "ru", "Мы откроемся завтра в девять часов."),
        ((2026, 11, 26, 2, 0), "ru", "Мы откроемся завтра в два часа."),
        ((2026, 11, 27, 9, 5), "ru", "Мы откроемся в пятницу в девять ноль пять."),
        ((2026, 12, 1, 10, 30), "ru", "Мы откроемся во вторник в десять тридцать."),
        ((2026, 12, 5, 9, 0), "ru", "Мы откроемся пятого декабря в девять часов."),
        ((2026, 11, 26, 9, 0), "en", "We open again tomorrow at 9 a.m."),
        ((2026, 11, 28, 13, 30), "en", "We open again on Saturday at 1:30 p.m."),
        ((2026, 11, 26, 0, 0), "en", "We open again tomorrow at midnight."),
        ((2026, 11, 26, 0, 0), "ru", "Мы откроемся завтра в полночь."),
        ((2026, 11, 26, 0, 30), "en", "We open again tomorrow at 12:30 a.m."),
        ((2026, 12, 9, 12, 0), "en", "We open again on December ninth at 12 p.m."),
        # in UTC it is already the 25th at 17:00, but the day is the shop's: 23:30 Moscow is still "today"
        ((2026, 11, 25, 23, 30), "en", "We open again today at 11:30 p.m."),
    ],
)
def test_opening_text_says_when_a_closed_shop_opens_in_its_own_zone(opens, lang, text):
    now = datetime(2026, 11, 25, 17, 0, tzinfo=UTC)  # Wednesday 20:00 in Moscow, still the 25th
    assert opening_text(datetime(*opens, tzinfo=_MSK), now, lang) == text
