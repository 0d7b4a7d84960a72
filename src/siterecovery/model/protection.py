"""Protection: replication policies, cloud pairings, network and storage mappings.

A pairing protects one cloud with another under one policy, as in the source documents. Which
values a policy may take depends on the fabric (Hyper-V accepts exactly 30, 300 or 900 s copy
frequency; the built-in engine anything from 5 s); that check needs the topology and lives in
validate.py.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, model_validator

from .common import Frozen, Name, Slug


class NetworkInitial(Frozen):
    method: Literal["network"] = "network"
    start_at: datetime | None = Field(None, description="schedule the copy; within 7 days")


class OfflineInitial(Frozen):
    method: Literal["offline"]
    export_path: str = Field(..., min_length=1, description="where the primary exports the initial copy")
    import_path: str = Field(..., min_length=1, description="where the replica site imports it from")


class ExistingReplicaInitial(Frozen):
    method: Literal["existing_replica"]


InitialReplication = Annotated[
    NetworkInitial | OfflineInitial | ExistingReplicaInitial, Field(discriminator="method")
]


class ReplicationPolicy(Frozen):
    name: Name
    copy_frequency_seconds: int = Field(300, ge=1)
    recovery_history_hours: int = Field(0, ge=0, le=24)
    app_consistent_frequency_hours: int | None = Field(None, ge=1, le=12)
    compression: bool = True
    initial_replication: InitialReplication = NetworkInitial()
    delete_replica_on_disable: bool = False
    rpo_threshold_seconds: int | None = Field(None, ge=1, description="alert above this; default 2x copy frequency")
    authentication: Literal["kerberos", "certificate"] = "kerberos"
    certificate_thumbprint: str | None = None
    resync_window: tuple[str, str] | None = Field(None, description="off-hours window, 'HH:MM' local pair")
    bandwidth_mbps: float | None = Field(None, gt=0, description="cap on each source host's replication traffic "
                                         "(megabits/s), shared by its concurrent transfers (linux fabric)")

    @property
    def bandwidth_bytes_per_second(self) -> int | None:
        return int(self.bandwidth_mbps * 1_000_000 / 8) if self.bandwidth_mbps else None

    @property
    def rpo_threshold(self) -> int:
        return self.rpo_threshold_seconds or 2 * self.copy_frequency_seconds

    @model_validator(mode="after")
    def _coherent(self) -> ReplicationPolicy:
        if self.app_consistent_frequency_hours is not None:
            if self.recovery_history_hours == 0:
                raise ValueError("app_consistent_frequency_hours needs recovery_history_hours above 0")
            if self.app_consistent_frequency_hours >= self.recovery_history_hours:
                raise ValueError(
                    f"app_consistent_frequency_hours ({self.app_consistent_frequency_hours}) must be below "
                    f"recovery_history_hours ({self.recovery_history_hours})"
                )
        if self.authentication == "certificate" and not self.certificate_thumbprint:
            raise ValueError("certificate authentication needs certificate_thumbprint")
        if self.resync_window is not None:
            for t in self.resync_window:
                hh, _, mm = t.partition(":")
                if not (hh.isdigit() and mm.isdigit() and int(hh) < 24 and int(mm) < 60 and len(mm) == 2):
                    raise ValueError(f"resync_window time '{t}' is not HH:MM")
        return self


class ExtendedReplication(Frozen):
    """hyperv: Hyper-V Replica's extended replication (A -> B -> C): each replica on the protecting side
    replicates on to a third host, at 300 or 900 s, without application-consistent points."""

    host: Name = Field(..., description="the third host (C): a replica server, named in the topology")
    frequency_seconds: Literal[300, 900] = 300


class Pairing(Frozen):
    name: Slug
    protected_cloud: Name
    protecting_cloud: Name
    policy: Name
    extended: ExtendedReplication | None = Field(None, description="hyperv: extend each replica to a third host")


class NetworkMapping(Frozen):
    source: Name
    target: Name


class StorageMapping(Frozen):
    source: Name
    target: Name


class ConsistencyGroup(Frozen):
    """VMs whose disks share recovery points: every member is captured at one instant, a group point exists
    only once every member holds it, and a failover takes every member to the same group point (linux
    fabric; docs/OPERATIONS.md, "Consistency groups")."""

    name: Slug
    vms: tuple[Name, ...] = Field(..., min_length=2, max_length=16, description="2 to 16 VMs of one pairing")


class Protection(Frozen):
    kind: Literal["Protection"] = "Protection"
    policies: tuple[ReplicationPolicy, ...] = ()
    pairings: tuple[Pairing, ...] = ()
    network_mappings: tuple[NetworkMapping, ...] = ()
    storage_mappings: tuple[StorageMapping, ...] = ()
    consistency_groups: tuple[ConsistencyGroup, ...] = ()

    def group_of(self, vm: str) -> ConsistencyGroup | None:
        return next((g for g in self.consistency_groups if vm in g.vms), None)

    def policy(self, name: str) -> ReplicationPolicy:
        for p in self.policies:
            if p.name == name:
                return p
        raise KeyError(f"unknown policy '{name}'")

    def pairing(self, name: str) -> Pairing:
        for p in self.pairings:
            if p.name == name:
                return p
        raise KeyError(f"unknown pairing '{name}' (known: {', '.join(p.name for p in self.pairings) or 'none'})")

    def pairing_for(self, source_cloud: str, target_cloud: str) -> Pairing | None:
        for p in self.pairings:
            if (p.protected_cloud, p.protecting_cloud) == (source_cloud, target_cloud):
                return p
        return None
