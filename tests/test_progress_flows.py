"""Progress of long copies through the protection flows on the linux fabric (real file-backed disks,
local paths) under the session's Prefect test server: the progress artifact per VM reaches 100, the
run log holds throttled lines with bytes and MB/s, the in-process listeners see every step; and the CLI
(`protect`, `resync`) run as a subprocess without a terminal prints plain progress lines and its table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("prefect")

from siterecovery.placement import pairing_placements  # noqa: E402
from siterecovery.progress import ProgressEvent, listening  # noqa: E402
from siterecovery.project import load_project  # noqa: E402
from siterecovery.protection import open_fabric  # noqa: E402
from siterecovery.testing.disks import make_disk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
SIZES = {"os": 24 * MiB, "data": 12 * MiB}  # 36 MiB in all
LINE = re.compile(r"^web-01 (?P<op>[a-z ]+): (?P<done>[\d.]+ MiB) of 36\.0 MiB \((?P<pct>[\d.]+)%\), (?P<rate>[\d.]+) MB/s$")


def linux_project(root: Path) -> Path:
    """Two local hosts, one pairing, one VM with two disks."""
    disks = root / "disks"
    disks.mkdir(parents=True)
    for name, size in SIZES.items():
        make_disk(disks / f"{name}.img", size, every=2)
    proj = root / "project"
    proj.mkdir()
    topology = {
        "kind": "Topology",
        "sites": [{"name": "ny"}, {"name": "chi"}],
        "hosts": [{"name": "ny-h1", "site": "ny", "fabric": "linux", "address": "local", "root": str(root / "ra")},
                  {"name": "chi-h1", "site": "chi", "fabric": "linux", "address": "local", "root": str(root / "rb")}],
        "clouds": [{"name": "c-ny", "site": "ny", "host_groups": [{"name": "g-ny", "hosts": ["ny-h1"]}]},
                   {"name": "c-chi", "site": "chi", "host_groups": [{"name": "g-chi", "hosts": ["chi-h1"]}]}],
        "vms": [{"name": "web-01", "host": "ny-h1", "cloud": "c-ny",
                 "disks": [{"name": n, "path": str(disks / f"{n}.img")} for n in SIZES],
                 "compute": {"backend": "process", "command": [sys.executable, "-c", "import time; time.sleep(600)"],
                             "consistency": "none"}}],  # it never writes its disks
    }
    protection = {"kind": "Protection",
                  "policies": [{"name": "p30", "copy_frequency_seconds": 30, "recovery_history_hours": 1,
                                "initial_replication": {"method": "network"}}],
                  "pairings": [{"name": "lab", "protected_cloud": "c-ny", "protecting_cloud": "c-chi", "policy": "p30"}]}
    (proj / "topology.yaml").write_text(yaml.safe_dump(topology, sort_keys=False))
    (proj / "protection.yaml").write_text(yaml.safe_dump(protection, sort_keys=False))
    return proj


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None) -> Path:
    monkeypatch.setenv("SITERECOVERY_STATE", str(tmp_path / "state"))
    return linux_project(tmp_path)


def run_logs(flow_run_id: Any) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # send what the run logged before reading it back
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return [entry.message for entry in logs]


def progress_artifacts(flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])))
    return {a.key: a for a in arts}


def assert_steps(events: list[ProgressEvent], operation: str) -> None:
    mine = [e for e in events if e.vm == "web-01" and e.operation == operation]
    assert len(mine) >= 3, mine  # 16 MiB steps over 36 MiB: several reports, not just the end
    assert all(e.total == 36 * MiB for e in mine)
    assert [e.done for e in mine] == sorted(e.done for e in mine)
    assert mine[-1].done == 36 * MiB and mine[-1].final


def test_flows_report_progress_as_artifact_and_log_lines(lab: Path) -> None:
    from flows.protection import enable_protection, resynchronize

    seen: list[ProgressEvent] = []
    with listening(seen.append):
        state = enable_protection(pairing="lab", project=str(lab), return_state=True)
    reports = state.result()
    assert [(r.vm, r.outcome) for r in reports] == [("web-01", "protected")]
    assert_steps(seen, "initial replication")

    run_id = state.state_details.flow_run_id
    arts = progress_artifacts(run_id)
    art = arts["progress-initial-replication-web-01"]
    assert art.data == 100 and "36.0 MiB of 36.0 MiB" in (art.description or "")
    lines = [m for m in run_logs(run_id) if m.startswith("web-01 initial replication:")]
    assert lines and all(LINE.match(m) for m in lines), lines
    last = LINE.match(lines[-1])
    assert last is not None and last["pct"] == "100.0" and float(last["rate"]) > 0

    # On demand resynchronization of a replica changed behind replication's back.
    fab = open_fabric("linux", Path(os.environ["SITERECOVERY_STATE"]))
    project = load_project(lab)
    p = pairing_placements(project, project.protection.pairing("lab"))["web-01"]
    fab.mark_resync_required(p)
    fab.close()
    seen.clear()
    with listening(seen.append):
        rstate = resynchronize(pairing="lab", project=str(lab), on_demand=True, return_state=True)
    report = rstate.result()
    assert report.status == "resynchronized" and [s.vm for s in report.steps] == ["web-01"]
    assert_steps(seen, "resynchronize")
    rid = rstate.state_details.flow_run_id
    assert progress_artifacts(rid)["progress-resynchronize-web-01"].data == 100
    assert any(LINE.match(m) and m.startswith("web-01 resynchronize:") for m in run_logs(rid))


def test_cli_without_a_terminal_prints_progress_lines_and_the_table(lab: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONPATH": str(ROOT),
           "SITERECOVERY_PROGRESS_INTERVAL": "0", "COLUMNS": "200"}
    cli = [sys.executable, "-m", "siterecovery"]
    r = subprocess.run([*cli, "protect", "lab", "--project", str(lab)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("web-01 initial replication:")]
    assert len(lines) >= 2 and all(LINE.match(ln) for ln in lines), r.stdout
    assert lines[-1].split(": ", 1)[1].startswith("36.0 MiB of 36.0 MiB (100.0%)")
    assert "Protection of lab" in r.stdout and re.search(r"web-01\s*│\s*protected", r.stdout), r.stdout
    assert "\x1b[" not in r.stdout  # no live bar, no colour codes in a pipe

    replica = lab.parent / "rb" / "web-01" / "replica" / "data.img"
    with open(replica, "r+b") as f:  # the replica changed behind replication's back: it must be resynchronized
        f.seek(5 * MiB)
        f.write(os.urandom(4096))
    r = subprocess.run([*cli, "resync", "lab", "web-01", "--project", str(lab)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("web-01 resynchronize:")]
    assert lines and all(LINE.match(ln) for ln in lines), r.stdout
    assert "(100.0%)" in lines[-1]
    assert "Resynchronization of lab" in r.stdout, r.stdout
    assert re.search(r"web-01\s*│\s*resync required[^│]*│\s*yes\s*│", r.stdout), r.stdout

    # `vm start|stop` run the VM at its current site (the primary here) through the vm-power flow.
    from siterecovery.replica.process import alive

    pidfile = lab.parent / "ra" / "web-01" / "run" / "vm.pid"
    r = subprocess.run([*cli, "vm", "start", "lab", "--project", str(lab)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0 and "web-01: started" in r.stdout, r.stdout + r.stderr
    assert alive(str(pidfile))
    for expect in ("web-01: stopped", "web-01: already off (nothing to do)"):
        r = subprocess.run([*cli, "vm", "stop", "lab", "web-01", "--project", str(lab)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
        assert r.returncode == 0 and expect in r.stdout, r.stdout + r.stderr
    assert not alive(str(pidfile))
