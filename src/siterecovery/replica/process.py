"""Processes the agent starts on its host: `process` VMs and QEMU (qemu.py) run detached, named by a pidfile.

Host side, standard library only. A pidfile names the process; a zombie or a reused pid is not ours.
Children this process started are kept so they are reaped (the agent runs in-process for local hosts).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from typing import Any

from .engine import ReplicaError


def alive(pidfile: str) -> int | None:
    _reap()
    try:
        with open(pidfile) as f:
            pid = int(f.read().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    # A zombie or a reused pid is not our VM.
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                return None
    except FileNotFoundError:
        return None
    return pid


# VMs this process started (the agent in-process for local hosts): kept so they are reaped, not
# left as zombies or reported as leaked by Popen's finalizer.
children: dict[int, subprocess.Popen[bytes]] = {}


def _reap() -> None:
    """Collect the children that exited on their own (a test copy that powered itself off): without a
    wait they stay zombies for as long as this process lives."""
    for pid, child in list(children.items()):
        if child.poll() is not None:
            children.pop(pid, None)


def spawn(pidfile: str, log: str, argv: list[str]) -> dict[str, Any]:
    """Start `argv` detached (own session, stdin closed, stdout/stderr appended to `log`)."""
    pid = alive(pidfile)
    if pid:
        return {"pid": pid, "started": False}
    os.makedirs(os.path.dirname(os.path.abspath(pidfile)), exist_ok=True)
    with open(log, "ab") as lf:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
                             start_new_session=True, close_fds=True)
    children[p.pid] = p
    with open(pidfile + ".tmp", "w") as f:
        f.write(f"{p.pid}\n")
    os.replace(pidfile + ".tmp", pidfile)
    time.sleep(0.05)
    rc = p.poll()
    if rc is not None:
        children.pop(p.pid, None)
        raise ReplicaError(f"{argv[0]} exited at once with status {rc}; see {log}", code="StartFailed")
    return {"pid": p.pid, "started": True}


def kill(pidfile: str, grace: float) -> dict[str, Any]:
    """TERM the process group, KILL it after `grace` seconds."""
    pid = alive(pidfile)
    if pid is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)
        return {"stopped": False}
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    how = "TERM"
    while alive(pidfile) and time.monotonic() < deadline:
        child = children.get(pid)
        if child is not None and child.poll() is not None:
            break
        time.sleep(0.02)
    if alive(pidfile):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        how = "KILL"
        while alive(pidfile):
            child = children.get(pid)
            if child is not None and child.poll() is not None:
                break
            time.sleep(0.02)
    child = children.pop(pid, None)
    if child is not None:
        child.wait()
    os.unlink(pidfile)
    return {"stopped": True, "signal": how}
