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


# A leader that, like a worker waiting for its flow runs, ignores SIGTERM: it notes when the signal came
# and whether the other leader (argv[2]) was still alive then.
STUBBORN = """
import os, signal, sys, time
def term(*_):
    try:
        os.kill(int(sys.argv[2]), 0)
        other = "alive"
    except (ProcessLookupError, ValueError):
        other = "gone"
    with open(sys.argv[1], "w") as f:
        f.write(other)
signal.signal(signal.SIGTERM, term)
open(sys.argv[1] + ".ready", "w").close()
time.sleep(60)
"""


def test_down_gives_workers_that_ignore_sigterm_one_grace(tmp_path: Path) -> None:
    """`ui down` with two stubborn workers: both get SIGTERM while both still run (one grace for all,
    not one each: 20 s per worker with a drill paused at its approval), and both are killed after it."""
    a = subprocess.Popen([sys.executable, "-c", STUBBORN, str(tmp_path / "a.term"), "-"], start_new_session=True)
    b = subprocess.Popen([sys.executable, "-c", STUBBORN, str(tmp_path / "b.term"), str(a.pid)], start_new_session=True)
    files = []
    for name, p in (("a", a), ("b", b)):
        ui._children[p.pid] = p
        files.append(ui.Layout(tmp_path.resolve()).pidfile(f"worker-site-{name}"))
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        ui.record(files[-1], p.pid)
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"{n}.term.ready").exists() for n in "ab") and time.monotonic() < deadline:
        time.sleep(0.05)  # both have set their handlers
    said: list[str] = []
    ui.down(tmp_path, say=said.append, grace=3)
    assert said == ["stopped the worker-site-a", "stopped the worker-site-b", "no server running"]
    assert a.returncode == b.returncode == -9  # SIGKILL after the grace
    # b was told to stop while a still ran: stopped one after the other, b would find a gone.
    assert (tmp_path / "b.term").read_text() == "alive"
    assert (tmp_path / "a.term").exists()
    assert not any(f.exists() for f in files)
