"""Faults during replication, linux fabric over the real sshd: the connection cut mid-transfer (a proxy
we control between the fabric and sshd), the target filesystem full (a small tmpfs), the orchestrator
killed mid-cycle (SIGKILL of a subprocess running the cycle), the source disk truncated or grown.

Every fault ends the same way or the test fails: no stray agent left, the replica is exactly a recovery
point (engine status + every point rebuilt and compared), replication_health says what happened, and
the next cycle recovers shipping only what changed. Counts go to docs/RELIABILITY-replication.md.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cutproxy import CutProxy
from faultrig import MiB, Rig, fill, tmpfs, wait_no_agents
from sshd import SSHServer

from siterecovery.errors import FabricError
from siterecovery.fabric.base import Health, ReplicationState
from siterecovery.replica.engine import BLOCK, file_digest, read_manifest_header
from siterecovery.testing.disks import rewrite_random

S = ReplicationState
DELTA_BLOCKS = 48  # 3 MiB of incompressible changes per fault: big enough to cut in the middle
SLACK = 256 * 1024  # stream headers and records on top of the payload


def _fault_then_recover(rig: Rig, attempt: object, marker: str, written: int) -> dict[str, object]:
    """Run `attempt` (a cycle under a fault), then check health, the replica, and the recovery cycle."""
    failed = ""
    try:
        attempt()  # type: ignore[operator]
    except FabricError as exc:
        failed = f"{type(exc).__name__}: {exc.message[:120]}"
    stray = wait_no_agents(marker)
    assert not stray, f"agents left running after the fault: {stray}"
    h = rig.f.replication_health(rig.p)
    if failed:
        assert h.health in (Health.Warning, Health.Critical), h
        assert h.details and "fail" in h.details.lower(), h.details
        assert h.missed_cycles >= 1
    rig.verify(clean=False, rebuild=1)
    newest = max(rig.f.recovery_points(rig.p), key=lambda x: x.created_at).id
    r = rig.cycle()
    assert r.changed and r.state == S.Replicating
    # No full copy: at most what was written since the last good cycle travels again.
    assert r.bytes_sent <= written + SLACK, (r.bytes_sent, written)
    assert "resynchronized" not in r.message, r.message  # a lost transfer needs no block compare
    assert file_digest(str(rig.replica)) == file_digest(str(rig.disk))
    rig.verify(clean=True, rebuild=1)
    h = rig.f.replication_health(rig.p)
    assert h.health == Health.Normal and not h.resync_required, h
    return {"failed": failed, "recovery_bytes": r.bytes_sent, "newest": newest}


@contextlib.contextmanager
def proxied_rig(sshd: SSHServer, tmp: Path, side: str) -> Iterator[tuple[Rig, CutProxy]]:
    proxy = CutProxy(sshd.port)
    via = {"port": proxy.port}
    a = sshd.host("ny-h1", "ny", root=str(tmp / "root-a"), **(via if side == "source" else {}))
    b = sshd.host("chi-h1", "chi", root=str(tmp / "root-b"), **(via if side == "target" else {}))
    rig = Rig(tmp, a, b)
    try:
        yield rig, proxy
    finally:
        rig.close()
        proxy.close()


# (side behind the proxy, direction the budget counts, bytes before the cut)
CUTS = {
    "target": [("up", 64 * 1024), ("up", 2 * MiB + 300_000), ("down", 300)],
    "source": [("down", 64 * 1024), ("down", 2 * MiB + 300_000), ("up", 200)],
}


def _cut_after_commit(rig: Rig, proxy: CutProxy) -> None:
    """One cycle whose connection drops right after the replica committed: the acknowledgement is lost."""
    manifest = str(rig.meta / "manifest")
    h0 = read_manifest_header(manifest)
    assert h0 is not None
    stop = threading.Event()

    # 100 KB into the stream the channel is set up: from there hold what sshd sends back (the result),
    # and drop the link once the commit is on disk.
    proxy.hold_after(100_000)

    def watch() -> None:
        while not stop.is_set():
            h = read_manifest_header(manifest)
            if h is not None and h.seq > h0.seq:
                proxy.cut_all()
                return
            time.sleep(0.001)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        rig.cycle()
    finally:
        stop.set()
        t.join()
        proxy.release()


@pytest.mark.sshd
@pytest.mark.parametrize("side", ["target", "source"])
def test_connection_cut_mid_transfer(sshd_server: SSHServer, tmp_path: Path, side: str) -> None:
    rnd = random.Random(side)
    with proxied_rig(sshd_server, tmp_path, side) as (rig, proxy):
        rig.start()
        outcomes = []
        for direction, budget in CUTS[side]:
            written = rewrite_random(rig.disk, DELTA_BLOCKS, rnd)

            def attempt(direction: str = direction, budget: int = budget) -> None:
                proxy.arm(budget, direction)
                try:
                    rig.cycle()
                finally:
                    proxy.disarm()

            outcomes.append(_fault_then_recover(rig, attempt, str(tmp_path), written))
        # the cuts in the middle of the 3 MiB stream must have hit (else the test proved nothing)
        assert proxy.cuts >= 2 and sum(bool(o["failed"]) for o in outcomes) >= 2, outcomes
        hits = sum(bool(o["failed"]) for o in outcomes)
        if side == "target":
            # The acknowledgement lost: the replica holds the new point, the orchestrator saw a failure.
            # The next cycle must carry on from that point, shipping nothing again.
            for _ in range(3):
                written = rewrite_random(rig.disk, 12, rnd)  # 768 KiB: the stream fits sshd's channel window
                pid = rig.next_id()
                out = _fault_then_recover(rig, lambda: _cut_after_commit(rig, proxy), str(tmp_path), written)
                newest_before_recovery = out["newest"]
                hits += bool(out["failed"])
                if out["failed"] and newest_before_recovery == pid:
                    assert out["recovery_bytes"] <= SLACK, out
                    break
            else:
                pytest.fail("the cut never landed between the commit and the acknowledgement")
        rig.verify()
        print(f"FAULTS cut-{side}: injected={hits} survived={hits} lost=0")


@pytest.mark.sshd
def test_source_truncated_and_grown_between_cycles(sshd_server: SSHServer, tmp_path: Path) -> None:
    a = sshd_server.host("ny-h1", "ny", root=str(tmp_path / "root-a"))
    b = sshd_server.host("chi-h1", "chi", root=str(tmp_path / "root-b"))
    rig = Rig(tmp_path, a, b)
    rnd = random.Random(5)
    try:
        rig.start()
        # shrink, a partial last block, grow with new data in the tail, empty, back to the start size
        for size, tail in [(12 * MiB, 0), (12 * MiB + 1000, 1000), (20 * MiB + 7, 2 * MiB), (0, 0),
                           (5 * BLOCK + 3, 5 * BLOCK + 3), (16 * MiB, 4 * BLOCK)]:
            old = os.path.getsize(rig.disk)
            with open(rig.disk, "r+b") as f:
                f.truncate(size)
                if size > old and tail:
                    f.seek(max(old, size - tail))
                    f.write(rnd.randbytes(size - max(old, size - tail)))
            r = rig.cycle()
            assert r.changed and "resynchronized" not in r.message, r.message
            assert r.bytes_sent <= max(0, size - old) + SLACK, (size, old, r.bytes_sent)
            assert os.path.getsize(rig.replica) == size
            assert file_digest(str(rig.replica)) == file_digest(str(rig.disk))
            h = rig.f.replication_health(rig.p)
            assert h.health == Health.Normal and not h.resync_required, h
        out = rig.verify()
        assert out["rebuilt"] >= 6  # every older size comes back through the undo logs
        print(f"FAULTS resize: injected=6 survived=6 points-rebuilt={out['rebuilt']} lost=0")
    finally:
        rig.close()


# ---- the target filesystem full ---------------------------------------------------------------------

@pytest.mark.sshd
def test_target_disk_full(sshd_server: SSHServer, tmp_path: Path) -> None:
    rnd = random.Random(3)
    with tmpfs(tmp_path / "fs-b", "64m") as fs:
        a = sshd_server.host("ny-h1", "ny", root=str(tmp_path / "root-a"))
        b = sshd_server.host("chi-h1", "chi", root=str(fs))
        rig = Rig(tmp_path, a, b)
        try:
            rig.start()
            # 3 MiB of changes need about 3 MiB staged, 1 MiB of undo and 2 MiB newly allocated: the
            # space runs out while staging, while writing the undo log, while writing blocks, or not at all.
            failures = []
            for leave in (5 * MiB, 128 * 1024, 2 * MiB, 3 * MiB + 512 * 1024, 8 * MiB):
                written = rewrite_random(rig.disk, DELTA_BLOCKS, rnd)
                filler = fill(fs, leave)
                failed = ""
                try:
                    rig.cycle()
                except FabricError as exc:
                    failed = exc.message
                    assert "No space left" in exc.message and exc.error_id == "ENOSPC", exc.message
                    assert exc.hint and "free space" in exc.hint
                assert not wait_no_agents(str(tmp_path))
                # Where it ran out, from what the failed receive left for the next recovery step.
                names = os.listdir(rig.meta) + os.listdir(rig.meta / "undo")
                phase = ("apply" if "journal" in names else "undo log" if any(n.endswith(".tmp") for n in names)
                         else "staging")
                # the disk is still full when the operator looks: health says why the cycle failed
                h = rig.f.replication_health(rig.p)
                if failed:
                    failures.append(phase)
                    # a full filesystem is Critical: no cycle lands until someone frees space
                    assert h.health == Health.Critical and "No space left" in h.details, h
                filler.unlink()
                out = _fault_then_recover(rig, lambda: None, str(tmp_path), written if failed else 0)
                assert out["recovery_bytes"] <= (written if failed else 0) + SLACK
            assert len(failures) >= 3 and len(set(failures)) >= 2, failures  # ENOSPC in different phases
            print(f"FAULTS disk-full: injected={len(failures)} phases={failures} survived={len(failures)} lost=0")
            rig.verify()
        finally:
            rig.close()


# ---- the orchestrator killed mid-cycle --------------------------------------------------------------

CHILD = Path(__file__).with_name("cycle_child.py")


@pytest.mark.sshd
@pytest.mark.parametrize("path", ["relay", "peer"])
def test_orchestrator_killed_mid_cycle(sshd_server: SSHServer, tmp_path: Path, path: str) -> None:
    rnd = random.Random(9)
    # peer: the source host streams to the target over its own ssh; killing the orchestrator leaves
    # that link running without anyone to hear the result
    extra = {"peer_ssh": sshd_server.peer_ssh(tmp_path / "on-source-host")} if path == "peer" else {}
    a = sshd_server.host("ny-h1", "ny", root=str(tmp_path / "root-a"), **extra)
    b = sshd_server.host("chi-h1", "chi", root=str(tmp_path / "root-b"))
    rig = Rig(tmp_path, a, b)
    pjson = tmp_path / "placement.json"
    pjson.write_text(rig.p.model_dump_json())
    manifest = str(rig.meta / "manifest")
    outcomes = []
    try:
        rig.start()
        # seconds after "go"; None: the moment the replica committed (the orchestrator never hears)
        for delay in (0.0, 0.05, 0.15, 0.3, 0.6, None, 1.2):
            written = rewrite_random(rig.disk, 96, rnd)  # 6 MiB: a cycle long enough to land in
            pid = rig.next_id()
            rig.known[pid] = file_digest(str(rig.disk))
            h0 = read_manifest_header(manifest)
            assert h0 is not None
            child = subprocess.Popen([sys.executable, str(CHILD), str(tmp_path / "state"), str(pjson), sys.executable],
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
            try:
                assert child.stdout is not None
                assert child.stdout.readline().strip() == "go"
                if delay is None:
                    end = time.monotonic() + 60
                    while time.monotonic() < end:
                        h = read_manifest_header(manifest)
                        if h is not None and h.seq > h0.seq:
                            break
                        time.sleep(0.0005)
                else:
                    time.sleep(delay)
                child.send_signal(signal.SIGKILL)
                child.stdout.read()  # drained: the child may have printed "done" before the kill
            finally:
                child.kill()
                child.wait()
                if child.stdout is not None:
                    child.stdout.close()
            inside = (tmp_path / "state" / "linux" / "vms" / f"{rig.vm}.cycle").exists()  # killed mid-cycle
            # At once, as a restarted orchestrator would: agents of the dead one may still be running.
            h = rig.f.replication_health(rig.p)
            assert h.state == S.Replicating
            if inside:
                assert h.health == Health.Warning and "interrupted" in h.details, h
            r = rig.cycle()
            assert r.changed and "resynchronized" not in r.message, r.message
            assert r.details["data_path"] == path
            assert r.bytes_sent <= written + SLACK
            assert file_digest(str(rig.replica)) == file_digest(str(rig.disk))
            assert not wait_no_agents(str(tmp_path))
            rig.verify(clean=True, rebuild=2)
            newest_before = [x.id for x in rig.f.recovery_points(rig.p)]
            outcomes.append((delay, inside, pid in newest_before, r.bytes_sent))
        killed = [o for o in outcomes if o[1]]
        assert len(killed) >= 3, outcomes
        assert any(o[2] for o in killed), outcomes  # some kills landed after the replica committed
        print(f"FAULTS kill: injected={len(killed)} after-commit={sum(o[2] for o in killed)} survived={len(killed)} lost=0")
        rig.verify()
    finally:
        rig.close()
