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
    "require_asterisk_root",
    "root_is_ready",
]


def require_asterisk_root() -> None:
    """Skip a PBX test when no Asterisk root is built, but fail it when SHOPCALL_REQUIRE_PBX is set (CI):
    there, a missing PBX must never pass as a skip."""
    import os

    import pytest

    if root_is_ready(DEFAULT_ROOT):
        return
    msg = f"no Asterisk root at {DEFAULT_ROOT}: run scripts/build-asterisk-root.sh {DEFAULT_ROOT}"
    if os.environ.get("SHOPCALL_REQUIRE_PBX"):
        pytest.fail(msg + " (SHOPCALL_REQUIRE_PBX is set)")
    pytest.skip(msg)
