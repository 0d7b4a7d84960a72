"""Cross-reference rules over a loaded project: every name resolves, every VM has one role, every
policy value is one its fabric accepts, every dependency stays inside its group and has no cycle.

Each rule returns Problems located at the offending field, so one `siterecovery validate` run lists
everything that is wrong.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from .errors import Problem
from .mapping import location_classification
from .model import FabricKind, RecoveryPlan
from .project import PlanSource, Project
from .render import check_template
from .yamlload import Path_, SourceMap

HYPERV_FREQUENCIES = (30, 300, 900)
LINUX_MIN_FREQUENCY = 5


def _dupes(items: tuple, src: SourceMap, section: str, what: str) -> list[Problem]:  # type: ignore[type-arg]
    seen: dict[str, int] = {}
    out = []
    for i, item in enumerate(items):
        if item.name in seen:
            out.append(src.problem((section, i, "name"), f"{what} '{item.name}' is defined twice "
                                                         f"(first at {section}[{seen[item.name]}])"))
        else:
            seen[item.name] = i
    return out


def _unknown(what: str, name: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else (f"; known: {', '.join(sorted(known))}" if len(known) <= 8 else "")
    return f"unknown {what} '{name}'{hint}"


def check_topology(p: Project) -> list[Problem]:
    t, src = p.topology, p.topology_source
    assert src is not None
    out: list[Problem] = []
    for section, what in (("sites", "site"), ("hosts", "host"), ("clouds", "cloud"), ("vm_networks", "VM network"),
                          ("storage_classifications", "storage classification"), ("vms", "VM")):
        out += _dupes(getattr(t, section), src, section, what)
    sites = {s.name for s in t.sites}
    hosts = {h.name: h for h in t.hosts}
    nets = {n.name: n for n in t.vm_networks}
    classes = {c.name: c for c in t.storage_classifications}
    clouds = {c.name: c for c in t.clouds}
    for i, h in enumerate(t.hosts):
        if h.site not in sites:
            out.append(src.problem(("hosts", i, "site"), _unknown("site", h.site, sites)))
        if h.peer_ssh is not None and h.fabric != FabricKind.linux:
            out.append(src.problem(("hosts", i, "peer_ssh"), f"peer_ssh applies to linux hosts only; host "
                                                            f"'{h.name}' is {h.fabric.value}"))
        if h.fabric == FabricKind.hyperv and h.replica_server:
            for j, a in enumerate(h.replica_server.allowed_primaries):
                if a not in hosts:
                    out.append(src.problem(("hosts", i, "replica_server", "allowed_primaries", j), _unknown("host", a, set(hosts))))
    for i, c in enumerate(t.clouds):
        if c.site not in sites:
            out.append(src.problem(("clouds", i, "site"), _unknown("site", c.site, sites)))
        kinds = set()
        for g, hg in enumerate(c.host_groups):
            for j, hn in enumerate(hg.hosts):
                loc: Path_ = ("clouds", i, "host_groups", g, "hosts", j)
                if hn not in hosts:
                    out.append(src.problem(loc, _unknown("host", hn, set(hosts))))
                    continue
                kinds.add(hosts[hn].fabric)
                if hosts[hn].site != c.site:
                    out.append(src.problem(loc, f"host '{hn}' is in site '{hosts[hn].site}', not the cloud's site '{c.site}'"))
        if len(kinds) > 1:
            out.append(src.problem(("clouds", i, "host_groups"), f"cloud '{c.name}' mixes fabrics "
                                                                 f"({', '.join(sorted(kinds))}); keep one per cloud"))
    for i, n in enumerate(t.vm_networks):
        if n.site not in sites:
            out.append(src.problem(("vm_networks", i, "site"), _unknown("site", n.site, sites)))
        seen: set[str] = set()
        for j, s in enumerate(n.subnets):
            if s.name in seen:
                out.append(src.problem(("vm_networks", i, "subnets", j, "name"), f"subnet '{s.name}' is defined twice"))
            seen.add(s.name)
    for i, sc in enumerate(t.storage_classifications):
        if sc.site not in sites:
            out.append(src.problem(("storage_classifications", i, "site"), _unknown("site", sc.site, sites)))
        for j, hn in enumerate(sc.hosts):
            if hn not in hosts:
                out.append(src.problem(("storage_classifications", i, "hosts", j), _unknown("host", hn, set(hosts))))
    for i, vm in enumerate(t.vms):
        host = hosts.get(vm.host)
        if host is None:
            out.append(src.problem(("vms", i, "host"), _unknown("host", vm.host, set(hosts))))
        cloud = clouds.get(vm.cloud)
        if cloud is None:
            out.append(src.problem(("vms", i, "cloud"), _unknown("cloud", vm.cloud, set(clouds))))
        elif host is not None and vm.host not in cloud.hosts:
            out.append(src.problem(("vms", i, "host"), f"host '{vm.host}' is not in cloud '{vm.cloud}' "
                                                       f"(its hosts: {', '.join(cloud.hosts)})"))
        if vm.replica_host is not None and vm.replica_host not in hosts:
            out.append(src.problem(("vms", i, "replica_host"), _unknown("host", vm.replica_host, set(hosts))))
        dnames: set[str] = set()
        for j, d in enumerate(vm.disks):
            if d.name in dnames:
                out.append(src.problem(("vms", i, "disks", j, "name"), f"disk '{d.name}' is defined twice"))
            dnames.add(d.name)
            if d.classification is not None and d.classification not in classes:
                out.append(src.problem(("vms", i, "disks", j, "classification"),
                                       _unknown("storage classification", d.classification, set(classes))))
            elif d.classification is not None:
                at = location_classification(d.path, t)
                if at is not None and at != d.classification:
                    out.append(src.problem(("vms", i, "disks", j, "classification"),
                                           f"disk '{d.name}' is on a location of storage classification '{at}' "
                                           f"({d.path}), not '{d.classification}': a disk takes its location's "
                                           "classification (drop this field, or move the disk)"))
        for j, nic in enumerate(vm.nics):
            loc = ("vms", i, "nics", j)
            net = nets.get(nic.network)
            if net is None:
                out.append(src.problem(loc + ("network",), _unknown("VM network", nic.network, set(nets))))
                continue
            if host is not None and net.site != host.site:
                out.append(src.problem(loc + ("network",), f"VM network '{nic.network}' is in site '{net.site}', "
                                                           f"but the VM runs in site '{host.site}'"))
            sub = net.subnet(nic.subnet)
            if sub is None:
                out.append(src.problem(loc + ("subnet",), _unknown(f"subnet of '{net.name}'", nic.subnet,
                                                                    {s.name for s in net.subnets})))
            elif nic.address is not None and nic.address not in sub.cidr:
                out.append(src.problem(loc + ("address",), f"address {nic.address} is outside subnet "
                                                           f"'{sub.name}' ({sub.cidr})"))
        if host is not None and host.fabric == FabricKind.linux and vm.compute is None:
            out.append(src.problem(("vms", i), f"VM '{vm.name}' is on linux host '{vm.host}' and needs 'compute' "
                                               "(how to start it: backend qemu, process or libvirt)"))
        comp = vm.compute
        if (host is not None and host.fabric == FabricKind.linux and comp is not None
                and comp.backend not in ("qemu", "libvirt") and not comp.freeze and comp.consistency != "none"):
            out.append(src.problem(("vms", i, "compute"), f"VM '{vm.name}' has no consistent way to capture a recovery "
                                   f"point: backend {comp.backend} without a freeze command reads its disks over time, so a "
                                   "point can be torn; use backend qemu or libvirt, give compute.freeze/thaw, or say "
                                   "'consistency: none' to accept torn points (unsafe)"))
        if comp is not None and comp.guest_agent and comp.backend != "qemu":
            out.append(src.problem(("vms", i, "compute", "guest_agent"), f"VM '{vm.name}': guest_agent needs backend "
                                   f"qemu (the fabric talks to the agent through QEMU's port), not {comp.backend}"))
        if comp is not None and comp.formats:
            names = {d.name for d in vm.disks}
            for dn in comp.formats:
                if dn not in names:
                    out.append(src.problem(("vms", i, "compute", "formats"), _unknown("disk", dn, names)))
    return out


def check_protection(p: Project, now: datetime | None = None) -> list[Problem]:
    if p.protection_source is None:
        return []
    t, pr, src = p.topology, p.protection, p.protection_source
    now = now or datetime.now(UTC)
    out: list[Problem] = []
    out += _dupes(pr.policies, src, "policies", "policy")
    out += _dupes(pr.pairings, src, "pairings", "pairing")
    policies = {x.name: x for x in pr.policies}
    clouds = {c.name: c for c in t.clouds}
    hosts = {h.name: h for h in t.hosts}
    nets = {n.name: n for n in t.vm_networks}
    classes = {c.name: c for c in t.storage_classifications}
    protected: dict[str, int] = {}
    for i, pair in enumerate(pr.pairings):
        loc = ("pairings", i)
        kinds: set[FabricKind] = set()
        for field in ("protected_cloud", "protecting_cloud"):
            name = getattr(pair, field)
            if name not in clouds:
                out.append(src.problem(loc + (field,), _unknown("cloud", name, set(clouds))))
            else:
                kinds |= {hosts[h].fabric for h in clouds[name].hosts if h in hosts}
        if pair.protected_cloud == pair.protecting_cloud:
            out.append(src.problem(loc + ("protecting_cloud",), "a cloud cannot protect itself"))
        if pair.protected_cloud in protected:
            out.append(src.problem(loc + ("protected_cloud",), f"cloud '{pair.protected_cloud}' is already protected "
                                                              f"by pairings[{protected[pair.protected_cloud]}]"))
        protected.setdefault(pair.protected_cloud, i)
        if len(kinds) > 1:
            out.append(src.problem(loc, f"the two clouds use different fabrics ({', '.join(sorted(kinds))})"))
        policy = policies.get(pair.policy)
        if policy is None:
            out.append(src.problem(loc + ("policy",), _unknown("policy", pair.policy, set(policies))))
            continue
        pi = list(pr.policies).index(policy)
        ploc = ("policies", pi)
        if FabricKind.hyperv in kinds and policy.copy_frequency_seconds not in HYPERV_FREQUENCIES:
            out.append(src.problem(ploc + ("copy_frequency_seconds",),
                                   f"Hyper-V accepts a copy frequency of exactly 30, 300 or 900 seconds "
                                   f"(got {policy.copy_frequency_seconds}; used by pairing '{pair.name}')"))
        if FabricKind.linux in kinds and policy.copy_frequency_seconds < LINUX_MIN_FREQUENCY:
            out.append(src.problem(ploc + ("copy_frequency_seconds",),
                                   f"the linux fabric replicates at most every {LINUX_MIN_FREQUENCY} seconds "
                                   f"(got {policy.copy_frequency_seconds}; used by pairing '{pair.name}')"))
        if FabricKind.hyperv in kinds and policy.bandwidth_mbps:
            out.append(src.problem(ploc + ("bandwidth_mbps",),
                                   f"Hyper-V Replica has no bandwidth cap of its own (used by pairing '{pair.name}'): "
                                   "throttle it with a QoS policy on the replica port (New-NetQoSPolicy) instead"))
    for i, pol in enumerate(pr.policies):
        init = pol.initial_replication
        start = getattr(init, "start_at", None)
        if start is not None:
            s = start if start.tzinfo else start.replace(tzinfo=UTC)
            if s < now:
                out.append(src.problem(("policies", i, "initial_replication", "start_at"), "start time is in the past"))
            elif s > now + timedelta(days=7):
                out.append(src.problem(("policies", i, "initial_replication", "start_at"),
                                       "start time is more than 7 days ahead (Hyper-V's limit)"))
    out += check_consistency_groups(p)
    for section, known, what in (("network_mappings", nets, "VM network"), ("storage_mappings", classes, "storage classification")):
        mapped: dict[str, int] = {}
        for i, m in enumerate(getattr(pr, section)):
            for field in ("source", "target"):
                if getattr(m, field) not in known:
                    out.append(src.problem((section, i, field), _unknown(what, getattr(m, field), set(known))))
            if m.source in mapped:
                out.append(src.problem((section, i, "source"), f"{what} '{m.source}' is already mapped by {section}[{mapped[m.source]}]"))
            mapped.setdefault(m.source, i)
            if m.source in known and m.target in known and known[m.source].site == known[m.target].site:  # type: ignore[attr-defined]
                out.append(src.problem((section, i), f"source and target are both in site '{known[m.source].site}'"))  # type: ignore[attr-defined]
    return out


def check_consistency_groups(p: Project) -> list[Problem]:
    """Members exist, belong to one pairing on the linux fabric, to one group each, and can be held still."""
    t, pr, src = p.topology, p.protection, p.protection_source
    assert src is not None
    out = _dupes(pr.consistency_groups, src, "consistency_groups", "consistency group")
    vms = {v.name: v for v in t.vms}
    hosts = {h.name: h for h in t.hosts}
    member_of: dict[str, str] = {}
    for gi, g in enumerate(pr.consistency_groups):
        clouds: set[str] = set()
        for vi, name in enumerate(g.vms):
            loc: Path_ = ("consistency_groups", gi, "vms", vi)
            vm = vms.get(name)
            if vm is None:
                out.append(src.problem(loc, _unknown("VM", name, set(vms))))
                continue
            if name in member_of:
                out.append(src.problem(loc, f"VM '{name}' is already in consistency group '{member_of[name]}'; "
                                            "a VM belongs to one group"))
            member_of.setdefault(name, g.name)
            clouds.add(vm.cloud)
            host = hosts.get(vm.host)
            if host is not None and host.fabric == FabricKind.hyperv:
                out.append(src.problem(loc, f"VM '{name}' is on Hyper-V host '{host.name}': Hyper-V Replica keeps "
                                            "each VM's recovery points on its own and has no points across VMs, so "
                                            "a consistency group needs the linux fabric"))
            elif host is not None and host.fabric == FabricKind.linux:
                comp = vm.compute
                if comp is not None and comp.backend not in ("qemu", "libvirt") and not comp.freeze:
                    out.append(src.problem(loc, f"VM '{name}' has no freeze command and does not run under QEMU: "
                                                "a group point holds every member still at one instant, give it "
                                                "compute.freeze/thaw or backend qemu or libvirt"))
        if len(clouds) > 1:
            out.append(src.problem(("consistency_groups", gi, "vms"),
                                   f"the members are in different clouds ({', '.join(sorted(clouds))}); a group's "
                                   "VMs replicate under one pairing"))
    return out


def _cycle(deps: dict[str, tuple[str, ...]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in deps.get(n, ()):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if state.get(d) is None and d in deps:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in deps:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def check_plan(p: Project, ps: PlanSource) -> list[Problem]:
    plan, src, t = ps.plan, ps.source, p.topology
    out: list[Problem] = []
    vms = {v.name: v for v in t.vms}
    clouds = {c.name for c in t.clouds}
    hosts = {h.name for h in t.hosts}
    for field in ("source", "target"):
        if getattr(plan, field) not in clouds:
            out.append(src.problem((field,), _unknown("cloud", getattr(plan, field), clouds)))
    if plan.source in clouds and plan.target in clouds and p.protection.pairing_for(plan.source, plan.target) is None:
        pairs = ", ".join(f"{x.protected_cloud} -> {x.protecting_cloud}" for x in p.protection.pairings) or "none"
        out.append(src.problem(("target",), f"'{plan.source}' -> '{plan.target}' is not a configured pairing "
                                            f"(configured: {pairs})"))
    where: dict[str, tuple[int, int]] = {}
    gnames: dict[str, int] = {}
    for gi, g in enumerate(plan.groups):
        if g.name in gnames:
            out.append(src.problem(("groups", gi, "name"), f"group '{g.name}' is defined twice (first at groups[{gnames[g.name]}])"))
        gnames.setdefault(g.name, gi)
        for vi, gvm in enumerate(g.vms):
            loc: Path_ = ("groups", gi, "vms", vi)
            if gvm.name not in vms:
                out.append(src.problem(loc, _unknown("VM", gvm.name, set(vms))))
            elif vms[gvm.name].cloud != plan.source:
                out.append(src.problem(loc, f"VM '{gvm.name}' is in cloud '{vms[gvm.name].cloud}', not the plan's "
                                            f"source cloud '{plan.source}'"))
            if gvm.name in where:
                fg, fv = where[gvm.name]
                out.append(src.problem(loc, f"VM '{gvm.name}' is already in group '{plan.groups[fg].name}' "
                                            f"(groups[{fg}].vms[{fv}]); a VM belongs to one group"))
            else:
                where[gvm.name] = (gi, vi)
        for vi, gvm in enumerate(g.vms):
            cg = p.protection.group_of(gvm.name)
            missing = [m for m in cg.vms if not any(m in x.vm_names for x in plan.groups)] if cg else []
            if cg is not None and missing:
                out.append(src.problem(("groups", gi, "vms", vi),
                                       f"VM '{gvm.name}' is in consistency group '{cg.name}' with {', '.join(missing)}, "
                                       "which this plan does not fail over: a group fails over together, to one "
                                       "group point; add them to the plan"))
        members = set(g.vm_names)
        deps: dict[str, tuple[str, ...]] = {}
        for vi, gvm in enumerate(g.vms):
            deps[gvm.name] = gvm.depends_on
            for di, d in enumerate(gvm.depends_on):
                loc = ("groups", gi, "vms", vi, "depends_on", di)
                if d == gvm.name:
                    out.append(src.problem(loc, f"VM '{d}' depends on itself"))
                elif d not in members:
                    if d in where or any(d in x.vm_names for x in plan.groups):
                        out.append(src.problem(loc, f"'{gvm.name}' depends on '{d}' of another group; a dependency "
                                                    "must stay inside its group (groups already run in order)"))
                    else:
                        out.append(src.problem(loc, f"'{gvm.name}' depends on '{d}', which is not in group '{g.name}'"))
        cyc = _cycle({k: tuple(d for d in v if d in members and d != k) for k, v in deps.items()})
        if cyc:
            out.append(src.problem(("groups", gi, "vms"), f"boot dependency cycle: {' -> '.join(cyc)}"))
        for side in ("before", "after"):
            anames: set[str] = set()
            for ai, action in enumerate(getattr(g, side)):
                loc = ("groups", gi, side, ai)
                if action.name in anames:
                    out.append(src.problem(loc + ("name",), f"action '{action.name}' is defined twice in {side}"))
                anames.add(action.name)
                if action.type == "script":
                    if action.host is not None and action.host not in hosts:
                        out.append(src.problem(loc + ("host",), _unknown("host", action.host, hosts)))
                    script = (ps.file.parent / action.path)
                    if not Path(action.path).is_absolute() and not script.is_file():
                        out.append(src.problem(loc + ("path",), f"script '{action.path}' not found (looked in {script.parent})"))
                    for ri, arg in enumerate(action.args):
                        err = check_template(arg)
                        if err:
                            out.append(src.problem(loc + ("args", ri), err))
    return out


def check_plans_together(p: Project) -> list[Problem]:
    """A VM must not play opposite roles in two plans (protected in one direction here, the other there)."""
    out: list[Problem] = []
    role: dict[str, tuple[str, RecoveryPlan]] = {}
    for _name, ps in sorted(p.plans.items()):
        for gi, g in enumerate(ps.plan.groups):
            for vi, vm in enumerate(g.vm_names):
                pair = f"{ps.plan.source} -> {ps.plan.target}"
                if vm in role and role[vm][0] != pair:
                    other = role[vm][1]
                    out.append(ps.source.problem(("groups", gi, "vms", vi),
                                                 f"VM '{vm}' fails over {pair} here but {role[vm][0]} in plan '{other.name}'"))
                role.setdefault(vm, (pair, ps.plan))
    return out


def validate_project(p: Project, now: datetime | None = None) -> list[Problem]:
    out = check_topology(p) + check_protection(p, now)
    for ps in p.plans.values():
        out += check_plan(p, ps)
    out += check_plans_together(p)
    return out

