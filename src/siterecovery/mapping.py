"""Network, IP and storage mapping rules of the source documents, as pure functions.

- A VM's replica joins the VM network its source network is mapped to; unmapped: no network.
- Failing back, the original VM's network follows the replica's network then and the mapping then
  (failback_network: the documents' failback table).
- Its subnet is the target subnet with the same name as the source subnet, else the first subnet.
- Its address is its failover IP configuration, else the next free address of that subnet's pool,
  else none (DHCP).
- Its disks go to a location of the storage classification the source classification is mapped to,
  on a host that reaches it; else to the host's default storage location. A disk's classification is
  its storage location's (a disk on an unclassified location goes to the default location).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .model import NIC, VM, Disk, FailoverIP, Protection, Topology
from .model.common import Direction, Frozen


class NetworkChoice(Frozen):
    """What a NIC becomes at failback while the replica is on `replica_network` (None: disconnected)."""

    replica_network: str | None
    network: str | None
    subnet: str | None = None
    ip: FailoverIP | None = None
    switch: str | None = None
    replica_switch: str | None = None  # the switch backing replica_network (Hyper-V reports switches)


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
    # Failback only: the choice for each network the replica may be on when failing back (the seed's
    # failback table, resolved against the mapping as it is now); resolve_failback picks one at run time.
    failback_choices: tuple[NetworkChoice, ...] = ()


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


def failback_network(original: str, replica_network: str | None, protection: Protection) -> str | None:
    """The source documents' failback table: the network the original VM (VM-1) gets back, from the
    network its replica (VM-2) is on now and the network mapping as it is now.

    - VM-2 disconnected after failover: VM-1 is disconnected.
    - the mapping of VM-2's network changed (an explicit mapping from it, or VM-1's network no longer
      maps to it): VM-1 joins the network now mapped to VM-2's network;
    - no change (VM-1's network still maps to VM-2's): VM-1 stays on its original network;
    - VM-2 moved to another network: the network mapped to that one; unmapped: VM-1 is disconnected.
    """
    if replica_network is None:
        return None
    for m in protection.network_mappings:
        if m.source == replica_network:
            return m.target
    if target_network(original, protection) == replica_network:
        return original
    for m in protection.network_mappings:
        if m.target == replica_network:
            return m.source
    return None


def failback_choices(nic: NIC, topology: Topology, protection: Protection, replica_site: str) -> tuple[NetworkChoice, ...]:
    """One NetworkChoice per network the replica may be on at `replica_site` (and one for disconnected)."""
    out = [NetworkChoice(replica_network=None, network=None)]
    taken: set[ipaddress.IPv4Address] = set()
    for net in topology.vm_networks:
        if net.site != replica_site or net.isolated:
            continue
        back = failback_network(nic.network, net.name, protection)
        if back is None:
            out.append(NetworkChoice(replica_network=net.name, network=None, replica_switch=net.switch))
        elif back == nic.network:
            out.append(NetworkChoice(replica_network=net.name, network=back, subnet=nic.subnet, ip=nic.failback_ip,
                                     switch=topology.network(back).switch, replica_switch=net.switch))
        else:
            bnet = topology.network(back)
            sub = target_subnet(nic.subnet, [x.name for x in bnet.subnets])
            out.append(NetworkChoice(replica_network=net.name, network=back, subnet=sub, switch=bnet.switch,
                                     ip=pool_address(topology, back, sub, taken) if sub else None,
                                     replica_switch=net.switch))
    return tuple(out)


def resolve_failback(nics: tuple[NICPlacement, ...], current: dict[str, str | None] | None) -> tuple[NICPlacement, ...]:
    """Failback NICs for the networks the replica is on now (`current`: NIC -> network, None when it is
    disconnected). A NIC the fabric does not report keeps its placement (the replica on its mapped
    network, the table's no-change row); a network the topology does not know counts as unmapped."""
    out = []
    for n in nics:
        if current is None or n.nic not in current or not n.failback_choices:
            out.append(n)
            continue
        r = current[n.nic]
        c = next((x for x in n.failback_choices if x.replica_network == r), NetworkChoice(replica_network=r, network=None))
        out.append(n.model_copy(update={"source_network": r or n.source_network, "target_network": c.network,
                                        "target_subnet": c.subnet, "ip": c.ip, "switch": c.switch}))
    return tuple(out)


def place_nic(
    nic: NIC,
    topology: Topology,
    protection: Protection,
    direction: Direction = Direction.forward,
    taken: set[ipaddress.IPv4Address] | None = None,
    replica_site: str | None = None,
) -> NICPlacement:
    taken = set() if taken is None else taken
    if direction == Direction.failback:
        # Failing back returns the VM to its original network and address when nothing changed (the
        # documents' failback table); failback_choices covers the other rows, picked at run time from
        # the network the replica is on then (resolve_failback).
        src_net = target_network(nic.network, protection) or nic.network
        net = topology.network(nic.network)
        return NICPlacement(nic=nic.name, source_network=src_net, target_network=nic.network,
                            target_subnet=nic.subnet, ip=nic.failback_ip, switch=net.switch,
                            source_ip=nic.failover_ip.address if nic.failover_ip else None,
                            failback_choices=failback_choices(nic, topology, protection, replica_site)
                            if replica_site else ())
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


def _norm(path: str) -> str:
    """Windows paths (drive letter, UNC share or backslashes) compare case-insensitively, with '/'."""
    windows = "\\" in path or (len(path) > 1 and path[1] == ":")
    p = path.replace("\\", "/").rstrip("/")
    return p.lower() if windows else p


def location_classification(path: str, topology: Topology) -> str | None:
    """The classification of the storage location (share, CSV, directory) a disk path lies on: the
    longest matching location; None when the path is on no classified location."""
    p, best, found = _norm(path), -1, None
    for cls in topology.storage_classifications:
        for loc in cls.locations:
            lo = _norm(loc)
            if (p == lo or p.startswith(lo + "/")) and len(lo) > best:
                best, found = len(lo), cls.name
    return found


def disk_classification(disk: Disk, topology: Topology) -> str | None:
    """A disk's storage classification: its location's (the documents put classifications on storage
    locations), else an explicit one on a disk of an unclassified location (validation refuses an
    explicit one that contradicts its location)."""
    return location_classification(disk.path, topology) or disk.classification


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
        tcls = target_classification(disk_classification(d, topology), protection)
        if tcls is not None:
            reach = hosts_reaching(topology, tcls, hosts)
            if reach:
                hosts = reach
    return hosts


def place_disks(vm: VM, topology: Topology, protection: Protection, target_host: str) -> tuple[DiskPlacement, ...]:
    host = topology.host(target_host)
    out = []
    for d in vm.disks:
        tcls = target_classification(disk_classification(d, topology), protection)
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
