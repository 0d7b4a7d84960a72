"""The subjects of the fabric contract: one protected VM on each fabric, the same placement shape, and a
way to make new recovery points. memory: the memory fabric with a state file; linux: the linux fabric
over the real sshd; hyperv: the Hyper-V driver on the simulator behind a real SSH server (the simulator
keeps its own state machine, built from Microsoft's documentation, independent of fabric.states)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from estate import fabric as linux_fabric
from estate import placement as linux_placement
from hvhelpers import placement as hv_placement

from siterecovery.fabric import FabricContext
from siterecovery.fabric.base import Placement
from siterecovery.fabric.hyperv import HyperVFabric
from siterecovery.fabric.memory import MemoryFabric
from siterecovery.model import Host, ReplicationPolicy
from siterecovery.testing.disks import make_disk, scribble

FABRICS = ["memory", "linux", "hyperv"]


@dataclass
class Subject:
    kind: str
    fabric: Any
    p: Placement
    new_points: Callable[[int], None]  # the source writes and `n` cycles reach the replica


@pytest.fixture(params=FABRICS)
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    kind = request.param
    if kind == "memory":
        a, b = (Host(name=n, site=s, fabric="memory", address="127.0.0.1") for n, s in (("m-a", "a"), ("m-b", "b")))
        fab: Any = MemoryFabric(FabricContext(options={"state_file": str(tmp_path / "memory-fabric.json")}))
        p = Placement(vm="web-01", pairing="p", source=a, target=b,
                      policy=ReplicationPolicy(name="p", copy_frequency_seconds=300, recovery_history_hours=4))

        def points(n: int) -> None:
            for _ in range(n):
                fab.replicate(p)
    elif kind == "linux":
        sshd = request.getfixturevalue("sshd_server")
        a = sshd.host("ny-h1", "ny", root=str(tmp_path / "root-a"))
        b = sshd.host("chi-h1", "chi", root=str(tmp_path / "root-b"))
        disk = tmp_path / "src" / "web-01.img"
        make_disk(disk, 2 << 20, seed=3)
        fab = linux_fabric(tmp_path / "state", ssh_timeout=30)
        p = linux_placement(a, b, disk, events=tmp_path / "events.log")

        def points(n: int) -> None:
            for _ in range(n):
                scribble(disk)
                fab.replicate(p)
    else:
        sim = request.getfixturevalue("sim")
        hosts = request.getfixturevalue("hosts")
        sim.add_vm("hv-a", "web-01")
        fab = HyperVFabric(FabricContext(options={"timeout": 20}))
        p = hv_placement(hosts)

        def points(n: int) -> None:  # Hyper-V Replica replicates by itself: the host's cycles
            sim.replicate("hv-a", "web-01", cycles=n)
    try:
        yield Subject(kind, fab, p, points)
    finally:
        fab.close()


def protected(s: Subject, points: int = 2) -> None:
    s.fabric.enable_replication(s.p)
    s.fabric.start_initial_replication(s.p)
    s.new_points(points)
