"""What the benches through the real Asterisk share: the root check, a throw-away PostgreSQL, and a real
`shopcall serve --only agi` with the test directory plus number 710, a group number (greeting, office hours
"always", group sales; no recording notice, no sticky routing, recording off)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from shopcall import db
from tests.pbx import DEFAULT_ROOT, root_is_ready
from tests.pbx.service import DIRECTORY, Shopcall, free_tcp_port

NUMBER = "710"


def root_missing() -> str | None:
    """Why the bench cannot run here, or None."""
    if not root_is_ready(DEFAULT_ROOT) or os.geteuid() != 0:
        return f"needs root and the Asterisk root at {DEFAULT_ROOT} (scripts/build-asterisk-root.sh)"
    return None


@dataclass
class Service:
    work: Path  # the bench's work directory (kept afterwards, for its logs)
    data: Path  # shopcall's data_dir
    url: str  # the throw-away database
    app: Shopcall
    include: Path  # the rendered dialplan include


@contextlib.contextmanager
def shopcall_service(prefix: str, *, shop: str = "Bench", sections: str = "", database: str = "") -> Iterator[Service]:
    """Start PostgreSQL and `shopcall serve` (which builds every prompt before it listens); stop both after.
    `database`: more lines of its [database] table, `sections`: more tables."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    data = work / "shopcall"
    data.mkdir()
    pgdata = work / "pg" / "data"
    url = db.start_embedded(pgdata)
    app = None
    try:
        asyncio.run(db.migrate_url(url))
        agi_port = free_tcp_port()
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
[agi]
port = {agi_port}
backlog = 4096
[log]
level = "WARNING"
{sections}
""", encoding="utf-8")
        app = Shopcall(config, work / "shopcall.log", agi_port)
        app.cli("db", "load", str(DIRECTORY))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("""INSERT INTO numbers (number, title, schedule_id, group_id, recording_notice, sticky,
                                                 by_last_category, recording_policy)
                            SELECT %s, 'bench', s.id, g.id, false, false, false, 'never'
                              FROM schedules s, groups g WHERE s.name = 'always' AND g.name = 'sales'""",
                         (NUMBER,))
        include = data / "asterisk-shopcall.conf"
        app.cli("render-dialplan", "--pbx", "asterisk", "-o", str(include))
        app.start()
        yield Service(work, data, url, app, include)
    finally:
        if app:
            app.stop()
        db.stop_embedded(pgdata)
