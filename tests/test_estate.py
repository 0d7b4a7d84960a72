"""One estate per project (issue 13.1). The state directory is resolved from the project by one function,
whatever the current directory, and an estate records the project it belongs to.

The end-to-end test is the data-loss scenario that was reproduced: protect from one directory, keep
replicating from another, read status from a third, fail over from a fourth. Before, each directory got
its own `.siterecovery` (and, on the linux fabric, its own replicas under it), and the failover booted
the replica that had missed the later cycles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from siterecovery.estate import ESTATE_FILE, EstateError, home, open_estate, state_dir
from siterecovery.testing.disks import make_disk

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("SITERECOVERY_STATE", raising=False)
    p = tmp_path / "checkout" / "plans"
    p.mkdir(parents=True)
    return p


def test_the_state_directory_follows_the_project_not_the_current_directory(project: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    seen = set()
    for cwd, arg in ((tmp_path, project), (project, Path(".")), (project.parent, Path("plans")),
                     (project, project / "topology.yaml")):
        monkeypatch.chdir(cwd)
        seen.add(state_dir(arg))
    assert seen == {project.parent / ".siterecovery"}


def test_an_estate_records_its_project_and_refuses_another(project: Path, tmp_path: Path) -> None:
    state = open_estate(project)
    rec = json.loads((state / ESTATE_FILE).read_text())
    assert rec["project_root"] == str(project) and len(rec["estate_id"]) == 32
    assert open_estate(project) == state and json.loads((state / ESTATE_FILE).read_text()) == rec  # stable id
    other = tmp_path / "other" / "plans"
    other.mkdir(parents=True)
    with pytest.raises(EstateError, match=f"belongs to the project at {project}"):
        open_estate(other, explicit=state)


def test_a_second_estate_for_a_project_is_refused(project: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    first = open_estate(project)
    monkeypatch.setenv("SITERECOVERY_STATE", str(tmp_path / "elsewhere"))
    with pytest.raises(EstateError, match="already has its estate in .*second estate"):
        open_estate(project)
    assert not (tmp_path / "elsewhere").exists()  # refused before anything was written
    monkeypatch.setenv("SITERECOVERY_STATE", str(first))
    assert open_estate(project) == first


def test_an_estate_made_elsewhere_is_found_without_the_variable(project: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SITERECOVERY_STATE", str(tmp_path / "srv-state"))
    made = open_estate(project)
    monkeypatch.delenv("SITERECOVERY_STATE")
    assert state_dir(project) == made == open_estate(project)
    with pytest.raises(EstateError, match="already has its estate in"):
        open_estate(project, explicit=home(project))  # the home itself would be a second estate
    # Once that estate is gone, a new one may be made (a stale pointer blocks nothing).
    (made / ESTATE_FILE).unlink()
    assert open_estate(project, explicit=tmp_path / "new") == tmp_path / "new"


def test_reading_never_creates_an_estate(project: Path) -> None:
    state = open_estate(project, create=False)
    assert not state.exists()


# ---- the reproduced data loss, end to end -------------------------------------------------------------

def _lab(base: Path) -> Path:
    """Two local linux hosts WITHOUT a root: their replicas live under the estate, as by default."""
    disks = base / "disks"
    disks.mkdir(parents=True)
    make_disk(disks / "os.img", 4 * MiB, every=2)
    proj = base / "checkout" / "plans"
    proj.mkdir(parents=True)
    topology = {
        "kind": "Topology",
        "sites": [{"name": "ny"}, {"name": "chi"}],
        "hosts": [{"name": "ny-h1", "site": "ny", "fabric": "linux", "address": "local"},
                  {"name": "chi-h1", "site": "chi", "fabric": "linux", "address": "local"}],
        "clouds": [{"name": "c-ny", "site": "ny", "host_groups": [{"name": "g-ny", "hosts": ["ny-h1"]}]},
                   {"name": "c-chi", "site": "chi", "host_groups": [{"name": "g-chi", "hosts": ["chi-h1"]}]}],
        "vms": [{"name": "web-01", "host": "ny-h1", "cloud": "c-ny",
                 "disks": [{"name": "os", "path": str(disks / "os.img")}],
                 "compute": {"backend": "process", "command": [sys.executable, "-c", "import time; time.sleep(600)"],
                             "consistency": "none"}}],  # the test writes the disk itself, between cycles
    }
    protection = {"kind": "Protection",
                  "policies": [{"name": "p30", "copy_frequency_seconds": 30, "recovery_history_hours": 1}],
                  "pairings": [{"name": "lab", "protected_cloud": "c-ny", "protecting_cloud": "c-chi", "policy": "p30"}]}
    plan = {"kind": "RecoveryPlan", "name": "web", "source": "c-ny", "target": "c-chi",
            "groups": [{"name": "web", "vms": ["web-01"]}]}
    for name, doc in (("topology", topology), ("protection", protection), ("web", plan)):
        (proj / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return proj


@pytest.mark.prefect_server
@pytest.mark.timeout(900)  # four CLI processes, each importing prefect: slow on a loaded machine
def test_commands_from_four_directories_share_one_estate_and_fail_over_to_the_newest_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None) -> None:
    from prefect.settings import PREFECT_API_URL

    monkeypatch.delenv("SITERECOVERY_STATE", raising=False)
    proj = _lab(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "SITERECOVERY_STATE"}
    # No PYTHONPATH: the installed CLI finds flows/ and tasks/ (installed with the package) from any directory.
    env.pop("PYTHONPATH", None)
    env.update({"PREFECT_API_URL": str(PREFECT_API_URL.value()), "COLUMNS": "200"})
    dirs = {n: tmp_path / n for n in ("ops-a", "ops-b", "ops-c")}
    for d in dirs.values():
        d.mkdir()

    def sh(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
                           stdin=subprocess.DEVNULL, check=False)
        assert r.returncode == 0, f"{args} in {cwd}:\n{r.stdout}\n{r.stderr}"
        return r

    cli = [sys.executable, "-m", "siterecovery"]
    sh([*cli, "protect", "lab", "--project", str(proj)], dirs["ops-a"])
    newest = b"written after the initial copy and replicated by the second operator"
    with open(tmp_path / "disks" / "os.img", "r+b") as f:
        f.seek(MiB)
        f.write(newest)
    rel = os.path.relpath(proj, dirs["ops-b"])
    sh([sys.executable, "-m", "flows.protection", "replicate", "lab", "--project", rel], dirs["ops-b"])
    rows = json.loads(sh([*cli, "status", "lab", "--json", "--project", "."], proj).stdout)
    assert [(r["vm"], r["state"], r["health"]) for r in rows] == [("web-01", "Replicating", "Normal")], rows
    sh([*cli, "run", "web", "--type", "unplanned", "--confirm", "web", "--project", str(proj)], dirs["ops-c"])

    estates = sorted(p.parent for p in tmp_path.rglob(ESTATE_FILE))
    assert estates == [proj.parent / ".siterecovery"], estates
    assert not any((d / ".siterecovery").exists() for d in dirs.values())
    replicas = [p for p in (proj.parent / ".siterecovery" / "linux" / "sites" / "chi").rglob("os*")
                if p.is_file() and p.stat().st_size == 4 * MiB]
    assert replicas, "no replica disk at the recovery site"
    for disk in replicas:  # what the failed-over VM runs on holds the newest replicated write
        with open(disk, "rb") as f:
            f.seek(MiB)
            assert f.read(len(newest)) == newest, disk
