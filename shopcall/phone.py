"""Phone numbers: everything we store or dial is E.164, normalised here and nowhere else."""

from __future__ import annotations

import sys
from functools import lru_cache

import phonenumbers


class InvalidPhone(ValueError):
    pass


# what PBXes and carriers put where the caller's number is withheld
_WITHHELD = frozenset({"", "anonymous", "unknown", "restricted", "private", "unavailable", "withheld"})


def is_withheld(caller_number: str) -> bool:
    """The PBX shows no number for this caller (anonymous, withheld, nothing at all)."""
    return caller_number.strip().lower() in _WITHHELD


@lru_cache(maxsize=4096)  # parsing is ~0.5 ms, a tenth of a call's CPU; callers and campaigns repeat numbers
def to_e164(raw: str, region: str = "RU") -> str | None:
    """E.164 for a number as a PBX or a shop gives it ("8 916 …", "7916…", "+44…"); None if it is not one
    (an internal extension, "anonymous", garbage)."""
    text = (raw or "").strip()
    if not text or len(text) > 40 or not text.isprintable():
        return None  # a control character means garbage, not a number to call back
    candidates = [text]
    digits = "".join(ch for ch in text if ch.isdigit())
    if not text.startswith("+") and digits:
        candidates.append("+" + digits)  # a foreign number delivered without its "+"
    for candidate in candidates:
        try:
            number = phonenumbers.parse(candidate, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return None


@lru_cache(maxsize=4096)
def is_mobile(e164: str) -> bool:
    """Whether a text message can reach the number (mobile, or a plan where that cannot be told apart)."""
    try:
        kind = phonenumbers.number_type(phonenumbers.parse(e164))
    except phonenumbers.NumberParseException:
        return False
    return kind in (phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE)


def cli_phone(raw: str | None, region: str, what: str) -> str | None:
    """A command's phone argument as E.164; None, after saying so on stderr, when it is not one."""
    e164 = to_e164(raw or "", region)
    if e164 is None:
        print(f"shopcall: {what} needs a phone number (got {raw!r})", file=sys.stderr)
    return e164


def require_e164(raw: str, region: str = "RU") -> str:
    e164 = to_e164(raw, region)
    if e164 is None:
        raise InvalidPhone(f"not a valid phone number: {raw!r}")
    return e164
