"""The Hyper-V driver's answer parser under fuzzing: whatever a host prints, only project exceptions
come out (never a KeyError, TypeError or OverflowError), and well-formed odd shapes parse."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siterecovery.errors import SiteRecoveryError
from siterecovery.fabric.hyperv import (
    decode_answer,
    enum_name,
    parse_date,
    parse_server_state,
    parse_vm_state,
)

scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12) | \
    st.sampled_from(["/Date(1700000000000)/", "\\/Date(-5)\\/", "/Date(99999999999999999)/", "Replicating",
                     "4", "2024-01-02T03:04:05.1234567Z", "2024-13-45", "Primary", "", "6", "AppConsistentReplica"])
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)
FIELDS = ["Name", "State", "Id", "ReplicationState", "ReplicationHealth", "ReplicationMode",
          "ReplicationRelationshipType", "LastReplicationTime", "PrimaryServerName", "ReplicaServerPort",
          "SnapshotType", "CreationTime", "PendingReplicationSize", "ReplicationHealthDetails", "SwitchName",
          "FailoverIPv4PreferredDNSServer", "ReplicationEnabled", "AllowedAuthenticationType"]
records = st.dictionaries(st.sampled_from(FIELDS), values, max_size=8)
answers = st.fixed_dictionaries({"ok": st.just(True)}, optional={
    "vm": records | values, "repl": st.lists(records, max_size=3) | records | values,
    "measure": st.lists(records, max_size=2) | records, "points": st.lists(records, max_size=3) | records | values,
    "nics": st.lists(records, max_size=2) | values, "server": records | values,
    "entries": st.lists(records, max_size=2) | values})


def sections(answer: dict) -> str:
    """An answer as the host scripts write it: a `#name` line, then that section's one JSON line, then `#end`."""
    lines = [f"#{k}\n{json.dumps(v, allow_nan=True)}" for k, v in answer.items() if k != "ok"]
    return "\n".join([*lines, "#end"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers, st.integers(-1, 2), st.booleans())
def test_structured_garbage_gives_only_project_errors(answer: dict, status: int, framed: bool) -> None:
    text = sections(answer) if framed else json.dumps(answer, allow_nan=True)
    for parse in (parse_vm_state, parse_server_state):
        try:
            parse(decode_answer(text, status))
        except SiteRecoveryError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200) | values.map(lambda v: json.dumps(v)), st.integers(-1, 2))
def test_text_garbage_gives_only_project_errors(text: str, status: int) -> None:
    try:
        parse_vm_state(decode_answer(text, status))
    except SiteRecoveryError:
        pass


def test_error_answer_becomes_exception_with_id() -> None:
    text = 'WARNING: noise\n{"ok":false,"id":"InvalidState,Microsoft.HyperV.PowerShell.Commands.StartVMFailover",' \
           '"category":"InvalidOperation","message":"nope"}'
    with pytest.raises(SiteRecoveryError) as ei:
        decode_answer(text, 1)
    assert ei.value.error_id == "InvalidState,Microsoft.HyperV.PowerShell.Commands.StartVMFailover"  # type: ignore[attr-defined]


def test_odd_shapes_parse() -> None:
    ms = int(datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp() * 1000)
    one = {"ok": True, "vm": {"Name": "a", "State": "Running"},
           "repl": {"ReplicationState": 4, "ReplicationHealth": "normal", "ReplicationMode": "1",
                    "ReplicationRelationshipType": 0, "LastReplicationTime": f"/Date({ms})/"},
           "points": {"Id": "p1", "Name": "a - Standard Replica", "SnapshotType": "Replica",
                      "CreationTime": "2024-05-01T12:00:00.1234567Z"},
           "nics": None, "measure": None}
    with pytest.raises(SiteRecoveryError, match="no complete result"):
        decode_answer(json.dumps(one), 0)  # an answer cut before its `#end` is never taken as a whole one
    st_ = parse_vm_state(decode_answer(sections(one), 0))
    assert (st_.state, st_.mode, st_.power, st_.simple.health) == ("Replicating", "Primary", "Running", "Normal")
    assert st_.simple.last_replication == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert st_.points[0].created_at == datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert enum_name(7, {6: "Replica", 7: "AppConsistentReplica"}, "t") == "AppConsistentReplica"
    assert parse_date("\\/Date(0)\\/") == datetime(1970, 1, 1, tzinfo=UTC)
    assert parse_date("/Date(1000+0100)/") == datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)


def test_driver_and_simulator_do_not_import_prefect() -> None:
    import subprocess
    import sys
    code = ("import sys, siterecovery.fabric.hyperv, siterecovery.testing.hyperv_sim; "
            "sys.exit(1 if any(m == 'prefect' or m.startswith('prefect.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
