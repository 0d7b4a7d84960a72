"""The protection flows on the linux fabric over a real sshd, under a real Prefect server: two linux
hosts on 127.0.0.1 whose agents run this venv's interpreter (`Host.python`), raw disk images on disk.

enable-protection copies and a re-run changes nothing; replicate ships only what changed;
replication-health writes its table and alerts once per VM per breach (an RPO breach made real by
time passing against a small threshold, and a Critical one by lost change tracking); pending_bytes is
the exact count of changed bytes; resynchronize defers or waits outside its window and repairs inside
it; disable-protection keeps or deletes the replica as the policy says.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alerts import observe_alerts, server_events
from sshd import SSHServer

pytest.importorskip("prefect")

from siterecovery.replica.engine import BLOCK, file_digest  # noqa: E402
from siterecovery.testing.disks import make_disk, rewrite_blocks  # noqa: E402

pytestmark = [pytest.mark.sshd, pytest.mark.prefect_server]

MiB = 1024 * 1024
PAIRING = "ny-chi"
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


# ---- the estate ---------------------------------------------------------------------------------


class Estate:
    """A project of two linux hosts on the suite's sshd, its disks, and where the replicas land."""

    def __init__(self, tmp: Path, sshd: SSHServer, vms: dict[str, list[str]]) -> None:
        self.tmp, self.sshd, self.vms = tmp, sshd, vms
        self.project = tmp / "project"
        self.project.mkdir()
        self.root = {"ny": tmp / "root-ny", "chi": tmp / "root-chi"}
        self.disks = {(vm, d): tmp / "disks" / f"{vm}-{d}.img" for vm, ds in vms.items() for d in ds}
        for path in self.disks.values():
            make_disk(path, 4 * MiB)
        self.write_topology()
        self.write_protection()

    def write_topology(self) -> None:
        hosts = [self.sshd.host(name, site, root=str(self.root[site]), python=sys.executable).model_dump(
            mode="json", exclude_none=True) for name, site in (("lx-ny", "ny"), ("lx-chi", "chi"))]
        vms = [{"name": vm, "host": "lx-ny", "cloud": "NY",
                "disks": [{"name": d, "path": str(self.disks[(vm, d)])} for d in ds],
                # The sleeper never writes its disks (the test does, between cycles): nothing to tear.
                "compute": {"backend": "process", "command": SLEEPER, "consistency": "none"}}
               for vm, ds in self.vms.items()]
        doc = {"kind": "Topology", "sites": [{"name": "ny"}, {"name": "chi"}], "hosts": hosts,
               "clouds": [{"name": "NY", "site": "ny", "host_groups": [{"name": "g-ny", "hosts": ["lx-ny"]}]},
                          {"name": "CHI", "site": "chi", "host_groups": [{"name": "g-chi", "hosts": ["lx-chi"]}]}],
               "vms": vms}
        (self.project / "topology.yaml").write_text(json.dumps(doc, indent=1))  # JSON is YAML

    def write_protection(self, **policy: Any) -> None:
        pol = {"name": "lx", "copy_frequency_seconds": 30, "recovery_history_hours": 1,
               "rpo_threshold_seconds": 3600, **policy}
        doc = {"kind": "Protection", "policies": [pol],
               "pairings": [{"name": PAIRING, "protected_cloud": "NY", "protecting_cloud": "CHI", "policy": "lx"}]}
        (self.project / "protection.yaml").write_text(json.dumps(doc, indent=1))

    # where things are
    def replica(self, vm: str, disk: str) -> Path:
        return self.root["chi"] / vm / "replica" / f"{disk}.img"

    def source_manifest(self, vm: str, disk: str) -> Path:
        return self.root["ny"] / vm / "source" / disk / "manifest"

    def in_sync(self, vm: str) -> bool:
        return all(file_digest(str(self.replica(v, d))) == file_digest(str(path))
                   for (v, d), path in self.disks.items() if v == vm)

    def vm_record(self, vm: str) -> dict[str, Any]:
        """The linux fabric's record of the VM (under $SITERECOVERY_STATE)."""
        return dict(json.loads((Path(os.environ["SITERECOVERY_STATE"]) / "linux" / "vms" / f"{vm}.json").read_text()))

    def replica_files(self) -> dict[str, tuple[str, int]]:
        """Every file under the replica host's root: digest and mtime, to prove a run changed nothing."""
        out = {}
        for path in sorted(self.root["chi"].rglob("*")):
            if path.is_file() and not path.name.endswith((".lock", "@lock")):  # locks are not replica data
                out[str(path)] = (file_digest(str(path)), path.stat().st_mtime_ns)
        return out

    # the flows
    def run(self, name: str, **kw: Any) -> Any:
        import flows.protection as fp

        return fp.FLOWS[name](pairing=PAIRING, project=str(self.project), **kw)


@pytest.fixture
def make_estate(sshd_server: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                prefect_harness: None) -> Any:
    monkeypatch.setenv("SITERECOVERY_STATE", str(tmp_path / "state"))

    def make(vms: dict[str, list[str]]) -> Estate:
        return Estate(tmp_path, sshd_server, vms)
    return make


def health(e: Estate, **kw: Any) -> dict[str, Any]:
    return {r.vm: r for r in e.run("replication-health", **kw)}


# ---- enable-protection, replicate, replication-health ------------------------------------------

def test_enable_then_rerun_then_replicate_only_changes(make_estate: Any) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    e = make_estate({"web-01": ["os"], "db-01": ["os", "data"]})

    first = {r.vm: r for r in e.run("enable-protection")}
    assert {vm: r.outcome for vm, r in first.items()} == {"web-01": "protected", "db-01": "protected"}, first
    assert all(r.ready for r in first.values())
    assert e.in_sync("web-01") and e.in_sync("db-01")  # the initial copy landed, block for block
    assert e.vm_record("db-01")["state"] == "Replicating"

    files, records = e.replica_files(), {vm: e.vm_record(vm) for vm in e.vms}
    again = e.run("enable-protection")
    assert {r.outcome for r in again} == {"already protected"}
    assert not any(s.changed for r in again for s in r.steps)
    assert e.replica_files() == files and {vm: e.vm_record(vm) for vm in e.vms} == records

    changed = rewrite_blocks(e.disks[("web-01", "os")], [1, 7, 20, 21, 40])
    assert not e.in_sync("web-01")
    cycles = {r.vm: r for r in e.run("replicate")}
    assert {vm: r.action for vm, r in cycles.items()} == {"web-01": "cycle", "db-01": "cycle"}, cycles
    assert e.in_sync("web-01") and e.in_sync("db-01")
    # Random blocks do not compress: what travelled is the five blocks plus framing, not the disk.
    assert changed <= cycles["web-01"].bytes_sent < changed + 5 * 1024
    assert cycles["db-01"].bytes_sent == 0

    state = e.run("replication-health", return_state=True)
    rows = {r.vm: r for r in state.result()}
    assert {vm: (r.state, r.health) for vm, r in rows.items()} == {
        "web-01": ("Replicating", "Normal"), "db-01": ("Replicating", "Normal")}
    assert rows["web-01"].successful_cycles == 2 and rows["web-01"].pending_bytes == 0
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"replication-health-{PAIRING}"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert len(arts) == 1 and arts[0].type == "table"
    table = {row["vm"]: row for row in json.loads(str(arts[0].data))}
    assert set(table) == {"web-01", "db-01"} and table["db-01"]["pending_mb"] == 0


def test_pending_bytes_are_the_changes_not_yet_replicated(make_estate: Any) -> None:
    e = make_estate({"web-01": ["os", "data"]})
    e.run("enable-protection")
    assert health(e)["web-01"].pending_bytes == 0

    # Changes on two disks, one of them growing the disk by a block: all of it is pending.
    pending = rewrite_blocks(e.disks[("web-01", "os")], [2, 3, 30])
    size = e.disks[("web-01", "data")].stat().st_size
    pending += rewrite_blocks(e.disks[("web-01", "data")], [5, size // BLOCK])
    row = health(e)["web-01"]
    assert row.pending_bytes == pending, row
    assert row.health == "Normal"

    # Rewriting a block with the bytes it already had changes the file's times, not its data.
    disk = e.disks[("web-01", "os")]
    e.run("replicate")
    same = disk.read_bytes()[BLOCK * 9:BLOCK * 10]
    time.sleep(0.05)
    with open(disk, "r+b") as f:
        f.seek(BLOCK * 9)
        f.write(same)
    assert health(e)["web-01"].pending_bytes == 0
    assert e.in_sync("web-01")


def test_rpo_breach_emits_one_event_per_vm_per_breach(make_estate: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    e = make_estate({"web-01": ["os"], "db-01": ["os"]})
    e.run("enable-protection")
    sent = observe_alerts(monkeypatch)

    # Cycles stop and time passes: with a 5 s threshold the RPO breaches by itself.
    e.write_protection(copy_frequency_seconds=5, rpo_threshold_seconds=5)
    deadline = time.monotonic() + 120
    rows = health(e)
    while not all("rpo" in r.breach_reasons() for r in rows.values()):
        assert time.monotonic() < deadline, rows
        time.sleep(1)
        rows = health(e)
    for _ in range(2):
        health(e)
    assert sorted((ev, vm, reasons) for ev, vm, reasons, _ in sent) == [
        ("siterecovery.replication.breached", "db-01", ("rpo",)),
        ("siterecovery.replication.breached", "web-01", ("rpo",))]

    # A cycle clears it: a `recovered` each. (A slow machine may need more than one cycle to get under
    # 5 s, and on a loaded one the RPO can pass 5 s again before the next health run: that is a new
    # breach. What must hold is no flood: per VM, breached and recovered strictly alternate.)
    deadline = time.monotonic() + 180
    while {vm for ev, vm, _, _ in sent if ev.endswith("recovered")} != {"db-01", "web-01"}:
        assert time.monotonic() < deadline, sent
        e.run("replicate")
        health(e)
    health(e)
    for vm in ("db-01", "web-01"):
        seq = [ev.rsplit(".", 1)[1] for ev, v, _, _ in sent if v == vm]
        assert seq[:2] == ["breached", "recovered"], (vm, seq)
        assert all(a != b for a, b in zip(seq, seq[1:], strict=False)), (vm, seq)  # never the same event twice

    got = server_events({s[3] for s in sent})
    assert sorted((ev["event"], ev["resource"]["prefect.resource.id"]) for ev in got) == sorted(
        (ev, f"siterecovery.vm.{vm}") for ev, vm, _, _ in sent)
    breach = next(ev for ev in got if ev["event"].endswith("breached"))
    assert breach["payload"]["rpo_threshold_seconds"] == 5 and breach["payload"]["current_rpo_seconds"] > 5
    related = {r["prefect.resource.role"]: r["prefect.resource.name"] for r in breach["related"]}
    assert related["primary-host"] == "lx-ny" and related["replica-host"] == "lx-chi"


# ---- resynchronize ------------------------------------------------------------------------------

def hhmm(dt: datetime) -> str:
    return dt.strftime("%H:%M")


class FakeClock:
    """Local time, advanced only by sleep()."""

    def __init__(self, start: datetime) -> None:
        self.t = start
        self.slept: list[float] = []

    def now(self) -> datetime:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += timedelta(seconds=seconds)


def test_lost_change_tracking_marks_resync_which_runs_in_its_window(make_estate: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import siterecovery.protection as core

    e = make_estate({"web-01": ["os"], "db-01": ["os"]})
    e.run("enable-protection")
    sent = observe_alerts(monkeypatch)

    # Change tracking breaks: web-01's source manifest is lost, db-01's replica is written behind
    # replication's back. Both are marked for resync (Critical) and alert once.
    for f in e.source_manifest("web-01", "os").parent.glob("manifest*"):
        f.unlink()
    changed = rewrite_blocks(e.disks[("web-01", "os")], [4, 5])
    rewrite_blocks(e.replica("db-01", "os"), [11])
    for _ in range(2):
        rows = health(e)
    for vm in ("web-01", "db-01"):
        assert rows[vm].resync_required and rows[vm].health == "Critical", rows[vm]
    assert sorted((ev, vm, r) for ev, vm, r, _ in sent) == [
        ("siterecovery.replication.breached", "db-01", ("critical",)),
        ("siterecovery.replication.breached", "web-01", ("critical",))]
    assert rows["web-01"].pending_bytes is None  # without a manifest nobody knows what is pending

    # replicate leaves them to resynchronize (it reads whole disks: the off-hours window decides).
    cycles = {r.vm: r for r in e.run("replicate")}
    assert {vm: r.action for vm, r in cycles.items()} == {"web-01": "skipped", "db-01": "skipped"}
    assert "resync required" in cycles["web-01"].note

    now = datetime.now().astimezone()
    # Outside the window, deferred: nothing touched.
    e.write_protection(resync_window=[hhmm(now + timedelta(hours=2)), hhmm(now + timedelta(hours=3))])
    res = e.run("resynchronize", outside_window="defer")
    assert res.status == "deferred" and set(res.candidates) == {"web-01", "db-01"}
    assert res.next_window is not None and res.next_window > now
    assert not e.in_sync("web-01") and not e.in_sync("db-01")

    # Outside the window, waiting (a clock that only moves when slept on): it waits, then repairs.
    clock = FakeClock(now.replace(hour=14, minute=0, second=0, microsecond=0))
    e.write_protection(resync_window=["22:00", "05:00"])
    with monkeypatch.context() as m:
        m.setattr(core, "CLOCK", clock)
        res = e.run("resynchronize", vms=["db-01"])
    assert res.status == "resynchronized" and res.waited_seconds == 8 * 3600 and clock.slept
    assert [s.vm for s in res.steps] == ["db-01"] and e.in_sync("db-01")
    assert res.steps[0].bytes_sent < 2 * BLOCK  # only the block that differed travelled
    del sent[:]

    # Inside the window: runs at once.
    e.write_protection(resync_window=[hhmm(now - timedelta(hours=1)), hhmm(now + timedelta(hours=1))])
    res = e.run("resynchronize")
    assert res.status == "resynchronized" and res.waited_seconds == 0
    assert [s.vm for s in res.steps] == ["web-01"] and e.in_sync("web-01")
    assert changed <= res.steps[0].bytes_sent < changed + 3 * BLOCK  # block compare: differences only
    assert list(e.source_manifest("web-01", "os").parent.glob("manifest*"))  # change tracking is back

    rows = health(e)
    assert {vm: (r.health, r.resync_required) for vm, r in rows.items()} == {
        "web-01": ("Normal", False), "db-01": ("Normal", False)}
    assert sorted((ev, vm) for ev, vm, _, _ in sent) == [
        ("siterecovery.replication.recovered", "db-01"), ("siterecovery.replication.recovered", "web-01")]
    assert e.run("resynchronize").status == "nothing to do"
    # and the next delta cycle works from the rebuilt tracking
    changed = rewrite_blocks(e.disks[("web-01", "os")], [50])
    cycles = {r.vm: r for r in e.run("replicate")}
    assert cycles["web-01"].action == "cycle" and changed <= cycles["web-01"].bytes_sent < changed + 1024
    assert e.in_sync("web-01")


# ---- disable-protection -------------------------------------------------------------------------

def test_disable_keeps_or_deletes_the_replica_per_policy(make_estate: Any) -> None:
    e = make_estate({"web-01": ["os"], "db-01": ["os", "data"]})
    e.run("enable-protection")

    kept = e.run("disable-protection", vms=["web-01"])
    assert [(r.vm, r.changed, r.delete_replica) for r in kept] == [("web-01", True, False)]
    assert e.replica("web-01", "os").exists() and e.in_sync("web-01")  # the replica stays, whole
    assert not (e.root["ny"] / "web-01" / "source").exists()  # change tracking is gone at the source
    again = e.run("disable-protection", vms=["web-01"])
    assert [(r.changed, r.delete_replica) for r in again] == [(False, False)]

    e.write_protection(delete_replica_on_disable=True)
    deleted = e.run("disable-protection", vms=["db-01"])
    assert [(r.vm, r.changed, r.delete_replica) for r in deleted] == [("db-01", True, True)]
    assert not e.replica("db-01", "os").exists() and not e.replica("db-01", "data").exists()
    assert not (e.root["chi"] / "db-01" / "meta").exists()
    assert e.disks[("db-01", "os")].exists()  # the source disks are never touched

    rows = health(e)
    assert {vm: r.state for vm, r in rows.items()} == {"web-01": "Disabled", "db-01": "Disabled"}
    # Protecting again after a disable starts from scratch and lands a full copy.
    back = {r.vm: r for r in e.run("enable-protection")}
    assert {r.outcome for r in back.values()} == {"protected"} and e.in_sync("web-01") and e.in_sync("db-01")
