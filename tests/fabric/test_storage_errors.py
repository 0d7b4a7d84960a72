"""Full and read-only filesystems say what happened: the source host's state directory full, the
orchestrator's state directory full (small tmpfs mounts, unmounted at teardown), and a read-only replica
filesystem (a read-only bind mount). Each is a StorageError with the errno's name as its id and the host
and path as attributes, counts as a missed cycle and makes health Critical; a drill from an intact
replica still works on a read-only replica filesystem. Local hosts: the same agent code runs over SSH.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from estate import fabric, local_host, placement
from faultrig import fill, tmpfs

from siterecovery.errors import StorageError
from siterecovery.fabric.base import Health
from siterecovery.fabric.linux import LinuxFabric
from siterecovery.replica.engine import file_digest
from siterecovery.testing.disks import make_disk, rewrite_random

MiB = 1024 * 1024


def _setup(tmp: Path, state: Path, root_a: Path, root_b: Path, **opts: object) -> tuple[LinuxFabric, object, Path]:
    disk = tmp / "src" / "web-01.img"
    make_disk(disk, 8 * MiB, seed=5)
    f = fabric(state, **opts)
    p = placement(local_host("ny-h1", "ny", root_a), local_host("chi-h1", "chi", root_b), disk)
    f.enable_replication(p)
    f.start_initial_replication(p)
    return f, p, disk


def _fails_with_storage(f: LinuxFabric, p: object, code: str, host: str, under: Path) -> StorageError:
    with pytest.raises(StorageError) as ei:
        f.replicate(p)  # type: ignore[arg-type]
    err = ei.value
    assert err.error_id == code and err.host == host, err
    assert err.path and err.path.startswith(str(under)), err.path
    assert f"({code})" in err.message and "torn" not in err.message, err.message
    h = f.replication_health(p)  # type: ignore[arg-type]
    assert h.health == Health.Critical and code in h.details and h.missed_cycles == 1, h
    return err


def test_source_state_directory_full(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs-a", "2m") as fs:
        f, p, disk = _setup(tmp_path, tmp_path / "state", fs, tmp_path / "root-b")
        try:
            written = rewrite_random(disk, 16, random.Random(1))
            filler = fill(fs, 0)
            err = _fails_with_storage(f, p, "ENOSPC", "ny-h1", fs)
            assert "No space left" in err.message
            filler.unlink()
            r = f.replicate(p)  # type: ignore[arg-type]
            assert r.bytes_sent <= written + 256 * 1024 and "resynchronized" not in r.message
            assert f.replication_health(p).health == Health.Normal  # type: ignore[arg-type]
        finally:
            f.close()


def test_orchestrator_state_directory_full(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs-state", "2m") as fs:
        f, p, disk = _setup(tmp_path, fs, tmp_path / "root-a", tmp_path / "root-b")
        try:
            rewrite_random(disk, 16, random.Random(2))
            filler = fill(fs, 0)
            _fails_with_storage(f, p, "ENOSPC", "orchestrator", fs)
            filler.unlink()
            f.replicate(p)  # type: ignore[arg-type]
            assert f.replication_health(p).health == Health.Normal  # type: ignore[arg-type]
        finally:
            f.close()


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path` remounted read-only in place (a bind mount of itself); unmounted at the end."""
    r = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount ({r.stderr.strip() or r.returncode}): needs root")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True, capture_output=True)
        yield
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def test_read_only_replica_filesystem(tmp_path: Path) -> None:
    root_b = tmp_path / "root-b"
    f, p, disk = _setup(tmp_path, tmp_path / "state", tmp_path / "root-a", root_b,
                        test_scratch=str(tmp_path / "scratch"))
    try:
        held = file_digest(str(disk))  # what the replica holds (the initial copy)
        with read_only(root_b):
            h = f.replication_health(p)  # type: ignore[arg-type]  # before: raised
            assert h.health == Health.Critical and "read-only (EROFS)" in h.details and "chi-h1" in h.details, h
            rewrite_random(disk, 8, random.Random(3))
            _fails_with_storage(f, p, "EROFS", "chi-h1", root_b)
            # a drill from the intact replica: its copy goes to the scratch directory
            r = f.test_failover(p)  # type: ignore[arg-type]
            assert r.changed
            copies = list((tmp_path / "scratch").rglob("*.img"))
            assert len(copies) == 1 and file_digest(str(copies[0])) == held, copies
            f.cleanup_test_failover(p)  # type: ignore[arg-type]
            assert not list((tmp_path / "scratch").rglob("*.img"))
        r = f.replicate(p)  # type: ignore[arg-type]  # remounted read-write: cycles land again
        assert r.changed
        assert f.replication_health(p).health == Health.Normal  # type: ignore[arg-type]
    finally:
        f.close()
