"""Generated projects on the in-memory fabric, for flow tests, the benchmark and demos.

`memory_project` writes a topology of two sites (hosts `src-N` and `dst-N`), one pairing and the
given plans into a directory, and `seed_memory` puts every VM of a plan straight into Replicating on
the memory fabric's shared state file, so a failover can run at once.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from ..fabric import FabricContext
from ..fabric.memory import MemoryFabric
from ..model import Direction
from ..placement import plan_placements
from ..project import load_project


def copy_project(src: Path, into: Path) -> Path:
    """A copy of the project `src` (and the `scripts/` beside it, which plans reference as ../scripts)
    under `into`. A test that gives a project its own state directory uses a copy: one project has one
    estate (siterecovery.estate), so the checkout's plans/ cannot serve many tests' estates."""
    dst = into / src.name
    shutil.copytree(src, dst)
    if (src.parent / "scripts").is_dir() and not (into / "scripts").exists():
        shutil.copytree(src.parent / "scripts", into / "scripts")
    return dst


def memory_project(root: Path, plans: list[dict[str, Any]], vms: list[str] | None = None, source_hosts: int = 2,
                   target_hosts: int = 2) -> Path:
    """Write the project into `root` and return it. `vms` defaults to every VM the plans name."""
    root.mkdir(parents=True, exist_ok=True)
    if vms is None:
        seen: dict[str, None] = {}
        for plan in plans:
            for g in plan["groups"]:
                for v in g["vms"]:
                    seen[v if isinstance(v, str) else v["name"]] = None
        vms = list(seen)
    src = [f"src-{i}" for i in range(1, source_hosts + 1)]
    dst = [f"dst-{i}" for i in range(1, target_hosts + 1)]
    topology = {
        "kind": "Topology",
        "sites": [{"name": "site-a"}, {"name": "site-b"}],
        "hosts": [{"name": h, "site": "site-a" if h.startswith("src") else "site-b", "fabric": "memory",
                   "address": "127.0.0.1"} for h in src + dst],
        "clouds": [{"name": "Prod", "site": "site-a", "host_groups": [{"name": "a", "hosts": src}]},
                   {"name": "Recovery", "site": "site-b", "host_groups": [{"name": "b", "hosts": dst}]}],
        "vms": [{"name": v, "host": src[i % len(src)], "cloud": "Prod"} for i, v in enumerate(vms)],
    }
    protection = {"kind": "Protection", "policies": [{"name": "p5", "copy_frequency_seconds": 300}],
                  "pairings": [{"name": "prod", "protected_cloud": "Prod", "protecting_cloud": "Recovery",
                                "policy": "p5"}]}
    (root / "topology.yaml").write_text(yaml.safe_dump(topology, sort_keys=False))
    (root / "protection.yaml").write_text(yaml.safe_dump(protection, sort_keys=False))
    for plan in plans:
        doc = {"kind": "RecoveryPlan", "source": "Prod", "target": "Recovery", **plan}
        (root / f"{plan['name']}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root


def seed_memory(project_dir: Path, plan: str, state_file: Path | None, points: int = 3,
                fabric: MemoryFabric | None = None) -> MemoryFabric:
    """Every VM of `plan` replicating forward with `points` recovery points (oldest app-consistent)."""
    project = load_project(project_dir)
    opts = {"state_file": str(state_file)} if state_file else {}
    fab = fabric or MemoryFabric(FabricContext(options=opts))
    for p in plan_placements(project, project.plan(plan), Direction.forward).values():
        fab.seed(p, points=points)
    return fab
