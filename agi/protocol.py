"""FastAGI wire format: the agi_* header block, command quoting and reply parsing, all in bytes.

Asterisk writes the header block without escaping anything, so a caller name holding a newline splits its
line in two; and replies may be interleaved with an unsolicited `HANGUP` line. Both are handled here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

_HEADER = re.compile(rb"^(agi_[a-z0-9_]+): ?(.*)$")
_REPLY_200 = re.compile(r"^200 result=(-?\d*)(?: \((.*)\))?(?: endpos=(-?\d+))?\s*$", re.S)


class AgiProtocolError(Exception):
    """Something that is not FastAGI arrived: the session is closed with a log line, nothing else breaks."""


def decode(raw: bytes) -> str:
    """UTF-8 when it is UTF-8; otherwise Latin-1, which maps every byte, so nothing a carrier sends is lost."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def parse_header_lines(lines: list[bytes]) -> dict[str, str]:
    """Parse the header block (without its blank line). A line that is not `agi_x: value` continues the
    previous value: that is what a newline inside a caller name looks like on the wire."""
    env: dict[str, str] = {}
    last: str | None = None
    for raw in lines:
        line = raw.rstrip(b"\r\n")
        m = _HEADER.match(line)
        if m:
            last = m.group(1).decode("ascii")
            env[last] = decode(m.group(2))
        elif last is not None:
            env[last] += "\n" + decode(line)
        else:
            raise AgiProtocolError(f"header block does not start with agi_*: {line[:80]!r}")
    return env


@dataclass(frozen=True)
class Script:
    name: str
    args: dict[str, str]


def parse_script(env: dict[str, str]) -> Script:
    """`agi_network_script` is the path of agi://host:port/NAME?k=v; the route is NAME, query gives args."""
    raw = env.get("agi_network_script") or env.get("agi_request", "")
    if raw.startswith("agi://"):
        raw = urlsplit(raw).path
    parts = urlsplit(raw)
    name = parts.path.strip("/").split("/")[0] if parts.path else ""
    return Script(name=name, args=dict(parse_qsl(parts.query, keep_blank_values=True)))


@dataclass(frozen=True)
class Reply:
    code: int
    result: str
    data: str | None = None
    endpos: int | None = None
    text: str = ""

    @property
    def result_int(self) -> int:
        try:
            return int(self.result)
        except ValueError:
            return 0


def parse_reply(line: str) -> Reply:
    m = _REPLY_200.match(line)
    if m:
        endpos = int(m.group(3)) if m.group(3) is not None else None
        return Reply(200, m.group(1), m.group(2), endpos, line)
    code = line[:3]
    if code.isdigit():
        return Reply(int(code), "", None, None, line)
    raise AgiProtocolError(f"not an AGI reply: {line[:80]!r}")


def quote(value: str) -> str:
    """Quote one AGI argument. Asterisk splits arguments on blanks, honours "..." and backslash escapes;
    a newline would end the command, so CR/LF become spaces (the caller name keeps them in our database)."""
    value = value.replace("\r", " ").replace("\n", " ").replace("\x00", "")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def command(*parts: str) -> bytes:
    """Build one command line; the verb and fixed words are ours, every variable part must be quoted."""
    line = " ".join(parts)
    if "\n" in line or "\r" in line:
        raise ValueError("AGI command with a line break")
    return line.encode("utf-8") + b"\n"
