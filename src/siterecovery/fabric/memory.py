"""The in-memory fabric: Hyper-V Replica's state machine without hosts, for dry runs, flow tests and
benchmarks (like httpx's MockTransport).

It runs the state machine the linux fabric runs (fabric.states), records every call, and has knobs for
latency and failure injection. With `context.options["state_file"]` its estate (VM records, calls, faults)
is one record of the state machine's locked file store, so several processes (a flow run, a re-run, a
test asserting afterwards) see one estate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ..errors import ConnectionFailed, FabricError, InvalidStateError, NotFoundError, TransientFabricError
from ..paths import check_ident
from . import FabricContext
from .base import (
    LATEST,
    Consistency,
    Health,
    OpResult,
    Placement,
    PointChoice,
    Progress,
    RecoveryPoint,
    ReplicationHealth,
    ReplicationMode,
    ReplicationState,
    Side,
    result,
    utcnow,
)
from .states import TRANSITIONS, FileRecords, MappingRecords, VMRecord, begin, codec, finish, need

S = ReplicationState


@dataclass
class _VM(VMRecord):
    """The memory fabric's VM record: the state machine's record and its recovery points."""

    points: list[dict[str, Any]] = field(default_factory=list)
    needs_resync_after_reverse: bool = False  # unused; kept so older estates load


def _estate(raw: dict[str, Any] | None) -> dict[str, Any]:
    st = dict(raw or {})
    for key, empty in (("vms", {}), ("faults", {}), ("unreachable", []), ("calls", [])):
        st.setdefault(key, empty)
    return st


class MemoryFabric:
    kind = "memory"

    def __init__(self, context: FabricContext | None = None) -> None:
        self.context = context or FabricContext()
        opts = self.context.options
        self.latency: dict[str, float] = dict(opts.get("latency", {}))  # operation -> seconds ("*" for all)
        self.state_file: Path | None = Path(opts["state_file"]) if opts.get("state_file") else None
        self._estate: FileRecords[dict[str, Any]] | None = None
        if self.state_file is not None:
            self._estate = FileRecords(self.state_file.parent, _estate, dict, suffix=self.state_file.suffix,
                                       wait=float(opts.get("vm_lock_wait", 300)),
                                       what=lambda name: f"the memory fabric's estate {name}")
        self._lock = threading.RLock()
        self.calls: list[tuple[float, str, str, str]] = []  # (time, operation, vm, host)
        # Without a state file the estate is this dict, in the same shape as the file's JSON:
        # vms: name -> _VM as a dict; faults: "operation|vm or *" -> [remaining count, kind, message].
        # Kept as is between calls (no conversion per call): a 1,000-VM plan stays linear.
        self._mem: dict[str, Any] = {"vms": {}, "faults": {}, "unreachable": sorted(opts.get("unreachable", ())),
                                     "calls": []}

    # ---- knobs -------------------------------------------------------------------------------
    def inject(self, operation: str, vm: str = "*", times: int = 1, transient: bool = False, message: str = "") -> None:
        """Make the next `times` calls of `operation` on `vm` fail."""
        with self._state() as st:
            st["faults"][f"{operation}|{vm}"] = [times, "transient" if transient else "fatal", message]

    def set_unreachable(self, host: str, down: bool = True) -> None:
        with self._state() as st:
            hosts = set(st["unreachable"])
            (hosts.add if down else hosts.discard)(host)
            st["unreachable"] = sorted(hosts)

    def seed(self, p: Placement, points: int = 3, every: timedelta = timedelta(minutes=5)) -> None:
        """Put a VM straight into Replicating with `points` recovery points (for flow tests)."""
        with self._state() as st, self._records(st).open(p.vm, "seed") as box:
            vm = _VM(primary=p.source.name, replica=p.target.name, state=S.Replicating.value, running=[p.source.name])
            now = utcnow()
            for i in range(points):
                vm.seq += 1
                vm.points.append(_point(p.vm, vm.seq, now - every * (points - 1 - i), "app" if i == 0 else "crash"))
            vm.last_replication = now.isoformat()
            vm.cycles_ok = points
            box[0] = vm

    def vm_state(self, vm: str) -> dict[str, Any]:
        with self._state() as st:
            return dict(st["vms"][vm])

    # ---- state plumbing ---------------------------------------------------------------------
    @contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        """The estate as a dict, saved when the block ends, even when it fails: a failed operation
        changes no VM (its record is saved only on success, _records) but still records its call and
        uses up its injected fault."""
        with self._lock:
            if self._estate is None or self.state_file is None:
                st = self._mem
                st["calls"] = []
                try:
                    yield st
                finally:
                    self.calls.extend(tuple(c) for c in st["calls"])  # type: ignore[misc]
                    st["calls"] = []
                return
            with self._estate.open(self.state_file.stem, "memory fabric") as box:
                st = box[0] = _estate(box[0])
                before = len(st["calls"])
                try:
                    yield st
                finally:
                    self.calls.extend(tuple(c) for c in st["calls"][before:])  # type: ignore[misc]

    @staticmethod
    def _records(st: dict[str, Any]) -> MappingRecords[_VM]:
        """The estate's VM records. Kept as dicts between calls (converted only for the one VM a call
        touches): a 1,000-VM plan stays linear."""
        return MappingRecords(st["vms"], *codec(_VM))

    def all_calls(self) -> list[tuple[float, str, str, str]]:
        """Every call recorded (from the state file when there is one, so other processes' calls count)."""
        if self.state_file is None:
            return list(self.calls)
        with self._state() as st:
            return [tuple(c) for c in st["calls"]]  # type: ignore[misc]

    @contextmanager
    def _op(self, operation: str, p: Placement, host: str) -> Iterator[tuple[dict[str, Any], list[_VM | None]]]:
        delay = self.latency.get(operation, self.latency.get("*", 0.0))
        if delay:
            time.sleep(delay)
        with self._state() as st:
            st["calls"].append((time.time(), operation, p.vm, host))
            if host in st["unreachable"]:
                raise ConnectionFailed("host is unreachable", vm=p.vm, host=host, operation=operation,
                                       hint="check the host and the network, then re-run the plan")
            for key in (f"{operation}|{p.vm}", f"{operation}|*"):
                fault = st["faults"].get(key)
                if fault and fault[0] > 0:
                    fault[0] -= 1
                    cls = TransientFabricError if fault[1] == "transient" else FabricError
                    raise cls(fault[2] or f"injected failure of {operation}", vm=p.vm, host=host, operation=operation,
                              hint="this failure was injected by a test", error_id="Injected")
            # Records are keyed by name, not by path, but the rule is the same on every fabric: a
            # name the linux fabric would refuse (`./web-01`, `../x`) is refused here too.
            check_ident(p.vm, "VM name")
            with self._records(st).open(p.vm, operation) as box:
                yield st, box

    @staticmethod
    def _either_way(vm: _VM | None, p: Placement, operation: str) -> _VM:
        """The VM of a placement's pair of hosts, whichever way replication runs between them now (a VM's
        networks belong to a host, not to a direction)."""
        if vm is not None and vm.primary == p.target.name and vm.replica == p.source.name:
            return vm
        return need(vm, p, operation)

    # ---- protection -------------------------------------------------------------------------
    def enable_replication(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("enable_replication", p, p.source.name) as (_, box):
            vm = box[0]
            if vm is not None and not begin(vm, p, "enable_replication"):
                return result(p, "enable_replication", False, S(vm.state), TRANSITIONS["enable_replication"].said, t0,
                              host=p.source.name)
            box[0] = new = _VM(primary=p.source.name, replica=p.target.name, running=[p.source.name])
            return result(p, "enable_replication", True, finish(new, "enable_replication"), "replication enabled", t0,
                          host=p.source.name)

    def _add_point(self, vm: _VM, name: str, consistency: str = "crash", when: datetime | None = None,
                   group: str | None = None) -> dict[str, Any]:
        vm.seq += 1
        pt = _point(name, vm.seq, when or utcnow(), consistency)
        if group is not None:
            pt["group"] = group
        vm.points.append(pt)
        vm.last_replication = pt["created_at"]
        vm.cycles_ok += 1
        return pt

    def start_initial_replication(self, p: Placement, progress: Progress | None = None) -> OpResult:
        t0 = utcnow()
        with self._op("start_initial_replication", p, p.source.name) as (_, box):
            vm = need(box[0], p, "start_initial_replication")
            if not begin(vm, p, "start_initial_replication"):
                return result(p, "start_initial_replication", False, S(vm.state),
                              TRANSITIONS["start_initial_replication"].said, t0)
            total = sum(d.source_path.__len__() for d in p.disks) or 1
            if progress:
                progress(total, total)
            pt = self._add_point(vm, p.vm)
            return result(p, "start_initial_replication", True, finish(vm, "start_initial_replication"),
                          "initial copy complete", t0,
                          point=_rp(pt))

    def replicate(self, p: Placement, consistency: Consistency = "crash", progress: Progress | None = None) -> OpResult:
        t0 = utcnow()
        with self._op("replicate", p, p.source.name) as (_, box):
            vm = need(box[0], p, "replicate", *TRANSITIONS["replicate"].allowed)
            pt = self._add_point(vm, p.vm, consistency)
            return result(p, "replicate", True, S.Replicating, "delta cycle complete", t0, point=_rp(pt))

    def replicate_group(self, ps: list[Placement], group: str, consistency: Consistency = "crash",
                        progress: Progress | None = None) -> list[OpResult]:
        """One cycle of a consistency group: every member's part of one group point, captured at one instant.
        Each part commits on its own, as on the linux fabric: a member that fails leaves the group point
        incomplete (siterecovery.groups never offers it)."""
        t0 = utcnow()
        with self._state() as st:
            seq = int(st.setdefault("groups", {}).get(group, 0)) + 1
            st["groups"][group] = seq
        gid = f"{group}@{seq}"
        out = []
        for p in ps:
            with self._op("replicate", p, p.source.name) as (_, box):
                vm = need(box[0], p, "replicate", *TRANSITIONS["replicate"].allowed)
                pt = self._add_point(vm, p.vm, consistency, when=t0, group=gid)
                out.append(result(p, "replicate", True, S.Replicating, f"part of group point {gid}", t0, point=_rp(pt)))
        return out

    def resynchronize(self, p: Placement, progress: Progress | None = None) -> OpResult:
        t0 = utcnow()
        with self._op("resynchronize", p, p.source.name) as (_, box):
            vm = need(box[0], p, "resynchronize")
            begin(vm, p, "resynchronize")
            if not vm.resync_required and vm.state == S.Replicating.value:
                return result(p, "resynchronize", False, S.Replicating, TRANSITIONS["resynchronize"].said, t0)
            vm.resync_required = False
            pt = self._add_point(vm, p.vm)
            return result(p, "resynchronize", True, finish(vm, "resynchronize"), "resynchronized", t0, point=_rp(pt))

    def mark_resync_required(self, p: Placement) -> None:
        with self._state() as st, self._records(st).open(p.vm, "mark_resync_required") as box:
            vm = need(box[0], p, "mark_resync_required")
            begin(vm, p, "mark_resync_required")
            vm.resync_required = True
            finish(vm, "mark_resync_required")

    def suspend(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("suspend", p, p.source.name) as (_, box):
            vm = need(box[0], p, "suspend")
            if not begin(vm, p, "suspend"):
                return result(p, "suspend", False, S(vm.state), TRANSITIONS["suspend"].said, t0)
            return result(p, "suspend", True, finish(vm, "suspend"), "replication suspended", t0)

    def resume(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("resume", p, p.source.name) as (_, box):
            vm = need(box[0], p, "resume")
            if not begin(vm, p, "resume"):
                return result(p, "resume", False, S(vm.state), TRANSITIONS["resume"].said, t0)
            return result(p, "resume", True, finish(vm, "resume"), "replication resumed", t0)

    def disable_replication(self, p: Placement, delete_replica: bool = False) -> OpResult:
        t0 = utcnow()
        with self._op("disable_replication", p, p.source.name) as (_, box):
            vm = box[0]
            if not begin(vm, p, "disable_replication"):
                return result(p, "disable_replication", False, S.Disabled, TRANSITIONS["disable_replication"].said, t0)
            vm = need(vm, p, "disable_replication")
            box[0] = None
            return result(p, "disable_replication", True, finish(vm, "disable_replication"),
                          "replication disabled" + ("; replica deleted" if delete_replica else ""), t0)

    def replication_health(self, p: Placement) -> ReplicationHealth:
        with self._op("replication_health", p, p.source.name) as (_, box):
            vm = box[0]
            if vm is None:
                return ReplicationHealth(vm=p.vm, state=S.Disabled, health=Health.NotApplicable, mode=ReplicationMode.None_)
            last = datetime.fromisoformat(vm.last_replication) if vm.last_replication else None
            rpo = (utcnow() - last).total_seconds() if last else None
            health = Health.Normal
            details = ""
            if vm.resync_required:
                health, details = Health.Critical, f"Resynchronization is required for {p.vm}."
            elif vm.state in (S.Error.value, S.Suspended.value):
                health = Health.Critical if vm.state == S.Error.value else Health.Warning
            elif rpo is not None and rpo > p.policy.rpo_threshold:
                health, details = Health.Warning, f"last replication {int(rpo)} s ago"
            elif vm.state == S.FailedOver.value:
                health, details = Health.Warning, "failed over: reverse replication to protect it again"
            return ReplicationHealth(vm=p.vm, state=S(vm.state), health=health, mode=ReplicationMode.Primary,
                                     primary_host=vm.primary, replica_host=vm.replica, last_replication_time=last,
                                     successful_cycles=vm.cycles_ok, missed_cycles=vm.cycles_missed,
                                     current_rpo_seconds=rpo, resync_required=vm.resync_required,
                                     test_failover_active=vm.test_active, details=details)

    def recovery_points(self, p: Placement) -> tuple[RecoveryPoint, ...]:
        with self._op("recovery_points", p, p.target.name) as (_, box):
            vm = need(box[0], p, "recovery_points")
            return tuple(_rp(x) for x in vm.points)

    # ---- failover ---------------------------------------------------------------------------
    def _pick(self, vm: _VM, p: Placement, point: PointChoice, operation: str) -> dict[str, Any]:
        pts = {x["id"]: x for x in vm.points}
        chosen = point.choose([_rp(x) for x in vm.points])
        if chosen is None:
            raise NotFoundError(f"no recovery point matches {point.describe()}",
                                vm=p.vm, host=p.target.name, operation=operation,
                                hint="list recovery points and choose another", error_id="VMFailover_InvalidSnapshot")
        return pts[chosen.id]

    def test_failover(self, p: Placement, point: PointChoice = LATEST, network: str | None = None) -> OpResult:
        t0 = utcnow()
        with self._op("test_failover", p, p.target.name) as (_, box):
            vm = need(box[0], p, "test_failover")
            if not begin(vm, p, "test_failover"):
                pt = next((x for x in vm.points if x["id"] == vm.test_point), None)
                return result(p, "test_failover", False, S(vm.state), TRANSITIONS["test_failover"].said, t0,
                              point=_rp(pt) if pt else None)
            pt = self._pick(vm, p, point, "test_failover")
            vm.test_active, vm.test_point = True, pt["id"]
            return result(p, "test_failover", True, finish(vm, "test_failover"), f"test VM created from {pt['id']}", t0,
                          point=_rp(pt), details={"network": network})

    def cleanup_test_failover(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("cleanup_test_failover", p, p.target.name) as (_, box):
            vm = need(box[0], p, "cleanup_test_failover")
            if not begin(vm, p, "cleanup_test_failover"):
                return result(p, "cleanup_test_failover", False, S(vm.state), TRANSITIONS["cleanup_test_failover"].said, t0)
            vm.test_active, vm.test_point = False, None
            test_host = f"{p.target.name}#test"
            vm.running = [h for h in vm.running if h != test_host]
            return result(p, "cleanup_test_failover", True, finish(vm, "cleanup_test_failover"), "test VM deleted", t0)

    def prepare_planned_failover(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("prepare_planned_failover", p, p.source.name) as (_, box):
            vm = need(box[0], p, "prepare_planned_failover")
            if not begin(vm, p, "prepare_planned_failover"):
                return result(p, "prepare_planned_failover", False, S(vm.state),
                              TRANSITIONS["prepare_planned_failover"].said, t0)
            vm.running = [h for h in vm.running if h != p.source.name]
            pt = self._add_point(vm, p.vm)
            return result(p, "prepare_planned_failover", True, finish(vm, "prepare_planned_failover"),
                          "source shut down, pending changes sent", t0, point=_rp(pt))

    def failover(self, p: Placement, point: PointChoice = LATEST) -> OpResult:
        t0 = utcnow()
        with self._op("failover", p, p.target.name) as (_, box):
            vm = need(box[0], p, "failover")
            if not begin(vm, p, "failover"):
                pt = next((x for x in vm.points if x["id"] == vm.failover_point), None)
                return result(p, "failover", False, S(vm.state), TRANSITIONS["failover"].said, t0,
                              point=_rp(pt) if pt else None)
            pt = self._pick(vm, p, point, "failover")
            vm.failover_point = pt["id"]
            return result(p, "failover", True, finish(vm, "failover"), f"failed over to {pt['id']}", t0,
                          point=_rp(pt))

    def commit_failover(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("commit_failover", p, p.target.name) as (_, box):
            vm = need(box[0], p, "commit_failover")
            if not begin(vm, p, "commit_failover"):
                return result(p, "commit_failover", False, S(vm.state), TRANSITIONS["commit_failover"].said, t0)
            vm.points = [x for x in vm.points if x["id"] == vm.failover_point]
            return result(p, "commit_failover", True, finish(vm, "commit_failover"), "failover committed", t0)

    def cancel_failover(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("cancel_failover", p, p.target.name) as (_, box):
            vm = need(box[0], p, "cancel_failover")
            if not begin(vm, p, "cancel_failover"):
                return result(p, "cancel_failover", False, S(vm.state), TRANSITIONS["cancel_failover"].said, t0)
            vm.running = [h for h in vm.running if h != p.target.name]
            vm.failover_point = None
            return result(p, "cancel_failover", True, finish(vm, "cancel_failover"), "failover cancelled", t0)

    def reverse_replication(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("reverse_replication", p, p.target.name) as (_, box):
            vm0 = box[0]
            if vm0 is not None and not begin(vm0, p, "reverse_replication"):
                return result(p, "reverse_replication", False, S(vm0.state), TRANSITIONS["reverse_replication"].said, t0)
            vm = need(vm0, p, "reverse_replication", *TRANSITIONS["reverse_replication"].allowed)
            vm.primary, vm.replica = p.target.name, p.source.name
            vm.failover_point = None
            pt = self._add_point(vm, p.vm)
            return result(p, "reverse_replication", True, finish(vm, "reverse_replication"),
                          f"now replicating {p.target.name} -> {p.source.name}", t0, point=_rp(pt))

    def start_vm(self, p: Placement, side: Side = "target", test: bool = False) -> OpResult:
        t0 = utcnow()
        host = p.target.name if side == "target" else p.source.name
        with self._op("start_vm", p, host) as (_, box):
            vm = need(box[0], p, "start_vm") if box[0] is None else box[0]
            where = f"{host}#test" if test else host
            if test and not vm.test_active:
                raise InvalidStateError("no test VM to start", vm=p.vm, host=host, operation="start_vm",
                                        hint="run the test failover first", error_id="InvalidState")
            if where in vm.running:
                return result(p, "start_vm", False, S(vm.state), "already running", t0, host=host)
            vm.running.append(where)
            return result(p, "start_vm", True, S(vm.state), "started", t0, host=host)

    def stop_vm(self, p: Placement, side: Side = "source") -> OpResult:
        t0 = utcnow()
        host = p.target.name if side == "target" else p.source.name
        with self._op("stop_vm", p, host) as (_, box):
            vm = need(box[0], p, "stop_vm") if box[0] is None else box[0]
            if host not in vm.running:
                return result(p, "stop_vm", False, S(vm.state), "already off", t0, host=host)
            vm.running.remove(host)
            return result(p, "stop_vm", True, S(vm.state), "stopped", t0, host=host)

    def apply_network(self, p: Placement) -> OpResult:
        t0 = utcnow()
        with self._op("apply_network", p, p.target.name) as (_, box):
            # Hyper-V's planned order reverses replication before the network is applied and the VM starts.
            vm = self._either_way(box[0], p, "apply_network")
            want = {n.nic: n.target_network for n in p.nics}
            if vm.networks.get(p.target.name) == want:
                return result(p, "apply_network", False, S(vm.state), "network settings already applied", t0)
            vm.network_applied = True
            vm.networks[p.target.name] = want
            nets = ", ".join(f"{n.nic}->{n.target_network or 'disconnected'}" for n in p.nics)
            return result(p, "apply_network", True, S(vm.state), f"network: {nets or 'no NICs'}", t0)

    def vm_networks(self, p: Placement, side: Side = "source") -> dict[str, str | None] | None:
        """The networks the VM's NICs are on at that side's host (None: never recorded there)."""
        host = p.source if side == "source" else p.target
        with self._op("vm_networks", p, host.name) as (_, box):
            vm = self._either_way(box[0], p, "vm_networks")
            nets = vm.networks.get(host.name)
            return dict(nets) if nets is not None else None

    def connect_network(self, p: Placement, side: Side, nic: str, network: str | None) -> None:
        """An operator's change of a VM's NIC at one side (Connect-/Disconnect-VMNetworkAdapter)."""
        host = p.source if side == "source" else p.target
        with self._op("connect_network", p, host.name) as (_, box):
            vm = self._either_way(box[0], p, "connect_network")
            vm.networks.setdefault(host.name, {n.nic: n.target_network for n in p.nics})[nic] = network

    def close(self) -> None:
        return None


def _point(vm: str, seq: int, when: datetime, consistency: str) -> dict[str, Any]:
    return {"id": f"{vm}@{seq}", "vm": vm, "created_at": when.isoformat(), "consistency": consistency}


def _rp(x: dict[str, Any]) -> RecoveryPoint:
    return RecoveryPoint(id=x["id"], vm=x["vm"], created_at=datetime.fromisoformat(x["created_at"]),
                         consistency=x["consistency"], group=x.get("group"))
