"""Contacts CSV import into a real PostgreSQL."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from shopcall.contacts_import import ContactsFileError, Rejected, Summary, import_contacts, progress_bar


def write(tmp_path: Path, text: str, name: str = "contacts.csv", *, bom: bool = False) -> Path:
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


async def customers(conn) -> dict[str, dict]:
    cur = await conn.execute("SELECT * FROM customers ORDER BY phone")
    return {r["phone"]: r for r in await cur.fetchall()}


async def rows(conn, sql: str) -> list[tuple]:
    cur = await conn.execute(sql)
    return [tuple(r.values()) for r in await cur.fetchall()]


MIXED = """Phone,Name,Email,Segment,Language,Timezone
+7 916 123-45-67,Иван Петров,ivan@example.com,vip,ru,Europe/Moscow
8 (916) 123-45-68,Olga,,,EN,
12,Short,,,,
abc,Letters,,,,
89161234567,Ivan again,,,,
+79161234569,Bad Lang,,,de,
+79161234570,Bad Zone,,,,Mars/Olympus

+79161234571,"Smith, John",,,,Asia/Vladivostok
"""


async def test_mixed_file(conn, pool, tmp_path):
    summary = await import_contacts(pool, write(tmp_path, MIXED))
    assert (summary.total, summary.imported, summary.updated) == (8, 3, 0)
    assert summary.rejected == [
        Rejected(4, "12", "not a phone number"),
        Rejected(5, "abc", "not a phone number"),
        Rejected(6, "89161234567", "duplicate of line 2"),
        Rejected(7, "+79161234569", "language: 'de' is not one of ru, en"),
        Rejected(8, "+79161234570", "timezone: 'Mars/Olympus' is not a time zone name such as Europe/Moscow"),
    ]
    got = await customers(conn)
    assert set(got) == {"+79161234567", "+79161234568", "+79161234571"}
    ivan = got["+79161234567"]
    assert (ivan["name"], ivan["email"], ivan["segment"], ivan["language"], ivan["timezone"]) == (
        "Иван Петров", "ivan@example.com", "vip", "ru", "Europe/Moscow")
    olga = got["+79161234568"]
    assert (olga["name"], olga["email"], olga["segment"], olga["language"], olga["timezone"]) == (
        "Olga", None, "default", "en", None)
    assert got["+79161234571"]["name"] == "Smith, John"
    report = summary.report()
    assert "8 rows: 3 new, 0 updated, 5 rejected" in report
    assert "rejected, not a phone number: 2\n  line 4: '12'\n  line 5: 'abc'" in report
    assert "line 6: '89161234567' (duplicate of line 2)" in report
    assert "language: 'de'" in report


async def test_semicolon_file_with_bom(conn, pool, tmp_path):
    path = write(tmp_path, "phone;name;segment\r\n+79161234567;Иванов; опт \r\n+79161234568;Петров;\r\n", bom=True)
    summary = await import_contacts(pool, path)
    assert (summary.total, summary.imported, summary.rejected) == (2, 2, [])
    got = await customers(conn)
    assert got["+79161234567"]["name"] == "Иванов" and got["+79161234567"]["segment"] == "опт"
    assert got["+79161234568"]["segment"] == "default"


async def test_tab_delimited(conn, pool, tmp_path):
    summary = await import_contacts(pool, write(tmp_path, "name\tphone\nAnna\t+44 20 7946 0958\n"))
    assert summary.imported == 1
    assert list(await customers(conn)) == ["+442079460958"]


async def test_reimport_updates_only_given_values(conn, pool, tmp_path):
    first = "phone,name,email,segment,language\n+79161234567,Ivan,ivan@example.com,vip,ru\n"
    assert (await import_contacts(pool, write(tmp_path, first, "a.csv"))).imported == 1
    [before] = (await customers(conn)).values()
    second = "phone,name,email,segment,language\n89161234567,,new@example.com,,\n+79161234568,Olga,,,\n"
    summary = await import_contacts(pool, write(tmp_path, second, "b.csv"))
    assert (summary.total, summary.imported, summary.updated) == (2, 1, 1)
    got = await customers(conn)
    assert len(got) == 2
    ivan = got["+79161234567"]
    assert ivan["id"] == before["id"]
    assert (ivan["name"], ivan["email"], ivan["segment"], ivan["language"]) == (
        "Ivan", "new@example.com", "vip", "ru")
    assert ivan["updated_at"] > before["updated_at"]
    # the same file again: nothing new, nothing duplicated
    again = await import_contacts(pool, write(tmp_path, second, "b.csv"))
    assert (again.imported, again.updated) == (0, 2)
    assert len(await customers(conn)) == 2


async def test_consent_dnc_blacklist_and_subscriptions(conn, pool, tmp_path):
    await conn.execute("INSERT INTO do_not_call (phone, source) VALUES ('+79161234568', 'dtmf')")
    text = """phone,consent_ad,consent_service,blacklisted,do_not_call,subscribe_sku,product_name,product_url
+79161234567,yes,No,TRUE,1,SKU-1,Чайник,https://shop.example/p/1
+79161234568,0,,,no,,,
+79161234569,,,,,,,
+79161234570,maybe,,,,,,
+79161234571,,,,,,Lamp,
"""
    summary = await import_contacts(pool, write(tmp_path, text))
    assert summary.imported == 3
    assert [(r.line, r.reason) for r in summary.rejected] == [
        (5, "consent_ad: 'maybe' is not yes/no, true/false or 1/0"),
        (6, "product_name: given without subscribe_sku"),
    ]
    assert await rows(conn, "SELECT phone, purpose, granted, source FROM consents ORDER BY 1, 2") == [
        ("+79161234567", "ad", True, "import"), ("+79161234567", "service", False, "import"),
        ("+79161234568", "ad", False, "import"),
    ]
    assert await rows(conn, "SELECT phone, source FROM do_not_call") == [("+79161234567", "import")]
    got = await customers(conn)
    assert [p for p, c in got.items() if c["blacklisted"]] == ["+79161234567"]
    assert await rows(conn, "SELECT phone, sku, product_name, product_url, notified_at FROM stock_subscriptions") \
        == [("+79161234567", "SKU-1", "Чайник", "https://shop.example/p/1", None)]

    # a later file: consent withdrawn, blacklist lifted, the product was notified and is subscribed again
    await conn.execute("UPDATE stock_subscriptions SET notified_at = now()")
    later = "phone,consent_ad,blacklisted,do_not_call,subscribe_sku\n+79161234567,no,false,,SKU-1\n"
    await import_contacts(pool, write(tmp_path, later, "later.csv"))
    assert await rows(conn, "SELECT granted FROM consents WHERE phone = '+79161234567' AND purpose = 'ad'") \
        == [(False,)]
    assert not (await customers(conn))["+79161234567"]["blacklisted"]
    assert await rows(conn, "SELECT phone FROM do_not_call") == [("+79161234567",)]  # empty cell: unchanged
    assert await rows(conn, "SELECT product_name, notified_at FROM stock_subscriptions") == [("Чайник", None)]


async def test_unknown_column_writes_nothing(conn, pool, tmp_path):
    text = "phone,name,fone_number\n+79161234567,Ivan,1\n"
    with pytest.raises(ContactsFileError) as err:
        await import_contacts(pool, write(tmp_path, text))
    assert "'fone_number'" in str(err.value) and "allowed: phone, name, email" in str(err.value)
    assert await customers(conn) == {}


async def test_file_errors(conn, pool, tmp_path):
    with pytest.raises(ContactsFileError, match="no 'phone' column"):
        await import_contacts(pool, write(tmp_path, "name,email\nIvan,i@example.com\n"))
    cp1251 = tmp_path / "cp1251.csv"
    cp1251.write_bytes("phone,name\n+79161234567,Ivan\n+79161234568,Иван\n".encode("cp1251"))
    with pytest.raises(ContactsFileError, match="line 3: not UTF-8"):
        await import_contacts(pool, cp1251)
    with pytest.raises(ContactsFileError, match="no header"):
        await import_contacts(pool, write(tmp_path, ""))
    assert await customers(conn) == {}


async def test_twenty_thousand_rows(conn, pool, tmp_path):
    lines = ["phone,name,consent_service"] + [f"+7916{i:07d},Customer {i},yes" for i in range(20000)]
    path = write(tmp_path, "\n".join(lines) + "\n")
    calls: list[tuple[int, int]] = []
    summary = await import_contacts(pool, path, progress=lambda done, total: calls.append((done, total)))
    assert (summary.total, summary.imported, summary.rejected) == (20000, 20000, [])
    assert calls[-1] == (20000, 20000) and len(calls) == 40
    assert (await rows(conn, "SELECT count(*) FROM customers")) == [(20000,)]
    assert (await rows(conn, "SELECT count(*) FROM consents")) == [(20000,)]


def test_report_truncates_long_groups():
    summary = Summary(total=30, rejected=[Rejected(i + 2, "x", "not a phone number") for i in range(25)])
    report = summary.report()
    assert report.count("line ") == 20 and "... and 5 more" in report


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar():
    tty = Tty()
    bar = progress_bar(tty)
    bar(1200, 5000)
    bar(5000, 5000)
    assert tty.getvalue().startswith("\r[#######.......................] 1200/5000 24%")
    assert tty.getvalue().endswith("5000/5000 100%\n")
    log = io.StringIO()
    bar = progress_bar(log)
    for done in range(100, 5001, 100):
        bar(done, 5000)
    printed = log.getvalue().splitlines()
    assert len(printed) <= 11 and printed[-1] == "5000/5000 100%"
