"""Which limit slots one reservation covers: the VM batches up to the next script or manual batch (then
the slots go back: scripts and people may take long), plus the cleanup when the stretch reaches the
end of the plan. Pure: no Prefect server."""

from __future__ import annotations

from pathlib import Path

from flows.recovery_plan import _needs, _stretch
from siterecovery.compile import compile_plan
from siterecovery.model import FailoverType
from siterecovery.project import load_project
from siterecovery.testing.projects import memory_project

PLANS = Path(__file__).resolve().parent.parent.parent / "plans"


def test_scripts_after_each_group_end_each_stretch() -> None:
    project = load_project(PLANS)
    c = compile_plan(project, project.plan("three-tier"), FailoverType.test)
    # database, database: after (scripts), application, ...: every VM batch is a stretch of its own,
    # and the last one ends at the web group's scripts, so the cleanup reserves afresh.
    assert [b.name for b in c.batches][:2] == ["database: test failover", "database: after"]
    assert _stretch(c, 0) == _needs([c.batches[0]])
    assert _stretch(c, 4) == _needs([c.batches[4]])


def test_without_actions_one_stretch_covers_every_group_and_the_cleanup(tmp_path: Path) -> None:
    plan = {"name": "p", "groups": [{"name": "a", "vms": [f"a-{i}" for i in range(6)]},
                                    {"name": "b", "vms": [f"b-{i}" for i in range(3)]}]}
    project = load_project(memory_project(tmp_path / "project", [plan], source_hosts=2, target_hosts=2))
    c = compile_plan(project, project.plan("p"), FailoverType.test)
    whole = _stretch(c, 0)
    assert whole == _needs([*c.batches, *c.cleanup])
    # per limit the most VMs one batch runs there (group a), not the sum over the batches
    site = [n for n in whole if n.startswith("siterecovery-site-")]
    assert len(site) == 1 and whole[site[0]] == 6
    assert sum(k for n, k in whole.items() if n.startswith("siterecovery-host-")) == 6
