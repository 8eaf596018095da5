"""A sandboxed Asterisk 22 to try shopcall without a PBX of your own (./install.sh --demo-pbx).

    scripts/demo-pbx.sh run           # Asterisk in the foreground on 127.0.0.1:5060, Ctrl-C stops it
    scripts/demo-pbx.sh call 100 2    # in another terminal: a SIPp caller dials 100 and presses 2;
                                      # a SIPp phone plays operator "demo" and answers; prints the call row

It uses the same harness as the tests (tests/pbx): Debian's Asterisk in a debootstrap root, its own config
directory inside the root, the rendered shopcall include, one PJSIP endpoint "demo" for the operator.
`shopcall serve` must be running (systemd unit, or by hand).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shopcall.config import load_config  # noqa: E402
from tests.pbx import AsteriskPbx  # noqa: E402
from tests.pbx.sipp import SippAgent, place_call  # noqa: E402

ROOT = Path(os.environ.get("SHOPCALL_ASTERISK_ROOT", "/var/cache/shopcall/asterisk-root"))
DEMO_AGENT_PORT = 5071


def run() -> int:
    config = load_config()
    work = config.paths.data_dir / "demo-pbx"
    work.mkdir(parents=True, exist_ok=True)
    include = work / "shopcall.conf"
    subprocess.run([sys.executable, "-m", "shopcall", "render-dialplan", "--pbx", "asterisk", "-o",
                    str(include)], check=True, cwd=REPO)
    dialplan = f'[demo-in]\nexten => _X.,1,Goto(shopcall-inbound,${{EXTEN}},1)\n\n#include "{include}"\n'
    pbx = AsteriskPbx(ROOT, work, sip_port=5060, ami_port=5038, binds=[config.sounds_dir],
                      agents={"demo": DEMO_AGENT_PORT}, context="demo-in", dialplan=dialplan)
    with pbx:
        print(f"demo Asterisk is up on 127.0.0.1:5060 (log: {pbx.full_log}); Ctrl-C stops it")
        print("place a call:  scripts/demo-pbx.sh call 100 2")
        try:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        except KeyboardInterrupt:
            pass
    return 0


async def call(number: str, digits: str, work: Path) -> bool:
    async with SippAgent("demo", DEMO_AGENT_PORT, work_dir=work, answer_after=1.0, hangup_after=3.0) as agent:
        result = await place_call(number, digits=digits, display_name="Demo caller", pbx="127.0.0.1:5060",
                                  work_dir=work)
        print(f"answered={result.answered} hung_up_by={result.hung_up_by} talk={result.talk_time}")
        print(f"operator phone: rang {agent.invites_received()} time(s), answered {agent.answered()}")
    return result.answered


def last_call_row() -> None:
    import psycopg

    out = subprocess.run(
        [sys.executable, "-m", "shopcall", "db", "url"], capture_output=True, text=True, cwd=REPO, check=True)
    with psycopg.connect(out.stdout.strip()) as conn:
        row = conn.execute("SELECT uniqueid, caller_number, dialled_number, menu_choice, outcome, missed, "
                           "answered_endpoint FROM calls ORDER BY id DESC LIMIT 1").fetchone()
    print(f"last call row: {row}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run")
    c = sub.add_parser("call")
    c.add_argument("number", nargs="?", default="100")
    c.add_argument("digits", nargs="?", default="")
    args = p.parse_args()
    if args.cmd == "run":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        return run()
    work = Path("/tmp/shopcall-demo-calls")
    work.mkdir(exist_ok=True)
    answered = asyncio.run(call(args.number, args.digits, work))
    time.sleep(1)  # the flow writes the row just after the PBX hangs up on the caller
    last_call_row()
    return 0 if answered else 1


if __name__ == "__main__":
    sys.exit(main())
