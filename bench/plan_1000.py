"""Benchmark: a generated plan of 1,000 VMs in 10 groups, test failover on the memory fabric with zero
latency, through the recovery-plan flow; against a plain Python loop calling the same driver.

    PYTHONPATH=. .venv/bin/python -m bench.plan_1000 [--vms 1000] [--groups 10] [--type test]

Prints total time, orchestration overhead per VM (flow minus loop, divided by VMs) and peak memory
(ru_maxrss of this process, which also runs the flow's tasks). Figures go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--groups", type=int, default=10)
    ap.add_argument("--type", default="test", choices=["test", "planned", "unplanned"])
    a = ap.parse_args()

    from siterecovery.compile import compile_plan
    from siterecovery.fabric import FabricContext
    from siterecovery.fabric.memory import MemoryFabric
    from siterecovery.model import FailoverType
    from siterecovery.placement import plan_placements
    from siterecovery.project import load_project
    from siterecovery.testing.projects import memory_project, seed_memory

    tmp = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    per = a.vms // a.groups
    plan = {"name": "big", "groups": [{"name": f"g{g:02d}", "vms": [f"vm-{g:02d}-{i:04d}" for i in range(per)]}
                                      for g in range(a.groups)]}
    root = memory_project(tmp / "project", [plan], source_hosts=10, target_hosts=10)
    project = load_project(root)
    ftype = FailoverType(a.type)
    compiled = compile_plan(project, project.plan("big"), ftype)
    placements = plan_placements(project, project.plan("big"))

    # Baseline: the same driver calls in a plain loop, batch by batch.
    fab = seed_memory(root, "big", None)
    t0 = time.perf_counter()
    for batch in (*compiled.batches, *compiled.cleanup):
        for s in batch.steps:
            p = placements[s.vm or ""]
            if s.operation == "test_failover":
                fab.test_failover(p, compiled.point, p.test_network)
            elif s.operation == "failover":
                fab.failover(p, compiled.point)
            elif s.operation == "start_vm":
                fab.start_vm(p, side=s.side or "target", test=s.test)
            elif s.operation == "stop_vm":
                fab.stop_vm(p, side=s.side or "source")
            else:
                getattr(fab, s.operation)(p)
    loop = time.perf_counter() - t0

    from prefect.testing.utilities import prefect_test_harness

    from flows.recovery_plan import recovery_plan
    from tasks.fabric import get_fabric

    os.environ["SITERECOVERY_STATE"] = str(tmp / "state")
    with prefect_test_harness(server_startup_timeout=90):
        # The flow's driver (in-process estate: no state file) seeded the same way.
        drv = get_fabric("memory", tmp / "state", {"state_file": None})
        assert isinstance(drv, MemoryFabric)
        seed_memory(root, "big", None, fabric=drv)
        t0 = time.perf_counter()
        summary = recovery_plan(plan="big", project=str(root), failover_type=ftype, confirm="big",
                                fabric_options={"state_file": None}, host_limit=16, site_limit=64)
        total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps = sum(len(b.steps) for b in (*compiled.batches, *compiled.cleanup))
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"plan: {a.vms} VMs in {a.groups} groups, {a.type} failover, {steps} steps; status {summary['status']}")
    print(f"plain loop: {loop:.2f} s ({loop / a.vms * 1000:.2f} ms/VM)")
    print(f"flow total: {total:.2f} s; overhead {(total - loop) / a.vms * 1000:.1f} ms/VM")
    print(f"peak memory (ru_maxrss): {peak:.0f} MiB")
    assert isinstance(MemoryFabric(FabricContext()), MemoryFabric)


if __name__ == "__main__":
    main()
