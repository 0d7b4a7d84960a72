"""Processes the agent starts (replica/process.py): a child that exits on its own is reaped, not left a
zombie for as long as the agent's process lives (the agent runs in-process for local hosts)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from siterecovery.replica import process


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0]
    except FileNotFoundError:
        return None


def test_a_child_that_exits_by_itself_is_reaped(tmp_path: Path) -> None:
    pidfile = str(tmp_path / "vm.pid")
    out = process.spawn(pidfile, str(tmp_path / "vm.log"), ["sleep", "0.3"])
    pid = out["pid"]
    assert out["started"] and process.alive(pidfile) == pid
    deadline = time.monotonic() + 10
    while _state(pid) not in ("Z", None) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.alive(pidfile) is None  # exited: not ours any more
    assert _state(pid) is None, "the exited child is still a zombie"
    assert pid not in process.children
    assert process.kill(pidfile, 1) == {"stopped": False} and not os.path.exists(pidfile)
