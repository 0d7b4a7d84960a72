"""`siterecovery ui down` stops exactly the process groups `ui up` recorded: the whole group (children
too), and never a process whose PID merely matches a stale PID file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from siterecovery import ui

# A leader that starts a child in its own group, like the worker and its flow-run subprocesses.
TREE = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has stopped all the same.
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"


def _children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_down_stops_the_recorded_group(tmp_path: Path) -> None:
    leader = subprocess.Popen([sys.executable, "-c", TREE], start_new_session=True)
    ui._children[leader.pid] = leader
    pidfile = tmp_path / "worker.pid"
    ui.record(pidfile, leader.pid)
    deadline = time.monotonic() + 10
    while not _children_of(leader.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    (child,) = _children_of(leader.pid)
    assert ui.recorded(pidfile) == leader.pid
    assert ui.stop_group(pidfile, grace=5)
    assert leader.returncode is not None and not _alive(child)
    assert not pidfile.exists()
    assert not ui.stop_group(pidfile)  # nothing left to stop


def test_a_stale_pid_file_stops_nothing(tmp_path: Path) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        pidfile = tmp_path / "server.pid"
        # Same PID, another start time: the recorded process is gone and the PID was reused.
        pidfile.write_text(f"{bystander.pid} 1\n")
        assert ui.recorded(pidfile) is None
        assert not ui.stop_group(pidfile)
        assert _alive(bystander.pid) and not pidfile.exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_status_and_down_without_anything_started(tmp_path: Path) -> None:
    said: list[str] = []
    ui.down(tmp_path, say=said.append)
    assert said == ["no worker running", "no server running"]
    assert ui.status(tmp_path) == {"server": None, "worker": None}
