"""The tiny test guest (scripts/build-test-guest.sh): build it once into a cache. What it wrote is read
by siterecovery.testing.guest (records, acks), shared with `siterecovery demo --qemu`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from siterecovery.testing.guest import acks, records  # noqa: F401 - the tests import them from here

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
