"""What the robot says in each scenario: Jinja2 templates per scenario, part, customer segment and language.

The defaults live here; the shop overrides any part for a segment and language through the API (table
`scripts`), without a restart. A template is compiled and rendered against a sample of its scenario's
context when it is saved, in a sandbox with undefined variables as errors, so a typo fails the save and
never a call. The rendered text goes to the TTS as one argument (never a shell, never a dial string).

Filters: `money` (Decimal → "пятьсот рублей"), `number`, `digits` (an order number read digit by digit),
`date` (an ISO date → "пятое декабря"; `date('g')` → "пятого декабря", after "до"), all in the call's
language. Items of an order always have sku, name, size, qty, price and category (empty when unknown).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from shopcall import speech

LANGUAGES = ("ru", "en")
MAX_TEMPLATE = 4000  # characters: a robot monologue longer than this is a mistake

# scenario -> part -> language -> template
DEFAULTS: dict[str, dict[str, dict[str, str]]] = {
    "cart_followup": {
        "offer": {
            "ru": "Вы интересовались: {{ product }}. Только сегодня на него скидка {{ discount_percent|number }} "
                  "процентов. Оформить заказ? Нажмите 1 — да, 2 — нет.",
            "en": "You were interested in {{ product }}. Today only it is {{ discount_percent|number }} percent "
                  "off. Would you like to order it? Press 1 for yes, 2 for no.",
        },
        "yes_callback": {"ru": "Спасибо! Менеджер перезвонит вам в течение нескольких минут.",
                         "en": "Thank you! A sales manager will call you back within minutes."},
        "yes_connect": {"ru": "Спасибо! Соединяю с менеджером.", "en": "Thank you! Connecting you to a manager."},
        "no": {"ru": "Спасибо за ответ. Хорошего дня!", "en": "Thank you for your answer. Have a nice day!"},
    },
    "back_in_stock": {
        "offer": {
            "ru": "Товар {{ product }}, который вы ждали, снова в продаже. Ссылку на него мы отправили вам "
                  "сообщением. Чтобы оформить заказ с менеджером, нажмите 1.",
            "en": "{{ product }}, which you were waiting for, is back in stock. We have sent you a link to it. "
                  "To order it with a manager, press 1.",
        },
        "connect": {"ru": "Соединяю с менеджером.", "en": "Connecting you to a manager."},
        "bye": {"ru": "Спасибо, до свидания!", "en": "Thank you, goodbye!"},
    },
    "order_confirmation": {
        "confirm": {
            "ru": "Ваш заказ номер {{ order_number|digits }} на сумму {{ total|money }}. "
                  "{% for item in items %}{{ item.name }}{% if item.size %}, размер {{ item.size }}{% endif %}"
                  "{% if item.qty > 1 %}, {{ item.qty|number }} штук{% endif %}. {% endfor %}"
                  "Подтверждаете заказ? Нажмите 1 — да, 2 — нет.",
            "en": "Your order number {{ order_number|digits }}, for {{ total|money }}. "
                  "{% for item in items %}{{ item.name }}{% if item.size %}, size {{ item.size }}{% endif %}"
                  "{% if item.qty > 1 %}, {{ item.qty|number }} pieces{% endif %}. {% endfor %}"
                  "Do you confirm the order? Press 1 for yes, 2 for no.",
        },
        "confirmed": {"ru": "Спасибо, заказ подтверждён и ожидает доставки.",
                      "en": "Thank you, your order is confirmed and awaiting delivery."},
        "operator": {"ru": "Соединяю с оператором.", "en": "Connecting you to an operator."},
        "addon": {
            "ru": "При покупке {{ addon.trigger }} {{ addon.name }} со скидкой {{ addon.discount_percent|number }} "
                  "процентов, всего за {{ addon.price|money }}. Добавить в заказ? Нажмите 1 — да, 2 — нет.",
            "en": "With your {{ addon.trigger }}, {{ addon.name }} is {{ addon.discount_percent|number }} percent "
                  "off, only {{ addon.price|money }}. Add it to your order? Press 1 for yes, 2 for no.",
        },
        "addon_added": {"ru": "Добавлено. Новая сумма заказа: {{ total|money }}.",
                        "en": "Added. Your order total is now {{ total|money }}."},
        "bye": {"ru": "Спасибо за заказ, до свидания!", "en": "Thank you for your order, goodbye!"},
    },
    "delivery_status": {
        "reminder": {
            "ru": "Ваш заказ номер {{ order_number|digits }} прибыл в пункт выдачи по адресу: {{ pickup_point }}. "
                  "{% if keep_until %}Он будет храниться до {{ keep_until|date('g') }}. {% endif %}"
                  "Чтобы поговорить с оператором, нажмите 1.",
            "en": "Your order number {{ order_number|digits }} has arrived at the pickup point at {{ pickup_point }}. "
                  "{% if keep_until %}It will be kept until {{ keep_until|date }}. {% endif %}"
                  "To talk to an operator, press 1.",
        },
        "connect": {"ru": "Соединяю с оператором.", "en": "Connecting you to an operator."},
        "bye": {"ru": "Ждём вас. До свидания!", "en": "We look forward to seeing you. Goodbye!"},
    },
}

ITEM_KEYS = ("sku", "name", "size", "qty", "price", "category")
_ITEM = {"sku": "TS-1", "name": "Футболка", "size": "M", "qty": 2, "price": Decimal("990.00"), "category": "tshirts"}


def order_item(raw: Mapping[str, Any]) -> dict[str, Any]:
    """An order line as templates see it: every key present, so `{% if item.size %}` works on any item."""
    return {"sku": raw.get("sku") or "", "name": raw.get("name") or "", "size": raw.get("size") or "",
            "qty": int(raw.get("qty") or 1), "price": raw.get("price") or "0", "category": raw.get("category") or "",
            **{k: v for k, v in raw.items() if k not in ITEM_KEYS}}
# what each scenario's context holds (the flow builds the same keys from the job): the save-time check
SAMPLES: dict[str, dict[str, Any]] = {
    "cart_followup": {"product": "Духовой шкаф", "discount_percent": 25, "cart_id": "c1"},
    "back_in_stock": {"product": "Духовой шкаф", "sku": "OVN-7", "product_url": "https://shop.example/ovn-7"},
    "order_confirmation": {
        "order_number": "10577", "total": Decimal("1980.00"), "currency": "RUB", "items": [_ITEM],
        "addon": {"sku": "BN-1", "name": "бандана", "trigger": "футболки", "discount_percent": 20,
                  "price": Decimal("500.00")},
    },
    "delivery_status": {"order_number": "10577", "pickup_point": "ул. Ленина, 1", "keep_until": "2026-12-10",
                        "status": "at_pickup_point"},
}
COMMON_SAMPLE = {"shop_name": "Магазин", "customer_name": "Иван", "segment": "default", "language": "ru"}


class ScriptError(ValueError):
    """A template that does not compile or render: said when it is saved."""


def _to_decimal(value: Any) -> Decimal:
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise ScriptError(f"not an amount: {value!r}") from None


def _to_date(value: Any) -> date:
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise ScriptError(f"not a date (YYYY-MM-DD): {value!r}") from None


@functools.cache
def environment(language: str) -> SandboxedEnvironment:
    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False, trim_blocks=True,
                               lstrip_blocks=True)
    env.filters.update({
        "money": lambda v, currency="RUB": speech.money_text(_to_decimal(v), currency, language),
        "number": lambda v: speech.number_text(int(v), language),
        "digits": lambda v: speech.digits_text(str(v), language),
        "date": lambda v, case="n": speech.date_text(_to_date(v), language, case=case),
    })
    return env


def default(scenario: str, part: str, language: str) -> str:
    try:
        return DEFAULTS[scenario][part][language]
    except KeyError:
        raise ScriptError(f"no script part {scenario}/{part} ({language})") from None


def render_text(template: str, language: str, context: Mapping[str, Any]) -> str:
    try:
        text = environment(language).from_string(template).render(**context)
    except ScriptError:
        raise
    except jinja2.TemplateError as exc:
        raise ScriptError(f"{type(exc).__name__}: {exc}") from None
    except (TypeError, ValueError, ArithmeticError) as exc:  # a filter given the wrong kind of value
        raise ScriptError(f"{type(exc).__name__}: {exc}") from None
    # the TTS reads one line; stray whitespace from template blocks is noise
    return " ".join(text.split())


def validate(scenario: str, part: str, language: str, template: str) -> str:
    """Check a template before it is stored; returns the sample rendering (shown to whoever saved it)."""
    if scenario not in DEFAULTS:
        raise ScriptError(f"unknown scenario {scenario!r} (one of {', '.join(DEFAULTS)})")
    if part not in DEFAULTS[scenario]:
        raise ScriptError(f"unknown part {part!r} of {scenario} (one of {', '.join(DEFAULTS[scenario])})")
    if language not in LANGUAGES:
        raise ScriptError(f"unknown language {language!r} (ru or en)")
    if not template.strip():
        raise ScriptError("the template is empty")
    if len(template) > MAX_TEMPLATE:
        raise ScriptError(f"the template is longer than {MAX_TEMPLATE} characters")
    text = render_text(template, language, {**COMMON_SAMPLE, **SAMPLES[scenario]})
    if not text:
        raise ScriptError("the template renders to nothing with the sample data")
    return text


async def load(conn, scenario: str, segment: str, language: str) -> dict[str, str]:
    """Every part of a scenario for this segment and language: the shop's own, else its default-segment
    version, else ours."""
    rows = await (await conn.execute(
        """SELECT part, template, segment FROM scripts WHERE scenario = %s AND language = %s
           AND segment IN (%s, 'default') ORDER BY segment = 'default' DESC""",
        (scenario, language, segment))).fetchall()
    parts = {part: langs[language] for part, langs in DEFAULTS[scenario].items()}
    for row in rows:  # default segment first, then the customer's own segment overrides it
        parts[row["part"]] = row["template"]
    return parts
