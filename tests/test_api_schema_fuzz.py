"""Schemathesis against the real HTTP API over a real socket, driven by the OpenAPI document the API serves
(GET /api/openapi.json): every operation gets generated requests, valid and invalid. Checks: never a 5xx,
answers conform to the description (status codes, content types, bodies), each within a few seconds.

The API runs in a thread with its own event loop and pool: schemathesis' requests are blocking, and the
test's own loop (pytest-asyncio) is not running while a sync test runs.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import psycopg
import pytest
import schemathesis
from hypothesis import strategies as st

from shopcall import db
from shopcall.api import OPENAPI, start_api
from tests.conftest import WIPE
from tests.test_api import AUTH, TOKEN, api_config

TIMEOUT = 5.0  # seconds per request: longer is a hang
MAX_EXAMPLES = 25  # per operation and phase; keeps the module well under a minute

# seeded rows (SEED, and the campaigns the migrations make) that generated values are sometimes swapped for
REAL_PATH = {
    "endpoint": ["anna", "boris"],
    "name": ["cart_followup", "delivery_status"],
    "part": ["offer", "bye"],  # "offer" of cart_followup has a row of the shop's own (segment vip)
}
REAL_QUERY = {
    "phone": ["+79161234567", "8 916 123-45-67"],
    "order": ["A-1"],
    "segment": ["default", "vip"],
}
REAL_BODY = {"phone": ["+79161234567", "+74957778899"]}  # events about a known and an unknown customer
HOSTILE = ["\x00", "\ud800"]  # valid in JSON, but no PostgreSQL text or jsonb value can hold them

SEED = """
INSERT INTO employees (name, endpoint) VALUES ('Anna', 'anna'), ('Boris', 'boris');
INSERT INTO groups (name) VALUES ('sales');
INSERT INTO calls (uniqueid, caller_number, caller_e164, dialled_number, started_at, outcome, missed, group_id)
     SELECT 'f.1', '89161234567', '+79161234567', '100', '2026-11-25 12:00+03', 'answered', false, id FROM groups;
INSERT INTO dial_jobs (campaign, phone, order_number, dedupe_key)
     VALUES ('order_confirmation', '+79161234567', 'A-1', 'fuzz-1');
INSERT INTO scripts (scenario, segment, part, template) VALUES ('cart_followup', 'vip', 'offer', 'Привет');
"""


class _Server:
    """start_api on a loop of its own in a daemon thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        try:
            self._stop = asyncio.Event()
            async with db.open_pool(self.url, min_size=1, max_size=4) as pool:
                # the limits off: thousands of generated requests (many without a token) from one address
                # would soon be 429s, and what is fuzzed here is how each request is read
                runner = await start_api(api_config(rate_per_second=0, auth_failures_per_minute=0), pool)
                self.port = runner.port
                self.ready.set()
                try:
                    await self._stop.wait()
                finally:
                    await runner.stop()
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            raise

    def __enter__(self) -> _Server:
        self.thread.start()
        if not self.ready.wait(30) or self.error is not None:
            raise RuntimeError(f"the API did not start: {self.error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def base_url(pg_url: str) -> Iterator[str]:
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(WIPE)
        c.execute(SEED)
    with _Server(pg_url) as server:
        yield f"http://127.0.0.1:{server.port}"


def _config(authenticated: bool) -> schemathesis.Config:
    data: dict = {
        "seed": 20260601,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "cache": {"enabled": False},  # no state carried from run to run
        "request-timeout": TIMEOUT,
        # the API checks what JSON Schema cannot say (a phone number, to >= from, a scenario's parts, the
        # fields of each event type), so a schema-valid request may well get a 4xx: no positive_data_acceptance
        "checks": {"max_response_time": TIMEOUT, "positive_data_acceptance": {"enabled": False}},
    }
    if authenticated:
        data["auth"] = {"openapi": {"bearer": {"bearer": TOKEN}}}
    return schemathesis.Config.from_dict(data)


def _add_hooks(schema: schemathesis.BaseSchema) -> None:
    """Generated values are sometimes swapped for seeded ones, so not every request is a 404 or a 422; and a
    string in a query or body sometimes gets a character PostgreSQL cannot store (those were 500s)."""

    @schema.hook
    def flatmap_path_parameters(ctx, path_parameters):
        return _sometimes_real(path_parameters, REAL_PATH)

    @schema.hook
    def flatmap_query(ctx, query):
        return st.one_of(_sometimes_real(query, REAL_QUERY), _hostile(query, "\x00"))  # a URL has no surrogates

    @schema.hook
    def flatmap_body(ctx, body):
        return st.one_of(_sometimes_real(body, REAL_BODY), _hostile(body, *HOSTILE)) if isinstance(body, dict) \
            else st.just(body)


def _sometimes_real(values: dict | None, real: dict[str, list[str]]) -> st.SearchStrategy:
    options = [st.just(values)]
    for key, choices in real.items():
        if values and key in values:
            options.append(st.sampled_from(choices).map(lambda v, k=key: {**values, k: v}))
    return st.one_of(options)


def _hostile(value: object, *chars: str) -> st.SearchStrategy:
    """`value` with one of `chars` put into one of its strings (or itself, if it has none)."""
    leaves: list[tuple] = []  # paths (keys and indexes) to the strings in value

    def walk(item: object, path: tuple) -> None:
        if isinstance(item, str):
            leaves.append(path)
        elif isinstance(item, dict):
            for k, v in item.items():
                walk(v, (*path, k))
        elif isinstance(item, list):
            for i, v in enumerate(item):
                walk(v, (*path, i))

    walk(value, ())
    if not leaves:
        return st.just(value)

    def put(path: tuple, char: str) -> object:
        copy = json.loads(json.dumps(value))
        if not path:
            return copy + char
        target = copy
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] += char
        return copy

    return st.builds(put, st.sampled_from(leaves), st.sampled_from(chars))


# the document as the API serves it (test_the_served_document_is_the_one_checked holds them equal); loaded at
# import time, since schemathesis makes one test per operation while collecting
DOCUMENT = json.loads(json.dumps(OPENAPI))
authenticated = schemathesis.openapi.from_dict(DOCUMENT, config=_config(True))
_add_hooks(authenticated)
anonymous = schemathesis.openapi.from_dict(DOCUMENT, config=_config(False)).include(
    path=["/api/v1/agents/{endpoint}", "/api/v1/events", "/healthz"])


@authenticated.parametrize()
def test_every_operation_with_a_token(case, base_url):
    response = case.call(base_url=base_url, timeout=TIMEOUT)
    case.validate_response(response)


@anonymous.parametrize()
def test_some_operations_without_a_token(case, base_url):
    response = case.call(base_url=base_url, timeout=TIMEOUT)
    case.validate_response(response)
    if case.path != "/healthz":
        assert response.status_code == 401, response.text


def test_the_served_document_is_the_one_checked(base_url):
    with urllib.request.urlopen(f"{base_url}/api/openapi.json", timeout=TIMEOUT) as resp:
        assert json.loads(resp.read()) == DOCUMENT
    with urllib.request.urlopen(urllib.request.Request(f"{base_url}/api/v1/agents", headers=AUTH)) as resp:
        assert resp.status == 200


# --------------------------------------------------------------------------- malformed input that gave 500s
# (found while writing this test: the fuzzing above, with HOSTILE, and requests aimed at what it pointed to)


def _send(base_url: str, method: str, path: str, body: object = None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base_url + path, data=data, method=method,
                                     headers={**AUTH, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("method, path, body, status, where", [
    # PostgreSQL text and jsonb cannot hold NUL: these were psycopg DataErrors, i.e. 500s
    ("PATCH", "/api/v1/campaigns/cart_followup", {"group_name": "sa\u0000les"}, 422, "group_name"),
    ("PATCH", "/api/v1/campaigns/cart_followup", {"settings": {"a": ["\u0000"]}}, 422, "settings.a[0]"),
    ("PATCH", "/api/v1/campaigns/cart_followup", {"retry_minutes": {"\u0000": 1}}, 422, "retry_minutes"),
    ("PATCH", "/api/v1/campaigns/cart%00followup", {"enabled": True}, 400, "name"),
    ("PUT", "/api/v1/scripts/cart_followup/offer", {"template": "hi\u0000"}, 422, "template"),
    ("DELETE", "/api/v1/scripts/cart_followup/off%00er", None, 400, "part"),
    ("GET", "/api/v1/history?order=A%00-1", None, 400, "order"),
    ("POST", "/api/v1/events", {"type": "stock_arrived", "idempotency_key": "k\u0000", "sku": "S"}, 422,
     "idempotency_key"),
    # a lone surrogate: psycopg's UnicodeEncodeError, and for a field name even aiohttp's plain-text 500
    ("PATCH", "/api/v1/campaigns/cart_followup", {"group_name": "sa\ud800les"}, 422, "group_name"),
    ("PUT", "/api/v1/scripts/cart_followup/offer", {"template": "\udfff"}, 422, "template"),
    ("POST", "/api/v1/agents/anna", {"paused": True, "\ud800": True}, 422, None),
    # numeric(12, 2) overflow of orders.total
    ("POST", "/api/v1/events", {"type": "order_created", "idempotency_key": "big-order", "phone": "+79161234567",
                                "order_number": "B-1", "items": [{"name": "a", "price": 1e10, "qty": 2}]},
     422, "total"),
    # Jinja folds 1e308*10 into a name "inf" the generated code does not define: a NameError
    ("PUT", "/api/v1/scripts/cart_followup/offer", {"template": "{{ (1e308*10)|number }}"}, 422, "template"),
])
def test_found_by_fuzzing_is_a_4xx_naming_the_field(base_url, method, path, body, status, where: str | None):
    got, answer = _send(base_url, method, path, body)
    assert got == status, answer
    assert answer["detail"]["field" if status == 422 else "parameter"] == where, answer
    assert answer["error"].startswith(where or "the body"), answer


def test_a_body_nested_too_deeply_is_400(base_url):
    # the JSON decoder's RecursionError was a 500
    got, answer = _send(base_url, "POST", "/api/v1/events", raw=b"[" * 30000)
    assert got == 400 and "nested too deeply" in answer["error"]
    got, _ = _send(base_url, "PATCH", "/api/v1/campaigns/cart_followup",
                   raw=b'{"settings": {"a": ' + b"[" * 500 + b"]" * 500 + b"}}")
    assert got == 200  # deep but decodable: stored

