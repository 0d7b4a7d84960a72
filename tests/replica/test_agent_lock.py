"""One agent at a time per replica: a receive still running (as one orphaned by a dropped SSH connection
is) and the next command's recovery step must not work on the same files at once. Real agent
processes; the receive is held half-way through its stream while another command starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from helpers import MiB, Pair, make_disk, scribble

from siterecovery.replica import agent
from siterecovery.replica.agent import lock_path
from siterecovery.replica.engine import file_digest


def test_a_command_waits_for_the_receive_in_progress(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    make_disk(disk, 8 * MiB, fill=0.5)
    pair = Pair(tmp_path, disk)
    pair.cycle("full")
    scribble(disk, 40)
    stream, _sent = pair.stream("delta")
    meta = pair.rep.meta
    args = ["--replica", pair.rep.path, "--meta", meta]
    point = {"id": "vm@2", "created_at": "2026-01-01T00:00:00+00:00", "consistency": "crash"}
    recv = subprocess.Popen([sys.executable, "-m", "siterecovery.replica.agent", "receive", *args,
                             "--point", json.dumps(point)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert recv.stdin is not None
    recv.stdin.write(stream[:len(stream) // 2])
    recv.stdin.flush()
    end = time.monotonic() + 60
    while not any(n.startswith("staging") for n in os.listdir(meta)):
        assert time.monotonic() < end and recv.poll() is None, recv.stderr.read() if recv.stderr else ""
        time.sleep(0.01)
    # The receive is staging. A status (what a health check or the next cycle runs first) starts now.
    box: dict[str, Any] = {}

    def status() -> None:
        box["status"] = agent.run_command(["status", *args], _null(), _null())

    t = threading.Thread(target=status)
    t.start()
    t.join(1.0)
    waited = t.is_alive()
    out, err = recv.communicate(stream[len(stream) // 2:], timeout=120)
    t.join(120)
    assert recv.returncode == 0, (out, err)  # the receive was not disturbed
    assert waited, "status ran while the receive held the replica"
    assert box["status"]["seq"] == 2 and box["status"]["disk_matches"]
    assert file_digest(pair.rep.path) == file_digest(str(disk))


def test_a_stuck_holder_gives_a_clear_busy_error(tmp_path: Path, monkeypatch: Any) -> None:
    import fcntl

    import pytest

    from siterecovery.replica.engine import ReplicaError

    meta = tmp_path / "meta"
    meta.mkdir()
    fd = os.open(lock_path(str(meta)), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, b"4242\n", 0)
    monkeypatch.setattr(agent, "LOCK_WAIT", 0.2)
    try:
        with pytest.raises(ReplicaError, match="pid 4242") as ei:
            agent.run_command(["status", "--replica", str(tmp_path / "r.img"), "--meta", str(meta)], _null(), _null())
        assert ei.value.code == "Busy"
    finally:
        os.close(fd)


def _half_received(tmp_path: Path, dead: float) -> tuple[Pair, list[str], subprocess.Popen[bytes], bytes]:
    """A real `agent receive` (dead-link deadline `dead`) staging the first half of a delta, its stdin
    held open: an agent whose orchestrator went away behind a silent partition."""
    disk = tmp_path / "disk.img"
    make_disk(disk, 8 * MiB, fill=0.5)
    pair = Pair(tmp_path, disk)
    pair.cycle("full")
    scribble(disk, 40)
    stream, _sent = pair.stream("delta")
    args = ["--replica", pair.rep.path, "--meta", pair.rep.meta]
    point = {"id": "vm@2", "created_at": "2026-01-01T00:00:00+00:00", "consistency": "crash"}
    recv = subprocess.Popen([sys.executable, "-m", "siterecovery.replica.agent", "receive", *args,
                             "--point", json.dumps(point)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "SITERECOVERY_DEAD_LINK_SECONDS": f"{dead:g}"})
    assert recv.stdin is not None
    recv.stdin.write(stream[:len(stream) // 2])
    recv.stdin.flush()
    end = time.monotonic() + 60
    while not any(n.startswith("staging") for n in os.listdir(pair.rep.meta)):
        assert time.monotonic() < end and recv.poll() is None, recv.stderr.read() if recv.stderr else ""
        time.sleep(0.01)
    return pair, args, recv, stream


def test_an_agent_whose_stream_goes_silent_exits_and_frees_the_replica(tmp_path: Path) -> None:
    pair, args, recv, _stream = _half_received(tmp_path, dead=2)
    t0 = time.monotonic()
    try:
        recv.wait(timeout=60)  # stdin stays open: nothing more arrives, and no EOF either
        assert recv.stdout is not None
        out = recv.stdout.read()
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
        for f in (recv.stdin, recv.stdout, recv.stderr):
            if f is not None:
                f.close()
    took = time.monotonic() - t0
    assert recv.returncode == 3 and b"NoTraffic" in out and b"no data arrived" in out, out
    assert took < 30, took
    # the replica is free at once and exactly the previous point
    st = agent.run_command(["status", *args], _null(), _null())
    assert st["seq"] == 1 and st["disk_matches"]
    assert not [n for n in os.listdir(pair.rep.meta) if n.startswith("staging")]


def test_the_lock_of_a_stopped_owner_is_broken(tmp_path: Path, monkeypatch: Any) -> None:
    import signal

    # The holder's own deadline is 6 s: it beats every 2 s while it runs. Stopped (SIGSTOP, as a hung
    # or frozen agent), it beats no more; it stays stopped, so its own stream deadline never fires.
    pair, args, recv, _stream = _half_received(tmp_path, dead=6)
    lockfile = lock_path(pair.rep.meta)
    owner = json.loads(Path(lockfile).read_text())
    assert owner["pid"] == recv.pid and owner["cmd"] == "receive" and owner["boot"] and owner["start"]
    os.kill(recv.pid, signal.SIGSTOP)
    monkeypatch.setenv("SITERECOVERY_DEAD_LINK_SECONDS", "1")
    monkeypatch.setattr(agent, "LOCK_WAIT", 120.0)
    try:
        t0 = time.monotonic()
        st = agent.run_command(["status", *args], _null(), _null())  # what a failover runs first
        took = time.monotonic() - t0
        assert recv.wait(10) == -signal.SIGKILL
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
        for f in (recv.stdin, recv.stdout, recv.stderr):
            if f is not None:
                f.close()
    # recovery ran before the newcomer acted: the torn staging is gone, the replica is the previous point
    assert st["seq"] == 1 and st["disk_matches"], st
    assert not [n for n in os.listdir(pair.rep.meta) if n.startswith("staging")]
    # broken twice the holder's deadline (12 s) after its last beat, well before LOCK_WAIT (120 s)
    assert took < 60, took
    print(f"FAULTS stale-lock: broken after {took:.1f}s (holder deadline 6 s, last beat <= 2 s before the stop)")


def _null() -> Any:
    import io
    return io.BytesIO()


def test_no_disk_name_can_be_another_disks_lock_file(tmp_path: Path) -> None:
    # Disks `x` and `x.lock` of one VM once shared a file: `x`'s lock was `x.lock`'s meta directory.
    from siterecovery.paths import IDENT_RE, check_ident

    for name in ("x", "x.lock", "os", "data-1"):
        check_ident(name)
        lock = os.path.basename(lock_path(str(tmp_path / "meta" / name)))
        assert not IDENT_RE.fullmatch(lock), lock  # so no valid disk name is this file's name
