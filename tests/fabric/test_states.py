"""The VM replication state machine the memory and linux fabrics share (siterecovery.fabric.states): every
documented transition is allowed and lands where the documentation says, a sample of forbidden ones is
refused with an error naming the VM, its state and the operation, and the record store loses no update
when two processes update VMs at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from siterecovery.errors import InvalidStateError, NotFoundError
from siterecovery.fabric.base import Placement, ReplicationState
from siterecovery.fabric.states import TRANSITIONS, FileRecords, VMRecord, begin, codec, finish, working
from siterecovery.model import Host, ReplicationPolicy

S = ReplicationState
A = Host(name="h-a", site="a", fabric="memory", address="127.0.0.1")
B = Host(name="h-b", site="b", fabric="memory", address="127.0.0.1")
P = Placement(vm="web-01", pairing="p", source=A, target=B,
              policy=ReplicationPolicy(name="p", copy_frequency_seconds=300, recovery_history_hours=4))

# (operation, from, to): the transitions docs/DESIGN.md and the source documents describe (to None: the
# replication state does not change, e.g. a drill).
DOCUMENTED = [
    ("enable_replication", S.Disabled, S.ReadyForInitialReplication),
    ("start_initial_replication", S.ReadyForInitialReplication, S.Replicating),
    ("start_initial_replication", S.InitialReplicationInProgress, S.Replicating),  # an interrupted copy, again
    ("replicate", S.Replicating, S.Replicating),
    ("resynchronize", S.Replicating, S.Replicating),
    ("resynchronize", S.WaitingForStartResynchronize, S.Replicating),
    ("resynchronize", S.Suspended, S.Replicating),
    ("resynchronize", S.Error, S.Replicating),
    ("mark_resync_required", S.Replicating, S.WaitingForStartResynchronize),
    ("suspend", S.Replicating, S.Suspended),
    ("suspend", S.Resynchronizing, S.Suspended),
    ("suspend", S.InitialReplicationInProgress, S.Suspended),
    ("resume", S.Suspended, S.Replicating),
    ("resume", S.Error, S.Replicating),
    ("resume", S.WaitingForStartResynchronize, S.Replicating),
    ("disable_replication", S.Replicating, S.Disabled),
    ("disable_replication", S.FailedOver, S.Disabled),
    ("test_failover", S.Replicating, None),
    ("test_failover", S.Suspended, None),
    ("prepare_planned_failover", S.Replicating, S.PreparedForFailover),
    ("failover", S.Replicating, S.FailedOverWaitingCompletion),  # unplanned
    ("failover", S.PreparedForFailover, S.FailedOverWaitingCompletion),  # planned
    ("failover", S.Suspended, S.FailedOverWaitingCompletion),
    ("commit_failover", S.FailedOverWaitingCompletion, S.FailedOver),
    ("cancel_failover", S.FailedOverWaitingCompletion, S.Replicating),
    ("cancel_failover", S.PreparedForFailover, S.Replicating),
    ("reverse_replication", S.FailedOver, S.Replicating),
    ("reverse_replication", S.FailedOverWaitingCompletion, S.Replicating),
]

# (operation, state): already there, a no-op that says so (what makes re-running a half-failed plan safe).
ALREADY = [
    ("enable_replication", S.Replicating), ("start_initial_replication", S.Replicating),
    ("suspend", S.Suspended), ("resume", S.Replicating),
    ("prepare_planned_failover", S.PreparedForFailover), ("prepare_planned_failover", S.FailedOverWaitingCompletion),
    ("prepare_planned_failover", S.FailedOver),
    ("failover", S.FailedOverWaitingCompletion), ("failover", S.FailedOver),
    ("commit_failover", S.FailedOver), ("cancel_failover", S.Replicating),
]

FORBIDDEN = [
    ("start_initial_replication", S.FailedOver),
    ("replicate", S.ReadyForInitialReplication),
    ("replicate", S.Suspended),
    ("replicate", S.FailedOverWaitingCompletion),
    ("resynchronize", S.FailedOver),
    ("suspend", S.FailedOver),
    ("resume", S.FailedOver),
    ("test_failover", S.ReadyForInitialReplication),
    ("test_failover", S.FailedOver),
    ("prepare_planned_failover", S.Suspended),
    ("failover", S.ReadyForInitialReplication),
    ("commit_failover", S.Replicating),
    ("commit_failover", S.PreparedForFailover),
    ("cancel_failover", S.FailedOver),
    ("reverse_replication", S.Replicating),
    ("reverse_replication", S.PreparedForFailover),
]


def record(state: S) -> VMRecord:
    return VMRecord(primary=A.name, replica=B.name, state=state.value)


@pytest.mark.parametrize(("operation", "start", "end"), DOCUMENTED, ids=lambda x: str(x))
def test_documented_transitions_are_allowed(operation: str, start: S, end: S | None) -> None:
    rec = record(start)
    assert begin(rec, P, operation) is True
    working(rec, operation)
    assert finish(rec, operation) == (end or start)


def test_the_table_holds_exactly_the_documented_transitions() -> None:
    documented: dict[str, set[S]] = {}
    for op, start, _ in DOCUMENTED:
        documented.setdefault(op, set()).add(start)
    for op, t in TRANSITIONS.items():
        if t.allowed:  # an empty tuple: any state (cleanup of a drill, marking for resync)
            assert set(t.allowed) == documented.get(op, set()), op
    assert set(documented) <= set(TRANSITIONS)


@pytest.mark.parametrize(("operation", "state"), ALREADY, ids=lambda x: str(x))
def test_an_operation_already_done_is_a_no_op(operation: str, state: S) -> None:
    rec = record(state)
    assert begin(rec, P, operation) is False
    assert rec.state == state.value and TRANSITIONS[operation].said


@pytest.mark.parametrize(("operation", "state"), FORBIDDEN, ids=lambda x: str(x))
def test_forbidden_transitions_are_refused_naming_vm_state_and_operation(operation: str, state: S) -> None:
    rec = record(state)
    with pytest.raises(InvalidStateError) as exc:
        begin(rec, P, operation)
    e = exc.value
    assert e.vm == "web-01" and e.operation == operation
    assert f"state {state.value} does not allow {operation}" in e.message
    assert rec.state == state.value  # a refusal changes nothing


def test_drills_failovers_direction_and_missing_records() -> None:
    drill = record(S.Replicating)
    drill.test_active = True
    assert begin(drill, P, "test_failover") is False  # already running
    with pytest.raises(InvalidStateError, match="a test failover is running"):
        begin(drill, P, "failover")
    assert begin(drill, P, "cleanup_test_failover") is True
    assert begin(record(S.Replicating), P, "cleanup_test_failover") is False
    back = P.model_copy(update={"source": B, "target": A})
    assert begin(record(S.Replicating), back, "reverse_replication") is False  # already reversed
    with pytest.raises(InvalidStateError, match="replication runs h-a -> h-b, not h-b -> h-a"):
        begin(record(S.Replicating), back, "suspend")
    with pytest.raises(NotFoundError, match="replication is not enabled"):
        begin(None, P, "failover")
    assert begin(None, P, "enable_replication") is True
    assert begin(None, P, "disable_replication") is False


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from siterecovery.fabric.states import FileRecords, VMRecord, codec
    directory, own, n, go = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    store = FileRecords(directory, *codec(VMRecord), wait=60)
    while not go.exists():
        time.sleep(0.01)
    for _ in range(n):
        for name in (own, "shared"):
            with store.open(name, "count") as box:
                rec = box[0]
                assert rec is not None
                rec.cycles_ok += 1
""")


def test_two_processes_updating_vms_at_once_lose_no_update(tmp_path: Path) -> None:
    store = FileRecords(tmp_path / "vms", *codec(VMRecord))
    for name in ("vm-a", "vm-b", "shared"):
        with store.open(name, "create") as box:
            box[0] = VMRecord(primary="h-a", replica="h-b")
    go, n = tmp_path / "go", 150
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "vms"), name, str(n), str(go)])
                for name in ("vm-a", "vm-b")]
    go.touch()
    assert [c.wait(timeout=120) for c in children] == [0, 0]
    counts = {name: store.read(name).cycles_ok for name in ("vm-a", "vm-b", "shared")}  # type: ignore[union-attr]
    assert counts == {"vm-a": n, "vm-b": n, "shared": 2 * n}
    assert sorted(p.name for p in (tmp_path / "vms").iterdir() if p.suffix == ".tmp") == []
