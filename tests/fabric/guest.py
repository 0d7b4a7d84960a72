"""The tiny test guest (scripts/build-test-guest.sh): build it once into a cache. What it wrote is read
by siterecovery.testing.guest (records, acks), shared with `siterecovery demo --qemu`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from siterecovery.testing.guest import Torn, acks, records  # noqa: F401 - the tests import them from here

ROOT = Path(__file__).resolve().parents[2]
QEMU = shutil.which("qemu-system-x86_64")


def kit() -> Path:
    """vmlinuz + initramfs.gz, built from the host's Debian kernel and busybox-static (skips without them)."""
    if QEMU is None or shutil.which("qemu-img") is None or shutil.which("qemu-nbd") is None:
        pytest.skip("QEMU is not installed (scripts/setup-system.sh installs qemu-system-x86 and qemu-utils)")
    cache = Path(os.environ.get("SITERECOVERY_GUEST_CACHE", Path.home() / ".cache" / "siterecovery" / "test-guest"))
    r = subprocess.run(["sh", str(ROOT / "scripts" / "build-test-guest.sh"), str(cache)], capture_output=True,
                       text=True, timeout=300)
    if r.returncode == 2:  # no kernel or busybox: the kit's packages are missing, not a failure of ours
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stderr
    return cache


def wait_for(what: str, cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---- srmode=fs: records in a file on an ext4 filesystem (the guest agent's tests) ----------------------

def features(k: Path) -> set[str]:
    """What the kit was built with: "qga" when Debian's qemu-ga went into the initramfs (its stamp says
    qga=<mtime>; an older build's stamp says nothing of it)."""
    try:
        stamp = (k / "stamp").read_text()
    except FileNotFoundError:
        return set()
    return {"qga"} if re.search(r"\bqga=\d+", stamp) else set()


def make_fs(image: Path, size: int) -> None:
    """An ext4 filesystem for srmode=fs, made on the host (e2fsprogs)."""
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True, timeout=60)


def fs_state(image: Path) -> dict[str, object]:
    """A copy of the guest's filesystem, read on the host without mounting it: {clean: e2fsck -fn found
    nothing, needs_recovery: the journal still had to be replayed (the filesystem was not frozen or
    unmounted), records: the number of gap-free "FS n" lines in /records (Torn if they are not)}."""
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, timeout=120)
    head = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, timeout=60)
    feats = next((ln for ln in head.stdout.splitlines() if ln.startswith("Filesystem features:")), "")
    cat = subprocess.run(["debugfs", "-R", "cat /records", str(image)], capture_output=True, timeout=60)
    lines = cat.stdout.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, line in enumerate(lines, 1):
        if line != f"FS {i:08d}".encode():
            raise Torn(f"{image}: /records line {i} is {line[:40]!r}")
    return {"clean": fsck.returncode == 0, "fsck": fsck.stdout[-600:], "needs_recovery": "needs_recovery" in feats,
            "records": len(lines)}
