"""The in-memory fabric: Hyper-V Replica's state machine, idempotency, failure knobs, shared state file."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from siterecovery.errors import (
    ConnectionFailed,
    FabricError,
    InvalidStateError,
    NotFoundError,
    TransientFabricError,
)
from siterecovery.fabric import Fabric, FabricContext, PointChoice, ReplicationState, driver_for, known_kinds
from siterecovery.fabric.memory import MemoryFabric
from siterecovery.model import Direction
from siterecovery.placement import plan_placements
from siterecovery.project import load_project

PLANS = Path(__file__).resolve().parent.parent / "plans"
S = ReplicationState


@pytest.fixture(scope="module")
def placements():  # type: ignore[no-untyped-def]
    project = load_project(PLANS)
    plan = project.plan("three-tier")
    return plan_placements(project, plan), plan_placements(project, plan, Direction.failback)


def protected(fab: MemoryFabric, p) -> None:  # type: ignore[no-untyped-def]
    fab.enable_replication(p)
    fab.start_initial_replication(p)


def test_registry() -> None:
    assert {"memory", "linux", "hyperv"} <= set(known_kinds())
    assert isinstance(driver_for("memory"), Fabric)
    with pytest.raises(Exception, match="unknown fabric kind 'vmware' \\(known: hyperv, linux, memory"):
        driver_for("vmware")


def test_planned_failover_reverse_and_failback(placements) -> None:  # type: ignore[no-untyped-def]
    fwd, back = placements
    p, pb = fwd["web-01"], back["web-01"]
    fab = MemoryFabric()
    protected(fab, p)
    assert fab.prepare_planned_failover(p).state == S.PreparedForFailover
    r = fab.failover(p)
    assert r.changed and r.state == S.FailedOverWaitingCompletion and r.point is not None
    assert fab.commit_failover(p).state == S.FailedOver
    assert fab.reverse_replication(p).state == S.Replicating
    # failback runs the same steps with the placement reversed
    fab.prepare_planned_failover(pb)
    fab.failover(pb)
    fab.commit_failover(pb)
    fab.reverse_replication(pb)
    h = fab.replication_health(p)
    assert (h.primary_host, h.replica_host, h.state) == (p.source.name, p.target.name, S.Replicating)


def test_every_operation_is_idempotent(placements) -> None:  # type: ignore[no-untyped-def]
    p = placements[0]["app-01"]
    fab = MemoryFabric()
    for op in ("enable_replication", "start_initial_replication"):
        assert getattr(fab, op)(p).changed
        assert not getattr(fab, op)(p).changed
    assert fab.test_failover(p).changed and not fab.test_failover(p).changed
    assert fab.start_vm(p, test=True).changed and not fab.start_vm(p, test=True).changed
    assert fab.cleanup_test_failover(p).changed and not fab.cleanup_test_failover(p).changed
    for op in ("prepare_planned_failover", "failover", "apply_network", "start_vm", "commit_failover",
               "reverse_replication"):
        assert getattr(fab, op)(p).changed, op
        assert not getattr(fab, op)(p).changed, op


def test_wrong_state_is_refused_with_a_hint(placements) -> None:  # type: ignore[no-untyped-def]
    p = placements[0]["sql-01"]
    fab = MemoryFabric()
    with pytest.raises(NotFoundError, match="enable protection first"):
        fab.failover(p)
    protected(fab, p)
    with pytest.raises(InvalidStateError) as ei:
        fab.commit_failover(p)
    assert ei.value.vm == "sql-01" and ei.value.error_id == "InvalidState" and ei.value.hint
    with pytest.raises(InvalidStateError, match="not .* -> "):
        fab.failover(placements[1]["sql-01"])  # failback before reversing
    fab.test_failover(p)
    with pytest.raises(InvalidStateError, match="test failover is running"):
        fab.failover(p)


def test_point_choice(placements) -> None:  # type: ignore[no-untyped-def]
    p = placements[0]["sql-02"]
    fab = MemoryFabric()
    fab.seed(p, points=4)
    pts = fab.recovery_points(p)
    assert [x.consistency for x in pts] == ["app", "crash", "crash", "crash"]
    r = fab.test_failover(p, PointChoice(kind="latest_app_consistent"))
    assert r.point == pts[0]
    fab.cleanup_test_failover(p)
    r = fab.failover(p, PointChoice(kind="point_in_time", at=pts[2].created_at))
    assert r.point == pts[2]
    fab.cancel_failover(p)
    with pytest.raises(NotFoundError):
        fab.failover(p, PointChoice(kind="point_in_time", at=pts[0].created_at.replace(year=2000)))


def test_injected_faults_and_unreachable_hosts(placements) -> None:  # type: ignore[no-untyped-def]
    p = placements[0]["web-02"]
    fab = MemoryFabric()
    protected(fab, p)
    fab.inject("failover", p.vm, times=1, transient=True)
    with pytest.raises(TransientFabricError):
        fab.failover(p)
    # a failed call changed nothing and the fault is used up
    assert fab.vm_state(p.vm)["state"] == S.Replicating
    assert fab.failover(p).changed
    fab.set_unreachable(p.target.name)
    with pytest.raises(ConnectionFailed):
        fab.commit_failover(p)
    fab.set_unreachable(p.target.name, down=False)
    fab.inject("commit_failover", "*", times=1)
    with pytest.raises(FabricError) as ei:
        fab.commit_failover(p)
    assert pickle.loads(pickle.dumps(ei.value)).vm == p.vm
    assert [c[1] for c in fab.calls].count("commit_failover") == 2


def test_state_file_is_shared_between_instances(tmp_path: Path, placements) -> None:  # type: ignore[no-untyped-def]
    p = placements[0]["lb-01"]
    ctx = FabricContext(state_dir=tmp_path, options={"state_file": tmp_path / "mem.json"})
    a, b = MemoryFabric(ctx), MemoryFabric(ctx)
    protected(a, p)
    assert b.failover(p).changed
    assert not a.failover(p).changed
    ops = [c[1] for c in MemoryFabric(ctx).all_calls()]
    assert ops == ["enable_replication", "start_initial_replication", "failover", "failover"]


def test_a_disk_on_a_classified_location_places_its_replica_by_that_classification(tmp_path: Path) -> None:
    """sql-02's disk lies on C:\\ClusterStorage\\SourceVolume1 (GOLD's location) with no classification
    of its own: it takes GOLD, whose mapped GOLD_TARGET only hv-chi-01 reaches, so its replica goes there
    (and onto TargetVolume1), not to the least-loaded Chicago host."""
    import shutil

    root = tmp_path / "plans"
    shutil.copytree(PLANS, root)
    shutil.copytree(PLANS.parent / "scripts", tmp_path / "scripts")
    topo = (root / "topology.yaml").read_text()
    old = "disks: [{name: os, path: 'C:\\ClusterStorage\\SourceVolume1\\sql-02\\os.vhdx', classification: GOLD}]"
    assert old in topo
    (root / "topology.yaml").write_text(topo.replace(old, old.replace(", classification: GOLD", "")))
    project = load_project(root)
    p = plan_placements(project, project.plan("three-tier"))["sql-02"]
    assert p.disks[0].classification == "GOLD_TARGET" and p.disks[0].target_location == "C:\\ClusterStorage\\TargetVolume1"
    fab = MemoryFabric(FabricContext(options={"state_file": str(tmp_path / "m.json")}))
    protected(fab, p)
    assert fab.vm_state("sql-02")["replica"] == "hv-chi-01"
