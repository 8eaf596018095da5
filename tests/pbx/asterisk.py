"""Debian's Asterisk 22, run from the debootstrap root built by scripts/build-asterisk-root.sh, for tests.

Usage (pytest, session scope)::

    @pytest.fixture(scope="session")
    def pbx(tmp_path_factory):
        if not root_is_ready(DEFAULT_ROOT):
            pytest.skip(...)              # or fail when SHOPCALL_REQUIRE_PBX is set
        with AsteriskPbx(DEFAULT_ROOT, tmp_path_factory.mktemp("pbx"), sip_port=None, ami_port=None,
                         agents={"agent1": free_sip_port()}, binds=[sounds_dir]) as pbx:
            yield pbx                     # start() ... stop()

    pbx.write_dialplan(text)              # replaces extensions.conf (contexts only), then:
    pbx.reload_dialplan()                 # raises PbxError on config errors
    pbx.rx("core show channels")          # any CLI command

The instance keeps everything of its own inside the root, keyed by its SIP port: config in
``/etc/asterisk-shopcall-test-PORT`` (``asterisk -C``), run/spool/db in ``/var/tmp/shopcall-test-PORT``
(wiped at start, so a stale run never interferes; a stale Asterisk of a crashed run is killed). The root's
stock /etc/asterisk is only read (its samples are the base config). /proc, /dev, the work dir and `binds`
are mounted into the root at the same paths; Asterisk's logs go to ``WORK_DIR/asterisk-PORT/log/full``.
Instances on other SIP ports (other test sessions) can share the root. Needs root (chroot, mount).

Endpoints (pjsip.conf): ``sipp`` takes every call from 127.0.0.1 into `context`; each agent NAME is an
endpoint + AOR with the static contact ``sip:NAME@127.0.0.1:PORT`` (dial it as ``PJSIP/NAME``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType

DEFAULT_ROOT = Path(os.environ.get("SHOPCALL_ASTERISK_ROOT", "/var/cache/shopcall/asterisk-root"))
READY_MARKER = ".shopcall-asterisk-ready"
MODULE_DIR = "/usr/lib/x86_64-linux-gnu/asterisk/modules"

# Modules that are useless here and either slow start-up, open ports, or want network/DNS/hardware.
NOLOAD = [
    "chan_console.so", "chan_iax2.so", "chan_unistim.so", "chan_motif.so", "chan_websocket.so",
    "chan_audiosocket.so", "res_audiosocket.so", "app_audiosocket.so",
    "pbx_dundi.so", "pbx_lua.so", "pbx_ael.so", "pbx_realtime.so", "res_ael_share.so",
    "res_xmpp.so", "res_snmp.so", "res_statsd.so", "res_prometheus.so", "res_hep.so", "res_hep_pjsip.so",
    "res_hep_rtcp.so", "res_stun_monitor.so", "res_resolver_unbound.so", "res_smdi.so", "res_phoneprov.so",
    "res_pjsip_phoneprov_provider.so", "res_stir_shaken.so", "res_pjsip_stir_shaken.so",
    "res_calendar.so", "res_calendar_caldav.so", "res_calendar_ews.so", "res_calendar_exchange.so",
    "res_calendar_icalendar.so", "res_config_ldap.so", "res_config_odbc.so", "res_config_pgsql.so",
    "res_config_curl.so", "res_config_sqlite3.so", "res_odbc.so", "res_odbc_transaction.so", "func_odbc.so",
    "res_curl.so", "func_curl.so", "cdr_adaptive_odbc.so", "cdr_odbc.so", "cdr_pgsql.so", "cdr_radius.so",
    "cdr_tds.so", "cdr_sqlite3_custom.so", "cel_odbc.so", "cel_pgsql.so", "cel_radius.so", "cel_tds.so",
    "cel_sqlite3_custom.so", "app_voicemail_odbc.so", "app_jack.so", "app_festival.so", "app_minivm.so",
    "res_fax.so", "res_fax_spandsp.so", "res_aeap.so", "res_speech_aeap.so", "res_websocket_client.so",
    "res_pjsip_transport_websocket.so", "res_http_websocket.so", "res_http_media_cache.so", "res_http_post.so",
    "res_ari.so", "res_ari_applications.so", "res_ari_asterisk.so", "res_ari_bridges.so",
    "res_ari_channels.so", "res_ari_device_states.so", "res_ari_endpoints.so", "res_ari_events.so",
    "res_ari_model.so", "res_ari_playbacks.so", "res_ari_recordings.so", "res_ari_sounds.so",
    "res_geolocation.so", "res_pjsip_geolocation.so", "res_corosync.so", "res_rtp_multicast.so", "chan_rtp.so",
    "app_stasis.so", "res_stasis_broadcast.so", "app_stasis_broadcast.so", "cdr_csv.so", "cdr_custom.so",
    "cel_custom.so", "cdr_manager.so", "cel_manager.so", "res_adsi.so", "app_adsiprog.so", "app_getcpeid.so",
]  # fmt: skip


class PbxError(RuntimeError):
    pass


def root_is_ready(root: Path = DEFAULT_ROOT) -> bool:
    return (root / READY_MARKER).is_file()


def _mount_targets() -> list[str]:
    """Mount points in /proc/self/mounts order (octal escapes such as \\040 decoded)."""
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        raw = [line.split()[1] for line in f if line.strip()]
    return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), t) for t in raw]


def _mounts_under(root: str) -> list[str]:
    """Mounts at or below root, deepest (latest) first so they can be unmounted in that order."""
    return [t for t in reversed(_mount_targets()) if t == root or t.startswith(root + "/")]


def _pids_in_root(root: str) -> list[int]:
    """Processes whose root directory is this chroot (another live instance, or our own)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/root") == root:
                    pids.append(int(entry))
    return pids


def _port_free(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _set_pdeathsig() -> None:
    # Asterisk gets SIGTERM if the test process dies without stopping it (PR_SET_PDEATHSIG = 1).
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


class AsteriskPbx:
    """One Asterisk for a test session; see the module docstring.

    sip_port / ami_port: None picks the first free port from 5060 / 5038 on (safe with other sessions).
    binds: host directories shopcall writes to (sounds, recordings), visible to Asterisk at the same paths.
    agents: endpoint name -> SIP port of the SippAgent playing it. context: where the `sipp` endpoint's
    calls go. dialplan: extensions.conf contexts (see write_dialplan). sip_debug: `pjsip set logger on`.
    Attributes for tests: sip_port, ami_port, ami_user, ami_secret, agents, full_log, startup_seconds.
    """

    kind = "asterisk"

    def __init__(
        self,
        root: Path,
        work_dir: Path,
        *,
        sip_port: int | None = 5060,
        ami_port: int | None = 5038,
        binds: Iterable[Path] = (),
        agents: Mapping[str, int] | None = None,
        context: str = "test-in",
        agent_context: str = "test-agents",
        dialplan: str = "",
        ami_user: str = "shopcall",
        ami_secret: str = "shopcall-test-secret",
        rtp_ports: tuple[int, int] = (20000, 20999),
        sip_debug: bool = False,
        start_timeout: float = 30.0,
    ) -> None:
        self.root = Path(os.path.realpath(root))
        self.work_dir = Path(os.path.realpath(work_dir))
        # None: the first free port from 5060 / 5038 on, picked in start() under the root's lock.
        self.sip_port = sip_port or 0
        self.ami_port = ami_port or 0
        self.ami_user = ami_user
        self.ami_secret = ami_secret
        self.binds = [Path(os.path.realpath(b)) for b in binds]
        self.agents = dict(agents or {})
        self.context = context
        self.agent_context = agent_context
        self.rtp_ports = rtp_ports
        self.sip_debug = sip_debug
        self.start_timeout = start_timeout
        self.startup_seconds: float | None = None
        self._dialplan = dialplan
        self._proc: subprocess.Popen[bytes] | None = None
        self._atexit_registered = False
        self._claimed = False

    # Paths as seen inside the root (reach them from the host with self._host()), keyed by the SIP port.
    @property
    def name(self) -> str:
        return f"shopcall-test-{self.sip_port}"

    @property
    def etc_dir(self) -> str:
        return f"/etc/asterisk-{self.name}"

    @property
    def state_dir(self) -> str:
        return f"/var/tmp/{self.name}"

    @property
    def conf_file(self) -> str:
        return f"{self.etc_dir}/asterisk.conf"

    @property
    def log_dir(self) -> Path:
        return self.work_dir / f"asterisk-{self.sip_port}" / "log"

    @property
    def _stdout_path(self) -> Path:
        return self.log_dir.parent / "stdout.log"

    # ---- public API -------------------------------------------------------------------------------

    @property
    def full_log(self) -> Path:
        return self.log_dir / "full"

    def start(self) -> None:
        """Mount, configure and boot Asterisk; returns once `core waitfullybooted` succeeded.

        Call it from the main thread: Asterisk is bound to the starting thread's life (PR_SET_PDEATHSIG),
        so a killed test run does not leave it behind.
        """
        if not root_is_ready(self.root):
            raise PbxError(f"no Asterisk root at {self.root} (run scripts/build-asterisk-root.sh {self.root})")
        if os.geteuid() != 0:
            raise PbxError("AsteriskPbx needs root (chroot, mount)")
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        try:
            self._prepare_root()
            self._spawn()
        except BaseException:
            self.stop()
            raise

    def _prepare_root(self) -> None:
        with self._lock():
            self._pick_ports()
            self._kill_stale()
            self._release_mounts()  # leftovers of crashed runs
            shutil.rmtree(self._host(self.state_dir), ignore_errors=True)
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir.mkdir(parents=True)
            for sub in ("run", "spool", "db", "cache", "keys"):
                self._host(f"{self.state_dir}/{sub}").mkdir(parents=True)
            self._write_config()
            # Parents first, so a bind inside another one is not hidden by it.
            mounts = sorted({self.work_dir, *self.binds}, key=lambda p: len(p.parts))
            targets = [self._host("/proc"), self._host("/dev"), *(self._host(str(p)) for p in mounts)]
            claim = {
                "owner": os.getpid(), "state": self.state_dir, "targets": [str(t) for t in targets],
                "ports": [self.sip_port, self.ami_port],
            }  # fmt: skip
            self._claim_file.write_text(json.dumps(claim))
            self._claimed = True
            self._mount("proc", "/proc", fstype="proc")
            self._mount("/dev", "/dev")
            for path in mounts:
                self._mount(str(path), str(path))

    def _spawn(self) -> None:
        started = time.monotonic()
        with open(self._stdout_path, "wb") as out:
            self._proc = subprocess.Popen(
                ["chroot", str(self.root), "asterisk", "-f", "-n", "-C", self.conf_file],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_set_pdeathsig,
            )  # fmt: skip
        self._wait_booted(started)
        self.startup_seconds = time.monotonic() - started
        if self.sip_debug:
            self.rx("pjsip set logger on")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(PbxError, subprocess.TimeoutExpired):
                self.rx("core stop now", timeout=5)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._claimed:
            with self._lock():
                self._claim_file.unlink(missing_ok=True)
                self._release_mounts()
            self._claimed = False

    def __enter__(self) -> AsteriskPbx:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def rx(self, command: str, timeout: float = 15.0) -> str:
        """Run one CLI command in the running Asterisk; returns its output."""
        try:
            res = subprocess.run(
                ["chroot", str(self.root), "asterisk", "-C", self.conf_file, "-rx", command],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            raise PbxError(f"asterisk -rx {command!r} timed out after {timeout}s") from e
        out = res.stdout.decode("utf-8", "replace")
        if res.returncode != 0 or "Unable to connect to remote asterisk" in out:
            raise PbxError(f"asterisk -rx {command!r} failed ({res.returncode}): {out.strip()}")
        return out

    def write_dialplan(self, text: str) -> None:
        """Replace extensions.conf with these contexts (may #include absolute paths in bound dirs)."""
        self._dialplan = text
        if self._host(self.etc_dir).is_dir():
            self._write(
                "extensions.conf",
                "[general]\nstatic=yes\nwriteprotect=yes\nclearglobalvars=yes\n\n" + text + "\n",
            )

    def reload_dialplan(self) -> None:
        """`dialplan reload`, failing on config errors (they only show up in the log)."""
        before = self.full_log.stat().st_size if self.full_log.exists() else 0
        out = self.rx("dialplan reload")
        if "Dialplan reloaded" not in out:
            raise PbxError(f"dialplan reload failed: {out.strip()}")
        time.sleep(0.05)  # the logger thread writes asynchronously
        with open(self.full_log, "rb") as f:
            f.seek(before)
            new = f.read().decode("utf-8", "replace")
        problems = [
            line for line in new.splitlines()
            if ("ERROR[" in line or "WARNING[" in line) and ("pbx_config" in line or "config.c" in line)
        ]  # fmt: skip
        if problems:
            raise PbxError("dialplan reload reported problems:\n" + "\n".join(problems))

    def log_tail(self, n: int = 80) -> str:
        parts = []
        for path in (self._stdout_path, self.full_log):
            if path.exists():
                lines = path.read_bytes().decode("utf-8", "replace").splitlines()
                parts.append(f"--- {path} (last {n} lines)\n" + "\n".join(lines[-n:]))
        return "\n".join(parts) or "(no Asterisk log yet)"

    # ---- internals --------------------------------------------------------------------------------

    def _host(self, inner: str) -> Path:
        return self.root / inner.lstrip("/")

    # Several instances (other test sessions, other SIP ports) may share the root and its mounts. Each one
    # claims the mounts it needs in ROOT/var/tmp/NAME.claim (with its owner's pid); a mount is removed only
    # when no live claim needs it, and none at all while an Asterisk the claims do not explain runs there.

    @property
    def _claim_file(self) -> Path:
        return self._host(f"/var/tmp/{self.name}.claim")

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self._host("/var/tmp/shopcall-test.lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _other_claims(self) -> list[dict]:
        """Claims of the other instances whose owner process still runs."""
        claims = []
        for path in self.root.glob("var/tmp/shopcall-test-*.claim"):
            if path != self._claim_file:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    claim = json.loads(path.read_text())
                    if _alive(claim["owner"]):
                        claims.append(claim)
        return claims

    def _live_claims(self) -> tuple[set[str], set[int]]:
        """Mount targets and Asterisk pids of the other live instances."""
        targets: set[str] = set()
        pids: set[int] = set()
        for claim in self._other_claims():
            targets.update(claim["targets"])
            with contextlib.suppress(OSError, ValueError):
                pids.add(int(self._host(f"{claim['state']}/run/asterisk.pid").read_text()))
        return targets, pids

    def _pick_ports(self) -> None:
        taken = {p for claim in self._other_claims() for p in claim.get("ports", [])}
        for attr, first, kind in (("sip_port", 5060, socket.SOCK_DGRAM), ("ami_port", 5038, socket.SOCK_STREAM)):
            if not getattr(self, attr):
                free = (p for p in range(first, first + 20) if p not in taken and _port_free(p, kind))
                port = next(free, None)
                if port is None:
                    raise PbxError(f"no free port for {attr} in {first}-{first + 19}")
                setattr(self, attr, port)

    def _release_mounts(self) -> None:
        needed, known = self._live_claims()
        if set(_pids_in_root(str(self.root))) - known:
            return  # an Asterisk we know nothing about runs here: leave its mounts alone
        for target in _mounts_under(str(self.root)):
            if target in needed or any(n.startswith(target + "/") for n in needed):
                continue
            if subprocess.run(["umount", target], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", target], capture_output=True)
            # Drop the empty mount-point directories a bind of a temp dir left behind in the root's /tmp.
            path, tmp = Path(target), self.root / "tmp"
            while tmp in path.parents:
                try:
                    path.rmdir()
                except OSError:
                    break
                path = path.parent

    def _kill_stale(self) -> None:
        """An Asterisk with this same config (SIP port) left by a crashed run; a live one is an error."""
        with contextlib.suppress(OSError, ValueError, KeyError):
            owner = json.loads(self._claim_file.read_text())["owner"]
            if owner != os.getpid() and _alive(owner):
                raise PbxError(f"SIP port {self.sip_port} is used by the AsteriskPbx of live process {owner}")
        with contextlib.suppress(OSError, ValueError):
            pid = int(self._host(f"{self.state_dir}/run/asterisk.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if os.readlink(f"/proc/{pid}/root") == str(self.root) and self.conf_file.encode() in cmdline:
                os.kill(pid, signal.SIGKILL)
                for _ in range(100):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.05)

    def _mount(self, source: str, inner: str, fstype: str | None = None) -> None:
        target = self._host(inner)
        if str(target) in _mount_targets():
            return  # shared with another live instance in this root
        target.mkdir(parents=True, exist_ok=True)
        cmd = ["mount", "-t", fstype, source, str(target)] if fstype else ["mount", "--bind", source, str(target)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise PbxError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")

    def _wait_booted(self, started: float) -> None:
        deadline = started + self.start_timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise PbxError(f"Asterisk exited during start-up (rc={self._proc.returncode})\n{self.log_tail()}")
            if self._host(f"{self.state_dir}/run/asterisk.ctl").exists():
                with contextlib.suppress(PbxError):
                    self.rx("core waitfullybooted", timeout=max(0.5, deadline - time.monotonic()))
                    return
            if time.monotonic() > deadline:
                raise PbxError(f"Asterisk not fully booted after {self.start_timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    def _write(self, name: str, text: str) -> None:
        self._host(f"{self.etc_dir}/{name}").write_text(text, encoding="utf-8")

    def _write_config(self) -> None:
        etc = self._host(self.etc_dir)
        shutil.rmtree(etc, ignore_errors=True)
        etc.mkdir(parents=True)
        # The package's sample configs as a base, so modules like app_amd, app_queue, res_musiconhold and
        # features load as on a stock install; the files written below replace the ones that matter.
        for sample in self._host("/etc/asterisk").glob("*.conf"):
            if sample.name not in ("users.conf", "extensions.conf"):
                shutil.copyfile(sample, etc / sample.name)
        s = self.state_dir
        self._write("asterisk.conf", f"""\
[directories]
astetcdir => {self.etc_dir}
astmoddir => {MODULE_DIR}
astvarlibdir => /var/lib/asterisk
astdbdir => {s}/db
astkeydir => {s}
astdatadir => /usr/share/asterisk
astagidir => /usr/share/asterisk/agi-bin
astspooldir => {s}/spool
astrundir => {s}/run
astlogdir => {self.log_dir}
astcachedir => {s}/cache
astsbindir => /usr/sbin

[options]
verbose = 3
debug = 0
documentation_language = en_US
hideconnect = yes
""")
        self._write("modules.conf", "[modules]\nautoload=yes\n" + "".join(f"noload => {m}\n" for m in NOLOAD))
        self._write("logger.conf", """\
[general]
dateformat = %F %T.%3q
[logfiles]
full => notice,warning,error,verbose,dtmf
messages => notice,warning,error
""")
        self._write("manager.conf", f"""\
[general]
enabled = yes
port = {self.ami_port}
bindaddr = 127.0.0.1

[{self.ami_user}]
secret = {self.ami_secret}
deny = 0.0.0.0/0.0.0.0
permit = 127.0.0.1/255.255.255.255
read = all
write = all
""")
        self._write("rtp.conf", f"""\
[general]
rtpstart = {self.rtp_ports[0]}
rtpend = {self.rtp_ports[1]}
icesupport = no
""")
        self._write("http.conf", "[general]\nenabled = no\n")
        self._write("cdr.conf", "[general]\nenable = no\n")
        self._write("cel.conf", "[general]\nenable = no\n")
        self._write("pjsip.conf", self._pjsip_conf())
        self.write_dialplan(self._dialplan)

    def _pjsip_conf(self) -> str:
        # media_address + bind_rtp_to_media_address avoid a DNS lookup per SDP (no DNS here, see the doc).
        media = (
            "disallow = all\nallow = ulaw\ndtmf_mode = rfc4733\nmedia_address = 127.0.0.1\n"
            "bind_rtp_to_media_address = yes\ndirect_media = no\nrtp_symmetric = yes\n"
            "send_pai = yes\ntrust_id_inbound = yes\ntrust_id_outbound = yes\ntransport = transport-udp\n"
        )
        parts = [f"""\
[global]
type = global
user_agent = {self.name}
; username first: a SIPp call From an agent's name arrives as that agent's phone (feature codes);
; any other caller falls through to the IP match of the sipp endpoint
endpoint_identifier_order = username,ip

[transport-udp]
type = transport
protocol = udp
bind = 127.0.0.1:{self.sip_port}

; inbound calls placed by SIPp
[sipp]
type = endpoint
context = {self.context}
{media}
[sipp-identify]
type = identify
endpoint = sipp
match = 127.0.0.1
"""]
        for agent, port in self.agents.items():
            parts.append(f"""
[{agent}]
type = endpoint
context = {self.agent_context}
aors = {agent}
{media}
[{agent}]
type = aor
contact = sip:{agent}@127.0.0.1:{port}
max_contacts = 1
""")
        return "".join(parts)
