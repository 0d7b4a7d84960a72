"""Compile a recovery plan into the ordered steps a run executes. Pure: no Prefect, no I/O.

plan + project + failover type + direction + recovery point choice -> batches. A batch's steps may
run concurrently, each waiting only for the steps named in its `after`; batches run in order. Every
step has a stable id (used for task names and for the cache keys that make a re-run resume) and names
the host it acts on (for per-host and per-site concurrency limits). The compiled plan also carries what
the run needs about each VM and script, resolved here once: the VMs' placements and the scripts' contexts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .fabric.base import Placement, PointChoice
from .model import Direction, FailoverType, ManualAction, RecoveryPlan, ScriptAction, VMGroup
from .model.common import Frozen
from .placement import plan_placements
from .project import Project

Stage = Literal["shutdown", "group", "drill", "commit", "reverse", "cleanup"]

# What each VM does in a group, per failover type. Which host an operation acts on is the
# fabric's: these act on the source (primary) side, every other one on the target (replica).
SOURCE_SIDE_OPS = frozenset({"prepare_planned_failover", "stop_vm"})


class RunOptions(Frozen):
    shut_down_source: bool = Field(True, description="unplanned: try to shut the source VMs down first")
    commit: bool = Field(True, description="planned/unplanned: commit the failover once every group is up")
    reverse_replication: bool | None = Field(
        None, description="replicate back to the old source; default: yes for a planned failover (reversed before "
                          "the VM starts, as Hyper-V Replica documents), no for an unplanned one (after commit)")
    cleanup: Literal["immediate", "after_approval"] = Field(
        "immediate", description="test: clean up at once, or after a manual 'drill finished' approval")
    test_network: str | None = Field(None, description="test: override the isolated network (switch name)")
    consistency_groups: Literal["together", "each"] = Field(
        "together", description="test/unplanned: 'together' takes every member of a consistency group to one group "
                                "point; 'each' lets each member take its own point (NOT one moment: only when no "
                                "group point exists and the VMs must come up anyway)")


class Step(Frozen):
    id: str
    label: str
    stage: Stage
    kind: Literal["vm", "script", "manual"]
    operation: str
    group: str | None = None
    vm: str | None = None
    host: str | None = None
    site: str | None = None
    side: Literal["source", "target"] | None = None
    action: ScriptAction | ManualAction | None = None
    after: tuple[str, ...] = ()
    best_effort: bool = False
    test: bool = False


class Batch(Frozen):
    name: str
    stage: Stage
    group: str | None = None
    steps: tuple[Step, ...]


class CompiledPlan(Frozen):
    plan: str
    plan_version: str
    failover_type: FailoverType
    direction: Direction
    point: PointChoice
    options: RunOptions
    batches: tuple[Batch, ...]
    cleanup: tuple[Batch, ...] = Field((), description="test failover: always run, also after a failure")
    placements: dict[str, Placement] = Field(default_factory=dict, description="each VM of the plan, in the "
                                                                               "run's direction")
    script_contexts: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="script step id -> what its script's template and environment see")

    def steps(self) -> list[Step]:
        return [s for b in (*self.batches, *self.cleanup) for s in b.steps]


def script_context(plan: RecoveryPlan, step: Step, failover_type: FailoverType, direction: Direction,
                   placements: dict[str, Placement]) -> dict[str, Any]:
    """What a script step's template sees: the plan, its group, the run's kind and, per VM, its hosts."""
    group = next(g for g in plan.groups if g.name == step.group)
    ctx: dict[str, Any] = {
        "plan": {"name": plan.name, "version": plan.version, "description": plan.description},
        "group": {"name": group.name, "vms": list(group.vm_names)},
        "failover_type": failover_type.value, "direction": direction.value,
    }
    if step.vm:
        placement = placements[step.vm]
        ctx["vm"] = {"name": step.vm, "source_host": placement.source.name, "target_host": placement.target.name}
    return ctx


def _actions(group: VMGroup, side: str, ftype: FailoverType, direction: Direction,
             hosts_site: dict[str, str], group_index: int) -> list[Batch]:
    steps: list[Step] = []
    prev: tuple[str, ...] = ()
    for action in getattr(group, side):
        if not action.when.applies(ftype, direction):
            continue
        if isinstance(action, ManualAction):
            sid = f"{group_index:02d}-{group.name}/{side}/{action.name}"
            steps.append(Step(id=sid, label=f"approve {action.name}", stage="group", kind="manual",
                              operation="manual", group=group.name, action=action, after=prev))
            prev = (sid,)
            continue
        host = action.host
        site = hosts_site.get(host) if host else None
        if action.per_vm:
            ids = []
            for vm in group.vm_names:
                sid = f"{group_index:02d}-{group.name}/{side}/{action.name}/{vm}"
                steps.append(Step(id=sid, label=f"script {action.name} {vm}", stage="group", kind="script",
                                  operation="script", group=group.name, vm=vm, host=host, site=site,
                                  action=action, after=prev))
                ids.append(sid)
            prev = tuple(ids)
        else:
            sid = f"{group_index:02d}-{group.name}/{side}/{action.name}"
            steps.append(Step(id=sid, label=f"script {action.name}", stage="group", kind="script",
                              operation="script", group=group.name, host=host, site=site, action=action,
                              after=prev))
            prev = (sid,)
    if not steps:
        return []
    return [Batch(name=f"{group.name}: {side}", stage="group", group=group.name, steps=tuple(steps))]


def compile_plan(
    project: Project,
    plan: RecoveryPlan,
    failover_type: FailoverType,
    direction: Direction = Direction.forward,
    point: PointChoice | None = None,
    options: RunOptions | None = None,
) -> CompiledPlan:
    """The ordered batches of steps one run of `plan` executes."""
    point = point or PointChoice()
    options = options or RunOptions()
    placements = plan_placements(project, plan, direction)
    hosts_site = {h.name: h.site for h in project.topology.hosts}

    def vm_step(stage: Stage, op: str, vm: str, group: str | None, gi: int, after: tuple[str, ...] = (),
                side: Literal["source", "target"] = "target", test: bool = False, best_effort: bool = False,
                verb: str | None = None) -> Step:
        p = placements[vm]
        if op in SOURCE_SIDE_OPS and not (op == "stop_vm" and side == "target"):
            side = "source"
        host = p.source if side == "source" else p.target
        prefix = f"{gi:02d}-{group}" if group is not None else stage
        label = f"{verb or op.replace('_', ' ')} {vm}"
        return Step(id=f"{prefix}/{op}{'-test' if test else ''}/{vm}", label=label, stage=stage, kind="vm",
                    operation=op, group=group, vm=vm, host=host.name, site=host.site, side=side,
                    after=after, best_effort=best_effort, test=test)

    batches: list[Batch] = []
    cleanup: list[Batch] = []
    groups = list(enumerate(plan.groups, start=1))
    reverse = options.reverse_replication

    def planned_reverse(vm: str) -> bool:
        # Hyper-V Replica reverses inside a planned failover, before the VM starts (on by default). The
        # linux fabric keeps its own order: commit, then reverse when asked.
        if failover_type != FailoverType.planned or reverse is False:
            return False
        return placements[vm].target.fabric.value == "hyperv"

    if failover_type == FailoverType.planned:
        for gi, g in reversed(groups):
            batches.append(Batch(name=f"{g.name}: shut down source", stage="shutdown", group=g.name, steps=tuple(
                vm_step("shutdown", "prepare_planned_failover", vm, g.name, gi, verb="prepare") for vm in g.vm_names)))
    elif failover_type == FailoverType.unplanned and options.shut_down_source:
        steps = tuple(vm_step("shutdown", "stop_vm", vm, g.name, gi, side="source", best_effort=True, verb="stop source")
                      for gi, g in reversed(groups) for vm in g.vm_names)
        batches.append(Batch(name="shut down source (best effort)", stage="shutdown", steps=steps))

    for gi, g in groups:
        batches += _actions(g, "before", failover_type, direction, hosts_site, gi)
        steps_: list[Step] = []
        start_ids: dict[str, str] = {}
        chains: dict[str, list[Step]] = {}
        for vm in g.vm_names:
            chain: list[Step] = []
            if failover_type == FailoverType.test:
                chain.append(vm_step("group", "test_failover", vm, g.name, gi, verb="test failover"))
                chain.append(vm_step("group", "start_vm", vm, g.name, gi, (chain[-1].id,), test=True, verb="start test"))
            else:
                chain.append(vm_step("group", "failover", vm, g.name, gi))
                if planned_reverse(vm):
                    # Seed 003 / Start-VMFailover: Prepare (primary), Start-VMFailover, Set-VMReplication
                    # -Reverse, Start-VM: the VM comes up already protected in the other direction.
                    chain.append(vm_step("group", "reverse_replication", vm, g.name, gi, (chain[-1].id,),
                                         verb="reverse replication"))
                chain.append(vm_step("group", "apply_network", vm, g.name, gi, (chain[-1].id,), verb="configure network"))
                chain.append(vm_step("group", "start_vm", vm, g.name, gi, (chain[-1].id,), verb="start"))
            start_ids[vm] = chain[-1].id
            chains[vm] = chain
        for gvm in g.vms:
            chain = chains[gvm.name]
            if gvm.depends_on:
                last = chain[-1]
                chain[-1] = last.model_copy(update={"after": last.after + tuple(start_ids[d] for d in gvm.depends_on
                                                                                  if d in start_ids)})
            steps_ += chain
        batches.append(Batch(name=f"{g.name}: {'test failover' if failover_type == FailoverType.test else 'failover'}",
                             stage="group", group=g.name, steps=tuple(steps_)))
        batches += _actions(g, "after", failover_type, direction, hosts_site, gi)

    if failover_type == FailoverType.test:
        if options.cleanup == "after_approval":
            drill = ManualAction(type="manual", name="drill-finished",
                                 instructions="Check the test VMs on the isolated network. Approve to clean them up.")
            batches.append(Batch(name="drill finished", stage="drill", steps=(Step(
                id="drill/drill-finished", label="approve drill-finished", stage="drill", kind="manual",
                operation="manual", action=drill),)))
        for gi, g in reversed(groups):
            cleanup.append(Batch(name=f"{g.name}: clean up test failover", stage="cleanup", group=g.name, steps=tuple(
                vm_step("cleanup", "cleanup_test_failover", vm, g.name, gi, verb="clean up test") for vm in g.vm_names)))
    else:
        # A reversed planned failover is complete (Set-VMReplication -Reverse commits it): nothing to commit.
        rest = [vm for vm in plan.vm_names if not planned_reverse(vm)]
        if options.commit and rest:
            batches.append(Batch(name="commit", stage="commit", steps=tuple(
                vm_step("commit", "commit_failover", vm, None, 0, verb="commit") for vm in rest)))
            if reverse:
                batches.append(Batch(name="reverse replication", stage="reverse", steps=tuple(
                    vm_step("reverse", "reverse_replication", vm, None, 0, verb="reverse replication")
                    for vm in rest)))
    contexts = {s.id: script_context(plan, s, failover_type, direction, placements)
                for b in batches for s in b.steps if s.kind == "script"}
    return CompiledPlan(plan=plan.name, plan_version=plan.version, failover_type=failover_type, direction=direction,
                        point=point, options=options, batches=tuple(batches), cleanup=tuple(cleanup),
                        placements=placements, script_contexts=contexts)
