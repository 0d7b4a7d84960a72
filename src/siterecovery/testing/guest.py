"""The tiny test guest's record format (scripts/build-test-guest.sh), read from outside the guest: the
records a disk image holds and the acknowledgements its serial console printed. Used by the QEMU tests
(tests/fabric/guest.py) and `siterecovery demo --qemu`.

Record n of a disk lives in 4 KiB slot n ("SR <disk> <n:08d>"), the header in the disk's last 4 KiB
("SRH <n:08d>"); the guest writes record n on every disk, then every header, each fsync'ed, then
prints "ACK n" on its serial console.
"""

from __future__ import annotations

import re
from pathlib import Path

SLOT = 4096


class Torn(AssertionError):
    pass


def records(image: Path, disk: str) -> int:
    """The number of records the header names, after checking records 1..n are all there and right."""
    data = Path(image).read_bytes()
    head = data[-SLOT:].split(b"\n", 1)[0]
    if not head.strip(b"\0"):
        return 0
    m = re.fullmatch(rb"SRH (\d{8})", head)
    if not m:
        raise Torn(f"{image}: bad header {head[:40]!r}")
    n = int(m.group(1))
    for i in range(1, n + 1):
        want = f"SR {disk} {i:08d}\n".encode()
        got = data[i * SLOT:i * SLOT + len(want)]
        if got != want:
            raise Torn(f"{image}: header says {n} records, record {i} is {got!r}")
    return n


def acks(serial: Path) -> int:
    """The last record the guest acknowledged on its serial console (0: none yet, or no console file)."""
    try:
        found = re.findall(rb"ACK (\d+)", Path(serial).read_bytes())
    except FileNotFoundError:
        return 0
    return int(found[-1]) if found else 0


def _text(serial: Path) -> bytes:
    try:
        return Path(serial).read_bytes()
    except FileNotFoundError:
        return b""


def resumed_from(serial: Path) -> int | None:
    """The record a guest in write mode started from ("GUEST writing from n"): one past the last record
    its disks' headers named at boot. None before it said so."""
    found = re.findall(rb"GUEST writing from (\d+)", _text(serial))
    return int(found[-1]) if found else None


def self_check(serial: Path) -> dict[str, tuple[bool, int]] | None:
    """A guest booted with srmode=check: disk -> (its records 1..n all right, n). None until "CHECK done"."""
    text = _text(serial)
    if b"CHECK done" not in text:
        return None
    return {m.group(1).decode(): (m.group(2) == b"ok", int(m.group(3)))
            for m in re.finditer(rb"CHECK (\w+) (ok|bad) records=(\d+)", text)}
