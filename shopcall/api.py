"""The HTTP API: statistics, agents' availability, a contact's call history, an OpenAPI description.

Stack: aiohttp's server. It runs on the asyncio loop the FastAGI and ESL servers already share (no second
event loop, no ASGI server process to manage), has middlewares for the allow-list, bearer tokens and JSON
errors, and its client serves the tests. FastAPI/Starlette would need uvicorn and pydantic on top (several
packages, a second lifecycle to embed) for what is here a handful of hand-validated endpoints; the
OpenAPI document is therefore written by hand (`OPENAPI`), and a test checks it lists every route.

Entry point: `runner = await start_api(config, pool)`; `await runner.stop()`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from aiohttp import web
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from shopcall import blocklist, callbacks, history, live, stats, status
from shopcall.call import check_endpoint
from shopcall.calllog import RECORDING_LINK
from shopcall.config import is_loopback
from shopcall.directory import Directory, Menu
from shopcall.listener import parse_allow, peer_allowed
from shopcall.phone import to_e164
from shopcall.ratelimit import Buckets, retry_after

log = logging.getLogger("shopcall.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

POOL: web.AppKey[AsyncConnectionPool] = web.AppKey("pool", AsyncConnectionPool)
CONFIG: web.AppKey[Any] = web.AppKey("config", object)
ALLOW: web.AppKey[list] = web.AppKey("allow", list)
TOKENS: web.AppKey[list] = web.AppKey("tokens", list)
REQUESTS: web.AppKey[Buckets] = web.AppKey("requests", Buckets)  # by token
FAILURES: web.AppKey[Buckets] = web.AppKey("auth_failures", Buckets)  # by address


@dataclass
class LivePhones:
    """The live view's link to the PBX: set by `shopcall serve` once it has connected (it may come later
    than the API, or never: the view then shows the phones as not asked)."""

    phones: live.PhoneStates | None = None


PHONES: web.AppKey[LivePhones] = web.AppKey("live_phones", LivePhones)

PUBLIC = frozenset({"/api/openapi.json", "/healthz"})  # no token: monitoring and client generators
MAX_BODY = 64 * 1024  # agent updates are a few bytes; a big body is a mistake or an attack
CALLS_LIMIT_MAX = 500
FIRST_DAY, LAST_DAY = date(1970, 1, 1), date(2999, 12, 31)  # beyond: no calls, and date arithmetic overflows


class ApiStartError(Exception):
    """The configuration does not allow a safe start (said in terms of configuration keys)."""


class ApiError(Exception):
    """Becomes `{"error": message, "detail": detail}` with `status`."""

    def __init__(self, status: int, message: str, detail: Any = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail
        self.headers = dict(headers or {})


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return float(value)  # stats' round(...) numerics; JSON readers want numbers, not strings
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _json(data: object, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=_json_default,
                                                                             ensure_ascii=False))


def _error(status: int, message: str, detail: Any = None) -> web.Response:
    return _json({"error": message, "detail": detail}, status)


# --------------------------------------------------------------------------- middlewares


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: every answer is JSON, every request is logged, no stack trace reaches a client."""
    started = time.monotonic()
    try:
        response = await handler(request)
    except ApiError as exc:
        response = _error(exc.status, exc.message, exc.detail)
        response.headers.update(exc.headers)
    except web.HTTPException as exc:  # aiohttp's own 404/405/413
        if exc.status < 400:
            raise
        response = _error(exc.status, f"{exc.reason}: {request.method} {request.path}",
                          {"method": request.method, "path": request.path})
        if exc.status == 405:
            response.headers["Allow"] = exc.headers.get("Allow", "")
    except (psycopg.OperationalError, PoolTimeout) as exc:
        log.error("%s %s: database unavailable: %s", request.method, request.path, exc)
        response = _error(503, "database unavailable")
    except Exception:
        log.exception("%s %s: handler failed", request.method, request.path)
        response = _error(500, "internal error (see the server log)")
    # never the query's values or headers: a phone number is personal data, a token a secret
    log.debug("%s %s %s -> %s (%.1f ms)", request.remote, request.method, request.path, response.status,
              (time.monotonic() - started) * 1000)
    return response


def _peer(request: web.Request) -> str:
    # the socket's peer, not X-Forwarded-For: a client could write that header itself
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return str(peer[0]) if peer else ""


def _too_many(message: str, wait: float) -> ApiError:
    after = retry_after(wait)
    return ApiError(429, message, {"retry_after": int(after)}, {"Retry-After": after})


@web.middleware
async def _allow(request: web.Request, handler: Handler) -> web.StreamResponse:
    host = _peer(request)
    if not peer_allowed(host, request.app[ALLOW]):
        log.warning("API: refused request from %s (not in api.allow)", host or "?")
        raise ApiError(403, "your address is not in api.allow", {"address": host})
    return await handler(request)


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC:
        return await handler(request)
    tokens: list[bytes] = request.app[TOKENS]
    if not tokens:
        raise ApiError(401, "the API has no tokens configured: set api.tokens in the configuration")
    host, failures = _peer(request), request.app[FAILURES]
    if wait := failures.wait(host):  # guessing tokens: every try costs the guesser a minute's share
        raise _too_many("too many failed authentications from your address (api.auth_failures_per_minute)", wait)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        failures.take(host)
        raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'")
    candidate = given.strip().encode()
    # compare with every token, without stopping at the first match: the time says nothing about which
    which = -1
    for i, token in enumerate(tokens):
        if hmac.compare_digest(candidate, token):
            which = i
    if which < 0:
        failures.take(host)
        raise ApiError(401, "invalid bearer token")
    if wait := request.app[REQUESTS].take(which):  # a client's runaway loop must not take every connection
        raise _too_many("too many requests for this token (api.rate_per_second)", wait)
    return await handler(request)


# PostgreSQL text and jsonb hold neither NUL nor a lone UTF-16 surrogate (which UTF-8 cannot even encode);
# refused where they come in, with the parameter or field named, not as the driver's error and a 500
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def _unstorable(text: str) -> str | None:
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    return "NUL characters are" if found[0] == "\x00" else "unpaired surrogates (\\ud800-\\udfff) are"


@web.middleware
async def _storable_params(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A path or query value with a NUL in it is a 400 naming it (a body's strings are read_json's)."""
    if request.path not in PUBLIC:
        for name, value in (*request.match_info.items(), *request.query.items()):
            what = _unstorable(name) or _unstorable(value)
            if what:
                label = _UNSTORABLE.sub("?", name)
                raise ApiError(400, f"{label}: {what} not allowed", {"parameter": label})
    return await handler(request)


# --------------------------------------------------------------------------- parameters


def _query(request: web.Request, allowed: set[str]) -> Mapping[str, str]:
    """Unknown parameters are errors: a typo ("form=") would otherwise silently give the default."""
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        raise ApiError(400, f"unknown query parameter {unknown[0]!r}",
                       {"parameter": unknown[0], "allowed": sorted(allowed)})
    return request.query


def _date_param(query: Mapping[str, str], name: str, default: date) -> date:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = date.fromisoformat(raw)
    except ValueError:
        raise ApiError(400, f"{name}: expected a date YYYY-MM-DD, got {raw[:40]!r}", {"parameter": name}) from None
    if not FIRST_DAY <= value <= LAST_DAY:
        raise ApiError(400, f"{name}: must be between {FIRST_DAY} and {LAST_DAY}", {"parameter": name})
    return value


def _int_param(query: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: expected an integer, got {raw[:40]!r}", {"parameter": name}) from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{name}: must be between {lo} and {hi}", {"parameter": name})
    return value


def _phone_param(request: web.Request, raw: str) -> str:
    """A `phone` parameter (E.164, or a number as dialled in shop.country) as E.164, else a 400."""
    e164 = to_e164(raw, request.app[CONFIG].shop.country)
    if e164 is None:
        raise ApiError(400, f"phone: not a phone number: {raw[:40]!r}", {"parameter": "phone"})
    return e164


async def read_json(request: web.Request) -> Any:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON") from None
    except RecursionError:  # "[[[[…" of 64 KB: the decoder gives up past about 1000 levels
        raise ApiError(400, "the body is nested too deeply") from None
    found = _unstorable_at(body)
    if found is not None:  # "\u0000" and "\ud800" are valid JSON, but no column can store them
        where, what = found
        raise ApiError(422, f"{where or 'the body'}: {what} not allowed", {"field": where or None})
    return body


async def read_object(request: web.Request, allowed: Iterable[str], what: str) -> dict:
    """The body as a JSON object of `allowed` fields (`what` says what such an object is): a body that is
    not an object, or a field that is not allowed, is a 422 naming it."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(422, f"the body must be a JSON object {what}", {"allowed": sorted(allowed)})
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(422, f"unknown field {unknown[0]!r}", {"field": unknown[0], "allowed": sorted(allowed)})
    return body


def _unstorable_at(body: Any) -> tuple[str, str] | None:
    """(path such as "items[0].name", what) of a string in a parsed JSON value that the database cannot store."""
    todo: list[tuple[str, Any]] = [("", body)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, str) and (what := _unstorable(value)):
            return path, what
        if isinstance(value, dict):
            for key in value:
                if what := _unstorable(key):
                    return path, what
            todo.extend((f"{path}.{k}" if path else k, v) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
    return None


# --------------------------------------------------------------------------- handlers


async def get_stats(request: web.Request) -> web.StreamResponse:
    q = _query(request, {"from", "to", "format"})
    timezone = request.app[CONFIG].shop.timezone
    first = _date_param(q, "from", datetime.now(ZoneInfo(timezone)).date())  # as `shopcall stats`: today
    last = _date_param(q, "to", first)
    if last < first:
        raise ApiError(400, f"to: the range ends ({last}) before it starts ({first})", {"parameter": "to"})
    fmt = q.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ApiError(400, f"format: expected 'json' or 'csv', got {fmt[:40]!r}", {"parameter": "format"})
    tables = await stats.collect(request.app[POOL], first, last, timezone)
    if fmt == "csv":
        return web.Response(text=stats.as_csv(tables), content_type="text/csv", charset="utf-8",
                            headers={"Content-Disposition": f'attachment; filename="stats-{first}-{last}.csv"'})
    # collect() returns the tables in QUERIES' order
    keyed = {key: {"title": t.title, "columns": list(t.columns), "rows": [list(r) for r in t.rows]}
             for key, t in zip(stats.QUERIES, tables, strict=True)}
    return _json({"from": first, "to": last, "timezone": timezone, "tables": keyed})


async def list_agents(request: web.Request) -> web.StreamResponse:
    _query(request, set())
    async with request.app[POOL].connection() as conn:
        cur = await conn.execute("SELECT endpoint, name, logged_in, paused FROM employees ORDER BY endpoint")
        rows = await cur.fetchall()
    return _json({"agents": [dict(r) for r in rows]})


async def get_live(request: web.Request) -> web.StreamResponse:
    _query(request, set())
    return _json(await live.snapshot(request.app[POOL], request.app[PHONES].phones))


AGENT_FIELDS = ("logged_in", "paused")


async def set_agent(request: web.Request) -> web.StreamResponse:
    _query(request, set())
    endpoint = request.match_info["endpoint"]
    try:
        check_endpoint(endpoint)
    except ValueError as exc:
        raise ApiError(400, str(exc), {"parameter": "endpoint"}) from None
    body = await read_object(request, AGENT_FIELDS, 'such as {"paused": true}')
    for key, value in body.items():
        if not isinstance(value, bool):
            raise ApiError(422, f"{key}: expected true or false, got {json.dumps(value)[:40]}", {"field": key})
    if not body:
        raise ApiError(422, "nothing to change: give logged_in and/or paused", {"allowed": list(AGENT_FIELDS)})
    directory = Directory(request.app[POOL], timezone=request.app[CONFIG].shop.timezone, default_menu=Menu())
    state = await directory.set_agent_state(endpoint, **body)
    if state is None:
        raise ApiError(404, f"no employee has endpoint {endpoint!r}", {"endpoint": endpoint})
    log.info("API: agent %s: logged_in=%s paused=%s", endpoint, *state)
    return _json({"endpoint": endpoint, "logged_in": state[0], "paused": state[1]})


async def list_calls(request: web.Request) -> web.StreamResponse:
    """The call history, newest first: a caller's (`phone`), a range of days' (`from`, `to`, in the shop's
    time zone), or both; pages of `limit` (`before` = the last id of the page before), or all as CSV."""
    q = _query(request, {"phone", "limit", "from", "to", "before", "format"})
    raw = q.get("phone")
    if not raw and "from" not in q:
        raise ApiError(400, "phone or from: required (E.164 such as +74951234567 or a local number; a day "
                            "YYYY-MM-DD)", {"parameter": "phone"})
    e164 = _phone_param(request, raw) if raw else None
    start = end = first = last = None
    if "from" in q:
        first = _date_param(q, "from", FIRST_DAY)
        last = _date_param(q, "to", first)
        if last < first:
            raise ApiError(400, f"to: the range ends ({last}) before it starts ({first})", {"parameter": "to"})
        start, end = stats.day_range(first, last, request.app[CONFIG].shop.timezone)
    elif "to" in q:
        raise ApiError(400, "to: needs from", {"parameter": "to"})
    fmt = q.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ApiError(400, f"format: expected 'json' or 'csv', got {fmt[:40]!r}", {"parameter": "format"})
    if fmt == "csv":
        if "limit" in q or "before" in q:
            raise ApiError(400, "format=csv: every call of the range, without limit or before",
                           {"parameter": "limit" if "limit" in q else "before"})
        return await _calls_csv(request, e164, start, end, f"calls-{first or e164}-{last or 'all'}.csv")
    limit = _int_param(q, "limit", 50, 1, CALLS_LIMIT_MAX)
    before = _int_param(q, "before", 0, 1, BIGINT_MAX) if "before" in q else None
    async with request.app[POOL].connection() as conn:
        rows = await history.page(conn, phone=e164, start=start, end=end, before=before, limit=limit)
    calls = [{**r, "recording": RECORDING_LINK.format(r["id"]) if r["recorded"] else None} for r in rows]
    return _json({"phone": e164, "from": first, "to": last, "calls": calls,
                  "next": calls[-1]["id"] if len(calls) == limit else None})


async def _calls_csv(request: web.Request, phone: str | None, start, end, filename: str) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/csv; charset=utf-8",
                                       "Content-Disposition": f'attachment; filename="{filename}"'})
    async with request.app[POOL].connection() as conn:
        chunks = history.csv_chunks(conn, phone=phone, start=start, end=end)
        first = await anext(chunks)  # errors before the status line are still a clean 500/503
        await resp.prepare(request)
        await resp.write(first.encode())
        async for chunk in chunks:
            await resp.write(chunk.encode())
    await resp.write_eof()
    return resp


CALLBACK_STATUSES = ("pending", "in_progress", "done", "failed")
_CALLBACKS = f"""
SELECT {callbacks.REQUEST_COLUMNS}
  FROM callback_requests r
 WHERE r.status = ANY(%s) AND (%s::text IS NULL OR r.phone = %s)
 ORDER BY r.due_at, r.id LIMIT %s"""


async def list_callbacks(request: web.Request) -> web.StreamResponse:
    """The callback queue, the soonest due first: by default the requests still open (pending and in
    progress), the ones a CRM shows as "to call back"."""
    q = _query(request, {"status", "phone", "limit"})
    statuses = q.get("status", "pending,in_progress").split(",")
    wrong = [st for st in statuses if st not in CALLBACK_STATUSES]
    if wrong:
        raise ApiError(400, f"status: {wrong[0][:40]!r} is not one of {', '.join(CALLBACK_STATUSES)}",
                       {"parameter": "status", "allowed": list(CALLBACK_STATUSES)})
    e164 = _phone_param(request, q["phone"]) if "phone" in q else None
    limit = _int_param(q, "limit", 100, 1, CALLS_LIMIT_MAX)
    async with request.app[POOL].connection() as conn:
        cur = await conn.execute(_CALLBACKS, (statuses, e164, e164, limit))
        return _json({"callbacks": await cur.fetchall()})


async def get_callback(request: web.Request) -> web.StreamResponse:
    """One request: how a click to call (or a callback) is going."""
    _query(request, set())
    rid = _id_param(request, "request_id", "callback request")
    async with request.app[POOL].connection() as conn:
        row = await callbacks.request_row(conn, rid)
    if row is None:
        raise ApiError(404, f"no callback request has id {rid}", {"request_id": rid})
    return _json(row)


async def delete_callback(request: web.Request) -> web.StreamResponse:
    """The CRM closes a pending request (the customer was reached some other way)."""
    _query(request, set())
    rid = _id_param(request, "request_id", "callback request")
    try:
        row = await callbacks.cancel(request.app[POOL], rid)
    except callbacks.CallbackError as exc:
        raise ApiError(exc.status, str(exc), {"field": exc.field}) from None
    if row is None:
        raise ApiError(404, f"no callback request has id {rid}", {"request_id": rid})
    log.info("API: callback request %s cancelled", rid)
    return _json(row)


CLICK_FIELDS = ("agent", "phone", "ref")


async def post_call(request: web.Request) -> web.StreamResponse:
    """Click to call: ring the agent's phone, and when they answer dial the customer (202; the call itself
    comes later, by the callback worker of the agents' PBX)."""
    _query(request, set())
    body = await read_object(request, CLICK_FIELDS, 'such as {"agent": "agent1", "phone": "+79161234567"}')
    for key in ("agent", "phone"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise ApiError(422, f"{key}: required, a string", {"field": key})
    ref = body.get("ref")
    if ref is not None and not isinstance(ref, str):
        raise ApiError(422, f"ref: a string of at most {callbacks.REF_MAX} characters, or null", {"field": "ref"})
    try:
        row = await callbacks.click_to_call(request.app[POOL], body["agent"], body["phone"], ref=ref,
                                            country=request.app[CONFIG].shop.country)
    except callbacks.CallbackError as exc:
        raise ApiError(exc.status, str(exc), {"field": exc.field}) from None
    log.info("API: click to call %s from %s (request %s)", row["phone"], row["agent_wanted"], row["id"])
    return _json(row, status=202)


async def list_blocked(request: web.Request) -> web.StreamResponse:
    _query(request, set())
    async with request.app[POOL].connection() as conn:
        return _json({"blocked": await blocklist.entries(conn)})


BLOCK_FIELDS = ("reason", "days")


async def put_blocked(request: web.Request) -> web.StreamResponse:
    """Refuse this caller's calls (again: the reason and end are replaced)."""
    _query(request, set())
    e164 = _phone_param(request, request.match_info["phone"])
    body = await read_object(request, BLOCK_FIELDS, 'such as {"reason": "spam", "days": 30}')
    reason, days = body.get("reason", ""), body.get("days")
    if not isinstance(reason, str):
        raise ApiError(422, "reason: expected a string", {"field": "reason"})
    if days is not None and (isinstance(days, bool) or not isinstance(days, int | float)):
        raise ApiError(422, "days: expected a number or null", {"field": "days"})
    try:
        async with request.app[POOL].connection() as conn:
            entry = await blocklist.block(conn, e164, reason=reason, days=days, source="api")
    except blocklist.BlockError as exc:
        raise ApiError(422, str(exc), {"field": exc.field}) from None
    log.info("API: calls from %s refused (%s)", e164, entry["until"] or "until removed")
    return _json(entry)


async def delete_blocked(request: web.Request) -> web.StreamResponse:
    _query(request, set())
    e164 = _phone_param(request, request.match_info["phone"])
    async with request.app[POOL].connection() as conn:
        if not await blocklist.unblock(conn, e164):
            raise ApiError(404, f"{e164} is not on the block list", {"phone": e164})
    log.info("API: calls from %s taken again", e164)
    return web.Response(status=204)


BIGINT_MAX = 2**63 - 1


def _id_param(request: web.Request, name: str, what: str) -> int:
    """A row id from the path; anything that cannot be one (Unicode digits, beyond bigint) is a 404."""
    raw = request.match_info[name]
    value = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 20 else 0
    if not 1 <= value <= BIGINT_MAX:
        raise ApiError(404, f"no {what} has id {raw[:20]!r}", {name: raw[:20]})
    return value


def _recording_file(stored: str, recordings_dir: Path) -> tuple[Path | None, str]:
    """The file to serve, or None and why not. Only what we recorded is served, whatever a row says."""
    base, path = recordings_dir.resolve(), Path(stored).resolve()
    if not path.is_relative_to(base):
        log.error("recording %s is outside recordings_dir %s: not served", path, base)
        return None, "is not in recordings_dir"
    if not path.is_file():
        return None, "file is missing"
    return path, ""


async def get_recording(request: web.Request) -> web.StreamResponse:
    """The call's recording as WAV (Range requests answered, so a CRM's player can seek)."""
    _query(request, set())
    call_id = _id_param(request, "call_id", "call")
    async with request.app[POOL].connection() as conn:
        cur = await conn.execute("SELECT recording_path, recording_purged_at FROM calls WHERE id = %s", (call_id,))
        row = await cur.fetchone()
    if row is None:
        raise ApiError(404, f"no call has id {call_id}", {"call_id": call_id})
    if row["recording_path"] is None:
        if row["recording_purged_at"] is not None:
            raise ApiError(410, "the recording was deleted after recording.retention_days",
                           {"call_id": call_id, "purged_at": row["recording_purged_at"].isoformat()})
        raise ApiError(404, "this call was not recorded", {"call_id": call_id})
    path, problem = await asyncio.to_thread(_recording_file, row["recording_path"], request.app[CONFIG].recordings_dir)
    if path is None:
        raise ApiError(404, f"the recording {problem}", {"call_id": call_id})
    return web.FileResponse(path, headers={
        "Content-Type": "audio/wav", "Content-Disposition": f'attachment; filename="call-{call_id}.wav"'})


async def get_status(request: web.Request) -> web.StreamResponse:
    """Is anything stuck: migrations, agents, the callback queue, outboxes, this machine's spools."""
    _query(request, set())
    async with request.app[POOL].connection() as conn:
        return _json(await status.collect(conn, request.app[CONFIG]))


async def healthz(request: web.Request) -> web.StreamResponse:
    try:
        async with request.app[POOL].connection(timeout=3.0) as conn:
            await conn.execute("SELECT 1")
    except (psycopg.Error, PoolTimeout, OSError) as exc:
        log.warning("healthz: database unreachable: %s", exc)
        return _error(503, "database unreachable")
    return _json({"status": "ok"})


async def openapi(request: web.Request) -> web.StreamResponse:
    return _json(OPENAPI)


# --------------------------------------------------------------------------- OpenAPI


def _err(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_AUTH_ERRORS = {"401": _err("missing or invalid bearer token, or no api.tokens configured"),
                "403": _err("client address not in api.allow"),
                "429": _err("over api.rate_per_second for this token, or too many failed authentications "
                            "from this address; wait the Retry-After header's seconds"),
                "503": _err("database unavailable")}
_PHONE_PATH = {"name": "phone", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1},
               "description": "E.164 or a number as dialled in the shop's country (shop.country)"}
_AGENT = {"type": "object", "required": ["endpoint", "logged_in", "paused"], "properties": {
    "endpoint": {"type": "string"}, "name": {"type": "string"},
    "logged_in": {"type": "boolean"}, "paused": {"type": "boolean"}}}
_DATE = {"type": "string", "format": "date"}
_LIVE = {"type": "object", "required": ["at", "waiting", "groups", "agents", "phones_asked", "pbx_error"],
         "properties": {
    "at": {"type": "string", "format": "date-time"},
    "waiting": {"type": "array", "items": {"type": "object", "properties": {
        "group": {"type": "string"}, "position": {"type": "integer", "minimum": 1},
        "caller_number": {"type": ["string", "null"]}, "uniqueid": {"type": "string"},
        "joined_at": {"type": "string", "format": "date-time"}, "waiting_seconds": {"type": "number"}}}},
    "groups": {"type": "array", "items": {"type": "object", "properties": {
        "group": {"type": "string"}, "waiting": {"type": "integer"}, "longest_wait_seconds": {"type": "number"}}}},
    "agents": {"type": "array", "items": {"type": "object", "properties": {
        **_AGENT["properties"], "groups": {"type": "array", "items": {"type": "string"}},
        "last_call_at": {"type": ["string", "null"], "format": "date-time"},
        "phone": {"type": ["string", "null"], "enum": [*live.PHONE_STATES, None]}}}},
    "phones_asked": {"type": "boolean"}, "pbx_error": {"type": ["string", "null"]}}}

_REQUEST_ID_PATH = {"name": "request_id", "in": "path", "required": True,
                    "schema": {"type": "integer", "minimum": 1, "maximum": BIGINT_MAX}}
OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "shopcall", "version": "1",
             "description": "A shop's call centre on its own PBX: statistics, agents, call history."},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"],
                      "properties": {"error": {"type": "string"}, "detail": {}}},
            "Agent": _AGENT,
            "Live": _LIVE,
            "Blocked": {"type": "object", "required": ["phone", "reason", "until", "source", "created_at"],
                        "properties": {"phone": {"type": "string"}, "reason": {"type": "string"},
                                       "until": {"type": ["string", "null"], "format": "date-time"},
                                       "source": {"type": "string", "enum": ["cli", "api"]},
                                       "created_at": {"type": "string", "format": "date-time"}}},
            "Table": {"type": "object", "properties": {
                "title": {"type": "string"}, "columns": {"type": "array", "items": {"type": "string"}},
                "rows": {"type": "array", "items": {"type": "array"}}}},
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/api/v1/stats": {"get": {
            "summary": "Call statistics for whole days in the shop's time zone",
            "parameters": [
                {"name": "from", "in": "query", "schema": _DATE, "description": "first day (default: today)"},
                {"name": "to", "in": "query", "schema": _DATE, "description": "last day, included (default: from)"},
                {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["json", "csv"]}},
            ],
            "responses": {
                "200": {"description": "the tables", "content": {
                    "application/json": {"schema": {"type": "object", "properties": {
                        "from": _DATE, "to": _DATE, "timezone": {"type": "string"},
                        "tables": {"type": "object", "properties": {
                            k: {"$ref": "#/components/schemas/Table"} for k in stats.QUERIES}}}}},
                    "text/csv": {"schema": {"type": "string"}}}},
                "400": _err("bad date, to before from, bad format or unknown parameter"), **_AUTH_ERRORS},
        }},
        "/api/v1/agents": {"get": {
            "summary": "Agents and their availability",
            "responses": {"200": _ok("the agents", {"type": "object", "properties": {
                "agents": {"type": "array", "items": {"$ref": "#/components/schemas/Agent"}}}}),
                "400": _err("a query parameter (this operation takes none)"), **_AUTH_ERRORS},
        }},
        "/api/v1/agents/{endpoint}": {"post": {
            "summary": "Log an agent in or out, pause or unpause them",
            "parameters": [{"name": "endpoint", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.+-]{0,62}$"}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False, "minProperties": 1,
                "properties": {"logged_in": {"type": "boolean"}, "paused": {"type": "boolean"}}}}}},
            "responses": {"200": _ok("the new state", {"type": "object", "properties": {
                "endpoint": {"type": "string"}, "logged_in": {"type": "boolean"}, "paused": {"type": "boolean"}}}),
                "400": _err("invalid endpoint name, body not JSON, or a query parameter"),
                "404": _err("no employee has this endpoint"),
                "413": _err("body too large"),
                "422": _err("body not an object, unknown field, a value not a boolean, or a NUL character"),
                **_AUTH_ERRORS},
        }},
        "/api/v1/live": {"get": {
            "summary": "Now: callers waiting in line (by group, longest wait) and each agent with their phone's state",
            "description": "phone is asked of the PBX (null when this process has no link to it; unknown, "
                           "with pbx_error, when the PBX cannot say). On FreeSWITCH free means no live channel.",
            "responses": {"200": _ok("the live view", {"$ref": "#/components/schemas/Live"}),
                          "400": _err("a query parameter (this operation takes none)"), **_AUTH_ERRORS},
        }},
        "/api/v1/calls": {"get": {
            "summary": "The call history, newest first: a caller's, a range of days', or both (JSON pages or CSV)",
            "parameters": [
                {"name": "phone", "in": "query", "schema": {"type": "string", "minLength": 1},
                 "description": "E.164 or a number as dialled in the shop's country (shop.country); "
                                "phone or from is required"},
                {"name": "from", "in": "query", "schema": {"type": "string", "format": "date"},
                 "description": "first day, in shop.timezone"},
                {"name": "to", "in": "query", "schema": {"type": "string", "format": "date"},
                 "description": "last day, included (default: from)"},
                {"name": "limit", "in": "query",
                 "schema": {"type": "integer", "minimum": 1, "maximum": CALLS_LIMIT_MAX, "default": 50}},
                {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": BIGINT_MAX},
                 "description": "the previous page's `next`: the calls after that one"},
                {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["json", "csv"]},
                 "description": "csv: every call of the range in one file (no limit, no before)"},
            ],
            "responses": {"200": {"description": "the calls", "content": {
                "application/json": {"schema": {"type": "object", "properties": {
                    "phone": {"type": ["string", "null"]}, "calls": {"type": "array", "items": {"type": "object"}},
                    "next": {"type": ["integer", "null"]}}}},
                "text/csv": {"schema": {"type": "string"}}}},
                "400": _err("neither phone nor from, not a phone number, a bad date, limit, before or format, or "
                            "an unknown parameter"), **_AUTH_ERRORS},
        }, "post": {
            "summary": "Click to call: ring the agent's phone, then dial the customer when they answer",
            "description": "Taken by the callback worker of the agents' PBX as soon as the agent's phone is "
                           "free (within callbacks.click_wait_seconds); a pending callback request for the "
                           "number is taken over. Follow it with GET /api/v1/callbacks/{id}; the call's "
                           "webhook carries callback_request_id and crm_ref.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False, "required": ["agent", "phone"], "properties": {
                    "agent": {"type": "string", "minLength": 1, "description": "the agent's endpoint"},
                    "phone": {"type": "string", "minLength": 1,
                              "description": "E.164 or a number as dialled in the shop's country"},
                    "ref": {"type": ["string", "null"], "maxLength": callbacks.REF_MAX,
                            "description": "the CRM's own id for this call"}}}}}},
            "responses": {"202": _ok("the request", {"type": "object"}),
                          "400": _err("body not JSON, or a query parameter"),
                          "404": _err("no employee has this endpoint"),
                          "409": _err("the agent is being rung for another request, or the number is being called"),
                          "413": _err("body too large"),
                          "422": _err("body not an object, unknown field, or a bad agent, phone or ref"),
                          **_AUTH_ERRORS},
        }},
        "/api/v1/calls/{call_id}/recording": {"get": {
            "summary": "A call's recording (WAV; Range requests are answered)",
            "parameters": [{"name": "call_id", "in": "path", "required": True,
                            "schema": {"type": "integer", "minimum": 1, "maximum": BIGINT_MAX}}],
            "responses": {
                "200": {"description": "the recording", "content": {"audio/wav": {
                    "schema": {"type": "string", "format": "binary"}}}},
                "206": {"description": "the part asked for with Range", "content": {"audio/wav": {
                    "schema": {"type": "string", "format": "binary"}}}},
                "400": _err("a query parameter (this operation takes none)"),
                "404": _err("no such call, the call was not recorded, or its file is missing"),
                "410": _err("the recording was deleted after recording.retention_days"),
                "416": {"description": "a Range outside the file"},
                **_AUTH_ERRORS},
        }},
        "/api/v1/callbacks": {"get": {
            "summary": "Callback requests, the soonest due first (default: the open ones)",
            "parameters": [
                {"name": "status", "in": "query", "schema": {"type": "string"},
                 "description": "comma-separated, of " + ", ".join(CALLBACK_STATUSES)
                                + " (default: pending,in_progress)"},
                {"name": "phone", "in": "query", "schema": {"type": "string", "minLength": 1},
                 "description": "E.164 or a number as dialled in the shop's country (shop.country)"},
                {"name": "limit", "in": "query",
                 "schema": {"type": "integer", "minimum": 1, "maximum": CALLS_LIMIT_MAX, "default": 100}},
            ],
            "responses": {"200": _ok("the requests", {"type": "object", "properties": {
                "callbacks": {"type": "array", "items": {"type": "object"}}}}),
                "400": _err("an unknown status, not a phone number, bad limit or unknown parameter"),
                **_AUTH_ERRORS},
        }},
        "/api/v1/callbacks/{request_id}": {"get": {
            "summary": "One callback or click-to-call request: status, attempts, last result, agent",
            "parameters": [_REQUEST_ID_PATH],
            "responses": {"200": _ok("the request", {"type": "object"}),
                          "400": _err("a query parameter (this operation takes none)"),
                          "404": _err("no such request"), **_AUTH_ERRORS},
        }, "delete": {
            "summary": "Close a pending request (the customer was reached some other way): done, cancelled",
            "parameters": [_REQUEST_ID_PATH],
            "responses": {"200": _ok("the request, closed", {"type": "object"}),
                          "400": _err("a query parameter (this operation takes none)"),
                          "404": _err("no such request"),
                          "409": _err("the request is in progress (ringing, talking) or already settled"),
                          **_AUTH_ERRORS},
        }},
        "/api/v1/blocked": {"get": {
            "summary": "Callers whose calls are refused (the block list), oldest first",
            "responses": {"200": _ok("the entries in force", {"type": "object", "properties": {
                "blocked": {"type": "array", "items": {"$ref": "#/components/schemas/Blocked"}}}}),
                "400": _err("a query parameter (this operation takes none)"), **_AUTH_ERRORS},
        }},
        "/api/v1/blocked/{phone}": {
            "put": {
                "summary": "Refuse a caller's calls, until removed or for `days`",
                "parameters": [_PHONE_PATH],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": False, "properties": {
                        "reason": {"type": "string", "maxLength": blocklist.REASON_MAX},
                        "days": {"type": ["number", "null"], "exclusiveMinimum": 0,
                                 "maximum": blocklist.DAYS_MAX}}}}}},
                "responses": {"200": _ok("the entry", {"$ref": "#/components/schemas/Blocked"}),
                              "400": _err("not a phone number, body not JSON, or a query parameter"),
                              "413": _err("body too large"),
                              "422": _err("body not an object, unknown field, a bad value, or a NUL character"),
                              **_AUTH_ERRORS},
            },
            "delete": {
                "summary": "Take a caller's calls again",
                "parameters": [_PHONE_PATH],
                "responses": {"204": {"description": "removed"},
                              "400": _err("not a phone number or a query parameter"),
                              "404": _err("the number is not on the block list"), **_AUTH_ERRORS},
            },
        },
        "/api/v1/status": {"get": {
            "summary": "Is anything stuck: migrations, agents, callback queue, webhook and mail outboxes, spools",
            "responses": {"200": _ok("the report; `problems` in words", {"type": "object", "properties": {
                "problems": {"type": "array", "items": {"type": "string"}}}}),
                "400": _err("a query parameter (this operation takes none)"), **_AUTH_ERRORS},
        }},
        "/api/openapi.json": {"get": {
            "summary": "This document", "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}}}},
        "/healthz": {"get": {
            "summary": "200 when the database answers, 503 otherwise", "security": [],
            "responses": {"200": _ok("healthy", {"type": "object"}), "503": _err("database unreachable")}}},
    },
}


def _outbound_paths() -> dict:
    from shopcall import api_outbound

    return api_outbound.openapi_paths(_err, _ok, _AUTH_ERRORS)


OPENAPI["paths"].update(_outbound_paths())
OPENAPI["info"]["description"] = ("A shop's call centre on its own PBX: statistics, agents, call history, "
                                  "events for robot campaigns, their scripts and results.")


# --------------------------------------------------------------------------- start/stop


def build_app(config: Any, pool: AsyncConnectionPool, phones: LivePhones | None = None) -> web.Application:
    app = web.Application(middlewares=[_errors, _allow, _auth, _storable_params], client_max_size=MAX_BODY)
    app[CONFIG] = config
    app[POOL] = pool
    app[PHONES] = phones or LivePhones()
    app[ALLOW] = parse_allow(config.api.allow)
    app[TOKENS] = [t.strip().encode() for t in config.api.tokens if t.strip()]  # the header's value is stripped too
    app[REQUESTS] = Buckets(config.api.rate_per_second, config.api.rate_burst)
    app[FAILURES] = Buckets(config.api.auth_failures_per_minute / 60, config.api.auth_failures_per_minute)
    app.router.add_get("/api/v1/stats", get_stats)
    app.router.add_get("/api/v1/agents", list_agents)
    app.router.add_post("/api/v1/agents/{endpoint}", set_agent)
    app.router.add_get("/api/v1/live", get_live)
    app.router.add_get("/api/v1/calls", list_calls)
    app.router.add_post("/api/v1/calls", post_call)
    app.router.add_get(r"/api/v1/calls/{call_id}/recording", get_recording)
    app.router.add_get("/api/v1/callbacks", list_callbacks)
    app.router.add_get("/api/v1/callbacks/{request_id}", get_callback)
    app.router.add_delete("/api/v1/callbacks/{request_id}", delete_callback)
    app.router.add_get("/api/v1/blocked", list_blocked)
    app.router.add_put("/api/v1/blocked/{phone}", put_blocked)
    app.router.add_delete("/api/v1/blocked/{phone}", delete_blocked)
    app.router.add_get("/api/v1/status", get_status)
    app.router.add_get("/api/openapi.json", openapi)
    app.router.add_get("/healthz", healthz)
    from shopcall import api_outbound

    api_outbound.register(app)
    return app


@dataclass
class ApiRunner:
    runner: web.AppRunner
    host: str
    port: int  # the bound port (useful with api.port = 0 in tests)

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_api(config: Any, pool: AsyncConnectionPool, phones: LivePhones | None = None) -> ApiRunner:
    """Listen on api.listen:api.port. Raises ApiStartError when that would expose the API unguarded."""
    api = config.api
    if not is_loopback(api.listen) and not api.allow:
        raise ApiStartError(f"api.listen = {api.listen!r} is not a loopback address and api.allow is empty: "
                            "list the networks that may use the API in api.allow, or listen on 127.0.0.1")
    if not api.tokens:
        log.warning("API: api.tokens is empty, so every request but /healthz and /api/openapi.json gets 401")
    runner = web.AppRunner(build_app(config, pool, phones), access_log=None)  # _errors logs each request itself
    await runner.setup()
    site = web.TCPSite(runner, api.listen, api.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ApiStartError(f"API: cannot listen on {api.listen}:{api.port}: {exc.strerror or exc}") from exc
    port = api.port
    for server in runner.addresses:
        port = server[1]
        break
    log.info("HTTP API listening on %s:%s", api.listen, port)
    return ApiRunner(runner, api.listen, port)
