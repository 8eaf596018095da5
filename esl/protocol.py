"""FreeSWITCH Event Socket wire format: framing in bytes, header decoding, and building commands safely.

What the captured transcripts (tests/data/esl/) showed a parser must survive:
- a message is a header block up to a blank line, then exactly Content-Length BYTES of body; one read may
  hold several messages (7 in 19 KB), one message may span reads; bodies may lack a trailing newline;
- header values of plain events and of the outbound `connect` reply are %-encoded UTF-8 (`Reply-Text:
  %2BOK%0A`); `+` is a literal plus, so we percent-decode, never form-decode;
- api/response bodies and JSON events carry raw UTF-8, so Content-Length counts bytes, not characters;
- a plain event body is itself a header block and may carry its own Content-Length and body
  (BACKGROUND_JOB: `+OK <uuid>` / `-ERR <cause>`);
- CHANNEL_HANGUP_COMPLETE repeats `Hangup-Cause`: repeated headers are kept once, never rejected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from agi.protocol import decode as decode_text  # UTF-8, else Latin-1: no byte a peer sends is lost

MAX_HEADER_BYTES = 256 * 1024  # a connect reply is ~4 KB; anything this large is not FreeSWITCH
MAX_BODY_BYTES = 16 * 1024 * 1024

_APP = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_HEADER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
# what may reach an application argument as a file name: no blanks (arguments are split on them),
# no quotes, braces, `$` or backslashes (FreeSWITCH expands ${...} and escapes in every argument)
_FILE = re.compile(r"^[\w./+:@=%(),-]{1,1024}$")
_UUID = re.compile(r"^[0-9A-Za-z-]{1,64}$")


class EslProtocolError(Exception):
    """Bytes that are not Event Socket framing arrived; the connection is closed."""


def pct_decode(raw: bytes) -> str:
    """%XX-decode to bytes first, then decode the UTF-8: a name split across %-escapes stays whole."""
    return decode_text(unquote_to_bytes(raw)) if b"%" in raw else decode_text(raw)


def parse_headers(block: bytes, *, decode: bool = True) -> dict[str, str]:
    """`Name: value` lines; a repeated name keeps its first value (FreeSWITCH repeats Hangup-Cause)."""
    headers: dict[str, str] = {}
    for line in block.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise EslProtocolError(f"not a header line: {line[:80]!r}")
        key = name.decode("latin-1").strip()
        value = value[1:] if value.startswith(b" ") else value
        headers.setdefault(key, pct_decode(value) if decode else decode_text(value))
    return headers


@dataclass(frozen=True)
class Event:
    """One FreeSWITCH event (plain or JSON), header values decoded; `body` is the event's own body."""

    headers: Mapping[str, str]
    body: str = ""

    @property
    def name(self) -> str:
        return self.headers.get("Event-Name", "")

    def get(self, key: str, default: str = "") -> str:
        return self.headers.get(key, default)

    def var(self, name: str) -> str | None:
        return self.headers.get("variable_" + name)

    @property
    def variables(self) -> dict[str, str]:
        return {k[9:]: v for k, v in self.headers.items() if k.startswith("variable_")}


@dataclass(frozen=True)
class Message:
    """One framed message: the outer headers (decoded) and the raw body bytes."""

    headers: Mapping[str, str]
    body: bytes = b""

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    @property
    def reply_text(self) -> str:
        """command/reply carries it as a header, api/response as the body."""
        if self.content_type == "api/response":
            return decode_text(self.body)
        return self.headers.get("Reply-Text", "")

    @property
    def ok(self) -> bool:
        return self.reply_text.startswith("+OK")

    @property
    def is_event(self) -> bool:
        return self.content_type in ("text/event-plain", "text/event-json")

    def event(self) -> Event:
        """The event this message carries; the outbound `connect` reply is an event without a body."""
        if self.content_type == "text/event-plain":
            return parse_plain_event(self.body)
        if self.content_type == "text/event-json":
            return parse_json_event(self.body)
        return Event(dict(self.headers))


def parse_plain_event(body: bytes) -> Event:
    head, sep, rest = body.partition(b"\n\n")
    headers = parse_headers(head)
    inner = b""
    if sep and "Content-Length" in headers:
        inner = rest[: _length(headers["Content-Length"])]
    return Event(headers, decode_text(inner))


def parse_json_event(body: bytes) -> Event:
    try:
        data = json.loads(decode_text(body))
    except ValueError as exc:
        raise EslProtocolError(f"bad JSON event: {exc}") from None
    if not isinstance(data, dict):
        raise EslProtocolError("JSON event is not an object")
    inner = data.pop("_body", "")
    return Event({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}, str(inner))


def _length(value: str) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise EslProtocolError(f"bad Content-Length {value!r}") from None
    if n < 0 or n > MAX_BODY_BYTES:
        raise EslProtocolError(f"Content-Length {n} out of range")
    return n


class Parser:
    """Feed it bytes as they arrive; it returns every message completed so far, in order."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head: dict[str, str] | None = None
        self._head_len = 0
        self._need = 0

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while True:
            if self._head is None:
                # FreeSWITCH frames with LF only; a stray blank line between messages is skipped
                while self._buf[:1] == b"\n":
                    del self._buf[:1]
                end = self._buf.find(b"\n\n")
                if end < 0:
                    if len(self._buf) > MAX_HEADER_BYTES:
                        raise EslProtocolError(f"no end of headers within {MAX_HEADER_BYTES} bytes")
                    return out
                self._head = parse_headers(bytes(self._buf[:end]))
                self._head_len = end + 2
                del self._buf[: end + 2]
                self._need = _length(self._head["Content-Length"]) if "Content-Length" in self._head else 0
            if len(self._buf) < self._need:
                return out
            body = bytes(self._buf[: self._need])
            del self._buf[: self._need]
            out.append(Message(self._head, body))
            self._head, self._need = None, 0

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete message (a parsed header block included)."""
        return len(self._buf) + (self._head_len if self._head is not None else 0)


def array_values(value: str) -> list[str]:
    """`ARRAY::a|:b` (originate_causes, originated_legs) -> ["a", "b"]."""
    if not value.startswith("ARRAY::"):
        return [value] if value else []
    return value[7:].split("|:")


# -- building what we send -----------------------------------------------------------------------


def _one_line(value: str, what: str) -> str:
    if "\n" in value or "\r" in value or "\x00" in value:
        raise ValueError(f"{what} must not contain a line break: {value[:80]!r}")
    return value


def command(line: str) -> bytes:
    """A plain command (`connect`, `myevents`, `api ...`), one line, ended by the blank line."""
    return _one_line(line, "an ESL command").encode("utf-8") + b"\n\n"


def sendmsg(headers: Mapping[str, str], uuid: str = "") -> bytes:
    """`sendmsg [uuid]` with its headers; no header may contain CR/LF (it would start a new header)."""
    lines = ["sendmsg" + (" " + check_uuid(uuid) if uuid else "")]
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise ValueError(f"invalid sendmsg header name {name!r}")
        lines.append(f"{name}: {_one_line(str(value), 'a sendmsg header')}")
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def execute(app: str, arg: str, event_uuid: str, *, lock: bool = True) -> bytes:
    headers = {"call-command": "execute", "execute-app-name": check_app(app)}
    if arg:
        headers["execute-app-arg"] = arg
    if lock:
        headers["event-lock"] = "true"
    headers["Event-UUID"] = check_uuid(event_uuid)
    return sendmsg(headers)


def hangup(cause: str) -> bytes:
    if not re.match(r"^[A-Z_]{1,64}$", cause):
        raise ValueError(f"invalid hangup cause {cause!r}")
    return sendmsg({"call-command": "hangup", "hangup-cause": cause})


def check_app(name: str) -> str:
    if not _APP.match(name or ""):
        raise ValueError(f"invalid application name {name!r}")
    return name


def check_var(name: str) -> str:
    """FreeSWITCH channel variable names: letters, digits, underscore (no Asterisk-style FUNC(arg))."""
    if not _VAR.match(name or ""):
        raise ValueError(f"invalid FreeSWITCH variable name {name!r}")
    return name


def check_uuid(value: str) -> str:
    if not _UUID.match(value or ""):
        raise ValueError(f"invalid uuid {value!r}")
    return value


def check_file(path: str) -> str:
    """A file name placed into an application argument (playback, play_and_get_digits, record)."""
    if not _FILE.match(path or "") or "${" in path:
        raise ValueError(f"file name not usable in a FreeSWITCH argument: {path!r}")
    return path


def app_text(value: str) -> str:
    """Free text (a caller name, a flow's variable value) made inert inside an application argument.

    FreeSWITCH expands `${...}` (API calls included, e.g. ${system(...)}) and backslash escapes in every
    application argument, and `set` expands its value a second time, so no quoting survives both passes:
    `${` is broken up and backslashes become `/`. Control characters (CR/LF would end the sendmsg header)
    become spaces. The original text stays in our database; this is what the PBX sees.
    """
    text = "".join(" " if (ord(ch) < 32 or ord(ch) == 127) else ch for ch in value)
    return text.replace("\\", "/").replace("${", "$ {")


def display_name(value: str) -> str:
    """A caller name for the From display name of a leg sofia dials (effective_caller_id_name). sofia writes
    it between double quotes without escaping anything, so a `"` or `\\` in it makes a From header it cannot
    parse ("Error creating HANDLE!") and the leg fails at once: quotes become apostrophes; the rest as
    app_text."""
    return app_text(value).replace('"', "'")


_SIP_ESCAPE = re.compile(r"\\(.)")


def sip_unescape(value: str) -> str:
    """sofia keeps a quoted display name's escapes (`Иван \\"Ваня\\"`): the name itself, as the caller sent it."""
    return _SIP_ESCAPE.sub(r"\1", value)


def encode_value(value: str) -> str:
    """%-encode a header value the way FreeSWITCH writes plain events (for test peers and round trips)."""
    return quote(value, safe="',/()!*")


def serialize_headers(headers: Mapping[str, str] | list[tuple[str, str]], *, encode: bool = True) -> bytes:
    items = headers.items() if isinstance(headers, Mapping) else headers
    text = "".join(f"{k}: {encode_value(v) if encode else v}\n" for k, v in items)
    return text.encode("utf-8")

