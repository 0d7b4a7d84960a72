"""Placements and a LinuxFabric over real files (and a real sshd) for the linux fabric tests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from siterecovery.fabric import FabricContext
from siterecovery.fabric.base import Placement
from siterecovery.fabric.linux import LinuxFabric
from siterecovery.mapping import DiskPlacement, NICPlacement
from siterecovery.model import Compute, Direction, Host, ReplicationPolicy

# A "VM" that prints its arguments and sleeps: enough to check argv rendering, logs, pid files and stop.
SLEEPER = [sys.executable, "-c", "import sys, time; print('vm up', sys.argv[1:], flush=True); time.sleep(600)",
           "{{ network }}", "{{ disk }}"]
APPEND = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + chr(10))"


def local_host(name: str, site: str, root: Path) -> Host:
    return Host(name=name, site=site, fabric="linux", address="local", root=str(root))


def fabric(state: Path, **opts: Any) -> LinuxFabric:
    return LinuxFabric(FabricContext(state_dir=state, options={"python": sys.executable, "stop_grace": 2, **opts}))


def placement(a: Host, b: Host, disk: Path, events: Path | None = None, compute: Compute | None = None,
              policy: ReplicationPolicy | None = None, test_network: str | None = "isolated",
              direction: Direction = Direction.forward) -> Placement:
    if compute is None and events is not None:
        compute = Compute(backend="process", command=tuple(SLEEPER),
                          freeze=(sys.executable, "-c", APPEND, str(events), "freeze"),
                          thaw=(sys.executable, "-c", APPEND, str(events), "thaw"))
    return Placement(
        vm="web-01", pairing="ny-chi", direction=direction, source=a, target=b,
        policy=policy or ReplicationPolicy(name="p", copy_frequency_seconds=30, recovery_history_hours=4,
                                           app_consistent_frequency_hours=1),
        disks=(DiskPlacement(disk="os", source_path=str(disk), target_location=None, classification=None),),
        nics=(NICPlacement(nic="eth0", source_network="prod-ny", target_network="prod-chi", target_subnet=None, ip=None),),
        compute=compute,
        quiesce=(sys.executable, "-c", APPEND, str(events), "quiesce") if events else (),
        test_network=test_network,
    )


def reverse(p: Placement) -> Placement:
    return p.model_copy(update={"source": p.target, "target": p.source, "direction": Direction.failback})
