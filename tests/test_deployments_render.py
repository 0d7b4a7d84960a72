"""deployments/prefect.yaml is generated from plans/ and deployments/settings.yaml: the committed file
matches the renderer, schedules come from the settings, and nothing secret or machine-specific leaks in."""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from siterecovery.cli import _load_commands, app
from siterecovery.deployments import Schedule, Settings, load_settings, render, worker_queues
from siterecovery.errors import PlanError
from siterecovery.project import load_project

ROOT = Path(__file__).resolve().parents[1]
_load_commands()


def _by(doc: dict, entry_suffix: str) -> dict[str, dict]:
    return {d["name"]: d for d in doc["deployments"] if d["entrypoint"].endswith(entry_suffix)}


def test_committed_prefect_yaml_is_what_render_produces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, ["deployments", "render", "--check"])
    assert result.exit_code == 0, result.output


def test_check_fails_on_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    out = tmp_path / "prefect.yaml"
    shutil.copy(ROOT / "deployments" / "prefect.yaml", out)
    shutil.copy(ROOT / "deployments" / "settings.yaml", tmp_path / "settings.yaml")
    runner = CliRunner()
    assert runner.invoke(app, ["deployments", "render", "--check", "--out", str(out)]).exit_code == 0
    out.write_text(out.read_text().replace("cron: 0 2 * * 6", "cron: 0 4 * * 6"))
    result = runner.invoke(app, ["deployments", "render", "--check", "--out", str(out)])
    assert result.exit_code == 1
    assert "0 4 * * 6" in result.output  # the diff shows what changed
    assert runner.invoke(app, ["deployments", "render", "--out", str(out)]).exit_code == 0
    assert runner.invoke(app, ["deployments", "render", "--check", "--out", str(out)]).exit_code == 0


def test_every_plan_gets_a_weekly_drill_and_an_on_demand_failover() -> None:
    project = load_project(ROOT / "plans")
    doc = render(project, load_settings(ROOT / "deployments" / "settings.yaml"))
    drills, failovers = _by(doc, ":dr_drill"), _by(doc, ":failover")
    assert set(drills) == set(failovers) == set(project.plans) == {"three-tier", "web-only"}
    # web-only keeps the default weekly cron; three-tier has its own from the settings file.
    assert drills["web-only"]["schedules"] == [{"cron": "0 2 * * 6", "timezone": "UTC", "active": True}]
    assert drills["three-tier"]["schedules"][0]["cron"] == "0 3 * * 0"
    for name, d in drills.items():
        assert d["parameters"] == {"plan": name, "project": "plans", "cleanup": "immediate"}
        assert d["work_pool"]["name"] == "siterecovery"
    for name, f in failovers.items():
        assert f["schedules"] == []
        assert f["enforce_parameter_schema"] is True
        # The guard is not pre-filled: the form opens on a test failover with an empty confirmation.
        assert f["parameters"] == {"plan": name, "project": "plans", "failover_type": "test", "confirm": ""}
        assert f"'confirm' is the plan's name ('{name}')" in f["description"]


def test_protection_jobs_follow_the_policy() -> None:
    project = load_project(ROOT / "plans")
    doc = render(project)
    repl, health = _by(doc, ":replicate"), _by(doc, ":replication_health")
    # gold is a Hyper-V pairing: Hyper-V Replica replicates by itself, so no replicate deployment
    assert set(health) == {"gold"} and repl == {}
    assert health["gold"]["schedules"][0]["interval"] == 600
    demo = load_project(ROOT / "plans" / "demo")  # linux hosts: we drive the cycles
    repl = _by(render(demo), ":replicate")
    (name, r), = repl.items()
    pairing = demo.protection.pairing(name)
    assert r["schedules"][0]["interval"] == demo.protection.policy(pairing.policy).copy_frequency_seconds
    assert r["parameters"] == {"pairing": name, "project": "plans"}
    # a fabric override (the UI tests' memory estate) decides for every pairing
    assert set(_by(render(project, Settings.model_validate({"fabric": "memory"})), ":replicate")) == {"gold"}
    assert "gold" in _by(doc, ":enable_protection")
    # gold-5min's off-hours window opens at 22:00: resynchronization is scheduled then.
    assert _by(doc, ":resynchronize")["gold"]["schedules"][0]["cron"] == "0 22 * * *"
    no_repl = render(project, Settings.model_validate({"protection": {"replicate": False}}))
    assert not _by(no_repl, ":replicate")


def test_settings_override_and_validation(tmp_path: Path) -> None:
    project = load_project(ROOT / "plans")
    s = Settings.model_validate({"work_pool": "dr", "fabric": "memory", "drills": {
        "schedule": {"interval_seconds": 3600},
        "plans": {"web-only": {"drill": {"cron": "30 1 * * *", "active": False}, "cleanup": "after_approval"}}}})
    drills = _by(render(project, s), ":dr_drill")
    assert drills["web-only"]["schedules"] == [{"cron": "30 1 * * *", "timezone": "UTC", "active": False}]
    assert drills["web-only"]["parameters"]["cleanup"] == "after_approval"
    assert drills["three-tier"]["schedules"][0]["interval"] == 3600
    assert drills["three-tier"]["parameters"]["fabric"] == "memory"
    assert drills["three-tier"]["work_pool"]["name"] == "dr"

    with pytest.raises(PlanError, match="unknown plan 'nope'"):
        render(project, Settings.model_validate({"drills": {"plans": {"nope": {}}}}))
    with pytest.raises(ValueError, match="exactly one"):
        Schedule(cron="0 2 * * 6", interval_seconds=60)
    with pytest.raises(ValueError, match="five fields"):
        Schedule(cron="0 2 * *")
    bad = tmp_path / "settings.yaml"
    bad.write_text("kind: DeploymentSettings\ndrills:\n  schedule: {cron: '0 2 * * 6'}\n  cleanp: immediate\n")
    with pytest.raises(PlanError) as exc:
        load_settings(bad)
    (problem,) = exc.value.problems
    assert (problem.line, "unknown field 'cleanp'") == (4, problem.message.split(" (")[0])


def test_no_secrets_or_machine_paths_in_the_deployments() -> None:
    text = (ROOT / "deployments" / "prefect.yaml").read_text()
    doc = yaml.safe_load(text)
    for word in ("credential", "secret", "password", "hv-ny-svc-key", "SITERECOVERY_OPS_KEY", str(ROOT)):
        assert word not in text
    # No pull section: prefect deploy records the directory it runs in, so the file stays portable.
    assert "pull" not in doc


def _functions(path: Path) -> dict[str, list[str]]:
    """Flow objects a module defines at top level, with their parameter names (read, not imported)."""
    out: dict[str, list[str]] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out[node.name] = [a.arg for a in (*node.args.args, *node.args.kwonlyargs)]
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = []
    return out


@pytest.mark.parametrize("kind", ["drill", "failover", "protection"])
def test_entrypoints_exist_and_take_the_parameters(kind: str) -> None:
    doc = render(load_project(ROOT / "plans"), Settings(fabric="memory"))
    checked = 0
    for d in doc["deployments"]:
        file, _, func = d["entrypoint"].partition(":")
        if kind not in d["tags"]:
            continue
        path = ROOT / file
        if kind == "failover":
            # deployments/failover.py renames the recovery-plan flow; its parameters are that flow's.
            assert func in _functions(path)
            path, func = ROOT / "flows" / "recovery_plan.py", "recovery_plan"
        if not path.exists():
            pytest.skip(f"{path.relative_to(ROOT)} is not on this branch yet")
        params = _functions(path).get(func)
        assert params is not None, f"{file} defines no {func}"
        assert set(d["parameters"]) <= set(params), f"{d['entrypoint']} lacks {set(d['parameters']) - set(params)}"
        checked += 1
    assert checked


def test_core_import_leaves_prefect_out() -> None:
    assert "siterecovery.deployments" in sys.modules
    import subprocess

    code = "import sys, siterecovery.deployments, siterecovery.ui; assert 'prefect' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_deployment_runs_on_the_queue_of_the_site_it_acts_on() -> None:
    demo = load_project(ROOT / "plans" / "demo")
    doc = render(demo)
    queue = {(d["entrypoint"].rsplit(":", 1)[1], d["name"]): d["work_pool"]["work_queue_name"]
             for d in doc["deployments"]}
    # Failover and drills at the recovery site: they must run when the primary is gone.
    assert queue["failover", "shop"] == queue["dr_drill", "shop"] == "site-recovery"
    (pairing,) = demo.protection.pairings
    # Replication reads the source disks at the protected site; health keeps watching from the other.
    for job in ("replicate", "enable_protection", "resynchronize"):
        assert queue[job, pairing.name] == "site-primary", job
    assert queue["replication_health", pairing.name] == "site-recovery"
    assert worker_queues(doc) == ["site-recovery", "site-primary"]
    one = render(demo, Settings.model_validate({"queue_per_site": False}))
    assert worker_queues(one) == [None]
