"""Render the PBX-side contexts an admin includes (dialplan/*.j2) from the configuration and directory."""

from __future__ import annotations

import logging
from pathlib import Path

import jinja2
from psycopg_pool import AsyncConnectionPool

from shopcall.call import check_endpoint
from shopcall.config import Config

log = logging.getLogger("shopcall.dialplan")
# What the rendered Asterisk include offers, sent to us in its AGI calls (dp=N): 2 adds [<prefix>-answered]
# for Dial's option U. An include rendered before (no dp) gets Dials without it: nothing it lacks is used.
ASTERISK_INCLUDE_VERSION = 2

TEMPLATES = Path(__file__).resolve().parent.parent / "dialplan"
PBXES = ("asterisk", "freeswitch")
TEMPLATE = {"asterisk": "asterisk.conf.j2", "freeswitch": "freeswitch.xml.j2"}


async def fallback_members(pool: AsyncConnectionPool, group: str) -> list[str]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT e.endpoint FROM groups g JOIN group_members gm ON gm.group_id = g.id
               JOIN employees e ON e.id = gm.employee_id WHERE g.name = %s ORDER BY gm.position, e.id""",
            (group,),
        )
        return [row["endpoint"] for row in await cur.fetchall()]


def fallback_group(config: Config, pbx: str) -> str:
    return config.freeswitch.fallback_group if pbx == "freeswitch" else config.asterisk.fallback_group


def render(config: Config, pbx: str, fallback_endpoints: list[str], include_path: str) -> str:
    if pbx not in PBXES:
        raise ValueError(f"no dialplan for {pbx!r} yet (available: {', '.join(PBXES)})")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    # endpoint names are validated, so nothing from the database can change the Dial() arguments
    template, joiner = (config.freeswitch.endpoint_template, ",") if pbx == "freeswitch" else (
        config.asterisk.endpoint_template, "&")
    dial = joiner.join(template.format(endpoint=check_endpoint(e)) for e in fallback_endpoints)
    if not dial:
        log.warning("fallback group %r has no members: the rendered fallback plays congestion",
                    fallback_group(config, pbx))
    if pbx == "freeswitch":
        return env.get_template(TEMPLATE[pbx]).render(
            context=config.freeswitch.context,
            socket=f"{config.freeswitch.socket_host}:{config.freeswitch.socket_port or config.esl.port}",
            fallback_group=config.freeswitch.fallback_group,
            fallback_dial=dial,
            fallback_timeout=config.inbound.ring_timeout,
            include_path=include_path,
        )
    return env.get_template(TEMPLATE[pbx]).render(
        version=ASTERISK_INCLUDE_VERSION,
        prefix=config.asterisk.context_prefix,
        agi_url=config.agi_url,
        fallback_group=config.asterisk.fallback_group,
        fallback_dial=dial,
        fallback_timeout=config.inbound.ring_timeout,
        include_path=include_path,
    )
