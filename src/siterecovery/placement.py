"""Resolve where each VM of a pairing or plan lives and where it fails over to, in one direction.

This is the single place that turns a project (topology + protection) into the Placement a fabric
driver acts on: the replica host from storage mapping, disk locations, NIC networks and IPs from the
network mapping, and the isolated test network of the target site.
"""

from __future__ import annotations

import ipaddress

from .errors import ConfigurationError
from .fabric.base import Placement
from .mapping import place_disks, place_nic, pool_address, replica_candidates
from .model import Direction, Host, Pairing, RecoveryPlan, VMNetwork
from .project import Project


def isolated_network(project: Project, site: str) -> str | None:
    """The isolated network test failovers use at `site`: its switch name, else its name."""
    for net in project.topology.vm_networks:
        if net.site == site and net.isolated:
            return net.switch or net.name
    return None


def extended_host(project: Project, pairing: Pairing) -> Host | None:
    """The pairing's extended-replication host (A -> B -> C), or None."""
    if pairing.extended is None:
        return None
    for h in project.topology.hosts:
        if h.name == pairing.extended.host:
            return h
    raise ConfigurationError(f"pairing {pairing.name}: extended.host {pairing.extended.host!r} is not a host of the "
                             "topology", hint="name a host of topology.yaml (a replica server on a third site)")


def _isolated(project: Project, site: str) -> VMNetwork | None:
    return next((n for n in project.topology.vm_networks if n.site == site and n.isolated), None)


def pairing_placements(project: Project, pairing: Pairing, direction: Direction = Direction.forward,
                       vms: list[str] | None = None) -> dict[str, Placement]:
    """Placements of the VMs of a pairing's protected cloud (or the named subset), in plan order of names."""
    t, pr = project.topology, project.protection
    policy = pr.policy(pairing.policy)
    members = [v for v in t.vms if v.cloud == pairing.protected_cloud]
    if vms is not None:
        unknown = sorted(set(vms) - {v.name for v in members})
        if unknown:
            raise KeyError(f"not in cloud '{pairing.protected_cloud}' of pairing '{pairing.name}': {', '.join(unknown)}")
    # Every VM of the cloud is placed, in topology order, so that a VM gets the same replica host and
    # pool address whichever subset is asked for.
    taken: set[ipaddress.IPv4Address] = set()
    test_taken: set[ipaddress.IPv4Address] = set()
    load: dict[str, int] = {}
    out: dict[str, Placement] = {}
    for vm in members:
        # Spread replicas: the least-loaded candidate host, in the cloud's host order on a tie.
        cands = replica_candidates(vm, t, pr, pairing.protecting_cloud)
        chosen = min(cands, key=lambda h: (load.get(h, 0), cands.index(h)))
        load[chosen] = load.get(chosen, 0) + 1
        primary, replica = t.host(vm.host), t.host(chosen)
        nics = tuple(place_nic(n, t, pr, direction, taken, replica_site=replica.site) for n in vm.nics)
        test_net = _isolated(project, replica.site if direction == Direction.forward else primary.site)
        if test_net is not None:
            # A test copy gets an address from the isolated network's pool (first subnet), so a drill's
            # VMs never take production addresses; allocated in topology order like failover IPs.
            nics = tuple(n.model_copy(update={"test_ip": pool_address(t, test_net.name, test_net.subnets[0].name,
                                                                      test_taken)})
                         if n.target_network else n for n in nics)
        if vms is not None and vm.name not in vms:
            continue
        source, target = (primary, replica) if direction == Direction.forward else (replica, primary)
        out[vm.name] = Placement(
            vm=vm.name, pairing=pairing.name, direction=direction, source=source, target=target, policy=policy,
            disks=place_disks(vm, t, pr, replica.name), nics=nics, compute=vm.compute, quiesce=vm.quiesce,
            test_network=isolated_network(project, target.site),
            extended=extended_host(project, pairing) if direction == Direction.forward else None,
            extended_frequency_seconds=pairing.extended.frequency_seconds if pairing.extended else 300,
            memory_mb=vm.memory_mb, vcpus=vm.vcpus,
        )
    return out


def plan_placements(project: Project, plan: RecoveryPlan, direction: Direction = Direction.forward) -> dict[str, Placement]:
    pairing = project.protection.pairing_for(plan.source, plan.target)
    if pairing is None:
        raise KeyError(f"plan '{plan.name}': {plan.source} -> {plan.target} is not a configured pairing")
    return pairing_placements(project, pairing, direction, list(plan.vm_names))
