"""Test harness for a real PBX: Debian's Asterisk in a debootstrap root (asterisk.py), FreeSWITCH under
/opt/freeswitch (freeswitch.py), SIPp (sipp.py), and one end-to-end stack on either (stack.py).

See /work/shared/docs/real-pbx-harness.md, scripts/build-asterisk-root.sh and scripts/install-freeswitch.sh.
"""

from .asterisk import DEFAULT_ROOT, AsteriskPbx, PbxError, root_is_ready
from .sipp import CallResult, SippAgent, SippError, free_media_port, free_sip_port, place_call

__all__ = [
    "DEFAULT_ROOT",
    "AsteriskPbx",
    "CallResult",
    "PbxError",
    "SippAgent",
    "SippError",
    "free_media_port",
    "free_sip_port",
    "place_call",
    "require_asterisk_root",
    "root_is_ready",
]


def require_asterisk_root() -> None:
    """Skip a PBX test when no Asterisk root is built, but fail it when SHOPCALL_REQUIRE_PBX is set (CI):
    there, a missing PBX must never pass as a skip."""
    from .stack import require_pbx

    require_pbx("asterisk")
