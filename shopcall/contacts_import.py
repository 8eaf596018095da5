"""Bulk import of the shop's contacts from a CSV file (`shopcall import FILE`).

The whole file is decoded and its header checked before anything is written, so a wrong file (not UTF-8,
unknown columns) changes nothing. Rows are then checked and written batch by batch, one transaction per
batch: a bad row is reported, not fatal, and 100k rows take a few hundred round trips, not 100k.

An empty cell leaves what the database has; only a value overwrites. Consent, do-not-call and blacklist
columns take yes/no (true/false, 1/0).
"""

from __future__ import annotations

import asyncio
import csv
import difflib
import functools
import io
import sys
import zoneinfo
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from psycopg_pool import AsyncConnectionPool

from shopcall.phone import to_e164

COLUMNS = ("phone", "name", "email", "segment", "language", "timezone", "consent_ad", "consent_service",
           "blacklisted", "do_not_call", "subscribe_sku", "product_name", "product_url")
_BOOLEAN_COLUMNS = ("consent_ad", "consent_service", "blacklisted", "do_not_call")
_TRUE = ("yes", "true", "1", "да")
_FALSE = ("no", "false", "0", "нет")
_LANGUAGES = ("ru", "en")
_DELIMITERS = ",;\t"
DUPLICATE = "duplicate of line"  # reasons "duplicate of line N" are one group in the report
REPORT_LINES = 20


class ContactsFileError(ValueError):
    """The file as a whole cannot be imported (encoding, header); nothing was written."""


@dataclass(frozen=True)
class Rejected:
    line: int
    phone: str
    reason: str


@dataclass
class Summary:
    total: int = 0
    imported: int = 0  # new customers
    updated: int = 0  # customers that were there already
    rejected: list[Rejected] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"{self.total} rows: {self.imported} new, {self.updated} updated, "
                 f"{len(self.rejected)} rejected"]
        groups: dict[str, list[Rejected]] = {}
        for r in self.rejected:
            groups.setdefault(DUPLICATE if r.reason.startswith(DUPLICATE) else r.reason, []).append(r)
        for reason, rows in groups.items():
            lines.append(f"rejected, {'duplicate of an earlier line' if reason == DUPLICATE else reason}: "
                         f"{len(rows)}")
            for r in rows[:REPORT_LINES]:
                detail = f" ({r.reason})" if r.reason != reason else ""
                lines.append(f"  line {r.line}: {r.phone!r}{detail}")
            if len(rows) > REPORT_LINES:
                lines.append(f"  ... and {len(rows) - REPORT_LINES} more")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Contact:
    phone: str
    values: dict[str, str]  # customer columns with a value in the file
    flags: dict[str, bool]  # boolean columns with a value in the file
    sku: str | None
    product_name: str | None
    product_url: str | None


# --------------------------------------------------------------------------- reading the file


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # -sig: Excel writes a BOM, and it must not stick to "phone"
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ContactsFileError(f"line {line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the file as "
                                "UTF-8 (in Excel: CSV UTF-8)") from None


def _delimiter(header_line: str) -> str:
    # the header holds only our column names, so any , ; or tab in it is the delimiter
    counts = {d: header_line.count(d) for d in _DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _columns(header: Sequence[str]) -> list[str]:
    names = [h.strip().lower() for h in header]
    unknown = [n for n in names if n and n not in COLUMNS]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, COLUMNS, n=1)
            hints.append(f"{n!r} (did you mean {close[0]!r}?)" if close else repr(n))
        raise ContactsFileError(f"line 1: unknown column(s) {', '.join(hints)}; allowed: {', '.join(COLUMNS)}")
    repeated = sorted({n for n in names if n and names.count(n) > 1})
    if repeated:
        raise ContactsFileError(f"line 1: column(s) given twice: {', '.join(repeated)}")
    if "phone" not in names:
        raise ContactsFileError(f"line 1: no 'phone' column; allowed: {', '.join(COLUMNS)}")
    return names  # "" for an empty header cell (a trailing delimiter): that column is ignored


def _read(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The column names and the data records with the line each starts on (a quoted value may span lines)."""
    text = _decode(path.read_bytes())
    first = text.split("\n", 1)[0]
    if not first.strip():
        raise ContactsFileError("line 1: no header line (expected column names such as phone,name)")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(first))
    try:
        columns = _columns(next(reader))
        records = []
        start = reader.line_num + 1
        for fields in reader:
            if any(f.strip() for f in fields):  # blank lines are skipped
                records.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise ContactsFileError(f"line {reader.line_num}: {exc}") from None
    return columns, records


# --------------------------------------------------------------------------- checking rows


@functools.lru_cache(maxsize=1024)
def _is_timezone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # OSError: odd names reach the filesystem
        return False
    return True


class _Bad(Exception):
    pass


def _contact(row: dict[str, str], phone: str) -> _Contact:
    values: dict[str, str] = {}
    for name in ("name", "email", "segment"):
        if row.get(name):
            values[name] = row[name]
    if language := row.get("language", "").lower():
        if language not in _LANGUAGES:
            raise _Bad(f"language: {row['language']!r} is not one of {', '.join(_LANGUAGES)}")
        values["language"] = language
    if tz := row.get("timezone"):
        if not _is_timezone(tz):
            raise _Bad(f"timezone: {tz!r} is not a time zone name such as Europe/Moscow")
        values["timezone"] = tz
    flags: dict[str, bool] = {}
    for name in _BOOLEAN_COLUMNS:
        if value := row.get(name, "").lower():
            if value not in _TRUE + _FALSE:
                raise _Bad(f"{name}: {row[name]!r} is not yes/no, true/false or 1/0")
            flags[name] = value in _TRUE
    sku = row.get("subscribe_sku") or None
    if sku is None:
        for name in ("product_name", "product_url"):
            if row.get(name):
                raise _Bad(f"{name}: given without subscribe_sku")
    return _Contact(phone, values, flags, sku, row.get("product_name") or None, row.get("product_url") or None)


class _Checker:
    """Turns records into contacts, remembering the phones already seen in the file."""

    def __init__(self, columns: list[str], region: str, summary: Summary) -> None:
        self.columns = columns
        self.region = region
        self.summary = summary
        self.seen: dict[str, int] = {}  # E.164 -> first line
        self.phone_at = columns.index("phone")

    def check(self, records: Sequence[tuple[int, list[str]]]) -> list[_Contact]:
        good = []
        for line, fields in records:
            raw = fields[self.phone_at].strip() if len(fields) > self.phone_at else ""
            try:
                if len(fields) > len(self.columns):
                    raise _Bad(f"{len(fields)} values but the header has {len(self.columns)} columns")
                row = {c: v.strip() for c, v in zip(self.columns, fields, strict=False) if c}
                phone = to_e164(raw, self.region)
                if phone is None:
                    raise _Bad("not a phone number")
                if phone in self.seen:
                    raise _Bad(f"{DUPLICATE} {self.seen[phone]}")
                self.seen[phone] = line  # even if the row is bad below: the first one wins
                good.append(_contact(row, phone))
            except _Bad as exc:
                self.summary.rejected.append(Rejected(line, raw, str(exc)))
        return good


# --------------------------------------------------------------------------- writing

_CUSTOMER_ROWS = """unnest(%(phone)s::text[], %(name)s::text[], %(email)s::text[], %(segment)s::text[],
                           %(language)s::text[], %(timezone)s::text[], %(blacklisted)s::boolean[])
                    AS v(phone, name, email, segment, language, timezone, blacklisted)"""

_INSERT_CUSTOMERS = f"""
INSERT INTO customers (phone, name, email, segment, language, timezone, blacklisted)
SELECT phone, coalesce(name, ''), email, coalesce(segment, 'default'), language, timezone,
       coalesce(blacklisted, false)
FROM {_CUSTOMER_ROWS}
ON CONFLICT (phone) DO NOTHING RETURNING phone
"""

# a separate statement (not ON CONFLICT DO UPDATE) because an empty cell must keep the stored value
_UPDATE_CUSTOMERS = f"""
UPDATE customers c SET name = coalesce(v.name, c.name), email = coalesce(v.email, c.email),
       segment = coalesce(v.segment, c.segment), language = coalesce(v.language, c.language),
       timezone = coalesce(v.timezone, c.timezone), blacklisted = coalesce(v.blacklisted, c.blacklisted),
       updated_at = now()
FROM {_CUSTOMER_ROWS}
WHERE c.phone = v.phone AND v.phone <> ALL(%(inserted)s::text[])
"""

_CONSENTS = """
INSERT INTO consents (phone, purpose, granted, source, updated_at)
SELECT phone, purpose, granted, 'import', now()
FROM unnest(%s::text[], %s::text[], %s::boolean[]) AS v(phone, purpose, granted)
ON CONFLICT (phone, purpose) DO UPDATE SET granted = EXCLUDED.granted, source = 'import', updated_at = now()
"""

_SUBSCRIBE = """
INSERT INTO stock_subscriptions (phone, sku, product_name, product_url)
SELECT phone, sku, coalesce(product_name, ''), product_url
FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[]) AS v(phone, sku, product_name, product_url)
ON CONFLICT (phone, sku) DO UPDATE SET notified_at = NULL,
    product_name = coalesce(nullif(EXCLUDED.product_name, ''), stock_subscriptions.product_name),
    product_url = coalesce(EXCLUDED.product_url, stock_subscriptions.product_url)
"""


async def _write(pool: AsyncConnectionPool, contacts: list[_Contact]) -> tuple[int, int]:
    """Write one batch in one transaction; returns (new customers, updated customers)."""
    if not contacts:
        return 0, 0
    params: dict[str, list] = {"phone": [c.phone for c in contacts]}
    for name in ("name", "email", "segment", "language", "timezone"):
        params[name] = [c.values.get(name) for c in contacts]
    params["blacklisted"] = [c.flags.get("blacklisted") for c in contacts]
    consents = [(c.phone, purpose, c.flags[f"consent_{purpose}"])
                for c in contacts for purpose in ("ad", "service") if f"consent_{purpose}" in c.flags]
    dnc_add = [c.phone for c in contacts if c.flags.get("do_not_call") is True]
    dnc_remove = [c.phone for c in contacts if c.flags.get("do_not_call") is False]
    subs = [(c.phone, c.sku, c.product_name, c.product_url) for c in contacts if c.sku]
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute(_INSERT_CUSTOMERS, params)
        inserted = [r["phone"] for r in await cur.fetchall()]
        cur = await conn.execute(_UPDATE_CUSTOMERS, {**params, "inserted": inserted})
        updated = cur.rowcount
        if consents:
            await conn.execute(_CONSENTS, [list(col) for col in zip(*consents, strict=True)])
        if dnc_add:
            await conn.execute(
                """INSERT INTO do_not_call (phone, source) SELECT unnest(%s::text[]), 'import'
                   ON CONFLICT (phone) DO NOTHING""", (dnc_add,))
        if dnc_remove:
            await conn.execute("DELETE FROM do_not_call WHERE phone = ANY(%s::text[])", (dnc_remove,))
        if subs:
            await conn.execute(_SUBSCRIBE, [list(col) for col in zip(*subs, strict=True)])
    return len(inserted), updated


async def import_contacts(
    pool: AsyncConnectionPool, path: Path, *, region: str = "RU",
    progress: Callable[[int, int], None] | None = None, batch: int = 500,
) -> Summary:
    """Import a contacts CSV; raises ContactsFileError (before writing anything) for a file it cannot read."""
    columns, records = await asyncio.to_thread(_read, Path(path))
    summary = Summary(total=len(records))
    checker = _Checker(columns, region, summary)
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        contacts = await asyncio.to_thread(checker.check, chunk)  # phonenumbers is CPU work
        new, updated = await _write(pool, contacts)
        summary.imported += new
        summary.updated += updated
        if progress is not None:
            progress(start + len(chunk), len(records))
    return summary


def progress_bar(stream: TextIO = sys.stderr, width: int = 30) -> Callable[[int, int], None]:
    """A progress callback: a bar redrawn in place on a terminal; in a log, a line per 10% at most."""
    tty = getattr(stream, "isatty", lambda: False)()
    last_decile = -1

    def show(done: int, total: int) -> None:
        nonlocal last_decile
        share = done / total if total else 1.0
        percent = int(share * 100)
        if tty:
            filled = int(share * width)
            stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {percent}%")
            if done >= total:
                stream.write("\n")
        else:
            decile = int(share * 10)
            if decile <= last_decile and done < total:
                return
            last_decile = decile
            stream.write(f"{done}/{total} {percent}%\n")
        stream.flush()

    return show
