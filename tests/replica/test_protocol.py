"""The agent's protocol: every command survives its trip through an argv, every answer is checked against
its declared shape, and a wrong message is refused with an error naming the field."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from siterecovery.replica import agent
from siterecovery.replica import protocol as P
from siterecovery.replica.orchestrator.endpoints import LocalEndpoint, agent_error

POINT = {"id": "web@3", "created_at": "2026-01-01T00:00:00+00:00", "consistency": "crash", "group": None}
SEND = dict(disk="/d/a b.img", state="/s/x", mode="base", expect_gen="ab" * 16, no_compress=True,
            freeze=["fsfreeze", "-f", "/"], thaw=[], seq=7,
            nbd={"socket": "/run/v.nbd", "export": "e", "bitmap": None}, offline_format=None, keepalive=2.5,
            bandwidth=1e6, bandwidth_bucket="/b", settle=2.1)
REP = dict(replica="/r/x.img", meta="/r/x.meta")
QEMU = dict(run="/run/vm", name="vm")

SAMPLES: list[P.Command[Any]] = [
    P.Status(**REP), P.Receive(**REP, point=POINT, retention_hours=24.0, input="/in", ready=True),
    P.Rehash(**REP), P.SeedSource(**REP, state="/s/x"),
    P.Adopt(**REP, state="/s/x", gen="ab" * 16, manifest="0f" * 16, point={**POINT, "seq": 3, "gen": "ab" * 16}),
    P.Manifest(**REP), P.Rebuild(**REP, seq=3, dest="/t/x.img"), P.Revert(**REP, seq=2),
    P.Prune(**REP, hours=0.5), P.Drop(**REP), P.Scrub(**REP, start=10, max_seconds=5.0, rate=100.0, points=True),
    P.Send(**SEND, output="/out/x.srstream"),  # type: ignore[arg-type]
    P.SendTo(**SEND, from_name="a", to_name="b", to_address="10.0.0.2", to_port=2222, to_user="sr",  # type: ignore[arg-type]
             identity_file="/k", known_hosts="/kh", connect_timeout=5,
             remote_argv=["python3", "-m", "siterecovery.replica.agent", "receive", "--ready"]),
    P.SourceCommit(state="/s", gen="cd" * 16), P.SourceDrop(state="/s"),
    P.SourceStatus(disk="/d", state="/s", gen=None, scan_limit=5), P.Digest(path="/p"), P.Copy(src="/a", dst="/b"),
    P.Remove(paths=["--a", "-b", "/c"]), P.Exists(path="/p"), P.Hook(what="freeze", argv_=["sh", "-c", "x --y"]),
    P.Spawn(pidfile="/p.pid", log="/p.log", argv_=["sleep", "--", "--x", "1"]), P.Kill(pidfile="/p", grace=1.5),
    P.Alive(pidfile="/p"), P.QemuStart(**QEMU, spec={"memory_mb": 256, "disks": [{"path": "/d"}]}),
    P.QemuStop(**QEMU, grace=3.0), P.QemuStatus(**QEMU), P.QemuControl(**QEMU, action="pause"),
    P.QemuCapture(**QEMU, disks=[{"node": "d0", "format": "raw", "prev": None}], tag="t1"),
    P.QemuRelease(**QEMU, view={"socket": "/s", "disks": []}, failed=True),
    P.LibvirtStart(uri="", domain="web", copy_of="web-prod", disks=["/t/a.img"], network="isolated"),
    P.LibvirtStop(uri="qemu:///system?socket=/x y", domain="web", grace=2.0), P.LibvirtStatus(uri="", domain="web"),
    P.LibvirtControl(uri="test:///default", domain="web", action="cont"),
    P.LibvirtCapture(uri="", domain="web", run="/run/vm", disks=[{"path": "/d", "format": "raw", "prev": None}], tag="t"),
    P.LibvirtRelease(uri="", domain="web", run="/run/vm", view={"socket": "/s", "disks": []}, failed=True),
    P.QemuAgent(**QEMU, execute="guest-fsfreeze-freeze", timeout=2.5),
]


def test_every_command_has_a_sample() -> None:
    assert sorted(c.command for c in SAMPLES) == sorted(P.COMMANDS)


@pytest.mark.parametrize("cmd", SAMPLES, ids=lambda c: c.command)
def test_a_command_survives_its_argv(cmd: P.Command[Any]) -> None:
    assert P.parse_command(cmd.argv()) == cmd


def test_defaults_stay_off_the_command_line() -> None:
    assert P.Status(**REP).argv() == ["status", "--replica", "/r/x.img", "--meta", "/r/x.meta"]
    assert P.parse_command(["scrub", *P.Status(**REP).argv()[1:]]) == P.Scrub(**REP)
    assert P.parse_command(["kill", "--pidfile=/p", "--grace=2"]) == P.Kill(pidfile="/p", grace=2.0)


def test_the_argv_the_fabric_writes_by_hand_reads_the_same() -> None:
    """What the linux fabric and the benchmark build as lists."""
    cmd = P.parse_command(["spawn", "--pidfile", "/r/vm.pid", "--log", "/r/vm.log", "--", "sleep", "30"])
    assert cmd == P.Spawn(pidfile="/r/vm.pid", log="/r/vm.log", argv_=["sleep", "30"])
    cmd = P.parse_command(["send", "--disk", "/d", "--state", "/s", "--freeze", "[]", "--mode", "delta", "--mode", "full"])
    assert isinstance(cmd, P.Send) and cmd.mode == "full"  # the last one wins, as argparse had it


@pytest.mark.parametrize(("argv", "field", "said"), [
    ([], "command", "no command given"),
    (["statuz", "--replica", "x"], "command", "unknown command 'statuz' (known: adopt, alive, copy"),
    (["status", "--replica", "/r"], "--meta", "status: --meta is missing"),
    (["status", "--replica", "/r", "--meta", "/m", "--bogus", "1"], "--bogus", "unknown option --bogus"),
    (["status", "--replica", "/r", "--meta"], "--meta", "--meta needs a value"),
    (["status", "--replica", "/r", "--meta", "/m", "extra"], "extra", "unexpected argument 'extra'"),
    (["rebuild", "--replica", "/r", "--meta", "/m", "--seq", "two", "--dest", "/d"], "--seq", "not an integer"),
    (["prune", "--replica", "/r", "--meta", "/m", "--hours", "x"], "--hours", "not a number"),
    (["receive", "--replica", "/r", "--meta", "/m", "--point", "{id: 1}"], "--point", "--point is not JSON"),
    (["receive", "--replica", "/r", "--meta", "/m", "--point", "[1]"], "--point", "must be a JSON object"),
    (["send", "--disk", "/d", "--state", "/s", "--mode", "fast"], "--mode", "not one of full, delta, base"),
    (["scrub", "--replica", "/r", "--meta", "/m", "--points=yes"], "--points", "takes no value"),
    (["remove"], "paths", "remove: paths is missing"),
    (["send-to", "--disk", "/d", "--state", "/s"], "--from-name", "send-to: --from-name is missing"),
    (["hook", "--what", "freeze", "--argv", '"fsfreeze -f /"'], "--argv", "must be a JSON list"),
])
def test_a_malformed_command_names_its_field(argv: list[str], field: str, said: str) -> None:
    with pytest.raises(P.ProtocolError) as e:
        P.parse_command(argv)
    assert e.value.field == field
    assert said in str(e.value)
    assert e.value.code == "BadMessage"


def test_answers_are_checked_against_their_shape() -> None:
    cmd = P.Exists(path="/p")
    assert P.parse_result(cmd, {"exists": True, "size": None}) == {"exists": True, "size": None}
    with pytest.raises(P.ProtocolError, match="exists: the answer has no 'size'") as e:
        P.parse_result(cmd, {"exists": True})
    assert e.value.field == "size"
    with pytest.raises(P.ProtocolError, match="the answer's 'exists' is 'yes', not bool"):
        P.parse_result(cmd, {"exists": "yes", "size": 3})
    with pytest.raises(P.ProtocolError, match="not a JSON object"):
        P.parse_result(cmd, ["exists"])
    got = {"point": {**POINT, "seq": 3, "size": 10}, "blocks": 1, "mode": "delta"}
    with pytest.raises(P.ProtocolError, match="receive: point: the answer has no 'gen'") as e:
        P.parse_result(P.Receive(**REP, point=POINT), got)
    assert e.value.field == "gen"
    st = {"exists": True, "initialized": True, "gen": "ab", "seq": 1, "size": 1, "disk_matches": True, "differs": [],
          "corrupt": None, "last_scrub": None, "points": [{"id": "x"}], "undo_bytes": 0, "writable": True}
    with pytest.raises(P.ProtocolError, match=r"status: points\[0\]: the answer has no 'created_at'"):
        P.parse_result(P.Status(**REP), st)


def test_a_protocol_error_pickles_with_its_field() -> None:
    e = pickle.loads(pickle.dumps(P.ProtocolError("x: --y is missing", "--y")))
    assert (str(e), e.field, e.code) == ("x: --y is missing", "--y", "BadMessage")


def test_the_agent_refuses_a_malformed_command_over_its_command_line() -> None:
    r = subprocess.run([sys.executable, "-m", P.AGENT_MODULE, "status", "--replica", "/nowhere"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 3
    assert json.loads(r.stdout) == {"error": "BadMessage", "message": "status: --meta is missing", "path": None}


def test_endpoints_take_commands_and_answer_typed_results(tmp_path: Path) -> None:
    f = tmp_path / "disk.img"
    f.write_bytes(b"x" * 100)
    ep = LocalEndpoint()
    got = ep.call(P.Exists(path=str(f)))
    assert got == {"exists": True, "size": 100}
    assert ep.call(["exists", "--path", str(f)]) == got  # an argv goes through the protocol too
    with pytest.raises(P.ProtocolError, match="exists: --path is missing"):
        ep.call(["exists"])
    with pytest.raises(P.ProtocolError, match="unknown command"):
        agent.run_command(["frobnicate"], None, None)  # type: ignore[arg-type]


def test_the_agent_checks_its_own_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler that drifts from the declared shape fails at the agent, not at a key lookup far away."""
    monkeypatch.setattr(agent, "_run", lambda cmd, *a: {"exists": True})
    with pytest.raises(P.ProtocolError, match="exists: the answer has no 'size'"):
        LocalEndpoint().call(P.Exists(path="/p"))


def test_a_failed_agent_is_read_through_the_failure_shape() -> None:
    err = agent_error(b'P 1 2\nE {"error": "ENOSPC", "message": "disk full", "path": "/x"}\n', 3, "h: send", "h")
    assert (str(err), err.code, err.path, err.host) == ("h: send: disk full", "ENOSPC", "/x", "h")
    err = agent_error(b"Traceback ...\nBoom", 1, "h: status")
    assert (err.code, str(err)) == ("AgentFailed", "h: status: agent exited 1: Traceback ...\nBoom")
    assert P.parse_failure({"exists": True}) is None
