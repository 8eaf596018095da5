"""What the benches through a real PBX share: the root check, a throw-away PostgreSQL, and a real `shopcall
serve` with the test directory plus two numbers (office hours "always", group sales; no recording notice, no
sticky routing, recording off):

- 710, a group number: greeting, "connecting", the group rings (the benches through Asterisk);
- 711, the same with a menu between greeting and "connecting": menu "bench" (one option, 1 = sales, which is
  also the default; 1 s to press, no retry), so the call plays the greeting, waits in play_and_get_digits /
  Read and rings sales whether or not the caller pressed anything (bench/e2e_ratio.py --pbx freeswitch).

`pbx="asterisk"` serves `--only agi` and renders the Asterisk include; `pbx="freeswitch"` serves `--only
esl` (its outbound-socket server on [esl] port) and renders the FreeSWITCH XML; the caller adds the PBX's
own sections ([freeswitch]) with `sections`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from shopcall import db
from tests.pbx import DEFAULT_ROOT, root_is_ready
from tests.pbx.freeswitch import PREFIX, freeswitch_is_installed
from tests.pbx.service import DIRECTORY, Shopcall, free_tcp_port

NUMBER = "710"
MENU_NUMBER = "711"  # NUMBER with menu "bench" between the greeting and "connecting"
MENU_TIMEOUT = 1.0  # seconds to press the menu's key (FreeSWITCH's play_and_get_digits takes 1 s at least)
MENU_DEFAULT = "1"  # the choice taken when nothing is pressed: group sales, as the only option


def root_missing(pbx: str = "asterisk") -> str | None:
    """Why the bench cannot run here, or None."""
    if pbx == "freeswitch":
        return None if freeswitch_is_installed() else \
            f"needs FreeSWITCH at {PREFIX} (tests/run.sh installs it from ../shared/freeswitch)"
    if not root_is_ready(DEFAULT_ROOT) or os.geteuid() != 0:
        return f"needs root and the Asterisk root at {DEFAULT_ROOT} (scripts/build-asterisk-root.sh)"
    return None


def postmaster_pid(pgdata: Path) -> int | None:
    """The embedded PostgreSQL's server process (its backends are its children), from postmaster.pid."""
    try:
        return int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


@dataclass
class Service:
    work: Path  # the bench's work directory (kept afterwards, for its logs)
    data: Path  # shopcall's data_dir
    url: str  # the throw-away database
    app: Shopcall
    include: Path  # the rendered dialplan include (Asterisk) or XML (FreeSWITCH)
    pgdata: Path

    @property
    def config(self) -> Path:
        return self.work / "shopcall.toml"


@contextlib.contextmanager
def shopcall_service(prefix: str, *, shop: str = "Bench", sections: str = "", database: str = "",
                     pbx: str = "asterisk") -> Iterator[Service]:
    """Start PostgreSQL and `shopcall serve` (which builds every prompt before it listens); stop both after.
    `database`: more lines of its [database] table, `sections`: more tables; `pbx`: whose calls it serves
    (`--only agi` for asterisk, `--only esl` for freeswitch) and whose dialplan it renders."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    data = work / "shopcall"
    data.mkdir()
    pgdata = work / "pg" / "data"
    url = db.start_embedded(pgdata)
    app = None
    try:
        asyncio.run(db.migrate_url(url))
        agi_port = free_tcp_port()
        part = "agi" if pbx == "asterisk" else "esl"
        config = work / "shopcall.toml"
        config.write_text(f"""
[shop]
name = "{shop}"
[paths]
data_dir = "{data}"
[database]
url = "{url}"
pool_max = 10
{database}
[{part}]
port = {agi_port}
backlog = 4096
[log]
level = "WARNING"
{sections}
""", encoding="utf-8")
        app = Shopcall(config, work / "shopcall.log", agi_port, part)
        app.cli("db", "load", str(DIRECTORY))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("""INSERT INTO menus (name, options, default_choice, timeout, retries)
                            VALUES ('bench', %s, %s, %s, 0)""",
                         (Jsonb({MENU_DEFAULT: "sales"}), MENU_DEFAULT, MENU_TIMEOUT))
            for number, menu in ((NUMBER, None), (MENU_NUMBER, "bench")):
                conn.execute("""INSERT INTO numbers (number, title, schedule_id, group_id, menu_id, recording_notice,
                                                     sticky, by_last_category, recording_policy)
                                SELECT %s, 'bench', s.id, g.id, (SELECT id FROM menus WHERE name = %s), false,
                                       false, false, 'never'
                                  FROM schedules s, groups g WHERE s.name = 'always' AND g.name = 'sales'""",
                             (number, menu))
        include = data / ("asterisk-shopcall.conf" if pbx == "asterisk" else "freeswitch-shopcall.xml")
        app.cli("render-dialplan", "--pbx", pbx, "-o", str(include))
        app.start()
        yield Service(work, data, url, app, include, pgdata)
    finally:
        if app:
            app.stop()
        db.stop_embedded(pgdata)
