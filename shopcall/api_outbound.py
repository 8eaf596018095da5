"""The HTTP API of outbound campaigns: events in, call history out, campaigns and scripts the shop edits.

Registered by shopcall.api.build_app; errors and auth are its middlewares'. Every body is validated with
a 4xx that names the field; nothing the shop sends reaches SQL but as a parameter.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from psycopg.types.json import Jsonb

# shopcall.api imports this module while it loads; only its names at call time are used here
from shopcall import api, events, scripts
from shopcall.call import check_number
from shopcall.hours import DAY_NAMES, parse_weekly
from shopcall.phone import to_e164

log = logging.getLogger("shopcall.api")

HISTORY_LIMIT_MAX = 500


async def post_event(request: web.Request) -> web.StreamResponse:
    api._query(request, set())
    body = await api.read_json(request)
    try:
        outcome = await events.ingest(request.app[api.POOL], body, region=request.app[api.CONFIG].shop.country,
                                      now=datetime.now(UTC))
    except events.EventError as exc:
        raise api.ApiError(exc.status, str(exc), {"field": exc.field}) from None
    return api._json({"event_id": outcome.event_id, "duplicate": outcome.duplicate, "result": outcome.result},
                     200 if outcome.duplicate else 201)


_HISTORY = """
SELECT j.id, j.campaign, c.scenario, j.phone, j.order_number, j.sku, j.status, j.result, j.reason,
       j.attempts, j.due_at, j.created_at, j.finished_at,
       COALESCE((SELECT jsonb_agg(jsonb_build_object(
                   'attempt', a.number, 'started_at', a.started_at, 'answered_at', a.answered_at,
                   'ended_at', a.ended_at, 'outcome', a.outcome, 'result', a.result, 'uniqueid', a.uniqueid)
                 ORDER BY a.number) FROM dial_attempts a WHERE a.job_id = j.id), '[]') AS attempts_log
  FROM dial_jobs j JOIN campaigns c ON c.name = j.campaign
 WHERE (%(phone)s::text IS NULL OR j.phone = %(phone)s) AND (%(order)s::text IS NULL OR j.order_number = %(order)s)
 ORDER BY j.created_at DESC, j.id DESC LIMIT %(limit)s
"""


async def get_history(request: web.Request) -> web.StreamResponse:
    """Robot calls about a contact or an order, newest first, each with its dial attempts."""
    q = api._query(request, {"phone", "order", "limit"})
    phone = q.get("phone")
    order = q.get("order")
    if not phone and not order:
        raise api.ApiError(400, "give phone or order", {"parameter": "phone"})
    e164 = None
    if phone:
        e164 = to_e164(phone, request.app[api.CONFIG].shop.country)
        if e164 is None:
            raise api.ApiError(400, f"phone: not a phone number: {phone[:40]!r}", {"parameter": "phone"})
    if order is not None and not 0 < len(order) <= 100:
        raise api.ApiError(400, "order: expected 1..100 characters", {"parameter": "order"})
    limit = api._int_param(q, "limit", 50, 1, HISTORY_LIMIT_MAX)
    async with request.app[api.POOL].connection() as conn:
        rows = await (await conn.execute(_HISTORY, {"phone": e164, "order": order, "limit": limit})).fetchall()
    return api._json({"phone": e164, "order": order, "jobs": [dict(r) for r in rows]})


# --------------------------------------------------------------------------- campaigns

_EDITABLE: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "enabled": (bool, None), "caller_id": ((str, type(None)), None), "group_name": ((str, type(None)), None),
    "settings": (dict, None), "max_concurrent": (int, (1, 1000)), "calls_per_second": ((int, float), (0.01, 500)),
    "max_attempts": (int, (1, 20)), "max_attempts_per_day": (int, (1, 20)), "retry_minutes": (dict, None),
    "ring_seconds": (int, (5, 120)), "amd": (bool, None), "calling_window": (dict, None),
    "pbx": (str, None),
}
_CAMPAIGN_COLUMNS = ("name", "scenario", "purpose", *(_EDITABLE))


async def list_campaigns(request: web.Request) -> web.StreamResponse:
    api._query(request, set())
    async with request.app[api.POOL].connection() as conn:
        rows = await (await conn.execute(
            f"SELECT {', '.join(_CAMPAIGN_COLUMNS)} FROM campaigns ORDER BY name")).fetchall()
    return api._json({"campaigns": [dict(r) for r in rows]})


def _check_campaign_field(key: str, value: Any) -> None:
    kind, bounds = _EDITABLE[key]
    if isinstance(value, bool) and kind is not bool:
        raise api.ApiError(422, f"{key}: wrong type", {"field": key})
    if not isinstance(value, kind):
        raise api.ApiError(422, f"{key}: wrong type", {"field": key})
    if bounds and not bounds[0] <= value <= bounds[1]:
        raise api.ApiError(422, f"{key}: must be between {bounds[0]} and {bounds[1]}", {"field": key})
    if key == "calling_window":
        try:
            parse_weekly(value)
        except ValueError as exc:
            raise api.ApiError(422, f"calling_window: {exc}", {"field": key}) from None
    if key == "retry_minutes" and any(
            not isinstance(v, int | float) or isinstance(v, bool) or not 0 < v <= 100000 for v in value.values()):
        raise api.ApiError(422, "retry_minutes: each value is a number of minutes > 0", {"field": key})
    if key == "caller_id" and value is not None:
        try:
            check_number(value)  # it reaches the Originate's CallerID
        except ValueError:
            raise api.ApiError(422, "caller_id: not a phone number (digits, optional +)", {"field": key}) from None
    if key == "pbx" and value not in ("asterisk", "freeswitch"):
        raise api.ApiError(422, "pbx: asterisk or freeswitch", {"field": key})


async def patch_campaign(request: web.Request) -> web.StreamResponse:
    api._query(request, set())
    name = request.match_info["name"]
    body = await api.read_object(request, _EDITABLE, "of fields to change")
    if not body:
        raise api.ApiError(422, "the body must be a JSON object of fields to change",
                           {"allowed": sorted(_EDITABLE)})
    for key, value in body.items():
        _check_campaign_field(key, value)
    values = {k: Jsonb(v) if isinstance(v, dict) else v for k, v in body.items()}
    sets = ", ".join(f"{k} = %({k})s" for k in values)  # keys from _EDITABLE only
    async with request.app[api.POOL].connection() as conn, conn.transaction():
        row = await (await conn.execute(
            f"UPDATE campaigns SET {sets}, updated_at = now() WHERE name = %(name)s "
            f"RETURNING {', '.join(_CAMPAIGN_COLUMNS)}", {**values, "name": name})).fetchone()
        if row is None:
            raise api.ApiError(404, f"no campaign {name!r}", {"name": name})
        if row["caller_id"] and row["group_name"]:
            # a customer who calls the campaign's number back reaches its group (unless the admin routed it)
            # hours and language as the catch-all "default" number has them, if there is one
            await conn.execute(
                """INSERT INTO numbers (number, title, group_id, schedule_id, language)
                   SELECT %s, %s, g.id, d.schedule_id, COALESCE(d.language, 'ru')
                     FROM groups g LEFT JOIN numbers d ON d.number = 'default'
                    WHERE g.name = %s ON CONFLICT (number) DO NOTHING""",
                (row["caller_id"], f"campaign {name}", row["group_name"]))
    log.info("API: campaign %s changed: %s", name, sorted(body))
    return api._json(dict(row))


# --------------------------------------------------------------------------- scripts


def _script_params(request: web.Request) -> tuple[str, str, str]:
    q = api._query(request, {"segment", "language"})
    scenario = request.match_info["scenario"]
    if scenario not in scripts.DEFAULTS:
        raise api.ApiError(404, f"no scenario {scenario!r}", {"allowed": list(scripts.DEFAULTS)})
    segment = q.get("segment", "default")
    if not 0 < len(segment) <= 64 or not segment.isprintable():
        raise api.ApiError(400, "segment: 1..64 printable characters", {"parameter": "segment"})
    language = q.get("language", "ru")
    if language not in scripts.LANGUAGES:
        raise api.ApiError(400, "language: ru or en", {"parameter": "language"})
    return scenario, segment, language


async def get_scripts(request: web.Request) -> web.StreamResponse:
    scenario, segment, language = _script_params(request)
    async with request.app[api.POOL].connection() as conn:
        parts = await scripts.load(conn, scenario, segment, language)
    return api._json({"scenario": scenario, "segment": segment, "language": language, "parts": parts,
                      "variables": sorted({*scripts.COMMON_SAMPLE, *scripts.SAMPLES[scenario]})})


async def put_script(request: web.Request) -> web.StreamResponse:
    scenario, segment, language = _script_params(request)
    part = request.match_info["part"]
    body = await api.read_json(request)
    if not isinstance(body, dict) or set(body) != {"template"} or not isinstance(body["template"], str):
        raise api.ApiError(422, 'the body must be {"template": "..."}', {"field": "template"})
    try:
        sample = scripts.validate(scenario, part, language, body["template"])
    except scripts.ScriptError as exc:
        raise api.ApiError(422, f"template: {exc}", {"field": "template"}) from None
    except Exception as exc:  # the sandbox's own failures, e.g. NameError for 1e308*10 that Jinja folds to "inf"
        log.info("API: script %s/%s refused: %s: %s", scenario, part, type(exc).__name__, exc)
        raise api.ApiError(422, f"template: {type(exc).__name__}: {exc}", {"field": "template"}) from None
    async with request.app[api.POOL].connection() as conn:
        await conn.execute(
            """INSERT INTO scripts (scenario, segment, language, part, template) VALUES (%s, %s, %s, %s, %s)
               ON CONFLICT (scenario, segment, language, part) DO UPDATE SET template = EXCLUDED.template,
                   updated_at = now()""", (scenario, segment, language, part, body["template"]))
    log.info("API: script %s/%s for %s (%s) saved", scenario, part, segment, language)
    return api._json({"scenario": scenario, "part": part, "segment": segment, "language": language,
                      "sample": sample})


async def delete_script(request: web.Request) -> web.StreamResponse:
    scenario, segment, language = _script_params(request)
    part = request.match_info["part"]
    async with request.app[api.POOL].connection() as conn:
        cur = await conn.execute(
            "DELETE FROM scripts WHERE scenario = %s AND segment = %s AND language = %s AND part = %s",
            (scenario, segment, language, part))
    if cur.rowcount == 0:
        raise api.ApiError(404, "no such script of the shop's own (the default applies)", {"part": part})
    return api._json({"deleted": True})


def register(app: web.Application) -> None:
    app.router.add_post("/api/v1/events", post_event)
    app.router.add_get("/api/v1/history", get_history)
    app.router.add_get("/api/v1/campaigns", list_campaigns)
    app.router.add_patch("/api/v1/campaigns/{name}", patch_campaign)
    app.router.add_get("/api/v1/scripts/{scenario}", get_scripts)
    app.router.add_put("/api/v1/scripts/{scenario}/{part}", put_script)
    app.router.add_delete("/api/v1/scripts/{scenario}/{part}", delete_script)


_JSON_TYPES = {bool: "boolean", str: "string", type(None): "null", dict: "object", int: "integer", float: "number"}


def _campaign_field_schema(key: str) -> dict:
    """What _check_campaign_field accepts, as far as JSON Schema can say it."""
    kind, bounds = _EDITABLE[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    types = sorted({_JSON_TYPES[k] for k in kinds} - ({"integer"} if float in kinds else set()))
    schema: dict[str, Any] = {"type": types[0] if len(types) == 1 else types}
    if bounds:
        schema |= {"minimum": bounds[0], "maximum": bounds[1]}
    if key == "caller_id":
        schema["pattern"] = r"^\+?[0-9]{3,20}$"
    elif key == "pbx":
        schema["enum"] = ["asterisk", "freeswitch"]
    elif key == "calling_window":  # checked whole by hours.parse_weekly: each end after its start
        hhmm = {"type": "string", "pattern": "^[0-9]{1,2}:[0-9]{2}$"}
        schema |= {"propertyNames": {"enum": list(DAY_NAMES)}, "additionalProperties": {
            "type": "array", "items": {"type": "array", "prefixItems": [hhmm, hhmm], "minItems": 2, "maxItems": 2}}}
    elif key == "retry_minutes":
        schema["additionalProperties"] = {"type": "number", "exclusiveMinimum": 0, "maximum": 100000}
    return schema


def _event_schemas() -> list[dict]:
    """One object schema per event type, from events.SPECS (a null optional field counts as absent)."""
    text = {"type": "string", "minLength": 1, "maxLength": events.MAX_TEXT}
    fields: dict[Any, dict] = {
        events._text: text, events._key: {"type": "string", "minLength": 1, "maxLength": 200},
        events._phone: {"type": "string", "minLength": 1, "description": "E.164 or as dialled in the shop's country"},
        events._bool: {"type": "boolean"}, events._date: {"type": "string", "format": "date"},
        events._money: {"type": ["number", "string"], "minimum": 0, "maximum": float(events.MAX_AMOUNT)},
        events._language: {"type": "string", "enum": ["ru", "en"]}, events._timezone: text,
    }
    item = {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        **{k: fields.get(check, {}) for k, (check, _) in events._ITEM_FIELDS.items()},
        "qty": {"type": "integer", "minimum": 1, "maximum": 10000}}}
    fields[events._items] = {"type": "array", "minItems": 1, "maxItems": events.MAX_ITEMS, "items": item}

    def field(check: Any, required: bool) -> dict:
        schema = fields.get(check, {})  # {}: any value, checked by the server (one of a few words)
        return schema if required or not schema else {"anyOf": [schema, {"type": "null"}]}

    return [{"type": "object", "title": kind, "additionalProperties": False,
             "required": [k for k, (_, required) in spec.items() if required],
             "properties": {k: {"const": kind} if k == "type" else field(check, required)
                            for k, (check, required) in spec.items()}}
            for kind, spec in sorted(events.SPECS.items())]


def openapi_paths(err, ok, auth_errors: dict) -> dict:
    """The OpenAPI description of the routes above (shopcall.api.OPENAPI merges it)."""
    obj = {"type": "object"}
    seg_lang = [{"name": "segment", "in": "query",
                 "schema": {"type": "string", "minLength": 1, "maxLength": 64, "default": "default"}},
                {"name": "language", "in": "query", "schema": {"type": "string", "enum": ["ru", "en"]}}]
    scenario = {"name": "scenario", "in": "path", "required": True, "schema": {"type": "string",
                                                                              "enum": list(scripts.DEFAULTS)}}
    parts = sorted({p for by_part in scripts.DEFAULTS.values() for p in by_part})
    part = {"name": "part", "in": "path", "required": True, "schema": {"type": "string", "enum": parts},
            "description": "a part of the scenario's script"}
    event_types = sorted(events.SPECS)
    return {
        "/api/v1/events": {"post": {
            "summary": "Tell shopcall what happened; the same idempotency_key twice changes nothing",
            "description": "Types and their fields: " + "; ".join(
                f"{t}: {', '.join(k for k in events.SPECS[t] if k not in ('type', 'idempotency_key'))}"
                for t in event_types),
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "oneOf": _event_schemas()}}}},
            "responses": {"201": ok("applied", obj), "200": ok("a repeat: the first result", obj),
                          "400": err("body not JSON, or a query parameter"),
                          "409": err("idempotency key used by another type"), "413": err("body too large"),
                          "422": err("a field is missing or wrong, or holds a NUL character"), **auth_errors},
        }},
        "/api/v1/history": {"get": {
            "summary": "Robot calls about a contact or an order, with their attempts",
            "parameters": [{"name": "phone", "in": "query", "schema": {"type": "string"}},
                           {"name": "order", "in": "query", "schema": {"type": "string", "minLength": 1,
                                                                        "maxLength": 100}},
                           {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                        "maximum": HISTORY_LIMIT_MAX}}],
            "responses": {"200": ok("the jobs", obj), "400": err("no phone or order, or a bad one"), **auth_errors},
        }},
        "/api/v1/campaigns": {"get": {"summary": "Campaigns and their settings",
                                      "responses": {"200": ok("the campaigns", obj),
                                                    "400": err("a query parameter (this operation takes none)"),
                                                    **auth_errors}}},
        "/api/v1/campaigns/{name}": {"patch": {
            "summary": "Change a campaign: caps, retries, window, caller ID, group, settings",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False, "minProperties": 1,
                "properties": {k: _campaign_field_schema(k) for k in _EDITABLE}}}}},
            "responses": {"200": ok("the campaign", obj),
                          "400": err("body not JSON, a query parameter, or a NUL character in the name"),
                          "404": err("no such campaign"), "413": err("body too large"),
                          "422": err("unknown field, a bad value, or a NUL character"), **auth_errors},
        }},
        "/api/v1/scripts/{scenario}": {"get": {
            "summary": "The words of a scenario for a segment and language (the shop's or the default)",
            "parameters": [scenario, *seg_lang],
            "responses": {"200": ok("the parts", obj), "400": err("bad segment or language"),
                          "404": err("no such scenario"), **auth_errors},
        }},
        "/api/v1/scripts/{scenario}/{part}": {
            "put": {
                "summary": "Save a Jinja2 template for a part; it is checked now, not during a call",
                "parameters": [scenario, part, *seg_lang],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["template"], "additionalProperties": False,
                    "properties": {"template": {"type": "string", "maxLength": scripts.MAX_TEMPLATE}}}}}},
                "responses": {"200": ok("saved, with the sample rendering", obj),
                              "400": err("bad parameter, or body not JSON"),
                              "404": err("no such scenario"), "413": err("body too large"),
                              "422": err("the template does not compile or render, or holds a NUL character"),
                              **auth_errors},
            },
            "delete": {
                "summary": "Go back to the default words for this part",
                "parameters": [scenario, part, *seg_lang],
                "responses": {"200": ok("deleted", obj), "400": err("bad parameter"),
                              "404": err("nothing of the shop's own"), **auth_errors},
            },
        },
    }
