"""Benchmark: Prefect on SQLite against Prefect on PostgreSQL, same run, same machine: one 1,000-VM plan,
then ten 100-VM plans at once (test failover, memory fabric, zero latency). Each plan runs in its own
process against a real `prefect server start` (as a worker would start it), so the server and its
database carry ten clients' writes at once.

    PYTHONPATH=. .venv/bin/python -m bench.scale [--vms 1000] [--plans 10] [--per-plan 100] [--db sqlite,postgres]

Prints per database: server start, wall time and per-VM time of each shape, failed runs, and the
`database is locked` / HTTP 5xx lines in the server's and clients' logs. Figures go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
REPO = Path(__file__).resolve().parents[1]

FLOW = """
import json, sys
from flows.recovery_plan import PlanFailed, recovery_plan
try:
    out = recovery_plan(plan=sys.argv[2], project=sys.argv[1], failover_type="test", confirm=sys.argv[2],
                        fabric_options={"state_file": None}, host_limit=16, site_limit=64)
except PlanFailed as exc:
    out = exc.summary
print("SUMMARY " + json.dumps(out, default=str), flush=True)
"""
# The flow's in-process memory estate has to be seeded in the same process: wrap the flow call.
SEEDED = """
import sys
from pathlib import Path
from siterecovery.testing.projects import seed_memory
from tasks.fabric import get_fabric
drv = get_fabric("memory", Path(sys.argv[3]), {"state_file": None})
seed_memory(Path(sys.argv[1]), sys.argv[2], None, fabric=drv)
""" + FLOW

BAD = ("database is locked", " 503 ", " 500 ", "HTTP 5", "status_code=5")


def _plan(name: str, vms: int, groups: int = 10) -> dict[str, object]:
    per = max(1, vms // groups)
    return {"name": name, "groups": [{"name": f"g{g:02d}", "vms": [f"{name}-{g:02d}-{i:04d}" for i in range(per)]}
                                     for g in range(groups)]}


def _run(server_env: dict[str, str], jobs: list[tuple[Path, str]], logs: Path) -> tuple[float, int]:
    """Start one flow process per (project, plan) at once; wall time until all end, failed count."""
    t0 = time.perf_counter()
    procs = []
    for i, (root, plan) in enumerate(jobs):
        state = logs / f"state-{plan}-{i}"
        env = server_env | {"PYTHONPATH": str(REPO), "SITERECOVERY_STATE": str(state),
                            "PREFECT_LOGGING_LEVEL": "WARNING"}
        with open(logs / f"{plan}-{i}.log", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", SEEDED, str(root), plan, str(state)], env=env,
                                          stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO))
    failed = 0
    for p in procs:
        out, _ = p.communicate(timeout=3600)
        line = next((x for x in out.splitlines() if x.startswith("SUMMARY ")), None)
        if line is None or json.loads(line[8:])["status"] != "succeeded":
            failed += 1
    return time.perf_counter() - t0, failed


def _bad_lines(d: Path) -> int:
    return sum(1 for f in d.rglob("*.log") for line in f.read_text(errors="replace").splitlines()
               if any(b in line for b in BAD))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--plans", type=int, default=10)
    ap.add_argument("--per-plan", type=int, default=100)
    ap.add_argument("--db", default="sqlite,postgres")
    a = ap.parse_args()

    from siterecovery.testing import postgres
    from siterecovery.testing.prefect_server import PrefectServer, free_port
    from siterecovery.testing.projects import memory_project

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    big = memory_project(tmp / "big", [_plan("big", a.vms)], source_hosts=10, target_hosts=10)
    small = memory_project(tmp / "small", [_plan(f"p{i}", a.per_plan) for i in range(a.plans)],
                           source_hosts=10, target_hosts=10)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    for db in a.db.split(","):
        logs = tmp / db
        logs.mkdir()
        with ExitStack() as stack:
            url = None
            if db == "postgres":
                url = stack.enter_context(postgres.scratch_cluster()).url
            server = PrefectServer(logs / "home", free_port(), database_url=url)
            t0 = time.perf_counter()
            server.start(timeout=600, log=logs / "server.log")
            stack.callback(server.stop)
            started = time.perf_counter() - t0
            env = server.env()
            one, f1 = _run(env, [(big, "big")], logs)
            ten, f10 = _run(env, [(small, f"p{i}") for i in range(a.plans)], logs)
        n10 = a.plans * a.per_plan
        print(f"{db}: server start {started:.1f} s | one {a.vms}-VM plan {one:.1f} s "
              f"({one / a.vms * 1000:.0f} ms/VM), failed {f1} | {a.plans} x {a.per_plan}-VM plans at once "
              f"{ten:.1f} s ({ten / n10 * 1000:.0f} ms/VM), failed {f10} | "
              f"'database is locked'/5xx log lines: {_bad_lines(logs)}", flush=True)


if __name__ == "__main__":
    main()
