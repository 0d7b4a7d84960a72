"""`siterecovery demo` end to end, as a user runs it: a real sshd, real tier processes, the recovery
plan through Prefect (the demo's own server, started cold: fresh PREFECT_HOME, no bytecode cache). Checks the demo's claims from the outside: exit 0, three runs in the
summary and as HTML reports, the order written before the planned failover read back at the recovery
site, nothing left by the drill, and nothing left running at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from siterecovery.demo import processes_under

ROOT = Path(__file__).resolve().parents[2]


def _with_env(entry: str) -> list[str]:
    """Live processes whose environment holds `entry` (the ephemeral Prefect server inherits it)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if entry.encode() in (d / "environ").read_bytes().split(b"\0"):
                    found.append(d.name)
            except OSError:
                continue
    return found


@pytest.mark.sshd
@pytest.mark.prefect_server
# The demo takes ~2 min on an idle 2-core machine (DEMO.md) and 7 min was seen under load ~12: a hang
# is still caught, a slow machine is not failed.
@pytest.mark.timeout(600)
def test_demo_end_to_end(tmp_path: Path) -> None:
    if not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("/usr/sbin/sshd is missing (scripts/setup-system.sh installs it)")
    state = tmp_path / "demo"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": str(ROOT), "COLUMNS": "120", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PREFECT_API_URL", None)  # the demo's default: it starts and waits for its own server
    env.pop("SITERECOVERY_STATE", None)
    cli = [sys.executable, "-m", "siterecovery", "demo", "--state", str(state)]
    try:
        _check_demo(cli, env, state, tmp_path)
    finally:
        # A demo that failed or overran its time leaves its tiers running (seen under heavy load: the
        # timeout killed the demo, not the three shop tiers): stop them as `make demo-clean` would.
        if state.exists():
            subprocess.run([*cli, "--clean"], cwd=ROOT, env=env, capture_output=True, timeout=60, check=False)


def _check_demo(cli: list[str], env: dict[str, str], state: Path, tmp_path: Path) -> None:
    proc = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True, timeout=520, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = json.loads((state / "summary.json").read_text())
    assert summary["ok"] and summary["transport"].startswith("ssh ")
    runs = summary["runs"]
    assert [(r["failover_type"], r["direction"], r["status"]) for r in runs] == [
        ("test", "forward", "succeeded"), ("planned", "forward", "succeeded"), ("planned", "failback", "succeeded")]
    assert all(r["achieved_rpo_seconds"] is not None and r["achieved_rto_seconds"] is not None for r in runs)
    reports = sorted((state / "state" / "reports").glob("*.html"))
    assert len(reports) == 3 and all(Path(r["report"]) in reports for r in runs)
    drill = runs[0]
    assert [a["decision"] for a in drill["approvals"]] == ["approved"]
    assert "drill-sign-off" in out and "resume_flow_run(" in out  # how a person would approve

    checks = summary["checks"]
    # The planned failover lost nothing: the order written just before it is read at the recovery site.
    assert checks["row_before_failover_at_recovery"] and checks["row_before_failover"].startswith("before-failover-")
    assert checks["rows_home_after_failback"]
    # The drill left no test copy, no test process and nothing answering on the isolated network.
    assert checks["drill_left_nothing"] and checks["drill_left"] == []
    assert not list((state / "sites").glob("*/*/test"))
    # The test copies' data came from the recovery point: the check script ran in the plan and passed.
    html = next(r for r in reports if "-test-" in r.name).read_text()
    assert "check-shop" in html and "drill-sign-off" in html
    # The database tier is one consistency group: both databases came up from one group point, and the
    # plan's check found every payment matching its order in the test copies.
    assert checks["drill_databases_from_one_group_point"] and drill["group_points"].get("shop-db", "").startswith("shop-db@")
    assert "payments match their orders" in (state / "demo.log").read_text()
    # Nothing left running: no VM, agent or sshd of this state, and no Prefect server of this PREFECT_HOME.
    assert processes_under(state) == []
    assert _with_env(f"PREFECT_HOME={tmp_path / 'prefect'}") == []

    # `--clean` (make demo-clean) removes the state.
    clean = subprocess.run([*cli, "--clean"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert not state.exists()
