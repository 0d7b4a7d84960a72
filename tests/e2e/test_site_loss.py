"""Lose the primary site in the middle of a replication cycle, then fail over through the Prefect API.

Three network namespaces on this machine are three sites: primary and recovery, each a linux host with
its own sshd and its own Prefect worker (queue site-<site>, as `deployments render` assigns), and an
orchestration site holding PostgreSQL and the Prefect API server. Replication runs primary -> recovery
(on the primary's worker). While a cycle is shipping (the primary's link throttled so it takes a while),
the primary namespace is cut: link down, every process in it killed. An unplanned failover to the
latest point, triggered through the API, must then run on the recovery site's worker, complete, bring
each VM up on the recovery host from the last complete cycle (nothing of the interrupted one), and its
report must say which VMs lost how much.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import netns
import pytest
from sshd import SSHD, running_sshd

from siterecovery import ui
from siterecovery.deployments import Settings, dump, render
from siterecovery.project import load_project
from siterecovery.replica.engine import BLOCK, file_digest
from siterecovery.testing import postgres
from siterecovery.testing.disks import make_disk, rewrite_blocks
from siterecovery.testing.prefect_server import PrefectServer, free_port

pytestmark = [pytest.mark.sshd, pytest.mark.prefect_server, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
VMS = ("db-01", "web-01")
POOL = "site-loss"
SLEEPER = [sys.executable, "-c", "import time; time.sleep(900)"]


def _need() -> None:
    why = netns.unavailable() or postgres.available()
    if why:
        pytest.skip(why)
    if not os.path.exists(SSHD):
        pytest.skip(f"{SSHD} is missing (install openssh-server: scripts/setup-system.sh)")


def write_project(root: Path, tmp: Path, hosts: dict[str, dict[str, Any]]) -> dict[str, Path]:
    root.mkdir(parents=True)
    disks = {vm: tmp / "disks" / f"{vm}.img" for vm in VMS}
    for path in disks.values():
        make_disk(path, 8 * MiB, every=1)
    topo = {"kind": "Topology", "sites": [{"name": "primary"}, {"name": "recovery"}],
            "hosts": list(hosts.values()),
            "clouds": [{"name": "primary-cloud", "site": "primary", "host_groups": [{"name": "p", "hosts": ["lx-primary"]}]},
                       {"name": "recovery-cloud", "site": "recovery",
                        "host_groups": [{"name": "r", "hosts": ["lx-recovery"]}]}],
            "vms": [{"name": vm, "host": "lx-primary", "cloud": "primary-cloud",
                     "disks": [{"name": "os", "path": str(disks[vm])}],
                     "compute": {"backend": "process", "command": SLEEPER,
                                 "consistency": "none"}} for vm in VMS]}  # the test writes the disks, not the VM
    prot = {"kind": "Protection",
            "policies": [{"name": "lx", "copy_frequency_seconds": 30, "recovery_history_hours": 1,
                          "rpo_threshold_seconds": 3600}],
            "pairings": [{"name": "pri-rec", "protected_cloud": "primary-cloud", "protecting_cloud": "recovery-cloud",
                          "policy": "lx"}]}
    plan = {"kind": "RecoveryPlan", "name": "shop", "source": "primary-cloud", "target": "recovery-cloud",
            "groups": [{"name": "db", "vms": ["db-01"]}, {"name": "web", "vms": ["web-01"]}]}
    for name, doc in (("topology", topo), ("protection", prot), ("shop", plan)):
        (root / f"{name}.yaml").write_text(json.dumps(doc, indent=1))  # JSON is YAML
    return disks


@contextmanager
def _api(server: PrefectServer) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
        yield client


def trigger(server: PrefectServer, deployment: str, params: dict[str, Any]) -> Any:
    with _api(server) as client:
        dep = client.read_deployment_by_name(deployment)
        return client.create_flow_run_from_deployment(dep.id, parameters=params).id


def wait_for(server: PrefectServer, run_id: Any, states: set[str], timeout: float, logs: Path) -> Any:
    deadline = time.monotonic() + timeout
    with _api(server) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state and run.state.type.value in states:
                return run
            time.sleep(1)
    tails = "\n".join(f"---- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.log")))
    raise AssertionError(f"run {run_id} not in {states} after {timeout:.0f} s (now {run.state}):\n{tails}")


def test_primary_lost_mid_cycle_then_unplanned_failover_on_the_recovery_worker(tmp_path: Path) -> None:
    _need()
    logs = tmp_path / "logs"
    logs.mkdir()
    state = tmp_path / "state"
    with ExitStack() as stack:
        sites = netns.Sites()
        stack.callback(sites.close)
        addr = {s: sites.add(s) for s in ("primary", "recovery", "orchestration")}
        wrap = {s: sites.wrap(s) for s in addr}
        ssh = {s: stack.enter_context(running_sshd(addr[s], sites.ns[s])) for s in ("primary", "recovery")}
        hosts = {s: ssh[s].host(f"lx-{s}", s, root=str(tmp_path / f"root-{s}"), python=sys.executable).model_dump(
            mode="json", exclude_none=True) for s in ssh}
        project = tmp_path / "project"
        disks = write_project(project, tmp_path, hosts)

        # The orchestration site: PostgreSQL and the Prefect API, reached by the workers at its address.
        pgdir = postgres.reachable_tmpdir("siterecovery-siteloss-")
        stack.callback(shutil.rmtree, pgdir, True)
        cluster = postgres.PostgresCluster(pgdir / "postgres", wrap=tuple(wrap["orchestration"]))
        stack.callback(cluster.stop)
        cluster.start()
        server = PrefectServer(tmp_path / "prefect-home", free_port(), database_url=cluster.url,
                               host=addr["orchestration"], wrap=tuple(wrap["orchestration"]))
        stack.callback(server.stop)
        server.start(timeout=300, log=logs / "server.log")

        # Deploy as `make ui` does, from the repository root; schedules off: the test drives the cycles.
        doc = render(load_project(project), Settings(work_pool=POOL, project=str(project)))
        keep = {"enable_protection", "replicate", "failover"}
        doc["deployments"] = [{**d, "schedules": []} for d in doc["deployments"]
                              if d["entrypoint"].rsplit(":", 1)[1] in keep]
        queues = {d["entrypoint"].rsplit(":", 1)[1]: d["work_pool"]["work_queue_name"] for d in doc["deployments"]}
        assert queues == {"enable_protection": "site-primary", "replicate": "site-primary",
                          "failover": "site-recovery"}
        prefect_file = tmp_path / "prefect.yaml"
        prefect_file.write_text(dump(doc, "project", "test"))
        env = server.env() | {"PYTHONPATH": str(REPO), "SITERECOVERY_STATE": str(state),
                              "PREFECT_LOGGING_LEVEL": "INFO"}
        exe = ui.prefect_exe()
        ui._run([exe, "--no-prompt", "work-pool", "create", POOL, "--type", "process", "--overwrite"], env, REPO, "pool")
        ui._run([exe, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)], env, REPO, "deploy")

        # A worker at each site, inside the site's namespace.
        for site in ("primary", "recovery"):
            with open(logs / f"worker-{site}.log", "wb") as log:
                worker = subprocess.Popen([*wrap[site], exe, "worker", "start", "--pool", POOL, "--type", "process",
                                           "--work-queue", f"site-{site}", "--name", f"worker-{site}"],
                                          env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
            stack.callback(_stop, worker)

        run = trigger(server, "enable-protection/pri-rec", {"pairing": "pri-rec", "project": str(project)})
        wait_for(server, run, {"COMPLETED"}, 300, logs)
        for path in disks.values():
            rewrite_blocks(path, range(0, 16))
        run = trigger(server, "replicate/pri-rec", {"pairing": "pri-rec", "project": str(project)})
        done = wait_for(server, run, {"COMPLETED"}, 300, logs)
        assert done.work_queue_name == "site-primary"
        last_complete = {vm: file_digest(str(path)) for vm, path in disks.items()}
        point_taken = time.time()

        # The next cycle carries 4 MiB per VM through a 2 Mbit/s link: about 30 s in flight.
        sites.throttle("primary", "2mbit")
        for path in disks.values():
            rewrite_blocks(path, range(16, 16 + 4 * MiB // BLOCK))
        run = trigger(server, "replicate/pri-rec", {"pairing": "pri-rec", "project": str(project)})
        wait_for(server, run, {"RUNNING"}, 300, logs)
        time.sleep(5)
        with _api(server) as client:
            assert client.read_flow_run(run).state.type.value == "RUNNING", "the cycle ended before the cut"
        sites.cut("primary")
        assert sites.pids("primary") == []
        cut_at = time.time()

        failover = trigger(server, "failover/shop", {"plan": "shop", "failover_type": "unplanned", "confirm": "shop",
                                                     "requested_by": "site-loss test", "recovery_point": "latest",
                                                     "advanced": {"project": str(project)}})
        done = wait_for(server, failover, {"COMPLETED", "FAILED", "CRASHED"}, 420, logs)
        assert done.state.type.value == "COMPLETED", done.state
        assert done.work_queue_name == "site-recovery"

        # Each VM runs at the recovery site from the last complete cycle: nothing of the interrupted one.
        for vm in VMS:
            record = json.loads((state / "linux" / "vms" / f"{vm}.json").read_text())
            assert record["state"] == "FailedOver", record
            replica = tmp_path / "root-recovery" / vm / "replica" / "os.img"
            assert file_digest(str(replica)) == last_complete[vm], vm

        # The report says which VMs lost how much: each VM's recovery point and its age.
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with _api(server) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[failover])))
        report = next(str(a.data) for a in arts if a.key == "failover-shop")
        ages = {}
        for vm in VMS:
            rows = [m for line in report.splitlines() if line.startswith("|") and f" {vm} " in line
                    for m in [AGE.search(line)] if m]
            assert rows, f"no recovery point for {vm} in the report:\n{report}"
            ages[vm] = float(rows[0].group(1)) * UNIT[rows[0].group(2)]
        # Each point predates the cut: at least the time from that point to the cut was lost.
        for vm, age in ages.items():
            assert age >= cut_at - point_taken - 1, (vm, age, report)


AGE = re.compile(r"\| [^|]+ \((\d+(?:\.\d+)?) (s|min|h)\) \|")
UNIT = {"s": 1.0, "min": 60.0, "h": 3600.0}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
