"""Network, IP and storage mapping rules of the source documents, as pure functions.

- A VM's replica joins the VM network its source network is mapped to; unmapped: no network.
- Its subnet is the target subnet with the same name as the source subnet, else the first subnet.
- Its address is its failover IP configuration, else the next free address of that subnet's pool,
  else none (DHCP).
- Its disks go to a location of the storage classification the source classification is mapped to,
  on a host that reaches it; else to the host's default storage location.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .model import NIC, VM, FailoverIP, Protection, Topology
from .model.common import Direction, Frozen


class NICPlacement(Frozen):
    nic: str
    source_network: str
    target_network: str | None
    target_subnet: str | None
    ip: FailoverIP | None
    switch: str | None = None
    # Where the VM runs now and where a test copy runs; both optional so older callers stay valid.
    source_ip: ipaddress.IPv4Address | None = None
    test_ip: FailoverIP | None = None


class DiskPlacement(Frozen):
    disk: str
    source_path: str
    target_location: str | None
    classification: str | None
    replicate: bool = True


def target_network(source_network: str, protection: Protection, direction: Direction = Direction.forward) -> str | None:
    """The mapped network, or None: an unmapped network leaves the replica disconnected."""
    for m in protection.network_mappings:
        if direction == Direction.forward and m.source == source_network:
            return m.target
        if direction == Direction.failback and m.target == source_network:
            return m.source
    return None


def target_subnet(source_subnet: str, target_net_subnets: Iterable[str]) -> str | None:
    """Same-named subnet if the target network has one, else its first subnet."""
    names = list(target_net_subnets)
    if not names:
        return None
    return source_subnet if source_subnet in names else names[0]


def pool_address(topology: Topology, network: str, subnet: str, taken: set[ipaddress.IPv4Address]) -> FailoverIP | None:
    """The next free pool address of a subnet, marked taken; None when there is no pool or it is exhausted."""
    sub = topology.network(network).subnet(subnet)
    if sub is None or sub.pool is None:
        return None
    for n in range(int(sub.pool.start), int(sub.pool.end) + 1):
        addr = ipaddress.IPv4Address(n)
        if addr not in taken:
            taken.add(addr)
            return FailoverIP(address=addr, prefix_length=sub.cidr.prefixlen, gateway=sub.gateway, dns=sub.dns)
    return None


def place_nic(
    nic: NIC,
    topology: Topology,
    protection: Protection,
    direction: Direction = Direction.forward,
    taken: set[ipaddress.IPv4Address] | None = None,
) -> NICPlacement:
    taken = set() if taken is None else taken
    if direction == Direction.failback:
        # Failing back returns the VM to its original network and address (the documents' failback
        # table: no change after failover -> the VM stays on its source network).
        src_net = target_network(nic.network, protection) or nic.network
        net = topology.network(nic.network)
        return NICPlacement(nic=nic.name, source_network=src_net, target_network=nic.network,
                            target_subnet=nic.subnet, ip=nic.failback_ip, switch=net.switch,
                            source_ip=nic.failover_ip.address if nic.failover_ip else None)
    tnet = target_network(nic.network, protection, direction)
    if tnet is None:
        return NICPlacement(nic=nic.name, source_network=nic.network, target_network=None, target_subnet=None, ip=None,
                            source_ip=nic.address)
    net = topology.network(tnet)
    tsub = target_subnet(nic.subnet, [s.name for s in net.subnets])
    ip = nic.failover_ip
    if ip is None and tsub is not None:
        ip = pool_address(topology, tnet, tsub, taken)
    elif ip is not None:
        taken.add(ip.address)
    return NICPlacement(nic=nic.name, source_network=nic.network, target_network=tnet, target_subnet=tsub,
                        ip=ip, switch=net.switch, source_ip=nic.address)


def target_classification(source: str | None, protection: Protection) -> str | None:
    if source is None:
        return None
    for m in protection.storage_mappings:
        if m.source == source:
            return m.target
    return None


def hosts_reaching(topology: Topology, classification: str, candidates: Iterable[str]) -> list[str]:
    cls = topology.classification(classification)
    cands = list(candidates)
    if not cls.hosts:
        return [h for h in cands if topology.host(h).site == cls.site]
    return [h for h in cands if h in cls.hosts]


def replica_candidates(vm: VM, topology: Topology, protection: Protection, protecting_cloud: str) -> list[str]:
    """Hosts that may hold the replica: the VM's pin, else the hosts of the protecting cloud that reach
    the mapped storage of the VM's classified disks (all of the cloud's hosts when none does)."""
    if vm.replica_host:
        return [vm.replica_host]
    hosts = list(topology.cloud(protecting_cloud).hosts)
    for d in vm.disks:
        tcls = target_classification(d.classification, protection)
        if tcls is not None:
            reach = hosts_reaching(topology, tcls, hosts)
            if reach:
                hosts = reach
    return hosts


def place_disks(vm: VM, topology: Topology, protection: Protection, target_host: str) -> tuple[DiskPlacement, ...]:
    host = topology.host(target_host)
    out = []
    for d in vm.disks:
        tcls = target_classification(d.classification, protection)
        loc = None
        if tcls is not None:
            cls = topology.classification(tcls)
            if not cls.hosts or target_host in cls.hosts:
                loc = cls.locations[0]
        if loc is None:
            loc = host.default_storage
        out.append(DiskPlacement(disk=d.name, source_path=d.path, target_location=loc, classification=tcls,
                                 replicate=d.replicate))
    return tuple(out)
