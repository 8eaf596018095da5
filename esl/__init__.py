"""FreeSWITCH Event Socket adapter: our own thin asyncio layer (see ../shared/docs/library-findings.md).

- `protocol`: framing in bytes, %-decoding, JSON events, building commands that cannot be subverted;
- `connection`: one socket, replies in order, events and disconnect notices to callbacks, timeouts;
- `session` + `server`: the outbound socket (`socket host:port async full` connects to us), one task per
  call, routed by the channel variable `shopcall_flow`;
- `call`: `EslCall`, the Call vocabulary over it; `routes`: flows as routes;
- `modules`: which optional FreeSWITCH modules (mod_say_*, mod_avmd) are loaded, asked once in a while;
- `client`: the inbound client (port 8021) for originating calls.
"""
