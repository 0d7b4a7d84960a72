"""kill -9 of the apply at random moments: the replica is always exactly a recovery point and the next
cycle carries on. A handful of trials here; the benchmark runs 50 (bench.replica crash)."""

from __future__ import annotations

from pathlib import Path

from siterecovery.replica.selfcheck import crash_trials


def test_killed_apply_leaves_a_recovery_point(tmp_path: Path) -> None:
    out = crash_trials(tmp_path, trials=6, size=24 * 1024 * 1024, seed=11)
    assert sum(out["outcomes"].values()) == 6
    # at least one kill must have landed before the commit, or the test proves nothing
    assert any(r["killed"] for r in out["results"])
