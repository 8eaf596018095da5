"""What the robot says in each scenario: Jinja2 templates per scenario, part, customer segment and language.

The defaults live here; the shop overrides any part for a segment and language through the API (table
`scripts`), without a restart. A template is compiled and rendered against a sample of its scenario's
context when it is saved, in a sandbox with undefined variables as errors, so a typo fails the save and
never a call; the sandbox also limits what a template may build and how long it may work (MAX_STRING,
MAX_WORK, MAX_SPOKEN below), so no template can tie up the event loop the calls share. The rendered text
goes to the TTS as one argument (never a shell, never a dial string).

Filters: `money` (Decimal → "пятьсот рублей"), `number`, `digits` (an order number read digit by digit),
`date` (an ISO date → "пятое декабря"; `date('g')` → "пятого декабря", after "до"), all in the call's
language. Items of an order always have sku, name, size, qty, price and category (empty when unknown).
"""

from __future__ import annotations

import functools
import math
import re
import types
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, ValuesView
from contextvars import ContextVar
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any

import jinja2
from jinja2 import nodes, pass_context, pass_eval_context
from jinja2.exceptions import SecurityError
from jinja2.filters import make_attrgetter, sync_do_join
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, LoopContext, Macro, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer
from markupsafe import EscapeFormatter, Markup

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


# --------------------------------------------------------------------------- the sandbox's limits
# Jinja's sandbox keeps a template away from Python's internals, not from the CPU and memory it shares with
# live calls (one event loop): `{{ 'a' * 10**9 }}` or `{{ 9**(9**9) }}` would block every call for seconds
# while the template is checked. So each operation that can build something big from a few characters of
# template is measured before it runs, and a render has a budget of work; past a limit the template is
# refused at once with ScriptLimitError, a SecurityError, which the save check turns into a 422 and a call
# into our default words.
MAX_STRING = 10_000  # characters of any string (or of the text of a list) a template builds: a sentence is ~100
MAX_ITEMS = 10_000  # items of a range or a list
MAX_DIGITS = 1_000  # digits of a number: a spoken amount has a dozen
# Work per render, in units: a loop iteration costs the nodes of its body, a call or filter a few (a macro 50),
# and each character or item built, printed or handed to a filter or method one. A save check renders in
# ~1 ms; the budget runs out in 10-25 ms whatever the template does (loops, recursion, output into
# macro and block buffers that no length check sees); a long order at call time needs a few thousand.
MAX_WORK = 50_000
# What one script part may say, after whitespace is squeezed: about two minutes of speech at espeak's ~15
# characters a second. A prompt is a sentence or two (the longest default, an order read item by item, is a
# few hundred); past this the customer has hung up long before, and each text is synthesised and cached whole.
MAX_SPOKEN = 2_000
MAX_DIGITS_SAID = 500  # `digits` reads a code aloud digit by digit (slow: num2words); events.MAX_TEXT allows 500


class ScriptLimitError(SecurityError):
    """A template that would build more than a robot ever says, or work longer than a render ever needs."""


class _Budget:
    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_WORK


# The budget of the render under way in this thread (None: ours, trusted, or rendered outside render_text).
_budget: ContextVar[_Budget | None] = ContextVar("script_budget", default=None)


def _spend(units: int) -> None:
    budget = _budget.get()
    if budget is None:
        return
    budget.left -= units
    if budget.left < 0:
        raise ScriptLimitError(f"template does too much work: more than {MAX_WORK} steps (loop iterations, "
                               "calls, characters built or read)")


_SIZED = (str, bytes, list, tuple, dict, set, frozenset, range, KeysView, ValuesView, ItemsView)


def _read(*values: Any) -> int:
    """What a filter, test or method handed these values costs: it may read each of them whole."""
    return sum(len(v) for v in values if isinstance(v, _SIZED))


def _too_long(what: str, n: float, limit: int, unit: str = "characters") -> ScriptLimitError:
    return ScriptLimitError(f"template would build {what} of {int(n)} {unit} (limit {limit})")


class _TooBig(Exception):
    pass


_WALKED = (Namespace, dict, list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)


def _text_size(value: Any, limit: int = MAX_STRING) -> int:
    """About how many characters str(value) has, walking lists, dicts and namespaces (a shared sublist as
    often as it is printed) without building the text; raises ScriptLimitError past `limit`."""
    if isinstance(value, str | bytes):
        if len(value) > limit:
            raise _too_long("a string", len(value), limit)
        return len(value)
    if not isinstance(value, _WALKED):
        return value.bit_length() * 3 // 10 + 1 if isinstance(value, int) else 20
    total = 0
    path: set[int] = set()

    def walk(v: Any, depth: int) -> None:
        nonlocal total
        if isinstance(v, str | bytes):
            total += len(v) + 2
        elif isinstance(v, bool) or v is None:
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() * 3 // 10 + 1
        elif isinstance(v, _WALKED):
            if id(v) in path:  # Python prints a cycle as [...]
                total += 5
                return
            if depth > 100:
                raise ScriptLimitError("template would build a list nested more than 100 deep")
            path.add(id(v))
            total += 2
            items = object.__getattribute__(v, "_Namespace__attrs") if isinstance(v, Namespace) else v
            for item in (items.items() if isinstance(items, dict) else items):
                walk(item, depth + 1)
                total += 2
                if total > limit:
                    raise _TooBig
            path.discard(id(v))
        else:  # numbers, dates, functions, undefined: short
            total += 20
        if total > limit:
            raise _TooBig

    try:
        walk(value, 0)
    except _TooBig:
        raise ScriptLimitError(f"template would build a text of more than {limit} characters") from None
    return total


def _check_count(what: str, n: Any, limit: int = MAX_ITEMS) -> None:
    if isinstance(n, int) and n > limit:
        raise _too_long(what, n, limit, "items")


def _check_width(n: Any) -> None:
    if isinstance(n, int) and n > MAX_STRING:
        raise _too_long("a string", n, MAX_STRING)


def _check_repeat(seq: Any, times: Any) -> None:
    """`seq * times`, either way round."""
    if isinstance(times, int) and isinstance(seq, str | bytes | list | tuple) and times > 1:
        if isinstance(seq, list | tuple):
            if len(seq) * times > MAX_ITEMS:
                raise _too_long("a list", len(seq) * times, MAX_ITEMS, "items")
            if _text_size(seq) * times > MAX_STRING:
                raise _too_long("a list whose text is", _text_size(seq) * times, MAX_STRING)
        elif len(seq) * times > MAX_STRING:
            raise _too_long("a string", len(seq) * times, MAX_STRING)


def _digits(n: int) -> int:
    return n.bit_length() * 3 // 10 + 1


_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.?)", re.DOTALL)


def _check_printf(fmt: str, values: Any) -> None:
    """`fmt % values` (the operator and the `format` filter): widths, and repeating a long value."""
    args = list(values.values()) if isinstance(values, Mapping) else list(values) if isinstance(
        values, tuple) else [values]
    fields = 0
    for m in _PRINTF.finditer(fmt):
        if m.group(3) == "%":
            continue
        fields += 1
        for size in m.group(1, 2):
            if size == "*":
                for arg in args:
                    _check_width(arg)
            elif size:
                _check_width(int(size[:19]))  # 19 digits tell it
    if fields > 1 and args:
        biggest = max(_text_size(a) for a in args)
        if len(fmt) + fields * biggest > MAX_STRING:
            raise _too_long("a string", len(fmt) + fields * biggest, MAX_STRING)


def _check_spec(spec: str) -> None:
    """A str.format field's spec ("{:>999999999}"): no number in it may exceed the string limit."""
    for m in re.finditer(r"\d+", spec):
        _check_width(int(m.group()[:19]))


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        if isinstance(left, int) and isinstance(right, int):
            if left and right and _digits(abs(left)) + _digits(abs(right)) > MAX_DIGITS + 1:
                raise _too_long("a number", _digits(abs(left)) + _digits(abs(right)), MAX_DIGITS, "digits")
        else:
            _check_repeat(left, right)
            _check_repeat(right, left)
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 1 and abs(left) > 1:
            digits = right * math.log10(abs(left))
            if digits > MAX_DIGITS:
                raise _too_long("a number", digits, MAX_DIGITS, "digits")
    elif operator == "+":
        if isinstance(left, str | bytes) and isinstance(right, str | bytes):
            if len(left) + len(right) > MAX_STRING:
                raise _too_long("a string", len(left) + len(right), MAX_STRING)
        elif isinstance(left, list | tuple) and isinstance(right, list | tuple):
            if len(left) + len(right) > MAX_ITEMS:
                raise _too_long("a list", len(left) + len(right), MAX_ITEMS, "items")
            _text_size(left, MAX_STRING - _text_size(right))
    elif operator == "%" and isinstance(left, str):
        _check_printf(left, right)


def _check_result(value: Any, text: bool = True) -> Any:
    """Count what an operation built against the render's budget; a string or list past the limits (made by
    something not measured beforehand) is refused before anything else uses it. A filter's list is only
    counted (`items|sort` of a big order is no bigger than the order): `text` measures what it prints as."""
    if isinstance(value, str | bytes):
        if len(value) > MAX_STRING:
            raise _too_long("a string", len(value), MAX_STRING)
        _spend(1 + len(value))
    elif isinstance(value, Namespace) or (text and isinstance(value, _WALKED)):
        _spend(1 + _text_size(value))
    elif isinstance(value, list | tuple | dict | set):
        _check_count("a list", len(value))
        _spend(1 + len(value))
    elif isinstance(value, int) and not isinstance(value, bool) and _digits(abs(value)) > MAX_DIGITS + 1:
        raise _too_long("a number", _digits(abs(value)), MAX_DIGITS, "digits")
    return value


_STR_METHOD_CHECKS: dict[str, Callable[..., None]] = {}


def _str_method(name: str):
    def register(check: Callable[..., None]) -> Callable[..., None]:
        _STR_METHOD_CHECKS[name] = check
        return check
    return register


@_str_method("center")
@_str_method("ljust")
@_str_method("rjust")
def _pad(s: str, width: int, fillchar: str = " ") -> None:
    _check_width(width)


@_str_method("zfill")
def _zfill(s: str, width: int) -> None:
    _check_width(width)


@_str_method("expandtabs")
def _expandtabs(s: str, tabsize: int = 8) -> None:
    if isinstance(tabsize, int) and tabsize > 0:
        _check_width(len(s) + s.count("\t" if isinstance(s, str) else b"\t") * tabsize)


@_str_method("replace")
def _replace(s: str, old: str, new: str, count: int = -1) -> None:
    if isinstance(old, str | bytes) and isinstance(new, str | bytes) and len(new) > len(old):
        n = s.count(old) if isinstance(s, type(old)) else 0
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        _check_width(len(s) + n * (len(new) - len(old)))


@_str_method("join")
def _str_join(sep: str, items: Any) -> None:
    if isinstance(items, list | tuple):
        _check_count("a list", len(items))
        _check_width(len(sep) * max(len(items) - 1, 0) + sum(_text_size(i) for i in items))


@_str_method("translate")
def _translate(s: str, table: Any) -> None:
    if isinstance(table, Mapping) and table:
        longest = max((len(v) for v in table.values() if isinstance(v, str | bytes)), default=1)
        _check_width(len(s) * longest)


class _Formatter(SandboxedFormatter):
    """str.format in the sandbox, each field's spec checked (after nested fields are filled in) and the
    whole result counted as it is built."""

    def __init__(self, env: Any, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self._built = 0

    def format_field(self, value: Any, format_spec: str) -> Any:
        _check_spec(format_spec)
        _text_size(value)
        text = super().format_field(value, format_spec)
        self._built += len(text)
        if self._built > MAX_STRING:
            raise _too_long("a string", self._built, MAX_STRING)
        return text


class _EscapeFormatter(_Formatter, EscapeFormatter):
    pass


# filters whose parameters say how big the result is: each gets its arguments (after the context or
# environment Jinja passes some) before it runs
def _f_center(value: Any, width: int = 80) -> None:
    _check_width(width)


def _f_indent(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> None:
    if isinstance(s, str):
        _check_width(len(s) + (s.count("\n") + 1) * (width if isinstance(width, int) else len(str(width))))


def _f_format(value: Any, *args: Any, **kwargs: Any) -> None:
    _check_printf(str(value) if isinstance(value, str) else "", kwargs or args)


def _f_replace(s: Any, old: Any, new: Any, count: Any = None) -> None:
    if isinstance(s, str):
        _replace(s, str(old), str(new), count if isinstance(count, int) else -1)


def _f_wordwrap(s: Any, width: int = 79, break_long_words: bool = True, wrapstring: Any = None,
                break_on_hyphens: bool = True) -> None:
    if isinstance(s, str) and isinstance(width, int):
        lines = 2 * len(s) // max(width, 1) + s.count("\n") + 2
        _check_width(len(s) + lines * len(str(wrapstring or "\n")))


def _f_batch(value: Any, linecount: Any, fill_with: Any = None) -> None:
    _check_count("a batch", linecount)


def _f_slice(value: Any, slices: Any, fill_with: Any = None) -> None:
    _check_count("a list of slices", slices)


def _f_sum(iterable: Any, attribute: Any = None, start: Any = 0) -> None:
    if not isinstance(start, int | float | Decimal):  # lists summed into one list: quadratic and unbounded
        raise ScriptLimitError("template may sum numbers only")


def _f_round(value: Any, precision: Any = 0, method: str = "common") -> None:
    if isinstance(precision, int) and abs(precision) > MAX_DIGITS:  # 10 ** precision, for ceil and floor
        raise _too_long("a number", abs(precision), MAX_DIGITS, "digits")


def _f_tojson(value: Any, indent: Any = None) -> None:
    if isinstance(indent, int) and indent > 8:
        raise ScriptLimitError(f"tojson indent {indent} (limit 8)")


def _f_digits(value: Any) -> None:
    if len(str(value)) > MAX_DIGITS_SAID:
        raise _too_long("a code read digit by digit", len(str(value)), MAX_DIGITS_SAID)
    _spend(10 * len(str(value)))


_FILTER_CHECKS: dict[str, Callable[..., None]] = {
    "center": _f_center, "indent": _f_indent, "format": _f_format, "replace": _f_replace,
    "wordwrap": _f_wordwrap, "batch": _f_batch, "slice": _f_slice, "sum": _f_sum, "round": _f_round,
    "tojson": _f_tojson, "digits": _f_digits,
}
# num2words is slow: a spoken number, amount or date costs as much as a loop iteration of a dozen nodes
_FILTER_STEPS = {"money": 30, "number": 30, "date": 30}


def _guarded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    check = _FILTER_CHECKS.get(name)
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # the context, eval context or env
    steps = _FILTER_STEPS.get(name, 2)

    @functools.wraps(func)  # keeps jinja_pass_arg, so Jinja passes the same first argument
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _spend(steps + _read(*args[skip:], *kwargs.values()))
        if check is not None:
            check(*args[skip:], **kwargs)
        return _check_result(func(*args, **kwargs), text=False)

    return guarded


def _guarded_test(func: Callable[..., Any]) -> Callable[..., Any]:
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _spend(2 + _read(*args[skip:], *kwargs.values()))
        return func(*args, **kwargs)

    return guarded


@pass_eval_context
def _join(eval_ctx: EvalContext, value: Any, d: str = "", attribute: Any = None) -> str:
    """The `join` filter, measuring what it joins first (`[s]*10000|join` would be 10000 × len(s))."""
    items = list(value)
    _check_count("a list", len(items))
    if attribute is not None:
        items = list(map(make_attrgetter(eval_ctx.environment, attribute), items))
    _check_width(len(str(d)) * max(len(items) - 1, 0) + sum(_text_size(i) for i in items))
    return sync_do_join(eval_ctx, items, d)


def _range(*args: int) -> range:
    """`range`, at most MAX_ITEMS long (Jinja's own allows 100000, and a loop over it is the budget's)."""
    numbers = range(*args)
    try:
        n = len(numbers)
    except OverflowError:  # past sys.maxsize
        n = abs(numbers.stop - numbers.start) // abs(numbers.step)
    _check_count("a range", n)
    return numbers


# filters the guard inserts into every template's tree (pass_context: Jinja never runs them at compile time)
@pass_context
def _each(context: Context, iterable: Any, weight: int) -> Iterator[Any]:
    """A loop's iterable: each iteration spends the nodes of the loop's body."""
    for item in iterable:
        _spend(weight)
        yield item


@pass_context
def _out(context: Context, value: Any) -> Any:
    """Whatever is output, in the template or in a macro, call or block buffer."""
    _spend(1 + _text_size(value))
    return value


@pass_context
def _concat(context: Context, values: list[Any]) -> str:
    """The `~` operator."""
    sizes = [_text_size(v) for v in values]
    _check_width(sum(sizes))
    _spend(1 + sum(sizes))
    return (markup_join if context.eval_ctx.autoescape else str_join)(values)


@pass_context
def _built(context: Context, value: Any) -> Any:
    """A list, tuple or dict literal: `[ns.l, ns.l]` in a loop doubles without an operator."""
    _spend(1 + _text_size(value))
    return value


@pass_context
def _operand(context: Context, value: Any) -> Any:
    """A side of a comparison: `==` and `in` may read all of it (the comparison itself is in its loop's weight)."""
    if isinstance(value, _SIZED):
        _spend(len(value))
    return value


def _call(node: nodes.Expr, name: str, *args: Any) -> nodes.Filter:
    return nodes.Filter(node, name, [nodes.Const(a) for a in args], [], None, None, lineno=node.lineno)


class _Guard(NodeTransformer):
    """Routes through the filters above what no sandbox hook sees: loop iterations, output, `~`, literals,
    comparisons."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        weight = 1 + sum(1 + sum(1 for _ in part.find_all(nodes.Node)) for part in (*node.body, *node.else_))
        node = self.generic_visit(node)
        node.iter = _call(node.iter, "_each", weight)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        node = self.generic_visit(node)
        node.nodes = [_call(nodes.MarkSafeIfAutoescape(nodes.Const(child.data), lineno=child.lineno)
                            if isinstance(child, nodes.TemplateData) else child, "_out") for child in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        node = self.generic_visit(node)
        return _call(nodes.List(node.nodes, lineno=node.lineno), "_concat")

    def visit_Compare(self, node: nodes.Compare) -> nodes.Compare:
        node = self.generic_visit(node)
        if not isinstance(node.expr, nodes.Const):
            node.expr = _call(node.expr, "_operand")
        for operand in node.ops:
            if not isinstance(operand.expr, nodes.Const):
                operand.expr = _call(operand.expr, "_operand")
        return node

    def _literal(self, node: nodes.Expr) -> nodes.Expr:
        return _call(self.generic_visit(node), "_built")

    visit_List = visit_Dict = _literal

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Expr:
        return self._literal(node) if node.ctx == "load" else self.generic_visit(node)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's sandbox (immutable: a script reads its data, it does not append to lists) with the limits."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    # unary minus and plus build nothing bigger than their operand: not intercepted

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _spend(1)
        _check_binop(operator, left, right)
        return _check_result(super().call_binop(context, operator, left, right))

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(obj, "__self__", None)
        _spend((50 if isinstance(obj, Macro | LoopContext) else 2) + _read(owner, *args, *kwargs.values()))
        if isinstance(owner, str | bytes) and isinstance(obj, types.BuiltinMethodType):
            wrapped = self.wrap_str_format(obj)  # Jinja < 3.1.5 hands str.format over unwrapped
            if wrapped is not None:
                obj = wrapped
            elif (check := _STR_METHOD_CHECKS.get(obj.__name__)) is not None:
                check(owner, *args, **kwargs)
        return _check_result(super().call(context, obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _spend(1)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _spend(1)
        value = super().getitem(obj, argument)
        return _check_result(value, text=False) if isinstance(argument, slice) else value

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """Jinja's own (3.1.6), with the formatter above."""
        if not isinstance(value, types.MethodType | types.BuiltinMethodType) or value.__name__ not in (
                "format", "format_map") or not isinstance(value.__self__, str):
            return None
        f_self: str = value.__self__
        is_format_map = value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs, args = args[0], ()
            formatter = (_EscapeFormatter(self, escape=f_self.escape) if isinstance(f_self, Markup)
                         else _Formatter(self))
            return type(f_self)(formatter.vformat(f_self, args, kwargs))

        return functools.update_wrapper(wrapper, value)


@functools.cache
def environment(language: str) -> SandboxedEnvironment:
    env = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=False, trim_blocks=True, lstrip_blocks=True)
    env.filters.update({
        "money": lambda v, currency="RUB": speech.money_text(_to_decimal(v), currency, language),
        "number": lambda v: speech.number_text(int(v), language),
        "digits": lambda v: speech.digits_text(str(v), language),
        "date": lambda v, case="n": speech.date_text(_to_date(v), language, case=case),
    })
    del env.filters["urlize"]  # HTML links, with a target repeated per link: nothing a voice says
    env.filters["join"] = _join
    env.filters.update({name: _guarded_filter(name, f) for name, f in env.filters.items()})
    env.filters.update({"_each": _each, "_out": _out, "_concat": _concat, "_built": _built, "_operand": _operand})
    env.tests.update({name: _guarded_test(t) for name, t in env.tests.items()})
    for name in ("lipsum", "cycler", "joiner"):  # lorem ipsum of any length, HTML row helpers
        del env.globals[name]
    env.globals["range"] = _range
    return env


@functools.lru_cache(maxsize=256)
def _compile(language: str, template: str) -> jinja2.Template:
    """A template guarded as above; compiled once per text (a call renders each part it says)."""
    env = environment(language)
    tree = _Guard().visit(env.parse(template))
    tree.set_environment(env)
    return env.from_string(tree)


def default(scenario: str, part: str, language: str) -> str:
    try:
        return DEFAULTS[scenario][part][language]
    except KeyError:
        raise ScriptError(f"no script part {scenario}/{part} ({language})") from None


# ours: trusted, and they grow only with the event's data (events.py bounds it), so the default a call falls
# back to never fails on a limit
_DEFAULT_TEMPLATES = frozenset(t for parts in DEFAULTS.values() for langs in parts.values() for t in langs.values())


def render_text(template: str, language: str, context: Mapping[str, Any]) -> str:
    """The text a script part says. A shop's template past a limit (the sandbox's, or MAX_SPOKEN) raises
    ScriptError, like any template that fails: refused when saved, our default said instead during a call."""
    trusted = template in _DEFAULT_TEMPLATES
    token = _budget.set(None if trusted else _Budget())
    try:
        text = _compile(language, template).render(**context)
    except ScriptError:
        raise
    except jinja2.TemplateError as exc:  # ScriptLimitError among them
        raise ScriptError(f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # a filter given the wrong kind of value, too deep a recursion, ...
        raise ScriptError(f"{type(exc).__name__}: {exc}") from None
    finally:
        _budget.reset(token)
    # the TTS reads one line; stray whitespace from template blocks is noise
    text = " ".join(text.split())
    if len(text) > MAX_SPOKEN and not trusted:
        raise ScriptError(f"the script part says {len(text)} characters (limit {MAX_SPOKEN}): "
                          f"{text[:60]}...")
    return text


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
