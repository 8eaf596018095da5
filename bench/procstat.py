"""CPU seconds used by the processes of a bench, read from /proc: on a shared 2-core machine a figure per
call or per request in CPU time is steadier than one in wall time.

By default every process of a kind on the machine counts (and `pin` moves them all). After
`only_under(pid, ...)` only the processes under those (the bench's own, and the embedded PostgreSQL's
server) count and are pinned: other sessions' PBXes, SIPp, PostgreSQL and `shopcall serve` on the same
machine neither inflate the figures nor get moved onto the PBX's core."""

from __future__ import annotations

import os
from pathlib import Path

KINDS = ("asterisk", "freeswitch", "shopcall", "postgres", "sipp", "stub")
STUBS = ("agi_stub.py", "esl_stub.py")
_roots: set[int] = set()  # only_under


def cpu_seconds(pid: int | str) -> float:
    """User + system time of one process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kind(cmdline: str) -> str | None:
    program = cmdline.split(" ", 1)[0]
    if program.endswith("/freeswitch") or program == "freeswitch":  # its arguments name its work dir
        return "freeswitch"
    if "postgres" in cmdline:
        return "postgres"
    if "sipp" in cmdline:
        return "sipp"
    if any(stub in cmdline for stub in STUBS):
        return "stub"
    if "shopcall" in cmdline and "serve" in cmdline:
        return "shopcall"
    if program.endswith("asterisk"):
        return "asterisk"
    return None


def only_under(*pids: int | None) -> None:
    """From now on count (and pin) only these processes and their descendants."""
    _roots.clear()
    _roots.update(p for p in pids if p)


def _parent(pid: str) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _scoped(pids: list[str]) -> list[str]:
    """The pids under _roots (all of them when no roots were set)."""
    if not _roots:
        return pids
    parent: dict[int, int] = {}
    for pid in pids:
        try:
            parent[int(pid)] = _parent(pid)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    keep = []
    for pid in pids:
        p, seen = int(pid), 0
        while p > 1 and p not in _roots and seen < 64:
            p, seen = parent.get(p, 0), seen + 1
        if p in _roots:
            keep.append(pid)
    return keep


def snapshot() -> dict[str, float]:
    """CPU seconds by pid for the processes of the KINDS, keyed 'kind:pid'."""
    out: dict[str, float] = {}
    for pid in _scoped([p for p in os.listdir("/proc") if p.isdigit()]):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            k = kind(cmd)
            if k:
                out[f"{k}:{pid}"] = cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            continue  # the process went away between listdir and read
    return out


def used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each kind used between two snapshots (processes that ended in between are not counted)."""
    total = dict.fromkeys(KINDS, 0.0)
    for key, t in after.items():
        total[key.split(":", 1)[0]] += t - before.get(key, 0.0)
    return total


def pin(kind_name: str, cores: set[int]) -> int:
    """Move every thread of the running processes of one kind onto `cores` (threads they start later
    inherit it); returns how many threads were moved."""
    moved = 0
    for key in snapshot():
        k, pid = key.split(":", 1)
        if k != kind_name:
            continue
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cores)
                moved += 1
            except OSError:
                continue  # the thread ended meanwhile
    return moved


def run_off(cores: set[int]) -> None:
    """This process, and every process it starts from now on, runs on the other cores (for --pin)."""
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)) - cores)
