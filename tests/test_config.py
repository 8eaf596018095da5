import dataclasses
import tomllib
from pathlib import Path

import pytest

from shopcall import config as config_module
from shopcall.config import (
    Config,
    ConfigError,
    Problem,
    check_config,
    load_config,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "shopcall.example.toml"


@pytest.fixture(autouse=True)
def no_config_files_on_this_machine(monkeypatch):
    # path=None would otherwise pick up ./shopcall.toml or /etc/shopcall/shopcall.toml if present.
    monkeypatch.setattr(config_module, "DEFAULT_SEARCH_PATH", ())


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shopcall.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_for(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[Problem]:
    return check_config(write(tmp_path, text), env or {})


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


# --------------------------------------------------------------------------- defaults and loading


def test_defaults():
    c = Config.default()
    assert c.shop.name == "Shop"
    assert c.shop.timezone == "Europe/Moscow"
    assert c.shop.language == "ru"
    assert c.shop.country == "RU"
    assert c.paths.data_dir == Path("/var/lib/shopcall")
    assert c.sounds_dir == Path("/var/lib/shopcall/sounds")
    assert c.spool_dir == Path("/var/lib/shopcall/spool")
    assert c.recordings_dir == Path("/var/lib/shopcall/recordings")
    assert c.pgdata == Path("/var/lib/shopcall/pgdata")
    assert c.database.url == "" and c.database.embedded
    assert (c.database.pool_min, c.database.pool_max, c.database.connect_timeout) == (1, 10, 5.0)
    assert (c.agi.listen, c.agi.port, c.agi.allow) == ("127.0.0.1", 4573, ())
    assert (c.agi.command_timeout, c.agi.max_call_seconds, c.agi.backlog) == (10.0, 14400, 1024)
    assert c.asterisk.endpoint_template == "PJSIP/{endpoint}"
    assert c.asterisk.context_prefix == "shopcall"
    assert c.asterisk.fallback_group == "sales"
    assert c.asterisk_agi_port == 4573
    assert c.agi_url == "agi://127.0.0.1:4573"
    assert c.asterisk_sounds_path == c.sounds_dir
    assert (c.prompts.tts, c.prompts.voice_ru, c.prompts.voice_en, c.prompts.speed) == (
        "espeak-ng",
        "ru",
        "en-us",
        150,
    )
    assert c.prompts.custom_dir is None
    assert (c.inbound.menu_timeout, c.inbound.menu_retries, c.inbound.ring_timeout) == (5.0, 2, 20)
    assert c.log.level == "INFO"
    assert c.source is None


def test_config_is_frozen():
    c = Config.default()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.agi.port = 1  # type: ignore[misc]


def test_paths_config_derives_subdirs_when_built_directly(tmp_path):
    paths = config_module.PathsConfig(data_dir=tmp_path)
    assert paths.sounds_dir == tmp_path / "sounds"
    assert paths.pgdata == tmp_path / "pgdata"


def test_database_url_not_in_repr():
    c = load_config(None, {"SHOPCALL_DATABASE__URL": "postgresql://u:secret@db/shop"})
    assert c.database.url == "postgresql://u:secret@db/shop"
    assert "secret" not in repr(c)


def test_file_values(tmp_path):
    path = write(
        tmp_path,
        """
[shop]
name = "Best Shop"
timezone = "Asia/Yekaterinburg"
language = "en"
country = "GB"

[paths]
data_dir = "/srv/shopcall"
sounds_dir = "/srv/sounds"

[database]
url = "postgresql://shop@db/shop"
pool_min = 2
pool_max = 4
connect_timeout = 3      # an int is fine for a float setting

[agi]
listen = "0.0.0.0"
port = 4600
allow = ["10.0.0.0/8", "192.0.2.7"]

[asterisk]
agi_host = "192.0.2.1"
sounds_path = "/var/lib/asterisk/sounds/shopcall"

[prompts]
custom_dir = "/srv/prompts"

[log]
level = "debug"
""",
    )
    c = load_config(path, {})
    assert c.source == path
    assert c.shop.name == "Best Shop"
    assert c.shop.tzinfo.key == "Asia/Yekaterinburg"
    assert (c.shop.language, c.shop.country) == ("en", "GB")
    assert c.sounds_dir == Path("/srv/sounds")
    assert c.spool_dir == Path("/srv/shopcall/spool")
    assert c.pgdata == Path("/srv/shopcall/pgdata")
    assert not c.database.embedded
    assert c.database.connect_timeout == 3.0 and isinstance(c.database.connect_timeout, float)
    assert c.agi.allow == ("10.0.0.0/8", "192.0.2.7")
    assert [str(n) for n in c.agi.allowed_networks] == ["10.0.0.0/8", "192.0.2.7/32"]
    assert not c.agi.listen_is_loopback
    assert c.agi_url == "agi://192.0.2.1:4600"
    assert c.asterisk_sounds_path == Path("/var/lib/asterisk/sounds/shopcall")
    assert c.prompts.custom_dir == Path("/srv/prompts")
    assert c.log.level == "DEBUG"


def test_asterisk_agi_port_overrides_and_ipv6_host():
    c = load_config(None, {"SHOPCALL_ASTERISK__AGI_PORT": "5000", "SHOPCALL_ASTERISK__AGI_HOST": "::1"})
    assert c.asterisk_agi_port == 5000
    assert c.agi_url == "agi://[::1]:5000"


def test_dotted_keys_at_top_level(tmp_path):
    path = write(tmp_path, 'agi.port = 4601\nshop.name = "Dotted"\n')
    c = load_config(path, {})
    assert (c.agi.port, c.shop.name) == (4601, "Dotted")
    p = only(problems_for(tmp_path, "shop.name = 'x'\nagi.port = 0\n"))
    assert (p.line, p.key) == (2, "agi.port")


# --------------------------------------------------------------------------- environment


def test_env_overrides_file(tmp_path):
    path = write(tmp_path, "[agi]\nport = 4600\nallow = ['10.0.0.1']\n[database]\nurl = 'postgresql://a/b'\n")
    env = {
        "SHOPCALL_AGI__PORT": "4700",
        "SHOPCALL_AGI__ALLOW": "10.0.0.0/8, 192.0.2.7",
        "SHOPCALL_AGI__COMMAND_TIMEOUT": "2.5",
        "SHOPCALL_DATABASE__URL": "postgresql://c/d",
        "SHOPCALL_CONFIG": "/ignored/because/path/is/given",
        "SHOPCALL_SOMETHING": "no double underscore: not ours",
        "PATH": "/bin",
    }
    c = load_config(path, env)
    assert c.agi.port == 4700
    assert c.agi.allow == ("10.0.0.0/8", "192.0.2.7")
    assert c.agi.command_timeout == 2.5
    assert c.database.url == "postgresql://c/d"


def test_env_empty_list():
    c = load_config(None, {"SHOPCALL_AGI__ALLOW": ""})
    assert c.agi.allow == ()


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [
        ("SHOPCALL_AGI__PORT", "forty", "agi.port"),
        ("SHOPCALL_AGI__PORT", "70000", "agi.port"),
        ("SHOPCALL_AGI__PORT", "true", "agi.port"),
        ("SHOPCALL_AGI__COMMAND_TIMEOUT", "nan", "agi.command_timeout"),
        ("SHOPCALL_AGI__COMMAND_TIMEOUT", "0", "agi.command_timeout"),
        ("SHOPCALL_SHOP__LANGUAGE", "de", "shop.language"),
        ("SHOPCALL_AGI__ALLOW", "10.0.0.0/8,not-an-ip", "agi.allow"),
    ],
)
def test_env_bad_value(name, value, key):
    p = only(check_config(None, {name: value}))
    assert (p.source, p.line, p.key) == (name, None, key)
    assert str(p).startswith(f"{name}: {key}: ")


def test_env_unknown_variable_suggests_name():
    p = only(check_config(None, {"SHOPCALL_AGI__PROT": "1"}))
    assert (p.source, p.key) == ("SHOPCALL_AGI__PROT", "agi.prot")
    assert "did you mean SHOPCALL_AGI__PORT?" in p.message
    p = only(check_config(None, {"SHOPCALL_NOPE__WHATEVER_AT_ALL": "1"}))
    assert "did you mean" not in p.message


def test_bad_file_value_reported_even_when_env_overrides_it(tmp_path):
    # A bad file value is reported even if the env overrides it: the file itself is wrong.
    path = write(tmp_path, "[agi]\nport = 'x'\n")
    problems = check_config(path, {"SHOPCALL_AGI__PORT": "4600"})
    assert [(p.line, p.key) for p in problems] == [(2, "agi.port")]


def test_bool_env_conversion():
    spec = config_module._Spec(bool, "true or false")
    assert config_module._from_env(spec, "Yes") is True
    assert config_module._from_env(spec, "off") is False
    with pytest.raises(config_module._Bad):
        config_module._from_env(spec, "maybe")


# --------------------------------------------------------------------------- file lookup


def test_lookup_order(tmp_path, monkeypatch):
    local = tmp_path / "local.toml"
    system = tmp_path / "system.toml"
    system.write_text("[shop]\nname = 'system'\n")
    monkeypatch.setattr(config_module, "DEFAULT_SEARCH_PATH", (local, system))
    assert load_config(None, {}).shop.name == "system"
    local.write_text("[shop]\nname = 'local'\n")
    assert load_config(None, {}).shop.name == "local"
    named = write(tmp_path, "[shop]\nname = 'named'\n")
    c = load_config(None, {"SHOPCALL_CONFIG": str(named)})
    assert (c.shop.name, c.source) == ("named", named)


def test_no_file_found_means_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "DEFAULT_SEARCH_PATH", (tmp_path / "missing.toml",))
    assert load_config(None, {}) == Config.default()


def test_env_none_uses_os_environ(monkeypatch):
    monkeypatch.setenv("SHOPCALL_AGI__PORT", "4999")
    assert load_config().agi.port == 4999


def test_missing_explicit_file(tmp_path):
    missing = tmp_path / "nope.toml"
    p = only(check_config(missing, {}))
    assert (p.source, p.line, p.key) == (str(missing), None, "")
    assert "not found" in p.message
    p = only(check_config(None, {"SHOPCALL_CONFIG": str(missing)}))
    assert p.source == str(missing)
    with pytest.raises(ConfigError):
        load_config(missing, {})


def test_not_utf8(tmp_path):
    path = tmp_path / "shopcall.toml"
    path.write_bytes(b"[shop]\nname = '\xff'\n")
    p = only(check_config(path, {}))
    assert p.line == 2 and "UTF-8" in p.message


# --------------------------------------------------------------------------- problems and line numbers


def test_syntax_error_reports_line(tmp_path):
    p = only(problems_for(tmp_path, "[shop]\nname = 'ok'\nport 4573\n"))
    assert p.line == 3 and p.key == ""
    assert p.message.startswith("TOML syntax error:")
    assert "column" in p.message and "(at line" not in p.message
    assert str(p).startswith(f"{tmp_path / 'shopcall.toml'}:3: TOML syntax error")


def test_syntax_error_at_end_of_file(tmp_path):
    p = only(problems_for(tmp_path, "[shop]\nname = 'unterminated\n"))
    assert p.line == 2


def test_duplicate_key_is_a_syntax_error(tmp_path):
    p = only(problems_for(tmp_path, "[agi]\nport = 1\nport = 2\n"))
    assert p.line == 3


def test_unknown_key_suggestion(tmp_path):
    p = only(problems_for(tmp_path, "[agi]\nlisten = '127.0.0.1'\nprot = 4600\n"))
    assert (p.line, p.key) == (3, "agi.prot")
    assert p.message == 'unknown key; did you mean "port"?'


def test_unknown_key_without_suggestion(tmp_path):
    p = only(problems_for(tmp_path, "[agi]\nzzzzzz = 1\n"))
    assert p.message == "unknown key"


def test_unknown_section_suggestion(tmp_path):
    p = only(problems_for(tmp_path, "[shop]\nname = 'x'\n\n[asterix]\nagi_port = 1\n"))
    assert (p.line, p.key) == (4, "asterix")
    assert 'did you mean "asterisk"?' in p.message


def test_subtable_in_section_is_unknown_key(tmp_path):
    p = only(problems_for(tmp_path, "[agi]\nport = 1\n[agi.extra]\nx = 1\n"))
    assert (p.line, p.key) == (3, "agi.extra")


def test_section_that_is_not_a_table(tmp_path):
    p = only(problems_for(tmp_path, "agi = 5\n"))
    assert (p.line, p.key) == (1, "agi")
    assert "must be a table" in p.message


def test_problem_str():
    assert str(Problem("shopcall.toml", 12, "agi.port", "must be an integer between 1 and 65535")) == (
        "shopcall.toml:12: agi.port: must be an integer between 1 and 65535"
    )
    assert str(Problem("SHOPCALL_AGI__PORT", None, "agi.port", "bad")) == "SHOPCALL_AGI__PORT: agi.port: bad"
    assert str(Problem("f.toml", 3, "", "TOML syntax error: x")) == "f.toml:3: TOML syntax error: x"


def test_config_error_lists_every_problem(tmp_path):
    path = write(tmp_path, "[agi]\nport = 0\nbacklog = -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {"SHOPCALL_LOG__LEVEL": "LOUD"})
    err = info.value
    assert [p.key for p in err.problems] == ["agi.port", "agi.backlog", "log.level"]
    lines = str(err).splitlines()
    assert lines == [str(p) for p in err.problems]
    assert lines[0] == f"{path}:2: agi.port: must be an integer between 1 and 65535"


# One case per check: (section body lines, the key of the problem, a fragment of its message).
# The bad line is always the last one, so its expected line number is known.
CHECKS = [
    ("[shop]", "name = ''", "shop.name", "must not be empty"),
    ("[shop]", "timezone = 'Mars/Olympus_Mons'", "shop.timezone", "unknown time zone"),
    ("[shop]", "language = 'de'", "shop.language", "must be one of ru, en"),
    ("[shop]", "country = 'ru'", "shop.country", "two-letter"),
    ("[shop]", "country = 'RUS'", "shop.country", "two-letter"),
    ("[shop]", "name = 5", "shop.name", "got an integer"),
    ("[paths]", "data_dir = ''", "paths.data_dir", "must not be empty"),
    ("[paths]", "sounds_dir = false", "paths.sounds_dir", "got a boolean"),
    ("[database]", "url = 5", "database.url", "must be a string"),
    ("[database]", "pool_min = 0", "database.pool_min", "must be a positive integer"),
    ("[database]", "pool_min = 1.5", "database.pool_min", "got a float"),
    ("[database]", "pool_min = 5\npool_max = 3", "database.pool_max", "at least database.pool_min (5)"),
    ("[database]", "connect_timeout = 0", "database.connect_timeout", "positive number of seconds"),
    ("[database]", "connect_timeout = -1.0", "database.connect_timeout", "positive number of seconds"),
    ("[database]", "connect_timeout = inf", "database.connect_timeout", "positive number of seconds"),
    ("[database]", "connect_timeout = true", "database.connect_timeout", "got a boolean"),
    ("[agi]", "port = 0", "agi.port", "must be an integer between 1 and 65535"),
    ("[agi]", "port = 65536", "agi.port", "must be an integer between 1 and 65535"),
    ("[agi]", "port = true", "agi.port", "got a boolean"),  # bool is not an int
    ("[agi]", "port = '4573'", "agi.port", "got a string"),
    ("[agi]", "listen = ''", "agi.listen", "must not be empty"),
    ("[agi]", "allow = ['10.0.0.0/8', '300.1.1.1']", "agi.allow", '"300.1.1.1"'),
    ("[agi]", "allow = [1, 2]", "agi.allow", "non-string items"),
    ("[agi]", "allow = '10.0.0.1'", "agi.allow", "got a string"),
    ("[agi]", "listen = '0.0.0.0'", "agi.allow", "not a loopback address"),
    ("[agi]", "listen = '0.0.0.0'\nallow = []", "agi.allow", "not a loopback address"),
    ("[agi]", "command_timeout = 0", "agi.command_timeout", "positive number of seconds"),
    ("[agi]", "max_call_seconds = 0", "agi.max_call_seconds", "positive integer"),
    ("[agi]", "backlog = 0", "agi.backlog", "positive integer"),
    ("[asterisk]", "agi_port = -1", "asterisk.agi_port", "between 0 and 65535"),
    ("[asterisk]", "agi_host = ''", "asterisk.agi_host", "must not be empty"),
    ("[asterisk]", "endpoint_template = 'PJSIP/operator'", "asterisk.endpoint_template", "{endpoint}"),
    ("[asterisk]", "endpoint_template = 'PJSIP/{endpoint}@{host}'", "asterisk.endpoint_template", "{host}"),
    ("[asterisk]", "endpoint_template = 'SIP/{endpoint}/{}'", "asterisk.endpoint_template", "{}"),
    ("[asterisk]", "endpoint_template = 'PJSIP/{endpoint'", "asterisk.endpoint_template", "format string"),
    ("[asterisk]", "context_prefix = 'Shop'", "asterisk.context_prefix", "lowercase letter"),
    ("[asterisk]", "context_prefix = '1shop'", "asterisk.context_prefix", "lowercase letter"),
    ("[asterisk]", "context_prefix = 'shop call'", "asterisk.context_prefix", "lowercase letter"),
    ("[asterisk]", "fallback_group = ''", "asterisk.fallback_group", "must not be empty"),
    ("[prompts]", "speed = 79", "prompts.speed", "between 80 and 450"),
    ("[prompts]", "speed = 451", "prompts.speed", "between 80 and 450"),
    ("[prompts]", "tts = ''", "prompts.tts", "must not be empty"),
    ("[inbound]", "menu_timeout = 0", "inbound.menu_timeout", "positive number of seconds"),
    ("[inbound]", "menu_retries = -1", "inbound.menu_retries", "non-negative integer"),
    ("[inbound]", "ring_timeout = 0", "inbound.ring_timeout", "positive integer"),
    ("[log]", "level = 'VERBOSE'", "log.level", "DEBUG, INFO, WARNING, ERROR"),
]


@pytest.mark.parametrize(("header", "body", "key", "fragment"), CHECKS, ids=[c[1] for c in CHECKS])
def test_each_check(tmp_path, header, body, key, fragment):
    # Padding before the section makes the expected line numbers non-trivial.
    text = f"# comment\n\n[shop]\nname = 'Padding'\n\n{header}\n{body}\n"
    if header == "[shop]":
        text = f"# comment\n\n{header}\n{body}\n"
    p = only(problems_for(tmp_path, text))
    assert p.key == key
    assert p.line == len(text.splitlines())
    assert p.source == str(tmp_path / "shopcall.toml")
    assert fragment in p.message


def test_allow_problem_points_at_listen_when_allow_is_absent(tmp_path):
    p = only(problems_for(tmp_path, "[agi]\nlisten = '::'\nport = 4573\n"))
    assert (p.line, p.key) == (2, "agi.allow")


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_listen_needs_no_allow(listen):
    assert check_config(None, {"SHOPCALL_AGI__LISTEN": listen}) == []


def test_non_loopback_listen_from_env_needs_allow():
    p = only(check_config(None, {"SHOPCALL_AGI__LISTEN": "0.0.0.0"}))
    assert (p.source, p.key) == ("SHOPCALL_AGI__LISTEN", "agi.allow")
    assert check_config(None, {"SHOPCALL_AGI__LISTEN": "0.0.0.0", "SHOPCALL_AGI__ALLOW": "10.0.0.0/8"}) == []


def test_several_problems_sorted_by_line(tmp_path):
    # The listen/allow cross-check is found last but belongs on line 2.
    text = "[agi]\nlisten = '0.0.0.0'\n[inbound]\nring_timeout = 0\n[agi.x]\n[shop]\nlanguage = 'xx'\n"
    problems = problems_for(tmp_path, text, {"SHOPCALL_AGI__PORT": "0"})
    assert [(p.line, p.key) for p in problems] == [
        (2, "agi.allow"),
        (4, "inbound.ring_timeout"),
        (5, "agi.x"),
        (7, "shop.language"),
        (None, "agi.port"),
    ]


def test_line_numbers_skip_multiline_strings(tmp_path):
    text = '[shop]\nname = """\nport = 1\n"""\n[agi]\nport = 0\n'
    p = only(problems_for(tmp_path, text))
    assert (p.line, p.key) == (6, "agi.port")


def test_quoted_keys_and_spaced_headers(tmp_path):
    p = only(problems_for(tmp_path, '[ "agi" ]\n"port" = 0\n'))
    assert p.line == 2


# --------------------------------------------------------------------------- example file


def test_example_file_is_clean():
    assert check_config(EXAMPLE, {}) == []


def test_example_file_lists_every_setting_with_its_default():
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    schema = {section: set(specs) for section, specs in config_module._SPECS.items()}
    assert {section: set(keys) for section, keys in data.items()} == schema
    assert load_config(EXAMPLE, {}) == dataclasses.replace(Config.default(), source=EXAMPLE)
