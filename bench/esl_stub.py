"""An outbound-socket server with no logic and no database, in a process of its own: for each connection
FreeSWITCH's `socket ... async full` makes it sends what `shopcall serve --only esl` sends on number 711's
normal path (bench/pbx_service.py: greeting, menu with nothing pressed, "connecting", ring sales' agent1):
`connect`, `myevents` less the events it never reads (`nixevent`), `linger`, then each application as a `sendmsg execute` with event-lock, one at a time,
each once the CHANNEL_EXECUTE_COMPLETE of the one before has arrived, and closes the socket (the rendered
extension hangs up on SHOPCALL_DONE=1).

bench/e2e_ratio.py --pbx freeswitch --stub routes a third side through it: what any outbound-socket server
costs a machine whose cores FreeSWITCH shares, before routing, hours, menus, groups or the call row are
looked at. It runs on uvloop, as `shopcall serve` does, and prints its port once it listens.

    .venv/bin/python bench/esl_stub.py SOUNDS_DIR [MENU_TIMEOUT_MS] [RING_SECONDS]
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

# as esl/call.py sends them: the playback terminators, prompt files, play_and_get_digits' arguments
# (collect), the bridge's channel variables in one multiset and its leg (ring, _bridge_vars, _leg), and the
# flow's outcome in one multiset; the constants are esl's own, so the stub follows them
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from esl.call import ALL_KEYS, RINGBACK, SILENCE  # noqa: E402
from esl.session import LINGER_SECONDS, UNUSED_EVENTS  # noqa: E402


def applications(sounds: str, menu_ms: int, ring: int) -> list[tuple[str, str]]:
    return [
        ("answer", ""),
        ("set", f"playback_terminators={ALL_KEYS}"),  # the greeting listens for the menu's key
        ("playback", f"{sounds}/greeting.wav"),
        ("play_and_get_digits", f"1 1 1 {menu_ms} # {sounds}/main_menu.wav {SILENCE} shopcall_digits ^[0-9*]+$ "
                                f"{menu_ms}"),
        ("set", "playback_terminators=none"),
        ("playback", f"{sounds}/connecting.wav"),
        ("multiset", f"^^|continue_on_fail=true|hangup_after_bridge=false|ringback={RINGBACK}|call_timeout={ring}"),
        ("bridge", f"{{ignore_early_media=true}}[origination_uuid={uuid.uuid4()},shopcall_agent=agent1]user/agent1"),
        ("multiset", "^^|SHOPCALL_DONE=1|SHOPCALL_OUTCOME=answered"),
    ]


async def read_message(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One framed message: its header block and its body (Content-Length bytes)."""
    head = await r.readuntil(b"\n\n")
    while head == b"\n":  # a stray blank line between messages
        head = await r.readuntil(b"\n\n")
    body = b""
    for line in head.split(b"\n"):
        if line.startswith(b"Content-Length:"):
            body = await r.readexactly(int(line.split(b":", 1)[1]))
    return head, body


async def reply(w: asyncio.StreamWriter, r: asyncio.StreamReader, data: bytes) -> bool:
    """Send a command, skip events up to its command/reply; False once the channel is gone."""
    w.write(data)
    while True:
        head, body = await read_message(r)
        if b"Content-Type: command/reply" in head:
            return True
        if b"text/disconnect-notice" in head:
            return False


async def main(sounds: str, menu_ms: int, ring: int) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            for line in (b"connect", b"myevents", UNUSED_EVENTS.encode(), f"linger {LINGER_SECONDS}".encode()):
                line += b"\n\n"
                if not await reply(w, r, line):
                    return
            for app, arg in applications(sounds, menu_ms, ring):
                tag = str(uuid.uuid4())
                msg = f"sendmsg\ncall-command: execute\nexecute-app-name: {app}\n" + \
                      (f"execute-app-arg: {arg}\n" if arg else "") + f"event-lock: true\nEvent-UUID: {tag}\n\n"
                if not await reply(w, r, msg.encode()):
                    return
                done = f"Application-UUID: {tag}\n".encode()
                while True:  # the events of this channel, up to this application's completion
                    head, body = await read_message(r)
                    if b"text/disconnect-notice" in head:
                        return
                    if b"Event-Name: CHANNEL_EXECUTE_COMPLETE\n" in body and done in body:
                        break
                    if b"Event-Name: CHANNEL_HANGUP_COMPLETE\n" in body:
                        return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096, limit=1 << 20)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # the bench still runs, on asyncio's own loop
        uvloop = None
    args = sys.argv[1:]
    (uvloop.run if uvloop else asyncio.run)(main(args[0], int(args[1]) if args[1:] else 1000,
                                                 int(args[2]) if args[2:] else 6))
