"""Kernel-timestamped capture of UDP packets on the loopback interface, for latency measurements.

SIPp owns its SIP and media sockets, so a test cannot read them itself; this reads copies of the packets
from an AF_PACKET socket on `lo` instead (needs root), with a classic BPF filter attached so only UDP
packets from or to the given ports are copied to us (other sessions' calls on `lo` stay in the kernel),
and SO_TIMESTAMPNS so each packet carries the time it passed through the interface, not the time
Python got round to it. One clock (CLOCK_REALTIME) for SIP and RTP alike.

    with LoopbackCapture([sip_port, media_port]) as cap:
        mark = cap.mark()
        ...                                   # place a call
        for p in cap.since(mark): p.ts, p.sport, p.dport, p.payload
"""

from __future__ import annotations

import ctypes
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

ETH_P_IP = 0x0800
SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = 35  # = SCM_TIMESTAMPNS (asm-generic, x86_64)
PACKET_OUTGOING = 4

# classic BPF opcodes
_LDB_ABS, _LDH_ABS, _LDXB_MSH, _LDH_IND = 0x30, 0x28, 0xB1, 0x48
_JEQ_K, _JSET_K, _RET_K = 0x15, 0x45, 0x06


@dataclass(frozen=True)
class Packet:
    ts: float  # seconds since the epoch, from the kernel
    sport: int
    dport: int
    payload: bytes  # the UDP payload


def _filter(ports: list[int]) -> list[tuple[int, int, int, int]]:
    """IPv4, UDP, first fragment, source or destination port in `ports` (offsets from the IP header:
    the socket is SOCK_DGRAM, so no link-layer header)."""
    n = len(ports)
    prog: list[tuple[int, int, int, int]] = []
    # accept is the last instruction, drop the one before it; jumps are relative to the next instruction
    total = 5 + (1 + n) + (1 + n) + 2  # header, src checks (ldh + n), dst checks (ldh + n), drop, accept

    def to_drop(i: int) -> int:
        return total - 2 - (i + 1)

    def to_accept(i: int) -> int:
        return total - 1 - (i + 1)

    prog.append((_LDB_ABS, 0, 0, 9))  # ip protocol
    prog.append((_JEQ_K, 0, to_drop(1), 17))
    prog.append((_LDH_ABS, 0, 0, 6))  # flags + fragment offset
    prog.append((_JSET_K, to_drop(3), 0, 0x1FFF))
    prog.append((_LDXB_MSH, 0, 0, 0))  # x = IP header length
    prog.append((_LDH_IND, 0, 0, 0))  # udp source port
    for p in ports:
        i = len(prog)
        prog.append((_JEQ_K, to_accept(i), 0, p))
    prog.append((_LDH_IND, 0, 0, 2))  # udp destination port
    for p in ports:
        i = len(prog)
        prog.append((_JEQ_K, to_accept(i), 0, p))
    prog.append((_RET_K, 0, 0, 0))
    prog.append((_RET_K, 0, 0, 0x40000))
    assert len(prog) == total
    return prog


class LoopbackCapture:
    """UDP packets on `lo` from or to `ports`, kept in arrival order (a background thread reads them)."""

    def __init__(self, ports: Iterable[int]) -> None:
        self.ports = sorted(set(ports))
        self.packets: list[Packet] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._bpf: ctypes.Array | None = None

    def start(self) -> None:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        insns = _filter(self.ports)
        self._bpf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in insns))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                        struct.pack("HL", len(insns), ctypes.addressof(self._bpf)))
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(("lo", ETH_P_IP))
        sock.settimeout(0.0)
        while True:  # whatever slipped in before the filter was attached
            try:
                sock.recv(65535)
            except BlockingIOError:
                break
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name="lo-capture", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                data, anc, _flags, addr = self._sock.recvmsg(65535, 64)
            except TimeoutError:
                continue
            except OSError:
                break
            if addr[2] == PACKET_OUTGOING:
                continue
            ts = time.time()
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
                    sec, nsec = struct.unpack("qq", raw[:16])
                    ts = sec + nsec / 1e9
            ihl = (data[0] & 0x0F) * 4
            sport, dport = struct.unpack("!HH", data[ihl:ihl + 4])
            with self._lock:
                self.packets.append(Packet(ts, sport, dport, data[ihl + 8:]))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._sock is not None:
            self._sock.close()
        self._thread = self._sock = None

    def mark(self) -> int:
        with self._lock:
            return len(self.packets)

    def since(self, mark: int) -> list[Packet]:
        with self._lock:
            return self.packets[mark:]

    def __enter__(self) -> LoopbackCapture:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
