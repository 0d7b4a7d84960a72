"""Compilation of plans into ordered steps: order per failover type, dependencies, scopes, stable ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from siterecovery.compile import RunOptions, compile_plan
from siterecovery.model import Direction, FailoverType
from siterecovery.project import load_project

PLANS = Path(__file__).resolve().parent.parent / "plans"


@pytest.fixture(scope="module")
def project():  # type: ignore[no-untyped-def]
    return load_project(PLANS)


def ops(compiled, stage=None):  # type: ignore[no-untyped-def]
    return [(s.operation, s.vm or (s.action.name if s.action else None)) for s in compiled.steps()
            if stage is None or s.stage == stage]


def test_test_failover_order_and_cleanup(project) -> None:  # type: ignore[no-untyped-def]
    c = compile_plan(project, project.plan("three-tier"), FailoverType.test)
    stages = [b.stage for b in c.batches]
    assert "shutdown" not in stages and "commit" not in stages
    group_ops = ops(c, "group")
    # groups in order, test failover before start, checks after each group's VMs
    assert group_ops.index(("test_failover", "sql-01")) < group_ops.index(("start_vm", "sql-01"))
    assert group_ops.index(("script", "sql-02")) < group_ops.index(("test_failover", "app-01"))
    # manual actions scoped to planned/unplanned are not in a test failover
    assert ("manual", "confirm-dba") not in group_ops and ("manual", "switch-dns") not in group_ops
    # cleanup in reverse group order, one step per VM
    cleanup = [s.vm for b in c.cleanup for s in b.steps]
    assert cleanup == ["web-01", "web-02", "lb-01", "app-01", "app-02", "sql-01", "sql-02"]
    assert all(s.test for s in c.steps() if s.operation == "start_vm")


def test_planned_failover_shuts_down_in_reverse_order_then_commits(project) -> None:  # type: ignore[no-untyped-def]
    c = compile_plan(project, project.plan("three-tier"), FailoverType.planned,
                     options=RunOptions(reverse_replication=True))
    shutdown = [s.vm for s in c.steps() if s.stage == "shutdown"]
    assert shutdown == ["web-01", "web-02", "lb-01", "app-01", "app-02", "sql-01", "sql-02"]
    assert all(s.host and s.host.startswith("hv-ny") for s in c.steps() if s.stage == "shutdown")
    chain = [op for op, vm in ops(c, "group") if vm == "web-01"]
    # Hyper-V hosts: the documented order (seed 003): Start-VMFailover, Set-VMReplication -Reverse, Start-VM;
    # the reverse completes the failover, so no commit stage.
    assert chain == ["failover", "reverse_replication", "apply_network", "start_vm"]
    assert not [b for b in c.batches if b.stage in ("commit", "reverse")]
    assert ("manual", "confirm-dba") in ops(c) and ("manual", "switch-dns") in ops(c)
    # Reverse is the default for a planned failover; turning it off commits instead.
    default = compile_plan(project, project.plan("three-tier"), FailoverType.planned)
    assert [op for op, vm in ops(default, "group") if vm == "web-01"] == chain
    off = compile_plan(project, project.plan("three-tier"), FailoverType.planned,
                       options=RunOptions(reverse_replication=False))
    assert [op for op, vm in ops(off, "group") if vm == "web-01"] == ["failover", "apply_network", "start_vm"]
    assert [b.stage for b in off.batches][-1:] == ["commit"]


def test_failback_drops_forward_only_actions_and_swaps_hosts(project) -> None:  # type: ignore[no-untyped-def]
    c = compile_plan(project, project.plan("three-tier"), FailoverType.planned, Direction.failback)
    assert ("manual", "switch-dns") not in ops(c)
    assert all(s.host and s.host.startswith("hv-chi") for s in c.steps() if s.stage == "shutdown")
    assert all(s.host and s.host.startswith("hv-ny") for s in c.steps() if s.operation == "failover")


def test_unplanned_shutdown_is_best_effort_and_optional(project) -> None:  # type: ignore[no-untyped-def]
    c = compile_plan(project, project.plan("three-tier"), FailoverType.unplanned)
    shut = [s for s in c.steps() if s.stage == "shutdown"]
    assert shut and all(s.best_effort and s.operation == "stop_vm" and s.side == "source" for s in shut)
    c2 = compile_plan(project, project.plan("three-tier"), FailoverType.unplanned,
                      options=RunOptions(shut_down_source=False, commit=False))
    assert not [s for s in c2.steps() if s.stage in ("shutdown", "commit")]


def test_boot_dependencies_wait_for_the_dependency_start(project) -> None:  # type: ignore[no-untyped-def]
    c = compile_plan(project, project.plan("three-tier"), FailoverType.planned)
    steps = {s.id: s for s in c.steps()}
    lb_start = next(s for s in steps.values() if s.operation == "start_vm" and s.vm == "lb-01")
    waited = {steps[x].vm for x in lb_start.after if steps[x].operation == "start_vm"}
    assert waited == {"web-01", "web-02"}
    # every `after` names a step of the same batch, so a batch can run on its own
    for batch in c.batches:
        ids = {s.id for s in batch.steps}
        for s in batch.steps:
            assert set(s.after) <= ids


def test_step_ids_are_unique_and_stable(project) -> None:  # type: ignore[no-untyped-def]
    a = compile_plan(project, project.plan("three-tier"), FailoverType.planned)
    b = compile_plan(project, project.plan("three-tier"), FailoverType.planned)
    ids = [s.id for s in a.steps()]
    assert len(ids) == len(set(ids))
    assert ids == [s.id for s in b.steps()]


def test_drill_finished_approval_option(project) -> None:  # type: ignore[no-untyped-def]
    c = compile_plan(project, project.plan("web-only"), FailoverType.test, options=RunOptions(cleanup="after_approval"))
    assert c.batches[-1].stage == "drill" and c.batches[-1].steps[0].kind == "manual"


def test_the_compiled_plan_carries_placements_and_script_contexts(project) -> None:  # type: ignore[no-untyped-def]
    from siterecovery.placement import plan_placements

    rp = project.plan("three-tier")
    c = compile_plan(project, rp, FailoverType.planned, Direction.failback)
    assert c.placements == plan_placements(project, rp, Direction.failback)
    vm_steps = [s for s in c.steps() if s.kind == "vm"]
    assert all(s.host in (c.placements[s.vm].source.name, c.placements[s.vm].target.name) for s in vm_steps if s.vm)
    scripts = [s for s in c.steps() if s.kind == "script"]
    assert scripts and set(c.script_contexts) == {s.id for s in scripts}
    per_vm = next(s for s in scripts if s.vm)
    ctx = c.script_contexts[per_vm.id]
    assert ctx["failover_type"] == "planned" and ctx["direction"] == "failback" and ctx["group"]["name"] == per_vm.group
    assert ctx["vm"] == {"name": per_vm.vm, "source_host": c.placements[per_vm.vm].source.name,
                         "target_host": c.placements[per_vm.vm].target.name}
