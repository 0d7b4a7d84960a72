"""Protection lifecycle logic that needs no Prefect: where state lives and which driver serves a VM,
the health table (Measure-VMReplication's view), RPO breach tracking that alerts once per breach, and
off-hours resync windows. flows/protection.py and the `status` / `protect` commands share it.
"""

from __future__ import annotations

import fcntl
import json
import time as _time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from .fabric import Fabric, FabricContext, driver_for
from .fabric.base import Health, Placement, ReplicationHealth, ReplicationState
from .model.common import Frozen
from .paths import child

# Fabrics whose driver moves the data itself; Hyper-V Replica ships its own cycles on its own timer.
DATA_PATH_KINDS = frozenset({"linux", "memory"})
# Consecutive failed delta cycles after which a VM is resynchronized rather than retried (Hyper-V and
# the source documents mark a VM for resync when delta replication keeps failing).
FAILED_CYCLES_BEFORE_RESYNC = 3
RESYNC_STATES = frozenset({ReplicationState.WaitingForStartResynchronize, ReplicationState.ResynchronizeSuspended,
                           ReplicationState.Error})

EVENT_BREACHED = "siterecovery.replication.breached"
EVENT_RECOVERED = "siterecovery.replication.recovered"
# A scrub found a replica's bytes differ from what was replicated (bit rot, a write behind our back).
EVENT_CORRUPT = "siterecovery.replication.corrupt"


# ---- which driver serves a VM (the state directory comes from siterecovery.estate) ------------------------------------------------------------------------

def fabric_context(kind: str, state: Path, secrets: Any = None) -> FabricContext:
    """The one convention every caller uses, so a CLI, a flow and a test see the same estate: the
    memory fabric keeps its estate in <state>/memory-fabric.json."""
    options: dict[str, Any] = {}
    if kind == "memory":
        options["state_file"] = str(state / "memory-fabric.json")
    return FabricContext(state_dir=state, secrets=secrets, options=options)


def open_fabric(kind: str, state: Path, secrets: Any = None) -> Fabric:
    return driver_for(kind, fabric_context(kind, state, secrets))


def kind_of(p: Placement, override: str | None = None) -> str:
    """The fabric kind that serves a VM: the override (e.g. `memory` for a dry run), else its primary host's."""
    return str(override or p.source.fabric)


# ---- the health table -------------------------------------------------------------------------

class HealthRow(Frozen):
    """One line of `siterecovery status` and of the replication-health artifact."""

    pairing: str
    vm: str
    state: str
    health: str = Field(..., description="NotApplicable, Normal, Warning, Critical, or Unknown when unreadable")
    primary: str | None = None
    replica: str | None = None
    last_replication_time: datetime | None = None
    pending_bytes: int | None = Field(0, description="changes not yet replicated; None when unknown")
    successful_cycles: int = 0
    missed_cycles: int = 0
    current_rpo_seconds: float | None = None
    rpo_threshold_seconds: int
    resync_required: bool = False
    details: str = ""
    bandwidth_mbps: float | None = Field(None, description="the policy's cap on the source host's replication "
                                         "traffic, shared by its transfers; None: uncapped")

    @classmethod
    def of(cls, h: ReplicationHealth, p: Placement) -> HealthRow:
        return cls(pairing=p.pairing, vm=p.vm, state=h.state.value, health=h.health.value,
                   primary=h.primary_host or p.source.name, replica=h.replica_host or p.target.name,
                   last_replication_time=h.last_replication_time, pending_bytes=h.pending_bytes,
                   successful_cycles=h.successful_cycles, missed_cycles=h.missed_cycles,
                   current_rpo_seconds=h.current_rpo_seconds, rpo_threshold_seconds=p.policy.rpo_threshold,
                   resync_required=h.resync_required, details=h.details, bandwidth_mbps=p.policy.bandwidth_mbps)

    @classmethod
    def unreadable(cls, p: Placement, error: BaseException) -> HealthRow:
        """A VM whose health could not be read: not knowing the RPO is itself worth an alert."""
        return cls(pairing=p.pairing, vm=p.vm, state="Unknown", health="Unknown", primary=p.source.name,
                   replica=p.target.name, rpo_threshold_seconds=p.policy.rpo_threshold, details=str(error),
                   bandwidth_mbps=p.policy.bandwidth_mbps)

    @property
    def protected(self) -> bool:
        return self.state not in (ReplicationState.Disabled.value,)

    def breach_reasons(self) -> tuple[str, ...]:
        reasons = []
        if self.current_rpo_seconds is not None and self.current_rpo_seconds > self.rpo_threshold_seconds:
            reasons.append("rpo")
        if self.health == Health.Critical.value:
            reasons.append("critical")
        if self.health == "Unknown":
            reasons.append("unreadable")
        return tuple(reasons)

    def table_row(self) -> dict[str, Any]:
        """Flat, human-sized values for a Prefect table artifact or --json."""
        return {
            "vm": self.vm, "state": self.state, "health": self.health, "primary": self.primary,
            "replica": self.replica,
            "last_replication": self.last_replication_time.isoformat(timespec="seconds") if self.last_replication_time else "",
            "pending_mb": None if self.pending_bytes is None else round(self.pending_bytes / 2**20, 1),
            "rpo_s": None if self.current_rpo_seconds is None else round(self.current_rpo_seconds),
            "threshold_s": self.rpo_threshold_seconds, "ok_cycles": self.successful_cycles,
            "missed_cycles": self.missed_cycles, "resync": self.resync_required, "details": self.details,
            "cap_mbps": self.bandwidth_mbps,
        }


def resync_reason(row: HealthRow, failed_cycles: int = 0) -> str | None:
    """Why a VM needs resynchronization, or None."""
    if row.resync_required:
        return "resync required (change tracking lost or change logs beyond 50% of disk size)"
    if row.state in {s.value for s in RESYNC_STATES}:
        return f"state {row.state}"
    if failed_cycles >= FAILED_CYCLES_BEFORE_RESYNC:
        return f"{failed_cycles} consecutive failed cycles"
    return None


# ---- per-pairing state: breaches, the event outbox, failed cycles -----------------------------

class Alert(Frozen):
    """A Prefect event to send. Stored before it is sent, with its id, so that a run killed between the
    two sends the same event again and the server (which ignores a repeated event id) keeps one."""

    id: str
    event: str
    pairing: str
    vm: str
    occurred: datetime
    reasons: tuple[str, ...] = ()
    breach_started: datetime
    row: HealthRow


@dataclass
class PairingState:
    """<state>/protection/<pairing>.json: open breaches, unsent alerts, consecutive failed cycles."""

    pairing: str
    breaches: dict[str, dict[str, Any]] = field(default_factory=dict)  # vm -> {since, reasons, event_id}
    outbox: list[Alert] = field(default_factory=list)
    failed_cycles: dict[str, int] = field(default_factory=dict)

    def observe(self, rows: list[HealthRow], now: datetime) -> list[Alert]:
        """Open a breach (one `breached` alert) for each VM newly in breach; close it (one `recovered`
        alert) once the VM is healthy again. A VM still in breach, whatever its reasons now, adds nothing."""
        new: list[Alert] = []
        for row in rows:
            reasons = row.breach_reasons()
            open_ = self.breaches.get(row.vm)
            if reasons and open_ is None:
                alert = Alert(id=str(uuid.uuid4()), event=EVENT_BREACHED, pairing=self.pairing, vm=row.vm,
                              occurred=now, reasons=reasons, breach_started=now, row=row)
                self.breaches[row.vm] = {"since": now.isoformat(), "reasons": list(reasons), "event_id": alert.id}
                new.append(alert)
            elif reasons and open_ is not None:
                open_["reasons"] = sorted(set(open_["reasons"]) | set(reasons))
            elif not reasons and open_ is not None:
                new.append(self.close(row, now, ()))
        self.outbox.extend(new)
        return new

    def close(self, row: HealthRow, now: datetime, reasons: tuple[str, ...]) -> Alert:
        """End a VM's open breach with a `recovered` alert (queued by the caller of observe, or here)."""
        open_ = self.breaches.pop(row.vm)
        return Alert(id=str(uuid.uuid4()), event=EVENT_RECOVERED, pairing=self.pairing, vm=row.vm, occurred=now,
                     reasons=reasons, breach_started=datetime.fromisoformat(open_["since"]), row=row)

    def forget(self, vm: str, row: HealthRow, now: datetime) -> None:
        """A VM leaves protection: close its breach (so automations resolve it) and drop its counters."""
        if vm in self.breaches:
            self.outbox.append(self.close(row, now, ("protection disabled",)))
        self.failed_cycles.pop(vm, None)

    def to_json(self) -> dict[str, Any]:
        return {"pairing": self.pairing, "breaches": self.breaches,
                "outbox": [a.model_dump(mode="json") for a in self.outbox], "failed_cycles": self.failed_cycles}

    @classmethod
    def from_json(cls, pairing: str, data: dict[str, Any]) -> PairingState:
        return cls(pairing=pairing, breaches=dict(data.get("breaches", {})),
                   outbox=[Alert.model_validate(a) for a in data.get("outbox", [])],
                   failed_cycles={k: int(v) for k, v in data.get("failed_cycles", {}).items()})


@contextmanager
def pairing_state(state: Path, pairing: str) -> Iterator[PairingState]:
    """The pairing's state under an exclusive lock, written back atomically when the block ends (also
    when it raises, so alerts sent before a failure are not sent twice). Two health checks running
    at once therefore cannot both open the same breach."""
    folder = state / "protection"
    folder.mkdir(parents=True, exist_ok=True)
    path = child(folder, pairing, suffix=".json")
    with open(child(folder, pairing, suffix=".lock"), "a+") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
            ps = PairingState.from_json(pairing, data)
            try:
                yield ps
            finally:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(ps.to_json(), indent=1))
                tmp.replace(path)
        finally:
            fcntl.flock(lockf, fcntl.LOCK_UN)


def read_pairing_state(state: Path, pairing: str) -> PairingState:
    path = child(state, "protection", pairing, suffix=".json")
    return PairingState.from_json(pairing, json.loads(path.read_text()) if path.exists() else {})


# ---- resync windows ---------------------------------------------------------------------------

class Clock:
    """Local wall-clock time and sleeping, in one object so tests can replace it (resync windows are
    off-hours in the orchestrator's local time, like the source documents' 'outside office hours')."""

    def now(self) -> datetime:
        return datetime.now().astimezone()

    def sleep(self, seconds: float) -> None:
        _time.sleep(seconds)


CLOCK = Clock()


def _hhmm(s: str) -> time:
    hh, _, mm = s.partition(":")
    return time(int(hh), int(mm))


def in_window(now: datetime, window: tuple[str, str] | None) -> bool:
    """Whether `now` (local) lies in [start, end). A window may wrap midnight ('22:00', '05:00');
    equal ends mean all day; no window means any time."""
    if window is None:
        return True
    start, end = _hhmm(window[0]), _hhmm(window[1])
    t = now.time().replace(tzinfo=None)
    if start == end:
        return True
    if start < end:
        return start <= t < end
    return t >= start or t < end


def next_window_start(now: datetime, window: tuple[str, str]) -> datetime:
    """The next time the window opens, at or after `now`."""
    start = _hhmm(window[0])
    candidate = now.replace(hour=start.hour, minute=start.minute, second=0, microsecond=0)
    return candidate if candidate >= now else candidate + timedelta(days=1)


WindowDecision = Literal["run", "wait", "defer"]
