"""Consistency groups through the flows, on the memory fabric: the replicate flow cycles a group as one,
an unplanned failover takes every member to one group point (never to a newer part that another member
lacks), a re-run keeps the point it chose, and the report names it. The linux fabric over real sshd,
with a writer whose invariant spans two VMs, is tests/fabric/test_consistency_linux.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.protection import replicate
from flows.recovery_plan import PlanFailed, recovery_plan
from siterecovery.compile import RunOptions
from siterecovery.fabric.memory import MemoryFabric
from siterecovery.model import Direction, FailoverType
from siterecovery.placement import plan_placements
from siterecovery.project import load_project

pytestmark = pytest.mark.usefixtures("prefect_harness")

PLAN = {"name": "tiers", "version": "1", "groups": [
    {"name": "db", "vms": ["db-1"]},
    {"name": "app", "vms": ["app-1", "web-1"]},
]}


def _with_group(root: Path, vms: list[str]) -> None:
    path = root / "protection.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["consistency_groups"] = [{"name": "orders", "vms": vms}]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _placements(root: Path) -> dict[str, Any]:
    proj = load_project(root)
    return plan_placements(proj, proj.plan("tiers"), Direction.forward)


def test_replicate_flow_cycles_the_group_as_one_point(estate) -> None:  # type: ignore[no-untyped-def]
    e = estate([PLAN], seed="tiers")
    _with_group(e.root, ["db-1", "app-1"])
    cycles = {r.vm: r for r in replicate(pairing="prod", project=str(e.root))}
    assert {vm: r.action for vm, r in cycles.items()} == {"db-1": "cycle", "app-1": "cycle", "web-1": "cycle"}
    assert "part of group point orders@1" in cycles["db-1"].note and "part of group point orders@1" in cycles["app-1"].note
    newest = {vm: e.vm(vm)["points"][-1] for vm in ("db-1", "app-1", "web-1")}
    assert newest["db-1"]["group"] == newest["app-1"]["group"] == "orders@1"
    assert newest["db-1"]["created_at"] == newest["app-1"]["created_at"]  # one instant
    assert "group" not in newest["web-1"]  # not a member: its own cycle


def test_unplanned_failover_takes_every_member_to_one_complete_group_point(estate) -> None:  # type: ignore[no-untyped-def]
    e = estate([PLAN], seed="tiers")
    _with_group(e.root, ["db-1", "app-1"])
    ps = _placements(e.root)
    fab = MemoryFabric(e.fabric.context)
    members = [ps["db-1"], ps["app-1"]]
    fab.replicate_group(members, "orders")  # orders@1
    fab.replicate_group(members, "orders")  # orders@2: the newest complete one
    fab.inject("replicate", "app-1")  # orders@3 reaches db-1 only: incomplete, never offered
    with pytest.raises(Exception, match="injected"):
        fab.replicate_group(members, "orders")
    fab.replicate(ps["db-1"])  # and a point of db-1's own, newer still
    part = {vm: next(p["id"] for p in e.vm(vm)["points"] if p.get("group") == "orders@2") for vm in ("db-1", "app-1")}
    assert e.vm("db-1")["points"][-1]["id"] != part["db-1"]  # the premise: latest would pick something else

    out = recovery_plan(plan="tiers", project=str(e.root), failover_type=FailoverType.unplanned, confirm="tiers")
    assert out["status"] == "succeeded" and out["group_points"] == {"orders": "orders@2"}
    assert {vm: e.vm(vm)["failover_point"] for vm in ("db-1", "app-1")} == part
    assert e.vm("web-1")["failover_point"] == e.vm("web-1")["points"][-1]["id"]  # not a member: latest
    rep = json.loads(Path(out["report"]).with_suffix(".json").read_text())
    assert [(g["group"], g["id"], sorted(g["members"])) for g in rep["group_points"]] == [
        ("orders", "orders@2", ["app-1", "db-1"])]
    assert "Consistency group orders" in Path(out["report"]).read_text()


def test_a_rerun_keeps_the_group_point_it_chose(estate) -> None:  # type: ignore[no-untyped-def]
    """A half-failed failover re-run after a newer group point arrived: members still to go take the point
    the first run chose, not the newer one (the intent journals it)."""
    e = estate([PLAN], seed="tiers")
    _with_group(e.root, ["db-1", "app-1"])
    ps = _placements(e.root)
    fab = MemoryFabric(e.fabric.context)
    fab.replicate_group([ps["db-1"], ps["app-1"]], "orders")  # orders@1
    fab.inject("failover", "app-1")
    with pytest.raises(PlanFailed):
        recovery_plan(plan="tiers", project=str(e.root), failover_type=FailoverType.unplanned, confirm="tiers")
    assert e.vm("db-1")["failover_point"] is not None and e.vm("app-1")["failover_point"] is None
    # A complete orders@2 shows up before the re-run (written into the simulator's estate: db-1 is failed
    # over, so no cycle could ship it now; what matters is that the re-run would prefer it if it chose again).
    when = datetime.now(UTC).isoformat()
    with fab._state() as st:
        for vm in ("db-1", "app-1"):
            rec = st["vms"][vm]
            rec["seq"] += 1
            rec["points"].append({"id": f"{vm}@{rec['seq']}", "vm": vm, "created_at": when, "consistency": "crash",
                                  "group": "orders@2"})
    out = recovery_plan(plan="tiers", project=str(e.root), failover_type=FailoverType.unplanned, confirm="tiers")
    assert out["status"] == "succeeded" and out["group_points"] == {"orders": "orders@1"}
    got = e.vm("app-1")["failover_point"]
    assert next(p for p in e.vm("app-1")["points"] if p["id"] == got).get("group") == "orders@1"


def test_no_complete_group_point_fails_over_nothing(estate) -> None:  # type: ignore[no-untyped-def]
    e = estate([PLAN], seed="tiers")  # seeded points are each VM's own: no group point yet
    _with_group(e.root, ["db-1", "app-1"])
    with pytest.raises(PlanFailed) as ei:
        recovery_plan(plan="tiers", project=str(e.root), failover_type=FailoverType.unplanned, confirm="tiers")
    assert "consistency group orders: no group point matches latest" in str(ei.value)
    assert "consistency_groups: each" in str(ei.value)  # the way on, named
    assert e.calls("failover") == []  # refused before any VM moved
    # The way on, for when the VMs must come up anyway: each member to its own latest point, said loudly.
    out = recovery_plan(plan="tiers", project=str(e.root), failover_type=FailoverType.unplanned, confirm="tiers",
                        options=RunOptions(consistency_groups="each"))
    assert out["status"] == "succeeded" and out["group_points"] == {}
    assert e.vm("db-1")["failover_point"] == e.vm("db-1")["points"][-1]["id"]
