"""deployments/prefect.yaml is generated from plans/ and deployments/settings.yaml: the committed file
matches the renderer, schedules come from the settings, and nothing secret or machine-specific leaks in."""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path
from typing import Any

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
    assert drills["web-only"]["schedules"] == [{"cron": "0 2 * * 6", "timezone": "UTC", "active": True,
                                                "parameters": {"requested_by": "schedule of dr-drill/web-only"}}]
    assert drills["three-tier"]["schedules"][0]["cron"] == "0 3 * * 0"
    for name, d in drills.items():
        # requested_by is the person's to fill in (the form requires it); the schedule names itself.
        assert d["parameters"] == {"plan": name, "cleanup": "immediate", "advanced": {"project": "plans"}}
        assert d["work_pool"]["name"] == "siterecovery"
    for name, f in failovers.items():
        assert f["schedules"] == []
        assert f["enforce_parameter_schema"] is True
        # The guard is not pre-filled: confirm, the type and the requester are the person's to give.
        assert f["parameters"] == {"plan": name, "advanced": {"project": "plans"}}
        assert f"Type the plan's name ('{name}') in 'confirm'" in f["description"]


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
    # suspend and resume: on demand, per pairing, on every fabric (Hyper-V's Suspend-VMReplication too)
    for entry in (":suspend_replication", ":resume_replication"):
        d = _by(doc, entry)["gold"]
        assert d["schedules"] == [] and d["parameters"] == {"pairing": "gold", "project": "plans"}


def test_replicas_we_hold_are_scrubbed_weekly_at_a_capped_rate() -> None:
    # Hyper-V keeps its own replica files: nothing to scrub there
    assert _by(render(load_project(ROOT / "plans")), ":scrub") == {}
    demo = load_project(ROOT / "plans" / "demo")
    (name, d), = _by(render(demo), ":scrub").items()
    assert d["schedules"] == [{"cron": "0 4 * * 0", "timezone": "UTC", "active": True}]
    assert d["parameters"] == {"pairing": name, "project": "plans", "rate_mb_per_second": 50.0, "points": True}
    assert d["concurrency_limit"] == 1
    tuned = render(demo, Settings.model_validate({"protection": {"scrub": {"cron": "0 1 * * 3"},
                                                                 "scrub_rate_mb_per_second": 10}}))
    (_, d), = _by(tuned, ":scrub").items()
    assert d["schedules"][0]["cron"] == "0 1 * * 3" and d["parameters"]["rate_mb_per_second"] == 10
    (_, d), = _by(render(demo, Settings.model_validate({"protection": {"scrub": None}})), ":scrub").items()
    assert d["schedules"] == []  # kept on demand, no schedule


def test_settings_override_and_validation(tmp_path: Path) -> None:
    project = load_project(ROOT / "plans")
    s = Settings.model_validate({"work_pool": "dr", "fabric": "memory", "drills": {
        "schedule": {"interval_seconds": 3600},
        "plans": {"web-only": {"drill": {"cron": "30 1 * * *", "active": False}, "cleanup": "after_approval"}}}})
    drills = _by(render(project, s), ":dr_drill")
    assert drills["web-only"]["schedules"] == [{"cron": "30 1 * * *", "timezone": "UTC", "active": False,
                                                "parameters": {"requested_by": "schedule of dr-drill/web-only"}}]
    assert drills["web-only"]["parameters"]["cleanup"] == "after_approval"
    assert drills["three-tier"]["schedules"][0]["interval"] == 3600
    assert drills["three-tier"]["parameters"]["advanced"]["fabric"] == "memory"
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


@pytest.mark.parametrize("kind", ["drill", "failover", "recover", "protection"])
def test_entrypoints_exist_and_take_the_parameters(kind: str) -> None:
    doc = render(load_project(ROOT / "plans"), Settings(fabric="memory"))
    checked = 0
    for d in doc["deployments"]:
        file, _, func = d["entrypoint"].partition(":")
        if kind not in d["tags"]:
            continue
        path = ROOT / file
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


def _schemas() -> dict[str, dict[str, Any]]:
    """The parameter schemas `prefect deploy` derives from the flows (what the UI renders as forms)."""
    pytest.importorskip("prefect")
    from prefect.utilities.callables import parameter_schema

    sys.path.insert(0, str(ROOT))
    from deployments.failover import failover
    from flows.drill import dr_drill
    from flows.recover import recover

    return {name: parameter_schema(f).model_dump() for name, f in
            (("dr-drill", dr_drill), ("failover", failover), ("recover", recover))}


def _props(schema: dict[str, Any], obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Properties of `obj`, with $refs to definitions resolved."""
    if "$ref" in obj:
        obj = schema["definitions"][obj["$ref"].rsplit("/", 1)[1]]
    if "allOf" in obj:
        return _props(schema, obj["allOf"][0])
    return obj.get("properties", {})


def test_forms_everyday_fields_first_help_on_every_field_no_none_types() -> None:
    schemas = _schemas()
    failover = schemas["failover"]
    # confirm first and required; the type a choice of planned/unplanned; the requester required.
    assert list(failover["properties"])[:3] == ["confirm", "failover_type", "requested_by"]
    assert {"confirm", "failover_type", "requested_by", "plan"} <= set(failover["required"])
    assert failover["properties"]["failover_type"]["enum"] == ["planned", "unplanned"]
    assert list(schemas["dr-drill"]["properties"]) == ["plan", "requested_by", "cleanup", "advanced"]
    assert list(schemas["recover"]["properties"])[:3] == ["confirm", "action", "requested_by"]
    assert schemas["recover"]["properties"]["action"]["enum"] == ["resume", "commit", "cancel-failover"]
    for name, schema in schemas.items():
        top = schema["properties"]
        assert list(top)[-1] == "advanced", name  # expert fields under one object, last
        # The fabric is a choice, not free text.
        fabric = _props(schema, top["advanced"])["fabric"]
        assert fabric.get("enum") == ["topology", "memory", "linux", "hyperv"], (name, fabric)
        fields = dict(top)
        for key in ("advanced", "options"):
            if key in top:
                fields.update({f"{key}.{k}": v for k, v in _props(schema, top[key]).items()})
        for field, spec in fields.items():
            assert spec.get("description"), f"{name}: {field} has no help text"
            # Optional types render as "Property is type None" in the UI.
            text = json.dumps(spec)
            assert '"null"' not in text and "anyOf" not in text, f"{name}: {field} is optional: {text}"


def test_the_worked_example_starts_green_its_protection_schedules_paused_with_a_reason() -> None:
    doc = render(load_project(ROOT / "plans"), load_settings(ROOT / "deployments" / "settings.yaml"))
    scheduled = [d for d in doc["deployments"] if "protection" in d["tags"] and d["schedules"]]
    assert scheduled, "the worked example has scheduled protection jobs"
    for d in scheduled:
        assert all(sch["active"] is False for sch in d["schedules"]), d["name"]
        assert "Schedule created PAUSED: the worked example's Hyper-V hosts" in d["description"]
    # Drills stay scheduled (weekly): they are what a person resumes protection for.
    assert all(sch["active"] for d in _by(doc, ":dr_drill").values() for sch in d["schedules"])
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
