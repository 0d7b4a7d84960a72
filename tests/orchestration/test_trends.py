"""Objectives and trends: a plan's RPO/RTO objectives are judged in every report, and every drill adds
itself to the plan's drill-trends artifact (table and chart), under the Prefect test harness."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flows.recovery_plan import recovery_plan

pytestmark = pytest.mark.usefixtures("prefect_harness")

# The seeded points are 5-15 min old: an RPO objective of an hour is met. No drill starts its last VM
# within a millisecond: that RTO objective is missed, every time.
TIMED = {"name": "timed", "version": "1", "objectives": {"rpo_seconds": 3600, "rto_seconds": 0.001},
         "groups": [{"name": "db", "vms": ["db-1"]}, {"name": "web", "vms": ["web-1"]}]}


def test_three_drills_make_a_trend_and_each_report_judges_the_objectives(estate) -> None:  # type: ignore[no-untyped-def]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    e = estate([TIMED], seed="timed")
    runs = [recovery_plan(plan="timed", project=str(e.root)) for _ in range(3)]
    rep = json.loads(Path(runs[-1]["report"]).with_suffix(".json").read_text())
    assert rep["rpo_objective_seconds"] == 3600 and rep["rto_objective_seconds"] == 0.001
    trend = json.loads((e.state / "trends" / "timed.json").read_text())
    assert [p["rto_seconds"] for p in trend] == [r["achieved_rto_seconds"] for r in runs]
    svg = (e.state / "reports" / "timed-drill-trends.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<circle") == 6  # RTO and RPO of three drills
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["drill-trends-timed"])))
        report = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["drill-timed"])))
    latest = max(arts, key=lambda a: a.created)  # type: ignore[arg-type, return-value]
    md = str(latest.data)
    rows = [ln for ln in md.splitlines() if re.match(r"\| \d{4}-", ln)]
    assert len(rows) == 3 and all("| missed |" in r and "| met |" in r for r in rows), md
    assert "data:image/svg+xml;base64," in md
    body = str(max(report, key=lambda a: a.created).data)  # type: ignore[arg-type, return-value]
    assert re.search(r"age of the oldest point used: .* against objective 60\.0 min: \*\*met\*\*", body), body
    assert re.search(r"Achieved RTO .* against objective 0\.0 s: \*\*missed\*\*", body), body
