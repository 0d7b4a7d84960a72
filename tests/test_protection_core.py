"""Protection logic without Prefect: resync windows, breach tracking (one alert per breach), the
pairing state file, and `siterecovery status` over the memory fabric."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from siterecovery.placement import pairing_placements
from siterecovery.project import load_project
from siterecovery.protection import (
    EVENT_BREACHED,
    EVENT_RECOVERED,
    FAILED_CYCLES_BEFORE_RESYNC,
    HealthRow,
    in_window,
    next_window_start,
    open_fabric,
    pairing_state,
    read_pairing_state,
    resync_reason,
)
from siterecovery.testing.projects import copy_project

ROOT = Path(__file__).resolve().parents[1]
CHI = timezone(timedelta(hours=-6))


def at(hh: int, mm: int = 0) -> datetime:
    return datetime(2026, 3, 2, hh, mm, tzinfo=CHI)


@pytest.mark.parametrize(("now", "window", "inside"), [
    (at(23), ("22:00", "05:00"), True),
    (at(22), ("22:00", "05:00"), True),
    (at(4, 59), ("22:00", "05:00"), True),
    (at(5), ("22:00", "05:00"), False),
    (at(14), ("22:00", "05:00"), False),
    (at(14), ("13:00", "15:00"), True),
    (at(15), ("13:00", "15:00"), False),
    (at(12, 59), ("13:00", "15:00"), False),
    (at(9), ("00:00", "00:00"), True),
    (at(9), None, True),
])
def test_in_window(now: datetime, window: tuple[str, str] | None, inside: bool) -> None:
    assert in_window(now, window) is inside


def test_next_window_start_today_or_tomorrow() -> None:
    assert next_window_start(at(14), ("22:00", "05:00")) == at(22)
    assert next_window_start(at(23), ("22:00", "05:00")) == at(22) + timedelta(days=1)
    assert next_window_start(at(22), ("22:00", "05:00")) == at(22)


def row(vm: str, rpo: float | None = 10, health: str = "Normal", state: str = "Replicating",
        resync: bool = False) -> HealthRow:
    return HealthRow(pairing="gold", vm=vm, state=state, health=health, current_rpo_seconds=rpo,
                     rpo_threshold_seconds=900, resync_required=resync, primary="hv-ny-01", replica="hv-chi-01")


def test_breach_reasons() -> None:
    assert row("a").breach_reasons() == ()
    assert row("a", rpo=900).breach_reasons() == ()  # at the threshold is not beyond it
    assert row("a", rpo=901).breach_reasons() == ("rpo",)
    assert row("a", rpo=None).breach_reasons() == ()  # never replicated yet: no RPO to exceed
    assert row("a", rpo=5000, health="Critical").breach_reasons() == ("rpo", "critical")
    assert row("a", rpo=None, health="Unknown").breach_reasons() == ("unreadable",)


def test_one_alert_per_breach_and_one_when_it_clears(tmp_path: Path) -> None:
    t0 = datetime(2026, 3, 2, tzinfo=UTC)
    events: list[tuple[str, str]] = []
    sequence = [
        [row("a", rpo=1000), row("b")],                      # a breaches
        [row("a", rpo=1300), row("b")],                      # still: nothing
        [row("a", rpo=1600, health="Critical"), row("b")],   # worse, same breach: nothing
        [row("a"), row("b", health="Critical", resync=True)],  # a recovers, b breaches
        [row("a"), row("b", health="Critical", resync=True)],  # nothing
        [row("a", rpo=2000), row("b")],                      # a breaches again, b recovers
    ]
    for i, rows in enumerate(sequence):
        # A fresh load each time: the ledger lives in the state file, not in memory.
        with pairing_state(tmp_path, "gold") as ps:
            for alert in ps.observe(rows, t0 + timedelta(minutes=i)):
                events.append((alert.event, alert.vm))
            ps.outbox.clear()
    assert events == [(EVENT_BREACHED, "a"), (EVENT_RECOVERED, "a"), (EVENT_BREACHED, "b"),
                      (EVENT_BREACHED, "a"), (EVENT_RECOVERED, "b")]
    assert set(read_pairing_state(tmp_path, "gold").breaches) == {"a"}


def test_unsent_alerts_survive_a_failure_with_their_ids(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), pairing_state(tmp_path, "gold") as ps:
        ps.observe([row("a", rpo=5000)], datetime.now(UTC))
        raise RuntimeError("killed before sending")
    ps2 = read_pairing_state(tmp_path, "gold")
    assert [a.vm for a in ps2.outbox] == ["a"]
    # The breach is open, so the next run queues nothing new: only the stored alert (same id) is resent.
    with pairing_state(tmp_path, "gold") as ps3:
        assert ps3.observe([row("a", rpo=6000)], datetime.now(UTC)) == []
        assert [a.id for a in ps3.outbox] == [ps2.outbox[0].id]


def test_forget_closes_an_open_breach(tmp_path: Path) -> None:
    with pairing_state(tmp_path, "gold") as ps:
        ps.observe([row("a", rpo=5000)], datetime.now(UTC))
        ps.outbox.clear()
        ps.failed_cycles["a"] = 2
        ps.forget("a", row("a", state="Disabled", rpo=None), datetime.now(UTC))
        assert [(a.event, a.reasons) for a in ps.outbox] == [(EVENT_RECOVERED, ("protection disabled",))]
        assert ps.breaches == {} and ps.failed_cycles == {}


def test_resync_reason() -> None:
    assert resync_reason(row("a")) is None
    assert "resync required" in (resync_reason(row("a", resync=True)) or "")
    assert resync_reason(row("a", state="WaitingForStartResynchronize")) == "state WaitingForStartResynchronize"
    assert resync_reason(row("a"), FAILED_CYCLES_BEFORE_RESYNC - 1) is None
    assert resync_reason(row("a"), FAILED_CYCLES_BEFORE_RESYNC) == f"{FAILED_CYCLES_BEFORE_RESYNC} consecutive failed cycles"


def test_core_and_cli_modules_do_not_import_prefect() -> None:
    code = ("import sys; import siterecovery.protection, siterecovery.commands.protection, siterecovery.cli; "
            "sys.exit('prefect' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_status_shows_health_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from siterecovery.cli import _load_commands, app

    monkeypatch.setenv("SITERECOVERY_STATE", str(tmp_path))
    plans = copy_project(ROOT / "plans", tmp_path / "checkout")  # its own estate: a copy of the project
    project = load_project(plans)
    placements = pairing_placements(project, project.protection.pairing("gold"))
    fab = open_fabric("memory", tmp_path)
    for p in placements.values():
        fab.seed(p)  # type: ignore[attr-defined]
    fab.mark_resync_required(placements["sql-01"])  # type: ignore[attr-defined]
    _load_commands()
    runner = CliRunner()
    res = runner.invoke(app, ["status", "gold", "--fabric", "memory", "--project", str(plans), "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["vm"]: r for r in json.loads(res.stdout)}
    assert set(rows) == set(placements)
    assert rows["sql-01"]["health"] == "Critical" and rows["sql-01"]["breach"] == ["critical"]
    assert rows["web-01"]["health"] == "Normal" and rows["web-01"]["state"] == "Replicating"
    res = runner.invoke(app, ["status", "gold", "--fabric", "memory", "--project", str(plans)])
    assert res.exit_code == 0, res.output
    assert "Critical" in res.stdout and "WaitingForStartResynchronize" in res.stdout
    res = runner.invoke(app, ["status", "nope", "--fabric", "memory", "--project", str(plans)])
    assert res.exit_code == 2


def test_status_shows_the_policys_bandwidth_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from siterecovery.cli import _load_commands, app

    monkeypatch.setenv("SITERECOVERY_STATE", str(tmp_path / "state"))
    project = tmp_path / "plans" / "demo"
    shutil.copytree(ROOT / "plans" / "demo", project)
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")  # the plan references ../../scripts
    text = (project / "protection.yaml").read_text()
    assert "copy_frequency_seconds: 30\n" in text
    (project / "protection.yaml").write_text(text.replace("copy_frequency_seconds: 30\n",
                                                          "copy_frequency_seconds: 30\n    bandwidth_mbps: 20\n", 1))
    proj = load_project(project)
    pairing = proj.protection.pairings[0]
    fab = open_fabric("memory", tmp_path / "state")
    for p in pairing_placements(proj, pairing).values():
        fab.seed(p)  # type: ignore[attr-defined]
    _load_commands()
    runner = CliRunner()
    args = ["status", pairing.name, "--fabric", "memory", "--project", str(project)]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    assert {r["bandwidth_mbps"] for r in json.loads(res.stdout)} == {20.0}
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "Cap" in res.stdout and "20 Mbit/s" in res.stdout
