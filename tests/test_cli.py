"""The CLI as a user runs it: a real subprocess, exit codes 0 (clean), 1 (problems), 2 (usage)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "siterecovery", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_version() -> None:
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip().startswith("siterecovery ")


def test_validate_clean_project() -> None:
    r = cli("validate", "plans")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok plans" in r.stdout


def test_validate_reports_every_problem_with_location(tmp_path: Path) -> None:
    for f in ("topology.yaml", "protection.yaml", "three-tier.yaml"):
        (tmp_path / f).write_text((ROOT / "plans" / f).read_text())
    plan = tmp_path / "three-tier.yaml"
    plan.write_text(plan.read_text().replace("vms: [app-01, app-02]", "vms: [app-01, app-09]")
                    .replace("path: ../scripts/notify.sh", f"path: {ROOT}/scripts/notify.sh")
                    .replace("path: ../scripts/check_port.sh", f"path: {ROOT}/scripts/check_port.sh"))
    r = cli("validate", str(tmp_path))
    assert r.returncode == 1, r.stdout + r.stderr
    line = next(i for i, t in enumerate(plan.read_text().splitlines(), 1) if "app-09" in t)
    assert f"{plan}:{line}:" in r.stdout and "groups[1].vms[1]: unknown VM 'app-09'" in r.stdout
    assert "1 problem" in r.stderr


def test_validate_usage_error() -> None:
    r = cli("validate", "/nonexistent/dir")
    assert r.returncode == 2 and "no such file" in r.stderr


def test_show_json_lists_the_steps() -> None:
    r = cli("show", "three-tier", "--type", "planned", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["failover_type"] == "planned" and data["plan_version"] == "3"
    ops = [s["operation"] for b in data["batches"] for s in b["steps"]]
    # Hyper-V hosts: reversed inside the planned failover (the documented order), so nothing to commit.
    assert ops[0] == "prepare_planned_failover" and "commit_failover" not in ops
    i = ops.index("failover")
    assert ops[i:i + 3] == ["failover", "reverse_replication", "apply_network"]


def test_show_table_and_plan_file() -> None:
    r = cli("show", "plans/web-only.yaml", "--type", "test")
    assert r.returncode == 0, r.stderr
    assert "test failover web-01" in r.stdout and "clean up test jump-01" in r.stdout


def test_show_unknown_plan_is_a_usage_error() -> None:
    r = cli("show", "nope")
    assert r.returncode == 2 and "unknown plan 'nope'" in (r.stdout + r.stderr)


def test_run_of_a_missing_plan_file_is_one_clear_error_before_prefect_starts() -> None:
    # Before, this started Prefect's ephemeral server first and ended in a traceback.
    r = cli("run", "nosuch.yaml")
    text = r.stdout + r.stderr
    assert r.returncode == 2 and "nosuch.yaml: no such plan file" in text
    assert "Traceback" not in text and "prefect" not in text.lower()


def test_run_of_an_invalid_plan_prints_its_problems(tmp_path: Path) -> None:
    (tmp_path / "topology.yaml").write_text("kind: Topology\nsites: [{name: a}]\nhosts: []\nvms: []\n")
    (tmp_path / "bad.yaml").write_text("kind: RecoveryPlan\nname: bad\nsource: nowhere\ntarget: nowhere\ngroups: []\n")
    r = cli("run", str(tmp_path / "bad.yaml"))
    text = r.stdout + r.stderr
    assert r.returncode == 1 and f"{tmp_path / 'bad.yaml'}:" in text and "Traceback" not in text


def test_failover_cancel_needs_the_plan_name() -> None:
    r = cli("failover", "cancel", "three-tier")
    assert r.returncode == 2 and "cancel-failover of 'three-tier' changes production" in r.stderr
    assert "--confirm three-tier" in r.stderr


def test_run_options_that_only_fit_one_kind_of_failover_are_refused_before_prefect_starts() -> None:
    r = cli("run", "web-only", "--type", "planned", "--confirm", "web-only", "--accept-damaged-replica")
    assert r.returncode == 2 and "is for an unplanned failover" in r.stderr, r.stdout + r.stderr
    r = cli("run", "web-only", "--consistency-groups", "sometimes")
    assert r.returncode == 2 and "unknown --consistency-groups sometimes" in r.stderr, r.stdout + r.stderr
