"""Prompt latency through the real Asterisk: from the answer (200 OK to the caller) to the first RTP packet
of the greeting reaching the caller, with the TTS cache warm and cold, against plain dialplan.

One Asterisk 22 (the test harness's chroot), one real `shopcall serve --only agi` (embedded PostgreSQL) and
SIPp on the same machine. Calls are placed one at a time (this measures latency, not load), the three
conditions in turn within each round (order rotated per round, the first --warmup rounds not counted):

  plain  `Answer()`, `Playback(<copy of the greeting's files>)`: what Asterisk alone costs
  warm   number 710 through the rendered include: AGI(inbound) → route and caller queries → ANSWER →
         the greeting's built file is there → STREAM FILE (the prompts were synthesised at start-up)
  cold   the same, but just before the call the greeting's built files (sounds/ru/greeting.{wav,ulaw})
         and its TTS cache entry (sounds/cache/<sha256>.{wav,ulaw}) are deleted, so espeak-ng and sox run
         in the call path between ANSWER and STREAM FILE (checked: the files are back after each call)

Why delete rather than start a shopcall on an empty cache: the cache is `<paths.sounds_dir>/cache`
(shopcall/app.py; sounds_dir defaults to `<data_dir>/sounds`), and `shopcall serve` runs
Prompts.build_all() before it listens, so a fresh service on an empty directory has synthesised every
prompt before its first call. Deleting one prompt's files reproduces what a call meets when the text was
never synthesised (a prompt edited in prompts.toml without a rebuild, free text spoken with `say`).

Method: SIPp (tests/sipp/uac_prompt_latency.xml) calls like a phone: SDP with its own media port, RTP
(µ-law silence) from right after the ACK (a caller that sends nothing makes Asterisk's answer wait up
to 500 ms for a first voice frame, in both dialplans: --silent-caller shows it), hangs up after --hold s.
SIPp owns its sockets, so the timing is read from copies of the packets on `lo`
(tests/pbx/lo_capture.py: AF_PACKET + BPF filter on the caller's SIP and media ports, kernel
timestamps, one clock for SIP and RTP): INVITE sent, 200 OK to the INVITE received, first RTP packet
(payload type 0) from Asterisk to the caller's media port after it. The first packet's payload is
compared with the first 20 ms of the prompt's .ulaw file, to show it is the prompt and not something
else Asterisk sent. Also printed: INVITE → 200 OK (for shopcall that is the AGI connection, the route and
caller queries and ANSWER; plain answers at once) and INVITE → first RTP, the caller's whole wait.

    .venv/bin/python bench/prompt_latency.py [--calls 20] [--warmup 2] [--hold 1.5]   (root: chroot, lo capture)
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


from bench.pbx_service import NUMBER, root_missing, shopcall_service  # noqa: E402
from shopcall.app import PROMPTS_FILE  # noqa: E402
from shopcall.prompts import Prompts  # noqa: E402
from shopcall.tts import Tts, with_ext  # noqa: E402
from tests.pbx import DEFAULT_ROOT, AsteriskPbx  # noqa: E402
from tests.pbx.lo_capture import LoopbackCapture, Packet  # noqa: E402
from tests.pbx.rtp_pcap import RtpStream  # noqa: E402
from tests.pbx.sipp import SCENARIO_DIR, SIPP, free_media_port, free_sip_port  # noqa: E402

SHOP = "Bench"
CONDITIONS = ("plain", "warm", "cold")
TITLES = {
    "plain": "plain dialplan (Answer + Playback)",
    "warm": "shopcall, TTS cached",
    "cold": "shopcall, TTS not cached",
}
EXTS = ("wav", "ulaw")


@dataclass
class Sample:
    invite_to_answer: float  # seconds
    answer_to_rtp: float
    invite_to_rtp: float
    first_payload: bytes


def first_invite_times(packets: list[Packet], sip_port: int, media_port: int) -> tuple[float, float, Packet] | None:
    """(INVITE sent, 200 OK to it received, first RTP from Asterisk after that) on the caller's ports."""
    invite = next((p for p in packets if p.sport == sip_port and p.payload.startswith(b"INVITE ")), None)
    ok = next((p for p in packets if p.dport == sip_port and p.payload.startswith(b"SIP/2.0 200")
               and _cseq_method(p.payload) == b"INVITE"), None)
    if invite is None or ok is None:
        return None
    rtp = next((p for p in packets if p.dport == media_port and p.ts >= ok.ts and len(p.payload) > 12
                and p.payload[0] >> 6 == 2 and p.payload[1] & 0x7F == 0), None)
    if rtp is None:
        return None
    return invite.ts, ok.ts, rtp


def _cseq_method(sip: bytes) -> bytes:
    for line in sip.split(b"\r\n"):
        if line.lower().startswith(b"cseq:"):
            return line.split()[-1].upper()
    return b""


def rtp_payload(packet: bytes) -> bytes:
    cc = packet[0] & 0x0F
    start = 12 + 4 * cc
    if packet[0] & 0x10:  # header extension
        start += 4 + 4 * int.from_bytes(packet[start + 2:start + 4], "big")
    return packet[start:]


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


class Bench:
    def __init__(self, work: Path, pbx: AsteriskPbx, greeting: Path, cache_entry: Path, baseline: Path,
                 hold: float, silent: bool) -> None:
        self.work, self.pbx = work, pbx
        self.greeting, self.cache_entry, self.baseline = greeting, cache_entry, baseline
        self.pristine = work / "pristine"
        self.pristine.mkdir()
        for ext in EXTS:  # kept aside so a warm call never finds the files missing after a failed cold one
            shutil.copy2(with_ext(greeting, ext), self.pristine / f"greeting.{ext}")
            shutil.copy2(with_ext(cache_entry, ext), self.pristine / f"cache.{ext}")
        self.sip_port, self.media_port = free_sip_port(), free_media_port()
        self.hold = hold
        template = (SCENARIO_DIR / "uac_prompt_latency.xml").read_text(encoding="utf-8")
        pcap = RtpStream().speech(work / "silence.pcap", b"\xff" * int(8000 * hold))
        if silent:
            template = "\n".join(line for line in template.splitlines() if "play_pcap_audio" not in line)
        self.scenario = work / "caller.xml"
        self.scenario.write_text(template.replace("{{PCAP}}", str(pcap))
                                 .replace("{{HOLD_MS}}", str(round(hold * 1000))), encoding="utf-8")
        self.samples: dict[str, list[Sample]] = {c: [] for c in CONDITIONS}
        self.failed: dict[str, int] = dict.fromkeys(CONDITIONS, 0)
        self.matched: dict[str, int] = dict.fromkeys(CONDITIONS, 0)
        self.synthesised_in_call = 0
        self.restored = 0
        self.seq = 0
        self.verbose = False

    def _restore_if_missing(self) -> None:
        if all(with_ext(self.greeting, ext).is_file() for ext in EXTS):
            return
        self.restored += 1
        for ext in EXTS:
            shutil.copy2(self.pristine / f"greeting.{ext}", with_ext(self.greeting, ext))
            shutil.copy2(self.pristine / f"cache.{ext}", with_ext(self.cache_entry, ext))

    def call(self, cap: LoopbackCapture, condition: str, count: bool) -> None:
        deleted_at = 0.0
        if condition == "cold":
            for ext in EXTS:
                with_ext(self.greeting, ext).unlink(missing_ok=True)
                with_ext(self.cache_entry, ext).unlink(missing_ok=True)
            deleted_at = time.time()
        else:
            self._restore_if_missing()
        exten = f"plain{NUMBER}" if condition == "plain" else NUMBER
        self.seq += 1
        base = self.work / f"call-{self.seq}-{condition}"
        mark = cap.mark()
        with open(f"{base}_stderr.log", "wb") as err:
            try:
                rc = subprocess.run(
                    [SIPP, f"127.0.0.1:{self.pbx.sip_port}", "-sf", str(self.scenario), "-s", exten,
                     "-i", "127.0.0.1", "-p", str(self.sip_port), "-mp", str(self.media_port), "-m", "1",
                     "-nostdin", "-aa", "-trace_err", "-error_file", f"{base}_errors.log"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, timeout=self.hold + 40,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = -1
        time.sleep(0.05)  # the last packets reach the capture thread
        times = first_invite_times(cap.since(mark), self.sip_port, self.media_port)
        prompt = self.baseline if condition == "plain" else self.greeting
        synthesised = condition == "cold" and with_ext(self.greeting, "ulaw").is_file() and \
            with_ext(self.greeting, "ulaw").stat().st_mtime >= deleted_at
        if not count:
            return
        if condition == "cold" and synthesised:
            self.synthesised_in_call += 1
        if times is None or rc != 0:
            self.failed[condition] += 1
            print(f"  {condition}: call {self.seq} failed (sipp rc {rc}, "
                  f"{'no answer or no RTP within --hold' if times is None else 'timing captured'}); see {base}_*",
                  flush=True)
            if times is None:
                return
        invite, ok, rtp = times
        first = rtp_payload(rtp.payload)
        ulaw = with_ext(prompt, "ulaw")
        if ulaw.is_file() and ulaw.read_bytes()[:len(first)] == first:
            self.matched[condition] += 1
        self.samples[condition].append(Sample(ok - invite, rtp.ts - ok, rtp.ts - invite, first))
        if self.verbose:
            print(f"  call {self.seq:3d} {condition:5s}: INVITE → 200 OK {(ok - invite) * 1000:7.1f} ms, "
                  f"200 OK → first RTP {(rtp.ts - ok) * 1000:7.1f} ms", flush=True)

    def report(self) -> None:
        ms = 1000.0
        print()
        print("| condition | calls | answer → first RTP p50 | p95 | max | INVITE → 200 OK p50 | INVITE → first RTP p50 | p95 |")
        print("|---|---|---|---|---|---|---|---|")
        for c in CONDITIONS:
            s = self.samples[c]
            if not s:
                print(f"| {TITLES[c]} | 0 | | | | | | |")
                continue
            a = [x.answer_to_rtp * ms for x in s]
            i = [x.invite_to_answer * ms for x in s]
            w = [x.invite_to_rtp * ms for x in s]
            print(f"| {TITLES[c]} | {len(s)} | {pct(a, .5):.1f} ms | {pct(a, .95):.1f} ms | {max(a):.1f} ms | "
                  f"{pct(i, .5):.1f} ms | {pct(w, .5):.1f} ms | {pct(w, .95):.1f} ms |")
        print()

        def p(c: str, q: float, field: str = "answer_to_rtp") -> float:
            return pct([getattr(x, field) * ms for x in self.samples[c]], q)

        if all(self.samples[c] for c in CONDITIONS):
            for q, name in ((.5, "p50"), (.95, "p95")):
                print(f"ratio uncached / cached, answer → first RTP, {name}: {p('cold', q) / max(p('warm', q), 1e-9):.2f}×"
                      f"   (shopcall cached / plain: {p('warm', q) / max(p('plain', q), 1e-9):.2f}×)")
            for c in ("warm", "cold"):
                print(f"added over plain dialplan, {TITLES[c].removeprefix('shopcall, ')}, p50: answer → first RTP {p(c, .5) - p('plain', .5):+.1f} ms, "
                      f"INVITE → first RTP {p(c, .5, 'invite_to_rtp') - p('plain', .5, 'invite_to_rtp'):+.1f} ms")
        for c in CONDITIONS:
            print(f"{TITLES[c]}: {len(self.samples[c])} measured, {self.failed[c]} failed, first RTP payload = "
                  f"the prompt's first 20 ms in {self.matched[c]} of {len(self.samples[c])}")
        print(f"cold calls whose greeting was synthesised during the call: {self.synthesised_in_call}; "
              f"warm/plain calls that found the files missing (restored): {self.restored}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=20, help="measured calls per condition")
    ap.add_argument("--warmup", type=int, default=2, help="uncounted rounds first")
    ap.add_argument("--hold", type=float, default=1.5, help="seconds the caller stays after the answer "
                    "(must exceed the latency, and stay below the greeting's 3.4 s)")
    ap.add_argument("--gap", type=float, default=0.2, help="seconds between calls")
    ap.add_argument("--silent-caller", action="store_true", help="the caller sends no RTP (shows Asterisk's "
                    "500 ms wait for the caller's media on answer)")
    ap.add_argument("--verbose", action="store_true", help="print every call's figures")
    args = ap.parse_args()
    if why := root_missing():
        print(why)
        return 2
    with shopcall_service("shopcall-prompt-latency-", shop=SHOP) as svc:
        work = svc.work
        sounds = svc.data / "sounds"
        greeting = sounds / "ru" / "greeting"
        tts = Tts(sounds / "cache")  # the service's defaults: voices, speed 150, espeak-ng
        text = Prompts(tts, PROMPTS_FILE, sounds, None, {"shop_name": SHOP}).text("greeting", "ru")
        cache_entry = tts.cache_base(text, "ru")
        for f in (with_ext(greeting, e) for e in EXTS):
            assert f.is_file(), f"{f} not built at start-up"
        for f in (with_ext(cache_entry, e) for e in EXTS):
            assert f.is_file(), f"{f}: the greeting's cache entry is not where Tts.cache_base says"
        baseline = svc.data / "baseline" / "greeting"
        baseline.parent.mkdir()
        for ext in EXTS:
            shutil.copy2(with_ext(greeting, ext), with_ext(baseline, ext))
        dialplan = f"""
[test-in]
exten => {NUMBER},1,Goto(shopcall-inbound,${{EXTEN}},1)
; the same greeting (a copy of the built files) in plain dialplan
exten => plain{NUMBER},1,Answer()
 same => n,Playback({baseline})
 same => n,Hangup()

#include "{svc.include}"
"""
        pbx = AsteriskPbx(DEFAULT_ROOT, work, sip_port=None, ami_port=None, binds=[svc.data], dialplan=dialplan,
                          rtp_ports=(24000, 29999))
        pbx.start()
        try:
            bench = Bench(work, pbx, greeting, cache_entry, baseline, args.hold, args.silent_caller)
            bench.verbose = args.verbose
            print(f"cores: {os.cpu_count()}; Asterisk 22, shopcall serve, PostgreSQL and SIPp on the same machine; "
                  f"{args.calls} calls per condition, one at a time, caller "
                  f"{'silent' if args.silent_caller else 'sending RTP'}; work dir {work}", flush=True)
            t0 = time.monotonic()
            with LoopbackCapture([bench.sip_port, bench.media_port]) as cap:
                for r in range(args.warmup + args.calls):
                    order = CONDITIONS[r % 3:] + CONDITIONS[:r % 3]
                    for condition in order:
                        bench.call(cap, condition, count=r >= args.warmup)
                        time.sleep(args.gap)
                    if r >= args.warmup and (r - args.warmup + 1) % 5 == 0:
                        print(f"  {r - args.warmup + 1} rounds done ({time.monotonic() - t0:.0f} s)", flush=True)
            bench.report()
            print(f"wall time of the calls: {time.monotonic() - t0:.0f} s")
        finally:
            pbx.stop()
    return 0 if all(bench.samples[c] for c in CONDITIONS) else 1


if __name__ == "__main__":
    sys.exit(main())
