"""The fabric contract: one Protocol every driver satisfies, and the frozen results it returns.

The operation vocabulary is the source documents' (enable replication, initial replication, test /
planned / unplanned failover, commit, cancel, reverse). Every operation is idempotent: asking for a
state the VM is already in returns `changed=False` and says so, which is what makes re-running a
half-failed plan safe. Drivers translate their own failures into siterecovery.errors at their edge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import Field

from ..mapping import DiskPlacement, NICPlacement
from ..model import Compute, Direction, Host, ReplicationPolicy
from ..model.common import Frozen


def utcnow() -> datetime:
    return datetime.now(UTC)


class ReplicationState(StrEnum):
    """Hyper-V's VMReplicationState names, used as the project's vocabulary for every fabric."""

    Disabled = "Disabled"
    ReadyForInitialReplication = "ReadyForInitialReplication"
    InitialReplicationInProgress = "InitialReplicationInProgress"
    WaitingForInitialReplication = "WaitingForInitialReplication"
    Replicating = "Replicating"
    PreparedForFailover = "PreparedForFailover"
    FailedOverWaitingCompletion = "FailedOverWaitingCompletion"
    FailedOver = "FailedOver"
    Suspended = "Suspended"
    Error = "Error"
    WaitingForStartResynchronize = "WaitingForStartResynchronize"
    Resynchronizing = "Resynchronizing"
    ResynchronizeSuspended = "ResynchronizeSuspended"
    RecoveryInProgress = "RecoveryInProgress"
    FailbackInProgress = "FailbackInProgress"
    FailbackComplete = "FailbackComplete"
    WaitingForUpdateCompletion = "WaitingForUpdateCompletion"
    UpdateError = "UpdateError"
    WaitingForRepurposeCompletion = "WaitingForRepurposeCompletion"
    PreparedForSyncReplication = "PreparedForSyncReplication"
    PreparedForGroupReverseReplication = "PreparedForGroupReverseReplication"
    FiredrillInProgress = "FiredrillInProgress"


class Health(StrEnum):
    NotApplicable = "NotApplicable"
    Normal = "Normal"
    Warning = "Warning"
    Critical = "Critical"


class ReplicationMode(StrEnum):
    None_ = "None"
    Primary = "Primary"
    Replica = "Replica"
    TestReplica = "TestReplica"
    ExtendedReplica = "ExtendedReplica"


class RecoveryPoint(Frozen):
    id: str
    vm: str
    created_at: datetime
    consistency: Literal["crash", "app"] = "crash"
    size_bytes: int | None = None
    group: str | None = None  # the group point this point is the VM's part of (siterecovery.groups)


PointKind = Literal["latest", "latest_processed", "latest_app_consistent", "point_in_time"]


class _Point(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def consistency(self) -> Literal["crash", "app"]: ...


P = TypeVar("P", bound=_Point)


class PointChoice(Frozen):
    """Which recovery point a failover uses.

    latest: everything the replica has received, pending data processed first (lowest RPO);
    latest_processed: the newest point already processed (lowest RTO); latest_app_consistent;
    point_in_time: the newest point at or before `at`.
    """

    kind: PointKind = "latest"
    at: datetime | None = None
    id: str | None = Field(None, description="exactly this point (a member's part of a chosen group point); "
                                             "None if the VM does not hold it any more")

    def describe(self) -> str:
        return f"point {self.id}" if self.id else self.kind + (f" at {self.at.isoformat()}" if self.at else "")

    def choose(self, points: Sequence[P]) -> P | None:
        if self.id is not None:
            return next((p for p in points if p.id == self.id), None)
        ordered = sorted(points, key=lambda p: p.created_at)
        if self.kind == "latest_app_consistent":
            ordered = [p for p in ordered if p.consistency == "app"]
        elif self.kind == "point_in_time":
            if self.at is None:
                return None
            at = self.at if self.at.tzinfo else self.at.replace(tzinfo=UTC)
            ordered = [p for p in ordered if p.created_at <= at]
        return ordered[-1] if ordered else None


LATEST = PointChoice()


class Placement(Frozen):
    """Everything a driver needs to act on one VM in one direction, resolved from the project."""

    vm: str
    pairing: str
    direction: Direction = Direction.forward
    source: Host = Field(..., description="the host the VM runs on now (primary of replication)")
    target: Host = Field(..., description="the host holding the replica (where it fails over to)")
    policy: ReplicationPolicy
    disks: tuple[DiskPlacement, ...] = ()
    nics: tuple[NICPlacement, ...] = ()
    compute: Compute | None = None
    quiesce: tuple[str, ...] = ()
    test_network: str | None = Field(None, description="switch/bridge of the isolated test network at the target")
    extended: Host | None = Field(None, description="hyperv: the third host the replica extends to (A -> B -> C)")
    extended_frequency_seconds: int = 300
    memory_mb: int | None = None
    vcpus: int | None = None


class OpResult(Frozen):
    vm: str
    operation: str
    changed: bool = Field(..., description="False: already in the asked-for state, nothing was done")
    state: ReplicationState
    message: str = ""
    host: str | None = None
    point: RecoveryPoint | None = None
    bytes_sent: int = 0
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime = Field(default_factory=utcnow)
    details: dict[str, str | int | float | bool | None] = Field(default_factory=dict)


class ReplicationHealth(Frozen):
    vm: str
    state: ReplicationState
    health: Health
    mode: ReplicationMode = ReplicationMode.Primary
    primary_host: str | None = None
    replica_host: str | None = None
    last_replication_time: datetime | None = None
    pending_bytes: int | None = Field(0, description="changes not yet replicated; None when unknown")
    successful_cycles: int = 0
    missed_cycles: int = 0
    current_rpo_seconds: float | None = None
    resync_required: bool = False
    test_failover_active: bool = False
    details: str = ""


Progress = Callable[[int, int], None]
"""progress(done_bytes, total_bytes) for long copies; total may be 0 when unknown."""

Side = Literal["source", "target"]
Consistency = Literal["crash", "app"]


@runtime_checkable
class Fabric(Protocol):
    """What every fabric driver offers. Synchronous, idempotent, errors from siterecovery.errors."""

    kind: str

    # protection
    def enable_replication(self, p: Placement) -> OpResult: ...
    def start_initial_replication(self, p: Placement, progress: Progress | None = None) -> OpResult: ...
    def replicate(self, p: Placement, consistency: Consistency = "crash", progress: Progress | None = None) -> OpResult: ...
    def resynchronize(self, p: Placement, progress: Progress | None = None) -> OpResult: ...
    def suspend(self, p: Placement) -> OpResult: ...
    def resume(self, p: Placement) -> OpResult: ...
    def disable_replication(self, p: Placement, delete_replica: bool = False) -> OpResult: ...
    def replication_health(self, p: Placement) -> ReplicationHealth: ...
    def recovery_points(self, p: Placement) -> tuple[RecoveryPoint, ...]: ...

    # failover
    def test_failover(self, p: Placement, point: PointChoice = LATEST, network: str | None = None) -> OpResult: ...
    def cleanup_test_failover(self, p: Placement) -> OpResult: ...
    def prepare_planned_failover(self, p: Placement) -> OpResult: ...
    def failover(self, p: Placement, point: PointChoice = LATEST) -> OpResult: ...
    def commit_failover(self, p: Placement) -> OpResult: ...
    def cancel_failover(self, p: Placement) -> OpResult: ...
    def reverse_replication(self, p: Placement) -> OpResult: ...
    def start_vm(self, p: Placement, side: Side = "target", test: bool = False) -> OpResult: ...
    def stop_vm(self, p: Placement, side: Side = "source") -> OpResult: ...
    def apply_network(self, p: Placement) -> OpResult: ...

    def close(self) -> None: ...


def result(p: Placement, operation: str, changed: bool, state: ReplicationState, message: str = "",
           started_at: datetime | None = None, **kw: Any) -> OpResult:
    """Shorthand for drivers: an OpResult for placement `p`, timed from `started_at`."""
    host = kw.pop("host", None) or (p.source.name if operation in ("prepare_planned_failover",) else p.target.name)
    return OpResult(vm=p.vm, operation=operation, changed=changed, state=state, message=message, host=host,
                    started_at=started_at or utcnow(), finished_at=utcnow(), **kw)
