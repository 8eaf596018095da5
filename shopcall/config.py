"""shopcall configuration: one TOML file plus ``SHOPCALL_<SECTION>__<KEY>`` environment overrides.

Every problem found is collected (never just the first) so that an operator can fix a
config file in one pass; each problem names the file and line, or the env variable.
"""

import difflib
import ipaddress
import math
import os
import re
import string
import tomllib
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "AgiConfig",
    "AsteriskConfig",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "EslConfig",
    "FreeswitchConfig",
    "MailConfig",
    "ApiConfig",
    "CallbacksConfig",
    "DiallerConfig",
    "WebhooksConfig",
    "RecordingConfig",
    "VoicemailConfig",
    "InboundConfig",
    "LogConfig",
    "PathsConfig",
    "Problem",
    "PromptsConfig",
    "ShopConfig",
    "check_config",
    "load_config",
    "DEFAULT_SEARCH_PATH",
    "ENV_PREFIX",
    "CONFIG_ENV_VAR",
]

ENV_PREFIX = "SHOPCALL_"
CONFIG_ENV_VAR = "SHOPCALL_CONFIG"
# Tried in order when no path is given and $SHOPCALL_CONFIG is unset (module-level so tests can patch it).
DEFAULT_SEARCH_PATH: tuple[Path, ...] = (Path("shopcall.toml"), Path("/etc/shopcall/shopcall.toml"))

LANGUAGES = ("ru", "en")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_CONTEXT_PREFIX_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_COUNTRY_RE = re.compile(r"^[A-Z]{2}$")


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    source: str  # config file path or env variable name
    line: int | None
    key: str  # dotted, e.g. "agi.port"; "" for problems about the whole file
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: Iterable[Problem]):
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------- schema machinery


@dataclass(frozen=True)
class _Spec:
    kind: type  # type of the value in TOML: str, int, float, bool or list (of str)
    want: str  # completes "must be ...", used for type errors and simple range errors
    check: Callable[[Any], str | None] | None = None  # returns an error message or None
    final: Callable[[Any], Any] | None = None  # turns the checked TOML value into the stored one


def _setting(default: Any, kind: type, want: str, check=None, final=None, *, repr: bool = True) -> Any:
    return field(default=default, repr=repr, metadata={"spec": _Spec(kind, want, check, final)})


def _number(default: float, kind: type, *, lo: float | None = None, hi: float | None = None) -> Any:
    """An int (lo <= v <= hi) or a float of seconds (v > 0) setting, with a matching "must be ..." text."""
    if kind is float:
        want = "a positive number of seconds"
    elif hi is not None:
        want = f"an integer between {lo} and {hi}"
    else:
        want = "a positive integer" if lo == 1 else "a non-negative integer"

    def check(v: float) -> str | None:
        bad = v <= 0 if kind is float else (lo is not None and v < lo) or (hi is not None and v > hi)
        return f"must be {want}" if bad else None

    return _setting(default, kind, want, check)


def _nonempty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _one_of(choices: Iterable[str], *, fold: bool = False):
    choices = tuple(choices)

    def check(v: str) -> str | None:
        if (v.upper() if fold else v) in choices:
            return None
        return f"must be one of {', '.join(choices)}, not {v!r}"

    return check


def _check_timezone(v: str) -> str | None:
    try:
        zoneinfo.ZoneInfo(v)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # OSError: odd names reach the filesystem
        return f'unknown time zone {v!r} (expected a zoneinfo name such as "Europe/Moscow")'
    return None


def _check_country(v: str) -> str | None:
    return (
        None
        if _COUNTRY_RE.match(v)
        else f'must be a two-letter uppercase ISO region code such as "RU", not {v!r}'
    )


def _check_allow(entries: list[str]) -> str | None:
    bad = []
    for entry in entries:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            bad.append(entry)
    if not bad:
        return None
    return "not an IP address or network: " + ", ".join(f'"{b}"' for b in bad)


def _check_endpoint_template(v: str) -> str | None:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(v) if name is not None]
    except ValueError as exc:
        return f"is not a valid format string ({exc})"
    if "endpoint" not in names:
        return 'must contain "{endpoint}"'
    others = sorted({n for n in names if n != "endpoint"})
    if others:
        return "may contain no field but {endpoint}, found: " + ", ".join(f"{{{n}}}" for n in others)
    return None


def _check_context_prefix(v: str) -> str | None:
    if _CONTEXT_PREFIX_RE.match(v):
        return None
    return f"must start with a lowercase letter and contain only a-z, 0-9, _ and - (got {v!r})"


def _path_or_none(v: str) -> Path | None:
    return Path(v) if v else None


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ShopConfig:
    name: str = _setting("Shop", str, "a non-empty string", _nonempty)
    timezone: str = _setting("Europe/Moscow", str, "a zoneinfo name", _check_timezone)
    language: str = _setting("ru", str, "one of ru, en", _one_of(LANGUAGES))
    country: str = _setting("RU", str, "a two-letter ISO region code", _check_country)

    @property
    def tzinfo(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)


@dataclass(frozen=True)
class PathsConfig:
    data_dir: Path = _setting(Path("/var/lib/shopcall"), str, "a non-empty path", _nonempty, Path)
    # None means "under data_dir"; __post_init__ fills it in, so these are always Paths afterwards.
    sounds_dir: Path = _setting(None, str, "a path", final=_path_or_none)
    spool_dir: Path = _setting(None, str, "a path", final=_path_or_none)
    recordings_dir: Path = _setting(None, str, "a path", final=_path_or_none)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        for name, sub in (("sounds_dir", "sounds"), ("spool_dir", "spool"), ("recordings_dir", "recordings")):
            value = getattr(self, name)
            object.__setattr__(self, name, Path(value) if value else self.data_dir / sub)

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"


@dataclass(frozen=True)
class DatabaseConfig:
    # libpq accepts both URLs and "key=value" strings, so the content is not checked here.
    # Not in repr: it may carry a password and configs end up in logs.
    url: str = _setting("", str, "a string (PostgreSQL connection URL)", repr=False)
    pool_min: int = _number(1, int, lo=1)
    pool_max: int = _number(10, int, lo=1)
    connect_timeout: float = _number(5.0, float)
    # groups and their available members kept in memory while PostgreSQL notifies us of their changes
    cache_groups: bool = _setting(True, bool, "true or false")

    @property
    def embedded(self) -> bool:
        return not self.url


@dataclass(frozen=True)
class AgiConfig:
    listen: str = _setting("127.0.0.1", str, "a non-empty address", _nonempty)
    port: int = _number(4573, int, lo=1, hi=65535)
    allow: tuple[str, ...] = _setting((), list, "a list of addresses/networks", _check_allow, tuple)
    command_timeout: float = _number(10.0, float)
    max_call_seconds: int = _number(14400, int, lo=1)
    backlog: int = _number(1024, int, lo=1)

    @property
    def allowed_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(a.strip(), strict=False) for a in self.allow)

    @property
    def listen_is_loopback(self) -> bool:
        return is_loopback(self.listen)


@dataclass(frozen=True)
class AsteriskConfig:
    agi_host: str = _setting("127.0.0.1", str, "a non-empty host", _nonempty)
    agi_port: int = _number(0, int, lo=0, hi=65535)
    endpoint_template: str = _setting(
        "PJSIP/{endpoint}", str, 'a string containing "{endpoint}"', _check_endpoint_template
    )
    sounds_path: Path | None = _setting(None, str, "a path", final=_path_or_none)
    context_prefix: str = _setting("shopcall", str, "a dialplan context prefix", _check_context_prefix)
    fallback_group: str = _setting("sales", str, "a non-empty group name", _nonempty)
    recordings_path: Path | None = _setting(None, str, "a path", final=_path_or_none)
    ami_host: str = _setting("127.0.0.1", str, "a non-empty host", _nonempty)
    ami_port: int = _number(5038, int, lo=1, hi=65535)
    ami_user: str = _setting("shopcall", str, "a string")
    ami_secret: str = _setting("", str, "a string", repr=False)  # empty: no AMI (no callbacks through Asterisk)
    # dial string for a customer's number through your trunk
    trunk_template: str = _setting(
        "PJSIP/{number}@trunk", str, 'a string containing "{number}"', lambda v: None if "{number}" in v
        else 'must contain "{number}"')

    def effective_agi_port(self, agi: AgiConfig) -> int:
        return self.agi_port or agi.port


@dataclass(frozen=True)
class PromptsConfig:
    tts: str = _setting("espeak-ng", str, "a non-empty command", _nonempty)
    voice_ru: str = _setting("ru", str, "a non-empty voice name", _nonempty)
    voice_en: str = _setting("en-us", str, "a non-empty voice name", _nonempty)
    speed: int = _number(150, int, lo=80, hi=450)
    custom_dir: Path | None = _setting(None, str, "a path", final=_path_or_none)

    def voice(self, language: str) -> str:
        return self.voice_en if language == "en" else self.voice_ru


@dataclass(frozen=True)
class InboundConfig:
    menu_timeout: float = _number(5.0, float)
    menu_retries: int = _number(2, int, lo=0)
    ring_timeout: int = _number(20, int, lo=1)
    # seconds after an agent's call ends before their phone rings for the next one (0: at once); a ring step
    # whose agents are all in wrap-up rings them anyway, so no call is missed for it
    wrapup_seconds: int = _number(0, int, lo=0, hi=3600)
    # when closed, say when the number's schedule opens next (off: a recorded after_hours says it already)
    say_next_opening: bool = _setting(True, bool, "true or false")
    # refuse calls that show no number (anonymous, withheld) as the block list's calls are refused
    block_anonymous: bool = _setting(False, bool, "true or false")
    # a text message to a missed caller's mobile, through webhooks.messages_url (your SMS gateway), once per
    # callback request; {shop} is shop.name
    missed_call_sms: bool = _setting(False, bool, "true or false")
    missed_call_text_ru: str = _setting("{shop}: мы пропустили ваш звонок и перезвоним вам в ближайшее время.",
                                        str, "a non-empty text", _nonempty)
    missed_call_text_en: str = _setting("{shop}: we missed your call and will call you back shortly.",
                                        str, "a non-empty text", _nonempty)


@dataclass(frozen=True)
class EslConfig:
    """Our outbound-socket server: FreeSWITCH's `socket` application connects here."""

    listen: str = _setting("127.0.0.1", str, "a non-empty address", _nonempty)
    port: int = _number(8084, int, lo=1, hi=65535)
    allow: tuple[str, ...] = _setting((), list, "a list of addresses/networks", _check_allow, tuple)
    command_timeout: float = _number(10.0, float)
    backlog: int = _number(2048, int, lo=1)


@dataclass(frozen=True)
class FreeswitchConfig:
    """How we reach FreeSWITCH (inbound ESL, for originate) and how it reaches us."""

    esl_host: str = _setting("127.0.0.1", str, "a non-empty host", _nonempty)
    esl_port: int = _number(8021, int, lo=1, hi=65535)
    esl_password: str = _setting("ClueCon", str, "a string", repr=False)
    socket_host: str = _setting("127.0.0.1", str, "a non-empty host", _nonempty)
    socket_port: int = _number(0, int, lo=0, hi=65535)  # 0 = esl.port
    endpoint_template: str = _setting(
        "user/{endpoint}", str, 'a string containing "{endpoint}"', _check_endpoint_template
    )
    sounds_path: Path | None = _setting(None, str, "a path", final=_path_or_none)
    # recordings_dir as FreeSWITCH sees it (another host, a chroot): record/record_session write there
    recordings_path: Path | None = _setting(None, str, "a path", final=_path_or_none)
    context: str = _setting("shopcall", str, "a dialplan context name", _check_context_prefix)
    fallback_group: str = _setting("sales", str, "a non-empty group name", _nonempty)
    # numbers, digits, money, dates: "tts" = our espeak prompts (both PBXes sound alike), "mod_say" =
    # FreeSWITCH's say application with its own recorded sound files (mod_say_ru / mod_say_en)
    say: str = _setting("tts", str, "one of tts, mod_say", _one_of(("tts", "mod_say")))
    # robot calls of campaigns with amd: how long mod_avmd listens for a voicemail's beep before the robot
    # speaks (the wait ends sooner once the callee has spoken and paused)
    amd_seconds: int = _number(8, int, lo=1, hi=60)
    # the dialler's originate to a customer through your gateway; dialler_enabled: campaigns with
    # pbx = "freeswitch" are dialled through the inbound event socket (esl_host:esl_port)
    trunk_template: str = _setting(
        "sofia/gateway/trunk/{number}", str, 'a string containing "{number}"',
        lambda v: None if "{number}" in v else 'must contain "{number}"')
    dialler_enabled: bool = _setting(False, bool, "true or false")
    # calls the rendered fallback extension rang (our server down or giving up) get their row and callback
    # request from their CHANNEL_HANGUP_COMPLETE, read on the inbound event socket (esl_host:esl_port)
    report_fallback: bool = _setting(False, bool, "true or false")


@dataclass(frozen=True)
class CallbacksConfig:
    """Callback requests offered to agents: the agent's phone rings first, then the customer is dialled."""

    enabled: bool = _setting(True, bool, "true or false")
    # where agents' phones are: "asterisk" (AMI, needs asterisk.ami_secret), "freeswitch" (the inbound event
    # socket, freeswitch.esl_*), "auto" = the PBX whose calls this process serves (Asterisk when it serves
    # both and asterisk.ami_secret is set)
    pbx: str = _setting("auto", str, "one of auto, asterisk, freeswitch", _one_of(("auto", "asterisk", "freeswitch")))
    poll_seconds: float = _number(5.0, float)
    agent_ring_seconds: int = _number(20, int, lo=1)
    customer_ring_seconds: int = _number(30, int, lo=1)
    retry_minutes: int = _number(15, int, lo=1)
    max_attempts: int = _number(3, int, lo=1)
    # a click to call (POST /api/v1/calls) waits this long for the agent's phone to be free, then gives up
    click_wait_seconds: int = _number(30, int, lo=1)


def _check_url(v: str) -> str | None:
    if not v or re.match(r"^https?://[^\s/]+", v):
        return None
    return f"must be an http:// or https:// URL (or empty), not {v!r}"


@dataclass(frozen=True)
class DiallerConfig:
    """Outbound robot campaigns: who is due, when, and how fast (the campaign rows hold per-campaign caps)."""

    enabled: bool = _setting(True, bool, "true or false")
    poll_seconds: float = _number(2.0, float)
    batch: int = _number(50, int, lo=1, hi=10000)  # jobs claimed per round at most
    # an attempt still "dialling" this long after its ring time, with no channel on the PBX, was lost
    lost_grace_seconds: int = _number(60, int, lo=1)
    answer_timeout: float = _number(10.0, float)  # the robot waits this long for a key
    # campaign caller IDs and delays are in the campaign rows; this is the default calling window's zone
    # for numbers whose zone phonenumbers cannot tell (a Russian mobile spans eleven zones)
    default_timezone: str = _setting("", str, "a zoneinfo name or empty (shop.timezone)",
                                     lambda v: None if not v else _check_timezone(v))


@dataclass(frozen=True)
class WebhooksConfig:
    """Results of robot calls, product links and finished calls to the shop's URLs, HMAC-SHA256 signed."""

    results_url: str = _setting("", str, "an http(s) URL or empty", _check_url)
    messages_url: str = _setting("", str, "an http(s) URL or empty", _check_url)  # SMS/WhatsApp gateway
    calls_url: str = _setting("", str, "an http(s) URL or empty", _check_url)  # every call row, for a CRM
    # agents' phones start ringing for a call: posted at once, never retried (a CRM's screen pop)
    ringing_url: str = _setting("", str, "an http(s) URL or empty", _check_url)
    ringing_timeout: float = _number(2.0, float)
    secret: str = _setting("", str, "a string", repr=False)
    timeout: float = _number(10.0, float)
    poll_seconds: float = _number(2.0, float)
    max_backoff_seconds: int = _number(3600, int, lo=1)
    keep_sent_days: int = _number(30, int, lo=1)  # delivered rows are deleted after this long


@dataclass(frozen=True)
class ApiConfig:
    listen: str = _setting("127.0.0.1", str, "a non-empty address", _nonempty)
    port: int = _number(8085, int, lo=1, hi=65535)
    # where the shop's systems reach this API (behind a proxy, say): links in webhooks are made from it
    public_url: str = _setting("", str, "an http(s) URL or empty", _check_url)
    allow: tuple[str, ...] = _setting((), list, "a list of addresses/networks", _check_allow, tuple)
    tokens: tuple[str, ...] = _setting((), list, "a list of bearer tokens", None, tuple, repr=False)
    # requests a second per token (a burst of rate_burst is let through); 0 turns the limit off
    rate_per_second: float = _number(50.0, float, lo=0)
    rate_burst: int = _number(100, int, lo=1)
    # failed authentications per minute from one address before it is told to wait (429); 0 = no limit
    auth_failures_per_minute: int = _number(10, int, lo=0)


@dataclass(frozen=True)
class RecordingConfig:
    retention_days: int = _number(90, int, lo=1)  # `shopcall purge-recordings` deletes older files


@dataclass(frozen=True)
class MailConfig:
    smtp_host: str = _setting("127.0.0.1", str, "a non-empty host", _nonempty)
    smtp_port: int = _number(25, int, lo=1, hi=65535)
    starttls: bool = _setting(False, bool, "true or false")
    username: str = _setting("", str, "a string")
    password: str = _setting("", str, "a string", repr=False)
    sender: str = _setting("shopcall@localhost", str, "an e-mail address", _nonempty)
    timeout: float = _number(10.0, float)
    retry_seconds: int = _number(60, int, lo=1)  # a failed notice is tried again after this long
    keep_sent_days: int = _number(30, int, lo=1)  # sent notices are deleted from the outbox after this long


@dataclass(frozen=True)
class VoicemailConfig:
    after_hours: bool = _setting(True, bool, "true or false")  # offer voicemail when closed
    on_no_answer: bool = _setting(False, bool, "true or false")  # ... and when nobody answered
    max_seconds: int = _number(120, int, lo=1)
    min_seconds: float = _number(1.0, float)  # shorter messages are dropped
    transcriber: str = _setting(
        "pocketsphinx", str, "one of pocketsphinx, vosk, command, none",
        _one_of(("pocketsphinx", "vosk", "command", "none")),
    )
    vosk_model: str = _setting("", str, "a path")
    command: str = _setting("", str, "a command line")  # gets the WAV path as its last argument


@dataclass(frozen=True)
class LogConfig:
    # Case-insensitive because env overrides like SHOPCALL_LOG__LEVEL=debug are common; stored upper-case.
    level: str = _setting(
        "INFO", str, "one of " + ", ".join(LOG_LEVELS), _one_of(LOG_LEVELS, fold=True), str.upper
    )


_SECTIONS: dict[str, type] = {
    "shop": ShopConfig,
    "paths": PathsConfig,
    "database": DatabaseConfig,
    "agi": AgiConfig,
    "asterisk": AsteriskConfig,
    "prompts": PromptsConfig,
    "inbound": InboundConfig,
    "esl": EslConfig,
    "freeswitch": FreeswitchConfig,
    "recording": RecordingConfig,
    "callbacks": CallbacksConfig,
    "api": ApiConfig,
    "dialler": DiallerConfig,
    "webhooks": WebhooksConfig,
    "mail": MailConfig,
    "voicemail": VoicemailConfig,
    "log": LogConfig,
}
_SPECS: dict[str, dict[str, _Spec]] = {
    section: {f.name: f.metadata["spec"] for f in fields(cls)} for section, cls in _SECTIONS.items()
}


@dataclass(frozen=True)
class Config:
    shop: ShopConfig = field(default_factory=ShopConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    agi: AgiConfig = field(default_factory=AgiConfig)
    asterisk: AsteriskConfig = field(default_factory=AsteriskConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    inbound: InboundConfig = field(default_factory=InboundConfig)
    esl: EslConfig = field(default_factory=EslConfig)
    freeswitch: FreeswitchConfig = field(default_factory=FreeswitchConfig)
    recording: RecordingConfig = field(default_factory=RecordingConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    dialler: DiallerConfig = field(default_factory=DiallerConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    mail: MailConfig = field(default_factory=MailConfig)
    voicemail: VoicemailConfig = field(default_factory=VoicemailConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: Path | None = None

    @classmethod
    def default(cls) -> "Config":
        return cls()

    @property
    def sounds_dir(self) -> Path:
        return self.paths.sounds_dir

    @property
    def spool_dir(self) -> Path:
        return self.paths.spool_dir

    @property
    def recordings_dir(self) -> Path:
        return self.paths.recordings_dir

    @property
    def pgdata(self) -> Path:
        return self.paths.pgdata

    @property
    def asterisk_agi_port(self) -> int:
        return self.asterisk.effective_agi_port(self.agi)

    @property
    def agi_url(self) -> str:
        host = self.asterisk.agi_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # bare IPv6 literal
        return f"agi://{host}:{self.asterisk_agi_port}"

    @property
    def asterisk_recordings_path(self) -> Path:
        return self.asterisk.recordings_path or self.paths.recordings_dir

    @property
    def asterisk_sounds_path(self) -> Path:
        return self.asterisk.sounds_path or self.paths.sounds_dir


# --------------------------------------------------------------------------- value conversion


class _Bad(Exception):
    pass


_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    str: "a string",
    list: "an array",
    dict: "a table",
}


def _type_name(value: Any) -> str:
    for t, name in _TYPE_NAMES.items():  # bool first: it is an int subclass
        if isinstance(value, t):
            return name
    return type(value).__name__


_TOML_TYPE_OK: dict[type, Callable[[Any], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),  # bool is an int subclass
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    list: lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
}


def _from_toml(spec: _Spec, value: Any) -> Any:
    if not _TOML_TYPE_OK[spec.kind](value):
        got = "an array with non-string items" if isinstance(value, list) else _type_name(value)
        raise _Bad(f"must be {spec.want} (got {got})")
    if spec.kind is float:
        value = float(value)
        if not math.isfinite(value):  # TOML allows inf/nan, no timeout should be either
            raise _Bad(f"must be {spec.want}")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _from_env(spec: _Spec, text: str) -> Any:
    kind = spec.kind
    if kind is str:
        return text
    if kind is list:
        return [item.strip() for item in text.split(",") if item.strip()]
    stripped = text.strip().lower()
    if kind is bool:
        if stripped in _TRUE:
            return True
        if stripped in _FALSE:
            return False
    else:
        try:
            value = kind(stripped)
        except ValueError:
            pass
        else:
            if kind is not float or math.isfinite(value):
                return value
    raise _Bad(f"must be {spec.want} (got {text!r})")


# --------------------------------------------------------------------------- line numbers

_BARE_OR_QUOTED = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED = rf"{_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*"
_HEADER_RE = re.compile(rf"^\s*\[\[?\s*({_DOTTED})\s*\]\]?")
_KEY_RE = re.compile(rf"^\s*({_DOTTED})\s*=")
_PART_RE = re.compile(_BARE_OR_QUOTED)


def _split_dotted(text: str) -> tuple[str, ...]:
    return tuple(p[1:-1] if p[0] in "\"'" else p for p in _PART_RE.findall(text))


def _line_map(text: str) -> dict[tuple[str, ...], int]:
    """Map key paths (("agi", "port"), ("agi",)) to the 1-based line that first defines them."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_multiline: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if in_multiline:
            # Only toggling on an odd count of delimiters is crude, but multi-line strings are rare here.
            if line.count(in_multiline) % 2:
                in_multiline = None
            continue
        if m := _HEADER_RE.match(line):
            table = _split_dotted(m.group(1))
            lines.setdefault(table, number)
        elif m := _KEY_RE.match(line):
            path = table + _split_dotted(m.group(1))
            for i in range(len(table) + 1, len(path) + 1):
                lines.setdefault(path[:i], number)
            rest = line[m.end() :]
            for delim in ('"""', "'''"):
                if rest.count(delim) % 2:
                    in_multiline = delim
                    break
    return lines


# --------------------------------------------------------------------------- loading


def _closest(word: str, choices: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def is_loopback(host: str) -> bool:
    """localhost or a loopback address: listening there needs no allow-list."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


_Origin = tuple[str, int | None]


class _Loader:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.values: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
        self.origins: dict[tuple[str, str], _Origin] = {}
        self.bad: set[tuple[str, str]] = set()

    def problem(self, origin: _Origin, key: str, message: str) -> None:
        self.problems.append(Problem(origin[0], origin[1], key, message))

    def set(
        self, section: str, key: str, raw: Any, origin: _Origin, convert: Callable[[_Spec, Any], Any]
    ) -> None:
        spec = _SPECS[section][key]
        dotted = f"{section}.{key}"
        try:
            value = convert(spec, raw)
            if spec.check and (message := spec.check(value)):
                raise _Bad(message)
        except _Bad as exc:
            self.problem(origin, dotted, str(exc))
            self.bad.add((section, key))
            return
        self.values[section][key] = spec.final(value) if spec.final else value
        self.origins[(section, key)] = origin
        self.bad.discard((section, key))  # a valid override replaces a broken file value

    def read_file(self, path: Path) -> None:
        source = str(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            self.problem((source, None), "", "config file not found")
            return
        except IsADirectoryError:
            self.problem((source, None), "", "is a directory, not a config file")
            return
        except OSError as exc:
            self.problem((source, None), "", f"cannot read config file: {exc.strerror or exc}")
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.problem((source, raw[: exc.start].count(b"\n") + 1), "", "file is not valid UTF-8")
            return
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            self.problem(
                _syntax_origin(source, str(exc), text), "", f"TOML syntax error: {_syntax_message(str(exc))}"
            )
            return
        lines = _line_map(text)

        def origin(*keys: str) -> _Origin:
            for n in range(len(keys), 0, -1):  # fall back to the enclosing table's line
                if keys[:n] in lines:
                    return source, lines[keys[:n]]
            return source, None

        for section, table in data.items():
            if section not in _SECTIONS:
                self.problem(origin(section), section, _unknown("section", section, _SECTIONS))
                continue
            if not isinstance(table, dict):
                self.problem(
                    origin(section), section, f"must be a table ([{section}]), not {_type_name(table)}"
                )
                continue
            for key, raw in table.items():
                if key not in _SPECS[section]:
                    self.problem(
                        origin(section, key), f"{section}.{key}", _unknown("key", key, _SPECS[section])
                    )
                    continue
                self.set(section, key, raw, origin(section, key), _from_toml)

    def read_env(self, env: Mapping[str, str]) -> None:
        valid = {_env_name(s, k): (s, k) for s, specs in _SPECS.items() for k in specs}
        for name in sorted(env):
            if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX) :]:
                continue  # e.g. SHOPCALL_CONFIG, or variables owned by other tools
            if name not in valid:
                section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
                # Compare without the shared prefix, which would make everything look similar.
                hint = _closest(name[len(ENV_PREFIX) :].upper(), [v[len(ENV_PREFIX) :] for v in valid])
                hint = hint and ENV_PREFIX + hint
                message = "unknown setting" + (f"; did you mean {hint}?" if hint else "")
                self.problem((name, None), f"{section}.{key}", message)
                continue
            section, key = valid[name]
            self.set(section, key, env[name], (name, None), _from_env)

    def cross_checks(self) -> None:
        db = self.values["database"]
        if not self.bad & {("database", "pool_min"), ("database", "pool_max")}:
            pool_min = db.get("pool_min", 1)
            pool_max = db.get("pool_max", 10)
            if pool_max < pool_min:
                where = self.origins.get(("database", "pool_max")) or self.origins[("database", "pool_min")]
                self.problem(
                    where,
                    "database.pool_max",
                    f"must be at least database.pool_min ({pool_min}), not {pool_max}",
                )

        agi = self.values["agi"]
        if not self.bad & {("agi", "listen"), ("agi", "allow")}:
            listen = agi.get("listen", "127.0.0.1")
            if not is_loopback(listen) and not agi.get("allow"):
                where = self.origins.get(("agi", "allow")) or self.origins[("agi", "listen")]
                self.problem(
                    where,
                    "agi.allow",
                    f'must list the addresses/networks allowed to connect when agi.listen ("{listen}") '
                    "is not a loopback address",
                )

    def build(self, source: Path | None) -> Config:
        sections = {name: cls(**self.values[name]) for name, cls in _SECTIONS.items()}
        return Config(source=source, **sections)


def _env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}__{key.upper()}"


def _unknown(what: str, name: str, choices: Iterable[str]) -> str:
    hint = _closest(name, choices)
    return f"unknown {what}" + (f'; did you mean "{hint}"?' if hint else "")


_AT_LINE_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_AT_END_RE = re.compile(r"\s*\(at end of document\)\s*$")


def _syntax_origin(source: str, message: str, text: str) -> _Origin:
    if m := _AT_LINE_RE.search(message):
        return source, int(m.group(1))
    if _AT_END_RE.search(message):
        return source, max(1, len(text.splitlines()))
    return source, None


def _syntax_message(message: str) -> str:
    if m := _AT_LINE_RE.search(message):
        return f"{message[: m.start()]} (column {m.group(2)})"
    if m := _AT_END_RE.search(message):
        return f"{message[: m.start()]} (at end of file)"
    return message


def _resolve_path(path: str | Path | None, env: Mapping[str, str]) -> Path | None:
    if path is not None:
        return Path(path)
    if env.get(CONFIG_ENV_VAR):
        return Path(env[CONFIG_ENV_VAR])
    for candidate in DEFAULT_SEARCH_PATH:
        if candidate.is_file():
            return candidate
    return None


def _load(path: str | Path | None, env: Mapping[str, str] | None) -> tuple[Config | None, list[Problem]]:
    env = os.environ if env is None else env
    source = _resolve_path(path, env)
    loader = _Loader()
    if source is not None:
        loader.read_file(source)
    loader.read_env(env)
    loader.cross_checks()
    if loader.problems:
        # File problems first, top-down (cross-checks and dotted keys arrive out of order), then env.
        file_source = str(source)
        problems = sorted(loader.problems, key=lambda p: (p.source != file_source, p.source, p.line or 0))
        return None, problems
    return loader.build(source), []


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load the config file (see DEFAULT_SEARCH_PATH) and apply env overrides; raise ConfigError on any problem."""
    config, problems = _load(path, env)
    if problems or config is None:
        raise ConfigError(problems)
    return config


def check_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> list[Problem]:
    """Return every problem in the configuration load_config would use; never raises for bad content."""
    return _load(path, env)[1]
