"""No secret in anything a run produces: a drill and a planned failover on the memory fabric whose hosts'
credentials point at an environment variable and a Prefect Secret block holding unique canaries, then a
scan of captured logs, the server's logs, artifacts, task runs and flow-run parameters, the reports and
every file of the state directory. The scanner is checked to find a planted canary first."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.drill import dr_drill
from flows.forms import DrillAdvanced
from flows.recovery_plan import recovery_plan
from siterecovery.model import FailoverType
from tasks.fabric import resolve_secret
from tests.scan_secrets import main as scan_main
from tests.scan_secrets import needles, scan_objects, scan_paths, scan_prefect

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_scanner_finds_a_planted_canary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    canary = "canary-" + secrets.token_hex(8)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "log.json").write_text('{"msg": "' + canary + '"}')
    (tmp_path / "clean.txt").write_text("nothing here")
    assert scan_main([str(tmp_path), "--secret", canary]) == 1
    assert "log.json" in capsys.readouterr().out
    assert scan_main([str(tmp_path / "clean.txt"), "--secret", canary]) == 0


def test_no_canary_in_anything_a_run_produces(estate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                              caplog: pytest.LogCaptureFixture) -> None:
    from prefect.blocks.system import Secret

    caplog.set_level(logging.DEBUG)
    env_canary = "env-canary-" + secrets.token_hex(12)
    block_canary = "block-canary-" + secrets.token_hex(12)
    monkeypatch.setenv("SR_CANARY_PASSWORD", env_canary)
    Secret(value=block_canary).save("sr-canary", overwrite=True)
    e = estate()
    topo = yaml.safe_load((e.root / "topology.yaml").read_text())
    for i, h in enumerate(topo["hosts"]):
        h["credential"] = ({"env": "SR_CANARY_PASSWORD", "kind": "password"} if i % 2 else
                           {"secret_block": "sr-canary", "kind": "password"})
    (e.root / "topology.yaml").write_text(yaml.safe_dump(topo, sort_keys=False))
    # The sources resolve: the canaries are really reachable by the run (else the scan proves nothing).
    from siterecovery.project import load_project

    creds = {h.credential for h in load_project(e.root).topology.hosts if h.credential}
    assert {resolve_secret(c) for c in creds} == {env_canary, block_canary}

    produced: list[Any] = [dr_drill(plan="app", requested_by="secrets-test", advanced=DrillAdvanced(project=str(e.root)))]
    produced.append(recovery_plan(plan="app", project=str(e.root), failover_type=FailoverType.planned, confirm="app"))
    assert [p["status"] for p in produced] == ["succeeded", "succeeded"]

    wanted = needles([env_canary, block_canary])
    hits, files = scan_paths([e.state, e.root], wanted)
    hits += scan_objects("summaries", produced, wanted)
    hits += scan_objects("captured log records", [r.getMessage() for r in caplog.records], wanted)
    more, counts = scan_prefect(wanted)
    hits += more
    assert files >= 6 and counts["flow_runs"] >= 2 and counts["artifacts"] >= 2 and counts["logs"] > 0
    assert hits == [], hits
