"""The replication soak in its short CI form (about 35 s of cycles): 4 VMs every 5 s over the real sshd
under write load, then a planned failover of each. The 10-minute run is `python -m bench.soak`, recorded
in docs/RELIABILITY-replication.md. Bounds are generous (a shared, loaded machine); none is on time."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from sshd import SSHD

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.soak import MiB, run_soak  # noqa: E402 - bench/ is not a package on the test path


@pytest.mark.sshd
@pytest.mark.timeout(240)
def test_soak_short(tmp_path: Path) -> None:
    if not os.path.exists(SSHD):
        pytest.skip(f"{SSHD} is missing (install openssh-server: scripts/setup-system.sh)")
    out = run_soak(35, tmp_path / "soak", vms=4, interval=5, size=16 * MiB, log=lambda *_: None)
    assert out["cycles"] >= 4 * 3, out
    assert out["failed_cycles"] == 0, out["errors"]
    assert out["vms_with_data_lost"] == [], out  # every byte, and the last stamp, at the target
    assert all(s.startswith("seq") and int(s.split()[1]) > 0 for s in out["last_stamps"]), out["last_stamps"]
    assert out["stray_files"] == [] and out["stray_agents"] == [], out
    assert out["files"]["mid"] == out["files"]["end"], out["files"]  # newest point only: a steady state
    assert out["sshd_children"]["after_close"] == 0, out["sshd_children"]
    assert out["sshd_children"]["peak"] <= (out["sshd_children"]["during"] or 0) + 8, out["sshd_children"]
    assert out["fds"]["after_close"] <= out["fds"]["start"] + 2, out["fds"]
    assert out["fds"]["peak"] <= out["fds"]["start"] + 16, out["fds"]
    assert out["rss_kib"]["end_before_close"] - out["rss_kib"]["start"] < 64 * 1024, out["rss_kib"]
