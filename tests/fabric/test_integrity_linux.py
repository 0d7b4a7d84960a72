"""Silent corruption of a replica on the linux fabric over a real sshd, under a real Prefect server
(issue 13, item 2): bytes changed with the mtime set back are seen (ctime), health goes Critical,
drills and failovers refuse the replica and say why, resynchronize repairs it; rot that no timestamp
shows is found by the scrub flow, which emits an event and repairs it by block compare."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from alerts import observe_alerts, server_events
from test_protection_linux import (
    PAIRING,
    Estate,
    health,
    make_estate,  # noqa: F401 - a fixture, found by name
)

from siterecovery.replica.engine import BLOCK
from siterecovery.testing.disks import rot

pytestmark = [pytest.mark.sshd, pytest.mark.prefect_server]


@pytest.fixture
def estate(make_estate: Any) -> Any:  # noqa: F811 - the imported fixture
    """test_protection_linux's estate of two linux hosts on the suite's sshd, under a Prefect server."""
    return make_estate


def driver_and_placements(e: Estate) -> tuple[Any, dict[str, Any]]:
    """The fabric a recovery plan's drill and failover call, and the pairing's placements."""
    from siterecovery.estate import state_dir
    from siterecovery.placement import pairing_placements
    from siterecovery.project import load_project
    from siterecovery.protection import open_fabric

    project = load_project(e.project)
    return open_fabric("linux", state_dir(e.project)), pairing_placements(project, project.protection.pairing(PAIRING))


def test_replica_written_with_mtime_set_back_is_critical_refused_and_resynchronized(estate: Any) -> None:
    from siterecovery.errors import InvalidStateError

    e = estate({"web-01": ["os"]})
    e.run("enable-protection")
    replica = e.replica("web-01", "os")
    mtime = replica.stat().st_mtime_ns
    rot(replica, 3 * BLOCK + 100)  # block 3 holds data (make_disk writes every third block)
    assert replica.stat().st_mtime_ns == mtime and not e.in_sync("web-01")

    row = health(e)["web-01"]
    assert row.health == "Critical" and row.resync_required, row
    assert "lx-chi" in row.details and "disk os" in row.details and "ctime" in row.details, row.details

    fab, placements = driver_and_placements(e)
    try:
        for op in (fab.test_failover, fab.failover):
            with pytest.raises(InvalidStateError) as ei:
                op(placements["web-01"])
            msg = str(ei.value)
            assert "web-01" in msg and "disk os" in msg and "lx-chi" in msg and "ctime" in msg, msg
            assert ei.value.fields.get("error_id") == "ReplicaMismatch"
        assert not (e.root["chi"] / "web-01" / "test").exists()  # the drill built nothing
        assert e.vm_record("web-01")["state"] == "Replicating" and not e.vm_record("web-01")["test_active"]
    finally:
        fab.close()

    # The source gone for good, this replica the only copy: the operator may accept it as it is. Drills
    # still refuse it; the failover goes on and says what it accepted.
    from siterecovery.estate import state_dir
    from siterecovery.fabric import FabricContext
    from siterecovery.fabric.linux import LinuxFabric

    anyway = LinuxFabric(FabricContext(state_dir=state_dir(e.project), options={"accept_damaged_replica": True}))
    try:
        with pytest.raises(InvalidStateError):
            anyway.test_failover(placements["web-01"])
        r = anyway.failover(placements["web-01"])
        assert r.changed and "DAMAGED REPLICA ACCEPTED" in r.message and "disk os" in r.message, r.message
        anyway.cancel_failover(placements["web-01"])  # back to replicating, for the repair below
    finally:
        anyway.close()

    res = e.run("resynchronize", on_demand=True, vms=["web-01"])
    assert res.status == "resynchronized", res
    (step,) = res.steps
    assert step.changed and "no resynchronization needed" not in step.message
    assert step.bytes_sent < 2 * BLOCK  # block compare: the one block that differed
    assert e.in_sync("web-01") and health(e)["web-01"].health == "Normal"


def trust_current_stat(e: Estate, vm: str, disk: str) -> None:
    """Real bit rot changes no timestamp; a user-space write always moves ctime. Record the file's stat
    as committed so the quick check sees nothing: what remains to find the rot is the scrub."""
    state = e.root["chi"] / vm / "meta" / disk / "state.json"
    st = json.loads(state.read_text())
    s = os.stat(e.replica(vm, disk))
    st["stat"] = [s.st_size, s.st_mtime_ns, s.st_ino, s.st_ctime_ns]
    state.write_text(json.dumps(st))


def test_scrub_finds_rot_no_timestamp_shows_alerts_and_repairs(estate: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from siterecovery.errors import InvalidStateError

    e = estate({"web-01": ["os"], "db-01": ["os", "data"]})
    e.run("enable-protection")
    rot(e.replica("db-01", "data"), 6 * BLOCK + 9)
    trust_current_stat(e, "db-01", "data")
    assert health(e)["db-01"].health == "Normal"  # the quick check cannot see it
    sent = observe_alerts(monkeypatch)

    found = {r.vm: r for r in e.run("scrub", repair=False, points=True)}
    assert {vm: r.outcome for vm, r in found.items()} == {"web-01": "intact", "db-01": "corrupt"}, found
    assert found["db-01"].corrupt_blocks == 1 and "disk data: 1 corrupt block" in found["db-01"].note
    assert all(r.bytes_read > 0 and r.replica_host == "lx-chi" for r in found.values())
    assert [(ev, vm) for ev, vm, _, _ in sent] == [("siterecovery.replication.corrupt", "db-01")]
    (event,) = server_events({i for _, _, _, i in sent})
    assert event["resource"]["prefect.resource.id"] == "siterecovery.vm.db-01"
    assert event["resource"]["siterecovery.health"] == "Critical"

    row = health(e)["db-01"]
    assert row.health == "Critical" and "scrub found 1 corrupt block" in row.details, row
    fab, placements = driver_and_placements(e)
    try:
        with pytest.raises(InvalidStateError, match="disk data.*scrub found"):
            fab.test_failover(placements["db-01"])
    finally:
        fab.close()

    repaired = {r.vm: r for r in e.run("scrub")}
    assert repaired["db-01"].outcome == "repaired" and repaired["web-01"].outcome == "intact", repaired
    assert e.in_sync("db-01") and health(e)["db-01"].health == "Normal"

    # the operator's command runs the same flow: everything intact now, exit 0
    from typer.testing import CliRunner

    from siterecovery.cli import _load_commands, app

    _load_commands()
    res = CliRunner().invoke(app, ["scrub", PAIRING, "--project", str(e.project), "--rate-mb", "0"],
                             env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    rows = [line for line in res.output.splitlines() if "web-01" in line or "db-01" in line]
    assert len(rows) == 2 and all("intact" in r and "lx-chi" in r for r in rows), res.output
