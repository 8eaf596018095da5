"""What a FastAGI request costs Asterisk itself: CPU per call of one Asterisk 22 for the same call routed four ways.

The e2e target (issue 6: our routing AGI ≥ 0.9 × plain dialplan where Asterisk saturates) is bounded by
what Asterisk spends on AGI before any of our code runs. This bench separates it, with Asterisk alone on
core 0 and everything else on the others, at a rate well below saturation so CPU per call is clean:

  plain     Answer, Playback(greeting), Playback(connecting), Dial(PJSIP/agent1,20), Hangup
  one       one FastAGI request first (a stub server: one SET VARIABLE, close), then the plain steps:
            the least any AGI routing can cost (the wazo-style "decision" request)
  replay    the whole call over FastAGI from a stub that sends shopcall's commands for this call
            (ANSWER, STREAM FILE ×2, EXEC Dial, GET FULL VARIABLE, EXEC MSet) with no logic and no database
  shopcall  the real thing: the rendered include, number 710, `shopcall serve`, PostgreSQL

The contexts run in turn, --rounds times; the median of each is printed with plain/ctx, the ratio a
CPU-bound Asterisk would give.

    .venv/bin/python bench/agi_overhead.py [--rate 40] [--seconds 15] [--rounds 3]   (root: the chroot)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import procstat  # noqa: E402
from bench.agi_stub import OUTCOME  # noqa: E402
from bench.e2e_ratio import run_calls  # noqa: E402
from bench.pbx_service import NUMBER, root_missing, shopcall_service  # noqa: E402
from tests.pbx import DEFAULT_ROOT, AsteriskPbx  # noqa: E402
from tests.pbx.sipp import SippAgent, free_sip_port  # noqa: E402

ASTERISK_CORE = {0}
CONTEXTS = ("plain", "one", "replay", "shopcall")


async def stub_agi(sounds: Path) -> asyncio.Server:
    """A FastAGI peer with no logic: `one` sets a variable, `replay` sends shopcall's commands for the call."""
    def replay(channel: str) -> list[bytes]:
        return [b"ANSWER\n", f'STREAM FILE "{sounds}/greeting" ""\n'.encode(),
                f'STREAM FILE "{sounds}/connecting" ""\n'.encode(),
                f'EXEC Dial "PJSIP/agent1,20,gU(shopcall-answered^{channel})"\n'.encode(), OUTCOME,
                b'EXEC MSet "SHOPCALL_DONE=1,SHOPCALL_OUTCOME=answered"\n']

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        script = channel = ""
        while (line := await r.readline()) not in (b"\n", b""):
            if line.startswith(b"agi_network_script: "):
                script = line.split(b": ", 1)[1].strip().decode()
            elif line.startswith(b"agi_channel: "):
                channel = line.split(b": ", 1)[1].strip().decode()
        for cmd in replay(channel) if script == "replay" else [b'SET VARIABLE SHOPCALL_GROUP "sales"\n']:
            w.write(cmd)
            if not await r.readline():
                break
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def measure(pbx: AsteriskPbx, work: Path, rate: int, seconds: float, rounds: int) -> dict[str, list[float]]:
    agent = SippAgent("agent1", pbx.agents["agent1"], work_dir=work, answer_after=0.2, hangup_after=0.5)
    await agent.start()
    sip = f"127.0.0.1:{pbx.sip_port}"
    n = int(rate * seconds)
    per_call: dict[str, list[float]] = {c: [] for c in CONTEXTS}
    try:
        for rnd in range(rounds):
            for ctx in CONTEXTS:
                run = await run_calls(sip, NUMBER if ctx == "shopcall" else ctx, work, n, rate, f"{ctx}-{rnd}")
                ms = 1000 * run.cpu["asterisk"] / max(run.ok, 1)
                per_call[ctx].append(ms)
                print(f"round {rnd + 1} {ctx:8s} {run.ok:5d} ok {run.failed:3d} failed  Asterisk {ms:5.1f} ms/call  "
                      f"({run.cpu_per_call()})", flush=True)
                await asyncio.sleep(3)
    finally:
        await agent.stop()
    return per_call


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if why := root_missing():
        print(why)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("needs 2 cores: Asterisk gets one of its own")
        return 2
    procstat.run_off(ASTERISK_CORE)  # inherited by all we start

    async def run(svc) -> dict[str, list[float]]:
        sounds = svc.data / "sounds" / "ru"
        stub = await stub_agi(sounds)
        port = stub.sockets[0].getsockname()[1]
        plain = (f" same => n,Answer()\n same => n,Playback({sounds}/greeting)\n"
                 f" same => n,Playback({sounds}/connecting)\n same => n,Dial(PJSIP/agent1,20)\n same => n,Hangup()\n")
        dialplan = f"""
[test-in]
exten => {NUMBER},1,Goto(shopcall-inbound,${{EXTEN}},1)
exten => plain,1,NoOp()
{plain}exten => one,1,AGI(agi://127.0.0.1:{port}/one)
{plain}exten => replay,1,AGI(agi://127.0.0.1:{port}/replay)
 same => n,Hangup()

#include "{svc.include}"
"""
        pbx = AsteriskPbx(DEFAULT_ROOT, svc.work, sip_port=None, ami_port=None, binds=[svc.data],
                          agents={"agent1": free_sip_port()}, dialplan=dialplan, rtp_ports=(24000, 29999))
        pbx.start()
        try:
            print(f"Asterisk 22 alone on core 0 ({procstat.pin('asterisk', ASTERISK_CORE)} threads); "
                  f"{args.rate} calls/s for {args.seconds:.0f} s per context, {args.rounds} rounds")
            return await measure(pbx, svc.work, args.rate, args.seconds, args.rounds)
        finally:
            pbx.stop()
            stub.close()

    with shopcall_service("shopcall-agi-overhead-", sections="[inbound]\nring_timeout = 20") as svc:
        per_call = asyncio.run(run(svc))
    base = statistics.median(per_call["plain"])
    for ctx in CONTEXTS:
        med = statistics.median(per_call[ctx])
        print(f"{ctx:8s} Asterisk {med:5.1f} ms/call (median of {len(per_call[ctx])}), +{med - base:4.1f} ms, "
              f"plain/{ctx} {base / med:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
