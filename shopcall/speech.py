"""Numbers, money, phone digits and dates as words for the TTS, in Russian or English.

Grammar (Russian gender/case/plural forms) comes from num2words; only month and weekday names are tabled here.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal

from num2words import CONVERTER_CLASSES, num2words

LANGS = ("ru", "en")

_MONTHS_RU_GENITIVE = tuple(
    "января февраля марта апреля мая июня июля августа сентября октября ноября декабря".split()
)
_MONTHS_EN = tuple(
    "January February March April May June July August September October November December".split()
)
_SYMBOLS = {
    "ru": {"+": "плюс", "*": "звёздочка", "#": "решётка"},
    "en": {"+": "plus", "*": "star", "#": "hash"},
}
_CENT = Decimal("0.01")


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise ValueError(f"unsupported language {lang!r}, expected one of {LANGS}")


def number_text(n: int, lang: str) -> str:
    """Cardinal number: 21 -> "двадцать один" / "twenty-one"."""
    _check_lang(lang)
    return num2words(int(n), lang=lang)


def digits_text(s: str, lang: str) -> str:
    """Say a phone number / code digit by digit; + * # are named.

    Other characters (spaces, dashes, brackets) become a short pause (", ") so groups
    like "+7 (916) 123-45-67" are read in the grouping the caller sees.
    """
    _check_lang(lang)
    groups: list[list[str]] = [[]]
    for ch in s:
        if ch.isdigit() and ch.isascii():
            groups[-1].append(num2words(int(ch), lang=lang))
        elif ch in _SYMBOLS[lang]:
            groups[-1].append(_SYMBOLS[lang][ch])
        elif groups[-1]:
            groups.append([])
    return ", ".join(" ".join(g) for g in groups if g)


def money_text(amount: Decimal | int | float, currency: str = "RUB", lang: str = "ru") -> str:
    """ "21 рубль 50 копеек" in words; the zero part is left out ("пять рублей", "одна копейка")."""
    _check_lang(lang)
    # float via str so 0.1 stays 0.1; ints must not reach num2words as ints (it reads them as cents)
    value = Decimal(str(amount)) if isinstance(amount, float) else Decimal(amount)
    value = value.quantize(_CENT, rounding=ROUND_HALF_UP)
    minus = value < 0
    value = abs(value)
    try:
        words = num2words(value, lang=lang, to="currency", currency=currency, separator="|")
    except NotImplementedError as e:
        raise ValueError(f"currency {currency!r} is not supported for {lang!r}") from e
    main, cents = (part.strip() for part in words.split("|", 1))
    whole, fraction = int(value), value % 1
    if fraction == 0:
        parts = [main]
    elif whole == 0:
        parts = [cents]
    else:
        parts = [main, cents]
    text = (" " if lang == "ru" else " and ").join(parts)
    if minus:
        text = ("минус " if lang == "ru" else "minus ") + text
    return text


def date_text(d: date, lang: str, with_year: bool = False, case: str = "n") -> str:
    """ "двадцать пятое ноября [две тысячи двадцать шестого года]" / "November twenty-fifth[, 2026 in words]".
    `case` "g" gives the Russian genitive that follows "до" ("до десятого декабря")."""
    _check_lang(lang)
    if lang == "ru":
        day = num2words(d.day, lang="ru", to="ordinal", gender="n", **({"case": case} if case != "n" else {}))
        text = f"{day} {_MONTHS_RU_GENITIVE[d.month - 1]}"
        if with_year:
            text += f" {num2words(d.year, lang='ru', to='ordinal', case='g')} года"
        return text
    text = f"{_MONTHS_EN[d.month - 1]} {num2words(d.day, lang='en', to='ordinal')}"
    if with_year:
        text += f", {num2words(d.year, lang='en', to='year')}"
    return text


_WEEKDAYS_RU_ON = ("в понедельник", "во вторник", "в среду", "в четверг", "в пятницу", "в субботу",
                   "в воскресенье")
_WEEKDAYS_EN = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _day_text(opens: datetime, days: int, lang: str) -> str:
    """Today, tomorrow, the weekday within a week, else the date: when, as one says it before the time."""
    ru = lang == "ru"
    if days < 2:
        return (("сегодня", "завтра") if ru else ("today", "tomorrow"))[days]
    if days < 7:
        return _WEEKDAYS_RU_ON[opens.weekday()] if ru else f"on {_WEEKDAYS_EN[opens.weekday()]}"
    return date_text(opens.date(), "ru", case="g") if ru else f"on {date_text(opens.date(), 'en')}"


def opening_text(opens: datetime, now: datetime, lang: str) -> str:
    """ "Мы откроемся завтра в девять часов." / "We open again on Monday at 9:30 a.m.": when a closed shop
    opens next, both moments in the shop's own time zone (`opens`' zone)."""
    _check_lang(lang)
    day = _day_text(opens, (opens.date() - now.astimezone(opens.tzinfo).date()).days, lang)
    h, m = opens.hour, opens.minute
    if lang == "ru":
        if not h and not m:
            at = "в полночь"
        elif m:
            minutes = num2words(m, lang="ru") if m >= 10 else f"ноль {num2words(m, lang='ru')}"
            at = f"в {num2words(h, lang='ru')} {minutes}"
        else:  # num2words' own Russian plural: час, часа, часов
            at = f"в {num2words(h, lang='ru')} {CONVERTER_CLASSES['ru'].pluralize(h, ('час', 'часа', 'часов'))}"
        return f"Мы откроемся {day} {at}."
    if not h and not m:
        return f"We open again {day} at midnight."
    clock = f"{h % 12 or 12}:{m:02d}" if m else f"{h % 12 or 12}"
    return f"We open again {day} at {clock} {'a.m.' if h < 12 else 'p.m.'}"


def position_text(position: int, lang: str) -> str:
    """ "Ваш номер в очереди — второй." / "You are number 2 in line.": a waiting caller's place."""
    _check_lang(lang)
    if lang == "ru":
        return f"Ваш номер в очереди — {num2words(int(position), lang='ru', to='ordinal')}."
    return f"You are number {int(position)} in line."
