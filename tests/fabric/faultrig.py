"""One VM replicated by the linux fabric over the real sshd, with the checks every fault test makes:
no stray agents, a replica that is exactly a recovery point (verified with the engine's own status and
point rebuild), and a recovery cycle that ships only what changed. Shared by the fault and soak tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from estate import fabric, placement

from siterecovery.fabric.base import OpResult, Placement
from siterecovery.fabric.linux import LinuxFabric
from siterecovery.model import Host
from siterecovery.replica.engine import Replica, file_digest
from siterecovery.testing.disks import make_disk

MiB = 1024 * 1024


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({r.stderr.strip() or r.returncode}): needs root")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(fs: Path, leave: int) -> Path:
    """A filler file that leaves `leave` bytes free on `fs`."""
    st = os.statvfs(fs)
    filler = fs / "filler"
    free = st.f_bavail * st.f_frsize
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if free > leave:
            os.posix_fallocate(fd, 0, free - leave)
    finally:
        os.close(fd)
    return filler


def agents(marker: str) -> list[tuple[int, str]]:
    """Live engine agents (and the shells running them) whose command line names `marker`."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{d}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if "siterecovery.replica.agent" in cmd and marker in cmd:
            out.append((int(d), cmd[:200]))
    return out


def wait_no_agents(marker: str, timeout: float = 60) -> list[tuple[int, str]]:
    end = time.monotonic() + timeout
    while True:
        left = agents(marker)
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.1)


@dataclass
class Rig:
    """A source disk at host `a`, its replica at host `b` (either may sit behind a CutProxy)."""

    tmp: Path
    a: Host
    b: Host
    size: int = 16 * MiB
    vm: str = "web-01"
    f: LinuxFabric = field(init=False)
    p: Placement = field(init=False)
    disk: Path = field(init=False)
    known: dict[str, str] = field(default_factory=dict)  # point id -> source digest it must hold
    data_bytes: int = 0

    def __post_init__(self) -> None:
        self.disk = self.tmp / "src" / f"{self.vm}.img"
        self.data_bytes = make_disk(self.disk, self.size, seed=1)
        self.f = fabric(self.tmp / "state", ssh_timeout=30)
        self.p = placement(self.a, self.b, self.disk).model_copy(update={"vm": self.vm})

    @property
    def replica(self) -> Path:
        return Path(self.f.host_root(self.b)) / self.vm / "replica" / "os.img"

    @property
    def meta(self) -> Path:
        return Path(self.f.host_root(self.b)) / self.vm / "meta" / "os"

    def next_id(self) -> str:
        """The id the next cycle's point will carry (the fabric numbers points per VM)."""
        vms = self.tmp / "state" / "linux" / "vms"
        seq = json.loads((vms / f"{self.vm}.json").read_text())["seq"]
        marker = vms / f"{self.vm}.cycle"  # a cycle whose process was killed: its id is not reused
        if marker.exists():
            seq = max(seq, json.loads(marker.read_text())["seq"])
        return f"{self.vm}@{seq + 1}"

    def start(self) -> OpResult:
        self.f.enable_replication(self.p)
        pid = self.next_id()
        r = self.f.start_initial_replication(self.p)
        self.known[pid] = file_digest(str(self.disk))
        return r

    def cycle(self) -> OpResult:
        pid, dig = self.next_id(), file_digest(str(self.disk))
        # Recorded before the call: a cycle that fails at the orchestrator may still have committed.
        self.known[pid] = dig
        return self.f.replicate(self.p)

    def leftovers(self) -> list[str]:
        """Files a half-done cycle leaves in the replica's metadata (staging, journal, temporaries)."""
        out = [e.name for e in os.scandir(self.meta) if e.name.startswith(("staging", "journal"))
               or e.name.endswith(".tmp") or e.name == "manifest.new"]
        out += [e.name for e in os.scandir(self.meta / "undo") if not e.name.endswith(".undo")]
        src = Path(self.f.host_root(self.a)) / self.vm / "source" / "os"
        out += [e.name for e in os.scandir(src) if e.name.endswith(".tmp") or e.name == "view.img"]
        return out

    def verify(self, clean: bool = True, rebuild: int = 1 << 30) -> dict[str, int]:
        """The replica is exactly its newest point, the `rebuild` points before it rebuild to what the
        source held then, and (`clean`: after a good cycle) no half-done cycle left files behind."""
        if clean:
            assert not self.leftovers(), self.leftovers()
        rep = Replica(str(self.replica), str(self.meta))
        st = rep.status()  # runs the engine's recovery first, as every agent command does
        assert st["initialized"] and st["disk_matches"], st
        pts = st["points"]
        assert pts, "no recovery point left"
        newest = max(pts, key=lambda x: x["seq"])
        assert file_digest(str(self.replica)) == self.known[newest["id"]], f"replica is not point {newest['id']}"
        ids = [x["id"] for x in pts]
        assert len(ids) == len(set(ids)), f"duplicate recovery point ids: {ids}"
        checked = 0
        for pt in sorted(pts, key=lambda x: x["seq"])[-1 - rebuild:-1]:
            dest = self.tmp / "rebuild.img"
            rep.rebuild(pt["seq"], str(dest))
            assert file_digest(str(dest)) == self.known[pt["id"]], f"point {pt['id']} does not rebuild"
            dest.unlink()
            checked += 1
        return {"points": len(pts), "rebuilt": checked}

    def close(self) -> None:
        self.f.close()
