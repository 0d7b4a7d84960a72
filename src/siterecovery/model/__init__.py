"""Pydantic models of the estate (topology), its protection and its recovery plans."""

from .common import Direction, FabricKind, FailoverType, FailurePolicy, Frozen
from .plan import GroupVM, ManualAction, RecoveryPlan, Scope, ScriptAction, VMGroup
from .protection import (
    ConsistencyGroup,
    ExistingReplicaInitial,
    NetworkInitial,
    NetworkMapping,
    OfflineInitial,
    Pairing,
    Protection,
    ReplicationPolicy,
    StorageMapping,
)
from .topology import (
    NIC,
    VM,
    Cloud,
    Compute,
    Credential,
    Disk,
    FailoverIP,
    Host,
    HostGroup,
    PeerSSH,
    Site,
    StorageClassification,
    Subnet,
    Topology,
    VMNetwork,
)

__all__ = [
    "NIC", "VM", "Cloud", "Compute", "ConsistencyGroup", "Credential", "Direction", "Disk", "ExistingReplicaInitial",
    "FabricKind", "FailoverIP", "FailoverType", "FailurePolicy", "Frozen", "GroupVM", "Host", "HostGroup",
    "ManualAction", "NetworkInitial", "NetworkMapping", "OfflineInitial", "Pairing", "PeerSSH", "Protection",
    "RecoveryPlan", "ReplicationPolicy", "Scope", "ScriptAction", "Site", "StorageClassification",
    "StorageMapping", "Subnet", "Topology", "VMGroup", "VMNetwork",
]
