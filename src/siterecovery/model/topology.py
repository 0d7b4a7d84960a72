"""The estate: sites, hosts, clouds, VMs, VM networks and storage.

Mirrors the source documents' VMM vocabulary (clouds of host groups, VM networks with subnets,
storage classifications) so that mapping rules can be written the way those documents state them.
Credentials are references only: a Prefect Secret block name or an environment variable.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .common import FabricKind, Frozen, Ident, Name


class Credential(Frozen):
    """Where a host's secret lives. Exactly one of the two; never the secret itself."""

    secret_block: Name | None = Field(None, description="name of a Prefect Secret block")
    env: Name | None = Field(None, description="name of an environment variable")
    kind: Literal["password", "private_key"] = "private_key"
    key_file: str | None = Field(None, description="path of a private key file on the orchestrator")

    @model_validator(mode="after")
    def _one_source(self) -> Credential:
        sources = [s for s in (self.secret_block, self.env, self.key_file) if s]
        if len(sources) != 1:
            raise ValueError("give exactly one of secret_block, env or key_file")
        return self


class ReplicaServer(Frozen):
    """Hyper-V replica server settings of a host (Set-VMReplicationServer)."""

    port: int = Field(80, ge=1, le=65535)
    authentication: Literal["kerberos", "certificate"] = "kerberos"
    certificate_thumbprint: str | None = None
    allowed_primaries: tuple[Ident, ...] = Field((), description="hosts allowed to replicate here; empty: any")
    storage_location: str | None = None

    @model_validator(mode="after")
    def _thumbprint(self) -> ReplicaServer:
        if self.authentication == "certificate" and not self.certificate_thumbprint:
            raise ValueError("certificate authentication needs certificate_thumbprint")
        if self.authentication == "kerberos" and self.certificate_thumbprint:
            raise ValueError("kerberos authentication takes no certificate_thumbprint")
        return self


class PeerSSH(Frozen):
    """How a linux host sends replication streams to another host itself (OpenSSH client on this host).

    Both paths are files ON THIS HOST, read by its `ssh`; the orchestrator never sees the key. The
    target is reached at its own `address`, `port` and `user`; its host key must already be in
    `known_hosts` (never trust-on-first-use).
    """

    identity_file: str = Field(..., description="private key on this host that the receiving hosts authorize")
    known_hosts: str = Field(..., description="known_hosts file on this host holding the receiving hosts' keys")

    @field_validator("identity_file", "known_hosts")
    @classmethod
    def _plain_path(cls, v: str) -> str:
        # ssh -o takes whitespace-separated lists and expands % tokens: keep paths unambiguous.
        if not v.startswith("/"):
            raise ValueError("must be an absolute path on the host (it is read there, not on the orchestrator)")
        if any(c.isspace() or c in "\"'%" or not c.isprintable() for c in v):
            raise ValueError("must not contain whitespace, quotes, % or control characters (ssh -o cannot take them)")
        return v


class Host(Frozen):
    name: Ident
    site: Ident
    fabric: FabricKind
    address: str = Field(..., min_length=1, max_length=255)
    port: int = Field(22, ge=1, le=65535)
    user: str = Field("root", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._\\@-]+$")
    host_key: str | None = Field(None, description="pinned public key, 'ssh-ed25519 AAAA...'")
    known_hosts: str | None = Field(None, description="known_hosts file to verify against")
    credential: Credential | None = None
    default_storage: str | None = Field(None, description="where replicas go when no storage mapping applies")
    replica_server: ReplicaServer | None = None
    max_active_transfers: int = Field(3, ge=1, le=64)
    broker: bool = Field(False, description="a Hyper-V Replica Broker client access point")
    node_host_keys: tuple[str, ...] = Field((), description="broker: each cluster node's pinned SSH host key "
                                                            "(the client access point moves between nodes)")
    root: str | None = Field(None, description="linux fabric: the site's state directory on this host")
    python: str | None = Field(None, description="linux fabric: a Python with siterecovery installed, for the "
                                                 "replication agent on this host (default: python3)")
    peer_ssh: PeerSSH | None = Field(None, description="linux fabric: this host sends cycles straight to remote "
                                                       "target hosts over its own ssh; without it the "
                                                       "orchestrator relays when both hosts are remote")

    @field_validator("node_host_keys")
    @classmethod
    def _node_keys_shape(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for k in v:
            cls._key_shape(k)
        return v

    @field_validator("host_key")
    @classmethod
    def _key_shape(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = v.split()
        if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-")):
            raise ValueError("host_key must look like '<type> <base64>' (e.g. 'ssh-ed25519 AAAA...')")
        return v


class CapacityProfile(Frozen):
    vcpus: int | None = Field(None, ge=0)
    memory_gb: float | None = Field(None, ge=0)
    storage_gb: float | None = Field(None, ge=0)


class HostGroup(Frozen):
    name: Name
    hosts: tuple[Ident, ...] = Field(..., min_length=1)


class Cloud(Frozen):
    name: Name
    site: Ident
    host_groups: tuple[HostGroup, ...] = Field(..., min_length=1)
    capacity: CapacityProfile = CapacityProfile()

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(h for g in self.host_groups for h in g.hosts)


class IPPool(Frozen):
    start: ipaddress.IPv4Address
    end: ipaddress.IPv4Address

    @model_validator(mode="after")
    def _order(self) -> IPPool:
        if int(self.end) < int(self.start):
            raise ValueError("pool end is before its start")
        return self


class Subnet(Frozen):
    name: Name
    cidr: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None = None
    dns: tuple[ipaddress.IPv4Address, ...] = ()
    pool: IPPool | None = None

    @model_validator(mode="after")
    def _inside(self) -> Subnet:
        if self.gateway is not None and self.gateway not in self.cidr:
            raise ValueError(f"gateway {self.gateway} is outside {self.cidr}")
        if self.pool is not None and (self.pool.start not in self.cidr or self.pool.end not in self.cidr):
            raise ValueError(f"pool {self.pool.start}-{self.pool.end} is outside {self.cidr}")
        return self


class VMNetwork(Frozen):
    name: Name
    site: Ident
    subnets: tuple[Subnet, ...] = Field(..., min_length=1)
    isolated: bool = Field(False, description="an isolated network for test failovers")
    switch: str | None = Field(None, description="Hyper-V virtual switch (or linux bridge) backing it")

    def subnet(self, name: str) -> Subnet | None:
        return next((s for s in self.subnets if s.name == name), None)


class StorageClassification(Frozen):
    name: Name
    site: Ident
    locations: tuple[str, ...] = Field(..., min_length=1, description="SMB shares, CSVs or directories")
    hosts: tuple[Ident, ...] = Field((), description="hosts that reach these locations; empty: every host of the site")


class FailoverIP(Frozen):
    """A static address injected at failover (Set-VMNetworkAdapterFailoverConfiguration)."""

    address: ipaddress.IPv4Address
    prefix_length: int = Field(..., ge=1, le=32)
    gateway: ipaddress.IPv4Address | None = None
    dns: tuple[ipaddress.IPv4Address, ...] = ()


class NIC(Frozen):
    name: Name = "eth0"
    network: Name
    subnet: Name
    address: ipaddress.IPv4Address | None = None
    failover_ip: FailoverIP | None = None
    failback_ip: FailoverIP | None = None


class Disk(Frozen):
    name: Ident
    path: str = Field(..., min_length=1, max_length=1024)
    size_bytes: int | None = Field(None, ge=0)
    classification: Name | None = None
    replicate: bool = Field(True, description="hyperv: false leaves this disk out of replication "
                                               "(-ExcludedVhdPath), e.g. a page-file or scratch disk")


class Compute(Frozen):
    """How a linux-fabric VM runs: a QEMU VM driven over QMP, a process started with its disks, or a
    libvirt domain (QEMU under libvirtd, through libvirt-python)."""

    backend: Literal["process", "libvirt", "qemu"] = "process"
    command: tuple[str, ...] = Field((), description="argv; jinja2 placeholders: disks, disk, vm, site, network, ip, test, host")
    domain: str | None = Field(None, description="libvirt: the domain's name at every host (default: the VM's name)")
    uri: str | None = Field(None, description="libvirt: the connection URI at the VM's host, e.g. qemu:///system "
                                              "(default: the fabric option libvirt_uri, else libvirt's default)")
    freeze: tuple[str, ...] = Field((), description="argv that makes the disks consistent before a point")
    thaw: tuple[str, ...] = ()
    health: tuple[str, ...] = Field((), description="argv that exits 0 once the VM is healthy")
    consistency: Literal["auto", "none"] = Field(
        "auto", description="none: accept recovery points read from the live disks over time (UNSAFE: they can "
                            "be torn and lose acknowledged writes); auto: QEMU's point-in-time views (qemu, libvirt), "
                            "or the freeze hook")
    # backend qemu
    kernel: str | None = Field(None, description="qemu: -kernel (path on the host)")
    initrd: str | None = Field(None, description="qemu: -initrd (path on the host)")
    append: str = Field("", description="qemu: kernel command line; the placeholders of command")
    accel: Literal["auto", "kvm", "tcg"] = Field("auto", description="qemu: auto is KVM when /dev/kvm works, else TCG")
    args: tuple[str, ...] = Field((), description="qemu: more arguments (NICs...); the placeholders of command")
    formats: dict[str, Literal["raw", "qcow2"]] = Field(
        default_factory=dict, description="qemu, libvirt: disk name -> format at the primary (default raw); replicas "
                                          "are raw")
    guest_agent: bool = Field(False, description="qemu: give the VM the QEMU guest agent's port "
                                                 "(org.qemu.guest_agent.0); app-consistent points freeze the "
                                                 "guest's filesystems through it (guest-fsfreeze-freeze/thaw)")
    guest_agent_timeout_seconds: float = Field(10, gt=0, le=120, description="qemu: the deadline of each guest "
                                                                             "agent call; no answer in time: a "
                                                                             "crash-consistent point")


class VM(Frozen):
    name: Ident
    host: Ident
    cloud: Name
    disks: tuple[Disk, ...] = ()
    nics: tuple[NIC, ...] = ()
    replica_host: Ident | None = Field(None, description="pin the replica's host; default: chosen by storage mapping")
    compute: Compute | None = None
    quiesce: tuple[str, ...] = Field((), description="argv run before an app-consistent point")
    memory_mb: int | None = Field(None, ge=0)
    vcpus: int | None = Field(None, ge=0)


class Site(Frozen):
    name: Ident
    description: str = ""


class Topology(Frozen):
    kind: Literal["Topology"] = "Topology"
    sites: tuple[Site, ...] = Field(..., min_length=1)
    hosts: tuple[Host, ...] = ()
    clouds: tuple[Cloud, ...] = ()
    vm_networks: tuple[VMNetwork, ...] = ()
    storage_classifications: tuple[StorageClassification, ...] = ()
    vms: tuple[VM, ...] = ()

    def host(self, name: str) -> Host:
        return _find(self.hosts, name, "host")

    def vm(self, name: str) -> VM:
        return _find(self.vms, name, "VM")

    def cloud(self, name: str) -> Cloud:
        return _find(self.clouds, name, "cloud")

    def network(self, name: str) -> VMNetwork:
        return _find(self.vm_networks, name, "VM network")

    def classification(self, name: str) -> StorageClassification:
        return _find(self.storage_classifications, name, "storage classification")


def _find(items: tuple, name: str, what: str):  # type: ignore[no-untyped-def,type-arg]
    for item in items:
        if item.name == name:
            return item
    known = ", ".join(sorted(i.name for i in items)) or "none"
    raise KeyError(f"unknown {what} '{name}' (known: {known})")
