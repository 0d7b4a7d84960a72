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
    fd = os.open(str(meta) + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, b"4242\n", 0)
    monkeypatch.setattr(agent, "LOCK_WAIT", 0.2)
    try:
        with pytest.raises(ReplicaError, match="pid 4242") as ei:
            agent.run_command(["status", "--replica", str(tmp_path / "r.img"), "--meta", str(meta)], _null(), _null())
        assert ei.value.code == "Busy"
    finally:
        os.close(fd)


def _null() -> Any:
    import io
    return io.BytesIO()
