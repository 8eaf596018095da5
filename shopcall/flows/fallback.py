"""The dialplan's own fallback, recorded: a call our server could not route (down, killed mid-call, a bug)
rings the fallback group from the rendered dialplan, which no flow sees. At the call's hangup the
dialplan's hangup handler reports it here, so it has its row (missed-call statistics) and a missed caller
gets a callback request, as any other missed call. If the flow had written a row before it failed, this
one completes it (the same uniqueid): who answered, and how it ended.

Arguments (the rendered handler passes them): `number`, the number the caller dialled; `flow_dial`, the
PBX's dial status when the flow stopped (ANSWER: an agent had already talked to the caller, and the
fallback did not ring); `agistatus`, why the flow stopped. A server that is still down at hangup gets no
report: Asterisk logs the failed AGI and the call is only in Asterisk's CDR.

On FreeSWITCH the same report is the channel's CHANNEL_HANGUP_COMPLETE, read by our inbound event socket
client (esl/hangup_report.py), with the same arguments taken from the channel's variables.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from shopcall.app import App
from shopcall.call import Call, DialStatus
from shopcall.calllog import CallRecord, now
from shopcall.dialplan import fallback_group
from shopcall.flows import flow

log = logging.getLogger("shopcall.fallback")

_WORD = re.compile(r"[A-Z]{1,16}\Z")  # DIALSTATUS and AGISTATUS are upper-case words
_UNIQUEID = re.compile(r"(\d{9,11})\.\d+\Z")  # Asterisk's uniqueid: the channel's creation time, a sequence


def _word(args: Mapping[str, str], key: str) -> str:
    value = args.get(key, "") or ""
    return value if _WORD.match(value) else ""


def started_at(uniqueid: str, fallback: datetime) -> datetime:
    """When the channel was created, as Asterisk's uniqueid says (to the second); else `fallback`."""
    m = _UNIQUEID.match(uniqueid)
    if m is None:
        return fallback
    at = datetime.fromtimestamp(int(m.group(1)), UTC)
    return at if at <= fallback else fallback


@flow("fallback")
async def fallback(call: Call, app: App) -> None:
    info = call.info
    ended = now()
    start = min(info.created_at, ended) if info.created_at else started_at(info.uniqueid, ended)
    rec = CallRecord.of_caller(info, app.config.shop.country, started_at=start, ended_at=ended)
    flow_dial, why = _word(info.args, "flow_dial"), _word(info.args, "agistatus")
    result = await call.last_dial()
    answered_before = flow_dial == "ANSWER"  # the flow's own ring was answered; the fallback rang nobody
    if not answered_before:
        rec.group_name = fallback_group(app.config, info.pbx)
    rec.step("fallback", agistatus=why or None, flow_dial=flow_dial or None, dial=result.detail or None,
             answered=result.answered_endpoint)
    if result.status == DialStatus.ANSWERED:
        rec.outcome, rec.missed = "answered", False
        rec.answered_endpoint = result.answered_endpoint
        rec.answered_at = ended - timedelta(seconds=result.talk_seconds)
    elif result.status == DialStatus.CALLER_GONE:
        rec.outcome, rec.callback_reason = "abandoned", "abandoned"
    elif result.detail:
        rec.outcome, rec.callback_reason = "missed_no_answer", "no_answer"
    else:  # no Dial ran: the fallback group had no members when the dialplan was rendered
        rec.outcome, rec.callback_reason = "failed", "no_answer"
    log.info("%s: fell back (AGISTATUS=%s) from %s to %s: %s", info.uniqueid, why or "-", info.caller_number or "-",
             info.dialled_number or "-", rec.outcome)
    await app.calllog.save(rec)
