"""FreeSWITCH 1.10 (installed under /opt/freeswitch from ../shared/freeswitch by tests/run.sh), for tests.

Usage, like AsteriskPbx::

    with FreeswitchPbx(work_dir, agents={"agent1": free_sip_port()}, dialplan=xml) as pbx:
        pbx.api("show channels")       # any API command, over the event socket
        pbx.write_dialplan(xml)        # the test's own contexts (the `public` context the callers land in)
        pbx.reload_dialplan()          # reloadxml, failing on an XML error

The configuration is written from scratch per instance (not the vanilla one) in WORK/freeswitch-PORT/conf,
with its state (db, run, log, storage, recordings) beside it; nothing is shared with another instance but
the TLS certificates FreeSWITCH generates at its first start (~5 s, copied from and to the cache).

- One sofia profile `test` on 127.0.0.1:`sip_port` (no registration, no auth, PCMU, RFC 2833 DTMF); SIPp's
  calls land in context `context`.
- Each agent NAME is a directory user whose dial-string reaches the SIPp phone playing it
  (`sofia/test/sip:NAME@127.0.0.1:PORT`, with presence_id NAME@domain as FreeSWITCH's own directory sets it),
  so `user/NAME` dials it, as on a real FreeSWITCH where the phone registered.
- The event socket on 127.0.0.1:`esl_port` (password `esl_password`); our outbound-socket server is
  wherever the rendered shopcall XML points.
- `dialplan`: XML contexts, written as conf/dialplan/test.xml; `includes`: more dialplan files (the rendered
  shopcall XML), each copied into conf/dialplan/ at start and at every reload_dialplan.
- mod_say_ru and mod_say_en are loaded and their languages configured as vanilla does, but no sound pack is
  installed (none ships): `sound_prefix(language)` is where a test may put one.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from xml.sax.saxutils import quoteattr

PREFIX = Path(os.environ.get("SHOPCALL_FREESWITCH_PREFIX", "/opt/freeswitch"))
BINARY = PREFIX / "bin" / "freeswitch"
CACHE = Path(os.environ.get("SHOPCALL_CACHE", "/var/cache/shopcall"))
# modules loaded: what shopcall uses (mod_avmd for AMD, mod_say_* to test that its sound files are missing)
MODULES = (
    "mod_logfile", "mod_event_socket", "mod_sofia", "mod_loopback", "mod_commands", "mod_dptools", "mod_db",
    "mod_hash", "mod_expr", "mod_avmd", "mod_dialplan_xml", "mod_sndfile", "mod_native_file", "mod_tone_stream",
    "mod_say_en", "mod_say_ru",
)  # fmt: skip


class FreeswitchError(RuntimeError):
    pass


def freeswitch_is_installed() -> bool:
    return os.access(BINARY, os.X_OK)


def _free_port(kind: int, first: int, last: int) -> int:
    start = (os.getpid() * 7919) % (last - first)
    for i in range(last - first):
        port = first + (start + i) % (last - first)
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            if kind == socket.SOCK_DGRAM:  # SIP also listens on TCP at the same port
                with socket.socket() as t:
                    try:
                        t.bind(("127.0.0.1", port))
                    except OSError:
                        continue
            return port
    raise FreeswitchError(f"no free port in {first}-{last}")


def _set_pdeathsig() -> None:
    # FreeSWITCH gets SIGTERM if the test process dies without stopping it (PR_SET_PDEATHSIG = 1)
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


class FreeswitchPbx:
    """One FreeSWITCH for a test module; see the module docstring.

    Attributes for tests: sip_port, esl_port, esl_password, agents, full_log, startup_seconds, domain.
    """

    kind = "freeswitch"

    def __init__(
        self,
        work_dir: Path,
        *,
        sip_port: int | None = None,
        esl_port: int | None = None,
        esl_password: str = "shopcall-test-esl",
        agents: Mapping[str, int] | None = None,
        context: str = "public",
        dialplan: str = "",
        includes: Iterable[Path] = (),
        rtp_ports: tuple[int, int] | None = None,
        sip_debug: bool = False,
        start_timeout: float = 30.0,
    ) -> None:
        self.sip_port = sip_port or _free_port(socket.SOCK_DGRAM, 15100, 15900)
        self.esl_port = esl_port or _free_port(socket.SOCK_STREAM, 18100, 18900)
        self.esl_password = esl_password
        self.agents = dict(agents or {})
        self.context = context
        self.domain = "127.0.0.1"
        self.includes = [Path(p) for p in includes]
        # distinct from Asterisk's 20000-20999 and SIPp's 30000-39999; per instance, by SIP port
        first = 16000 + (self.sip_port % 8) * 500 if rtp_ports is None else rtp_ports[0]
        self.rtp_ports = rtp_ports or (first, first + 499)
        self.sip_debug = sip_debug
        self.start_timeout = start_timeout
        self.base = Path(os.path.realpath(work_dir)) / f"freeswitch-{self.sip_port}"
        self.conf = self.base / "conf"
        self.startup_seconds: float | None = None
        self._dialplan = dialplan
        self._proc: subprocess.Popen[bytes] | None = None
        self._atexit = False

    # ---- paths ---------------------------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        return self.base / name

    @property
    def full_log(self) -> Path:
        return self._dir("log") / "freeswitch.log"

    @property
    def recordings_dir(self) -> Path:
        return self._dir("recordings")

    def sound_prefix(self, language: str) -> Path:
        """Where `say` looks for a language's sound files (vanilla's layout); empty, as no sound pack ships:
        a test that wants mod_say to speak puts files there (digits/40.wav ...)."""
        return self._dir("sounds") / {"ru": "ru/RU/elena", "en": "en/us/callie"}[language]

    # ---- life ----------------------------------------------------------------------------------------

    def start(self) -> None:
        if not freeswitch_is_installed():
            raise FreeswitchError(f"no FreeSWITCH at {PREFIX} (tests/run.sh installs it from ../shared/freeswitch)")
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        shutil.rmtree(self.base, ignore_errors=True)
        for name in ("conf", "log", "db", "run", "certs", "tmp", "storage", "recordings", "sounds"):
            self._dir(name).mkdir(parents=True)
        self._restore_certs()
        self._write_config()
        started = time.monotonic()
        cmd = [str(BINARY), "-nonat", "-nc", "-nf", "-conf", str(self.conf)]
        for flag in ("log", "db", "run", "certs", "temp", "storage", "recordings", "sounds"):
            cmd += [f"-{flag}", str(self._dir("tmp" if flag == "temp" else flag))]
        with open(self._dir("log") / "stdout.log", "wb") as out:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True, preexec_fn=_set_pdeathsig)
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        self._keep_certs()
        if self.sip_debug:
            self.api("sofia profile test siptrace on")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(FreeswitchError, OSError):
            self.api("fsctl shutdown", timeout=3)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> FreeswitchPbx:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _wait_ready(self, started: float) -> None:
        deadline = started + self.start_timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise FreeswitchError(f"FreeSWITCH exited during start-up (rc={self._proc.returncode})\n"
                                      f"{self.log_tail()}")
            with contextlib.suppress(OSError, FreeswitchError):
                if "is ready" in self.api("status", timeout=2) and "RUNNING" in self.api(
                        "sofia status", timeout=2):
                    return
            if time.monotonic() > deadline:
                raise FreeswitchError(f"FreeSWITCH not ready after {self.start_timeout}s\n{self.log_tail()}")
            time.sleep(0.1)

    # TLS certificates (DTLS): generated at the first start in an empty directory (~5 s of RSA); kept.
    def _restore_certs(self) -> None:
        cache = CACHE / "freeswitch-certs"
        if cache.is_dir():
            for f in cache.iterdir():
                shutil.copy2(f, self._dir("certs") / f.name)

    def _keep_certs(self) -> None:
        cache = CACHE / "freeswitch-certs"
        if cache.is_dir() or not any(self._dir("certs").iterdir()):
            return
        with contextlib.suppress(OSError):
            tmp = cache.with_name(f"freeswitch-certs.{os.getpid()}")
            shutil.copytree(self._dir("certs"), tmp)
            tmp.rename(cache)

    # ---- control -------------------------------------------------------------------------------------

    def api(self, command: str, timeout: float = 15.0) -> str:
        """One API command over the event socket (auth, `api`, the body); FreeswitchError if refused."""
        if "\n" in command or "\r" in command:
            raise ValueError("an API command is one line")
        with socket.create_connection(("127.0.0.1", self.esl_port), timeout=timeout) as s:
            f = s.makefile("rb")
            _read_message(f)  # auth/request
            s.sendall(f"auth {self.esl_password}\n\n".encode())
            headers, _ = _read_message(f)
            if not headers.get("Reply-Text", "").startswith("+OK"):
                raise FreeswitchError(f"event socket auth refused: {headers}")
            s.sendall(f"api {command}\n\n".encode())
            while True:
                headers, body = _read_message(f)
                if headers.get("Content-Type") == "api/response":
                    return body.decode("utf-8", "replace")

    # the name Asterisk's harness uses, so a test can run a PBX command on either
    rx = api

    def write_dialplan(self, text: str) -> None:
        self._dialplan = text
        if self.conf.is_dir():
            self._write_dialplans()

    def reload_dialplan(self) -> None:
        self._write_dialplans()
        out = self.api("reloadxml")
        # a file that does not parse is "+OK [[error near line N]: ...]" (the old XML stays in use)
        if not out.startswith("+OK [Success]"):
            raise FreeswitchError(f"reloadxml failed: {out.strip()}")

    def log_tail(self, n: int = 80) -> str:
        parts = []
        for path in (self._dir("log") / "stdout.log", self.full_log):
            if path.exists():
                lines = path.read_bytes().decode("utf-8", "replace").splitlines()
                parts.append(f"--- {path} (last {n} lines)\n" + "\n".join(lines[-n:]))
        return "\n".join(parts) or "(no FreeSWITCH log yet)"

    # ---- configuration -------------------------------------------------------------------------------

    def _write(self, name: str, text: str) -> None:
        path = self.conf / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    def _write_dialplans(self) -> None:
        self._write("dialplan/test.xml", f"<include>\n{self._dialplan}\n</include>\n")
        for i, include in enumerate(self.includes):
            shutil.copyfile(include, self.conf / "dialplan" / f"include-{i}-{include.name}")

    def _write_config(self) -> None:
        d = self.domain
        self._write("freeswitch.xml", f"""<?xml version="1.0"?>
<document type="freeswitch/xml">
  <X-PRE-PROCESS cmd="set" data="domain={d}"/>
  <X-PRE-PROCESS cmd="set" data="local_ip_v4=127.0.0.1"/>
  <X-PRE-PROCESS cmd="set" data="default_language=ru"/>
  <section name="configuration" description="configuration">
    <X-PRE-PROCESS cmd="include" data="autoload_configs/*.xml"/>
  </section>
  <section name="dialplan" description="dialplan">
    <X-PRE-PROCESS cmd="include" data="dialplan/*.xml"/>
  </section>
  <section name="directory" description="users">
    <X-PRE-PROCESS cmd="include" data="directory/*.xml"/>
  </section>
  <section name="languages" description="what `say` speaks, as vanilla's lang/ru and lang/en set it up">
    <language name="ru" say-module="ru" sound-prefix="{self.sound_prefix('ru')}"><phrases><macros/></phrases></language>
    <language name="en" say-module="en" sound-prefix="{self.sound_prefix('en')}"><phrases><macros/></phrases></language>
  </section>
</document>
""")
        self._write("autoload_configs/modules.conf.xml", "<configuration name=\"modules.conf\">\n  <modules>\n"
                    + "".join(f'    <load module="{m}"/>\n' for m in MODULES) + "  </modules>\n</configuration>\n")
        self._write("autoload_configs/switch.conf.xml", f"""<configuration name="switch.conf">
  <settings>
    <param name="colorize-console" value="false"/>
    <param name="max-sessions" value="5000"/>
    <param name="sessions-per-second" value="1000"/>
    <param name="loglevel" value="debug"/>
    <param name="dump-cores" value="no"/>
    <param name="rtp-start-port" value="{self.rtp_ports[0]}"/>
    <param name="rtp-end-port" value="{self.rtp_ports[1]}"/>
    <param name="rtp-enable-zrtp" value="false"/>
  </settings>
</configuration>
""")
        self._write("autoload_configs/logfile.conf.xml", """<configuration name="logfile.conf">
  <settings><param name="rotate-on-hup" value="true"/></settings>
  <profiles><profile name="default">
    <settings><param name="rollover" value="0"/><param name="uuid" value="true"/></settings>
    <mappings><map name="all" value="debug,info,notice,warning,err,crit,alert"/></mappings>
  </profile></profiles>
</configuration>
""")
        self._write("autoload_configs/event_socket.conf.xml", f"""<configuration name="event_socket.conf">
  <settings>
    <param name="nat-map" value="false"/>
    <param name="listen-ip" value="127.0.0.1"/>
    <param name="listen-port" value="{self.esl_port}"/>
    <param name="password" value="{self.esl_password}"/>
    <param name="apply-inbound-acl" value="loopback.auto"/>
  </settings>
</configuration>
""")
        self._write("autoload_configs/sofia.conf.xml", f"""<configuration name="sofia.conf">
  <global_settings><param name="log-level" value="0"/></global_settings>
  <profiles>
    <profile name="test">
      <settings>
        <param name="context" value="{self.context}"/>
        <param name="dialplan" value="XML"/>
        <param name="sip-ip" value="127.0.0.1"/>
        <param name="sip-port" value="{self.sip_port}"/>
        <param name="rtp-ip" value="127.0.0.1"/>
        <param name="ext-sip-ip" value="127.0.0.1"/>
        <param name="ext-rtp-ip" value="127.0.0.1"/>
        <param name="auth-calls" value="false"/>
        <param name="apply-inbound-acl" value="loopback.auto"/>
        <param name="disable-register" value="true"/>
        <param name="manage-presence" value="false"/>
        <param name="inbound-codec-prefs" value="PCMU"/>
        <param name="outbound-codec-prefs" value="PCMU"/>
        <param name="inbound-codec-negotiation" value="generous"/>
        <param name="dtmf-type" value="rfc2833"/>
        <param name="rtp-timer-name" value="soft"/>
        <param name="user-agent-string" value="shopcall-test-freeswitch"/>
        <param name="sip-trace" value="no"/>
      </settings>
    </profile>
  </profiles>
</configuration>
""")
        self._write("autoload_configs/avmd.conf.xml", """<configuration name="avmd.conf">
  <settings>
    <param name="debug" value="0"/>
    <param name="report_status" value="1"/>
    <param name="fast_math" value="0"/>
    <param name="require_continuous_streak" value="1"/>
    <param name="sample_n_continuous_streak" value="3"/>
    <param name="sample_n_to_skip" value="0"/>
    <param name="require_continuous_streak_amp" value="1"/>
    <param name="sample_n_continuous_streak_amp" value="3"/>
    <param name="simplified_estimation" value="1"/>
    <param name="inbound_channel" value="0"/>
    <param name="outbound_channel" value="1"/>
    <param name="detection_mode" value="2"/>
    <param name="detectors_n" value="36"/>
    <param name="detectors_lagged_n" value="1"/>
  </settings>
</configuration>
""")
        self._write("autoload_configs/db.conf.xml", '<configuration name="db.conf"><settings/></configuration>\n')
        self._write("autoload_configs/hash.conf.xml", '<configuration name="hash.conf"><remotes/></configuration>\n')
        users = "".join(f"""
        <user id={quoteattr(name)}>
          <params>
            <param name="dial-string" value={quoteattr(
                "{presence_id=${dialed_user}@${dialed_domain}}" f"sofia/test/sip:{name}@127.0.0.1:{port}")}/>
          </params>
        </user>""" for name, port in self.agents.items())
        self._write("directory/test.xml", f"""<include>
  <domain name="{d}">
    <groups>
      <group name="default">
        <users>{users}
        </users>
      </group>
    </groups>
  </domain>
</include>
""")
        self._write_dialplans()


def _read_message(f) -> tuple[dict[str, str], bytes]:
    headers: dict[str, str] = {}
    while True:
        line = f.readline()
        if not line:
            raise FreeswitchError("event socket closed")
        line = line.rstrip(b"\n")
        if not line:
            if headers:
                break
            continue
        key, _, value = line.decode("utf-8", "replace").partition(":")
        headers[key.strip()] = value.strip()
    body = f.read(int(headers["Content-Length"])) if "Content-Length" in headers else b""
    return headers, body

