"""The outbound part of the HTTP API over a real socket and a real PostgreSQL: events (with their
idempotency), history, campaigns, scripts; and the CLI's import, dnc and campaigns commands."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from shopcall import scripts
from tests.test_api import AUTH, api, client  # noqa: F401 (fixtures)
from tests.test_cli_db import config, shopcall  # noqa: F401 (fixture)

IVAN = "+79161234567"


async def post(client, body) -> tuple[int, dict]:  # noqa: F811
    resp = await client.post("/api/v1/events", json=body, headers=AUTH)
    return resp.status, await resp.json()


async def test_an_event_is_applied_once_and_a_repeat_gets_the_first_answer(client, conn):  # noqa: F811
    body = {"type": "order_created", "idempotency_key": "shop-order-10577", "phone": "8 916 123-45-67",
            "order_number": "10577", "items": [{"name": "Футболка", "size": "M", "price": 990}]}
    status, first = await post(client, body)
    assert status == 201 and first["duplicate"] is False and len(first["result"]["jobs"]) == 1
    status, again = await post(client, body)
    assert status == 200 and again["duplicate"] is True and again["result"] == first["result"]
    assert (await (await conn.execute("SELECT count(*) AS n FROM dial_jobs")).fetchone())["n"] == 1
    status, other = await post(client, {**body, "type": "cart_abandoned", "product": "x"})
    assert status == 422  # fields of another type: refused before the key is looked at
    status, clash = await post(client, {"type": "customer_consent", "idempotency_key": "shop-order-10577",
                                        "phone": IVAN, "purpose": "ad", "granted": True})
    assert status == 409 and clash["detail"]["field"] == "idempotency_key"


@pytest.mark.parametrize("body, status, field", [
    ({"type": "cart_abandoned", "idempotency_key": "k", "phone": "abc", "product": "x"}, 422, "phone"),
    ({"type": "cart_abandoned", "phone": IVAN, "product": "x"}, 422, "idempotency_key"),
    ({"type": "cart_abandoned", "idempotency_key": "k" * 201, "phone": IVAN, "product": "x"}, 422,
     "idempotency_key"),
    ([1, 2], 422, None),
])
async def test_bad_events_are_4xx_naming_the_field(client, conn, body, status, field):  # noqa: F811
    got, answer = await post(client, body)
    assert got == status and answer["detail"]["field"] == field, answer


async def test_not_json_is_400(client):  # noqa: F811
    resp = await client.post("/api/v1/events", data=b"{nope", headers=AUTH)
    assert resp.status == 400


async def test_history_by_phone_and_by_order(client, conn):  # noqa: F811
    await post(client, {"type": "order_created", "idempotency_key": "o1", "phone": IVAN, "order_number": "A-1",
                        "items": [{"name": "a"}]})
    by_phone = await (await client.get("/api/v1/history", params={"phone": "89161234567"}, headers=AUTH)).json()
    by_order = await (await client.get("/api/v1/history", params={"order": "A-1"}, headers=AUTH)).json()
    assert [j["campaign"] for j in by_phone["jobs"]] == ["order_confirmation"] == [j["campaign"] for j in by_order["jobs"]]
    assert by_phone["jobs"][0]["attempts_log"] == []
    for params in ({}, {"phone": "12"}, {"order": ""}, {"phone": IVAN, "limit": "0"}):
        assert (await client.get("/api/v1/history", params=params, headers=AUTH)).status == 400


async def test_campaign_changes_are_checked(client, conn):  # noqa: F811
    url = "/api/v1/campaigns/cart_followup"
    resp = await client.patch(url, json={"max_concurrent": 3, "retry_minutes": {"busy": 5}, "amd": True},
                              headers=AUTH)
    assert resp.status == 200 and (await resp.json())["max_concurrent"] == 3
    for body in ({"max_concurrent": 0}, {"calling_window": {"mon": [["21:00", "09:00"]]}}, {"nope": 1},
                 {"amd": "yes"}, {"retry_minutes": {"busy": -1}}, {"caller_id": "abc"}, {}):
        resp = await client.patch(url, json=body, headers=AUTH)
        assert resp.status == 422, (body, await resp.text())
    assert (await client.patch("/api/v1/campaigns/nosuch", json={"amd": True}, headers=AUTH)).status == 404
    campaigns = (await (await client.get("/api/v1/campaigns", headers=AUTH)).json())["campaigns"]
    assert {c["name"] for c in campaigns} == {"cart_followup", "back_in_stock", "order_confirmation",
                                             "delivery_status"}


async def test_scripts_are_checked_when_saved_and_served_at_once(client, conn):  # noqa: F811
    url = "/api/v1/scripts/cart_followup/offer"
    bad = await client.put(url, params={"segment": "vip"}, json={"template": "{{ prodct }}"}, headers=AUTH)
    assert bad.status == 422 and "prodct" in (await bad.json())["error"]
    good = await client.put(url, params={"segment": "vip"}, json={"template": "VIP: {{ product }}. 1 или 2?"},
                            headers=AUTH)
    assert good.status == 200 and (await good.json())["sample"] == "VIP: Духовой шкаф. 1 или 2?"
    parts = (await (await client.get("/api/v1/scripts/cart_followup", params={"segment": "vip"},
                                     headers=AUTH)).json())["parts"]
    assert parts["offer"] == "VIP: {{ product }}. 1 или 2?" and "Спасибо" in parts["no"]
    assert (await client.delete(url, params={"segment": "vip"}, headers=AUTH)).status == 200
    assert (await client.delete(url, params={"segment": "vip"}, headers=AUTH)).status == 404
    assert (await client.get("/api/v1/scripts/nosuch", headers=AUTH)).status == 404
    assert (await client.put("/api/v1/scripts/cart_followup/outro", json={"template": "x"},
                             headers=AUTH)).status == 422


async def test_random_queries_on_the_outbound_endpoints_never_give_5xx(api, conn):  # noqa: F811
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    port = api[0].port
    keys = st.sampled_from(["phone", "order", "limit", "segment", "language", "x"]) | st.text(max_size=8)
    values = st.text(max_size=30) | st.integers().map(str)
    paths = st.sampled_from(["/api/v1/history", "/api/v1/campaigns", "/api/v1/scripts/cart_followup",
                             "/api/v1/scripts/delivery_status"])
    bodies = st.dictionaries(st.sampled_from(["type", "idempotency_key", "phone", "product", "items", "sku",
                                              "order_number", "granted", "purpose"]),
                             st.none() | st.booleans() | st.integers() | st.text(max_size=20)
                             | st.lists(st.dictionaries(st.sampled_from(["name", "qty", "price"]),
                                                        st.integers() | st.text(max_size=5)), max_size=2))

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(paths, st.lists(st.tuples(keys, values), max_size=4), bodies)
    def check(path: str, pairs: list[tuple[str, str]], body: dict) -> None:
        for method, url, data in (("GET", f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(pairs)}", None),
                                  ("POST", f"http://127.0.0.1:{port}/api/v1/events", json.dumps(body).encode())):
            req = urllib.request.Request(url, data=data, method=method,
                                         headers={**AUTH, "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    status, text = resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                status, text = exc.code, exc.read()
            assert status < 500, (method, url, body, text)
            json.loads(text)

    await asyncio.to_thread(check)


# --------------------------------------------------------------------------- CLI


def test_cli_import_dnc_and_campaigns(config, tmp_path, conn):  # noqa: F811
    contacts = tmp_path / "contacts.csv"
    contacts.write_text("phone;name;segment;consent_ad\n8 916 123-45-67;Иван;vip;yes\n12;Плохой;;\n"
                        "+79161234567;Дубль;;\n", encoding="utf-8")
    out = shopcall("import", str(contacts), config=config)
    assert out.returncode == 0, out.stderr
    assert "not a phone number" in out.stdout and "duplicate of line 2" in out.stdout
    out = shopcall("dnc", "add", "8 916 123-45-67", config=config)
    assert out.returncode == 0 and "+79161234567: on the do-not-call list" in out.stdout
    listed = shopcall("dnc", "list", config=config)
    assert "+79161234567" in listed.stdout and "cli" in listed.stdout
    assert shopcall("dnc", "add", "nope", config=config).returncode == 2
    table = shopcall("campaigns", config=config)
    assert table.returncode == 0 and "cart_followup" in table.stdout and "order_confirmation" in table.stdout


async def test_a_template_that_would_build_too_much_is_a_quick_422_naming_the_limit(client, conn):  # noqa: F811
    url = "/api/v1/scripts/cart_followup/offer"
    for template, problem in (("{{ 'a' * 10**9 }}", "a string of 1000000000 characters (limit 10000)"),
                              ("{{ 'x'|center(10**9) }}", "a string of 1000000000 characters (limit 10000)"),
                              ("{{ 9**(9**9) }}", "a number of 369693099 digits (limit 1000)"),
                              ("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
                               "too much work"),
                              ("{{ product * 200 }}", "says 2400 characters (limit 2000)")):
        started = time.perf_counter()
        resp = await client.put(url, json={"template": template}, headers=AUTH)
        body = await resp.json()
        assert resp.status == 422 and problem in body["error"], body
        assert body["detail"]["field"] == "template"
        assert time.perf_counter() - started < 1  # tens of ms; unguarded, the first took seconds and gigabytes
    parts = (await (await client.get("/api/v1/scripts/cart_followup", headers=AUTH)).json())["parts"]
    assert parts["offer"] == scripts.default("cart_followup", "offer", "ru")  # nothing was saved
