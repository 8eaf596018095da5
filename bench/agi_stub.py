"""A FastAGI server with no logic and no database, in a process of its own: for each connection it reads the
agi_* block and sends the commands `shopcall serve` sends on number 710's normal path (Playback ×2, Dial,
GET FULL VARIABLE, MSet), one at a time, each after Asterisk's reply to the one before.

bench/e2e_ratio.py --stub routes a third side through it: what any FastAGI server costs a machine whose
cores Asterisk shares, before routing, hours, groups or the call row are looked at. It runs on uvloop, as
`shopcall serve` does, and prints its port once it listens.

    .venv/bin/python bench/agi_stub.py SOUNDS_DIR
"""

from __future__ import annotations

import asyncio
import sys

# as agi/call.py sends them (the Dial's U() is the include's answered routine, for the talk time)
OUTCOME = b'GET FULL VARIABLE "${DIALSTATUS}|${DIALEDPEERNAME}|${ANSWEREDTIME}|${SHARED(SHOPCALL_ANSWERED_AT)}|' \
          b'${STRFTIME(,,%s.%3q)}"\n'


def commands(sounds: str, channel: str) -> list[bytes]:
    return [f'EXEC Playback "{sounds}/greeting"\n'.encode(), f'EXEC Playback "{sounds}/connecting"\n'.encode(),
            f'EXEC Dial "PJSIP/agent1,6,gU(shopcall-answered^{channel})"\n'.encode(), OUTCOME,
            b'EXEC MSet "SHOPCALL_DONE=1,SHOPCALL_OUTCOME=answered"\n']


async def main(sounds: str) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            channel = ""
            while (line := await r.readline()) not in (b"\n", b""):
                if line.startswith(b"agi_channel: "):
                    channel = line.split(b": ", 1)[1].strip().decode()
            for cmd in commands(sounds, channel):
                w.write(cmd)
                if not await r.readline():
                    break
        except ConnectionError:
            pass
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # the bench still runs, on asyncio's own loop
        uvloop = None
    (uvloop.run if uvloop else asyncio.run)(main(sys.argv[1]))
