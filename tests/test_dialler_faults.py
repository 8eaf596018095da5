"""Fault drill for the dialler: PostgreSQL stops while calls are being dialled. The dialler pauses (its
rounds fail and are logged), keeps what the PBX said about calls in flight until the database is back,
then settles each once; nothing is dialled twice. Real PostgreSQL (the throw-away embedded server is
stopped and started); the PBX is tests/test_outbound.py's ScriptedOriginator, the real AMI path being
covered in tests/test_e2e_outbound.py."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import PoolTimeout

from shopcall import db, dialler
from tests.test_outbound import WED_NOON, ScriptedOriginator, app, event  # noqa: F401 (fixture)


class HeldOriginator(ScriptedOriginator):
    """Every dial rings until the test lets it end (busy)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def originate(self, phone, **kw):
        self.calls.append({"phone": phone, **kw})
        await self.release.wait()
        return dialler.DialOutcome("busy", "scripted")


async def test_database_stops_mid_dial_the_dialler_pauses_then_settles_once(app, pg_server):  # noqa: F811
    if pg_server["server"] is None:
        pytest.skip("SHOPCALL_TEST_DATABASE_URL points at a server these tests must not stop")
    async with app.pool.connection() as c:
        await c.execute("UPDATE campaigns SET calls_per_second = 100")
    for i in range(3):
        await event(app.pool, type="order_created", phone=f"+7495123470{i}", order_number=f"f{i}",
                    items=[{"name": "a"}])
    pbx = HeldOriginator()
    worker = dialler.Dialler(app.pool, app.config, {"asterisk": pbx}, clock=lambda: WED_NOON, worker="f1")
    assert len(await worker.round()) == 3
    await asyncio.sleep(0.3)
    assert len(pbx.calls) == 3  # three calls ringing
    db.stop_embedded(pg_server["pgdata"])
    try:
        with pytest.raises((psycopg.OperationalError, PoolTimeout)):
            await worker.round()  # paused: run_forever logs this and tries again next poll
        pbx.release.set()  # the PBX answers "busy" for all three while the database is down
        await asyncio.sleep(1.0)
        assert worker.tasks, "the outcomes are held, not dropped"
    finally:
        pg_server["server"].ensure_postgres_running()
    await asyncio.wait_for(worker.drain(), 60)
    async with await psycopg.AsyncConnection.connect(pg_server["url"], autocommit=True, row_factory=dict_row) as c:
        jobs = await (await c.execute("SELECT * FROM dial_jobs ORDER BY id")).fetchall()
        attempts = await (await c.execute("SELECT * FROM dial_attempts ORDER BY id")).fetchall()
    assert [(j["status"], j["attempts"], j["reason"]) for j in jobs] == [("pending", 1, "retry_after_busy")] * 3
    assert [a["outcome"] for a in attempts] == ["busy"] * 3
    assert len(pbx.calls) == 3  # nothing was dialled again while the database was away
    # and once due again, each is dialled exactly once more
    later = await dialler.claim(app.pool, app.config, now=jobs[0]["due_at"], worker="f1")
    assert sorted(d.job_id for d in later) == [j["id"] for j in jobs] and {d.number for d in later} == {2}
