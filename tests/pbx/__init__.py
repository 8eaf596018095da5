"""Test harness for a real PBX: Debian's Asterisk in a debootstrap root (asterisk.py) and SIPp (sipp.py).

See /work/shared/docs/real-pbx-harness.md and scripts/build-asterisk-root.sh.
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
    "root_is_ready",
]
