"""Hostile input through the loader, validation, placement and compilation: every payload either is
refused with a located PlanError or comes out as the exact literal, never interpreted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_validation import PLAN, PROTECTION, TOPOLOGY, write

from siterecovery.compile import compile_plan
from siterecovery.errors import PlanError
from siterecovery.model import FailoverType
from siterecovery.paths import UnsafeName, child, is_ident
from siterecovery.project import load_project
from siterecovery.render import PlanTemplateError, render_args

PAYLOADS = [
    "'; rm -rf / #",
    "$(touch /tmp/siterecovery-pwned)",
    "`touch /tmp/siterecovery-pwned`",
    "a\u2019; Remove-Item C:\\ -Recurse; \u2018",
    '"; exit 1; "',
    "& calc.exe",
    "| Out-File x",
    "${env:PATH}",
    "*",
    "web-0[1-9]",
    "../../etc/passwd",
    "x" * 129,
    "line\nbreak",
    "nul\x00byte",
    "tab\there",
    "\u202eevil\u202c",
    "名前",
]


FIELDS = [
    # (file, old text, where the value must come out)
    ("topology", "name: v3", "vm"),
    ("topology", "address: 127.0.0.1\n    default_storage: /srv/west", None),
    ("topology", "path: /srv/east/v1.img", "disk"),
    ("plan", "'{{ vm.name }}'", "arg"),
    ("plan", "instructions: Confirm.", "instructions"),
    ("plan", "name: check", "action"),
]


def build(tmp: Path, file: str, old: str, payload: str) -> None:
    """Put `payload` in one field. JSON strings are YAML double-quoted scalars, so the payload reaches
    the loader byte for byte."""
    topo, prot, plan = TOPOLOGY, PROTECTION, PLAN
    if file == "topology":
        if old.startswith("name: v3"):
            topo = topo.replace("  - name: v3\n", f"  - name: {json.dumps(payload)}\n")
            plan = plan.replace("vms: [v3]", f"vms: [{json.dumps(payload)}]")
        elif old.startswith("address"):
            topo = topo.replace("address: 127.0.0.1\n    default_storage: /srv/west",
                                f"address: {json.dumps(payload)}\n    default_storage: /srv/west")
        else:
            topo = topo.replace("path: /srv/east/v1.img", f"path: {json.dumps(payload)}")
    else:
        if old.startswith("'{{"):
            plan = plan.replace("args: ['{{ vm.name }}']", f"args: ['{{{{ vm.name }}}}', {json.dumps(payload)}]")
        elif old.startswith("instructions"):
            plan = plan.replace("instructions: Confirm.", f"instructions: {json.dumps(payload)}")
        else:
            plan = plan.replace("        name: check\n", f"        name: {json.dumps(payload)}\n")
    write(tmp, topology=topo, protection=prot, plan=plan)


@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
@pytest.mark.parametrize(("file", "old", "where"), FIELDS, ids=[f"{f[0]}-{f[2] or 'address'}" for f in FIELDS])
def test_payload_is_refused_or_kept_literal(tmp_path: Path, payload: str, file: str, old: str, where: str | None) -> None:
    build(tmp_path, file, old, payload)
    try:
        project = load_project(tmp_path)
    except PlanError as exc:
        # refused: each problem is located in a real file, on a real line
        for p in exc.problems:
            assert Path(p.file).exists() and p.line >= 1 and p.message
        return
    compiled = compile_plan(project, project.plan("app"), FailoverType.test)
    steps = compiled.steps()
    if where == "vm":
        assert payload in {s.vm for s in steps}
        assert any(s.label.endswith(" " + payload) for s in steps)
    elif where == "disk":
        assert project.topology.vm("v1").disks[0].path == payload
    elif where == "arg":
        action = next(s.action for s in steps if s.kind == "script")
        assert action is not None and action.args[1] == payload  # type: ignore[union-attr]
        try:
            rendered = render_args(action.args, {"vm": {"name": "v1"}})  # type: ignore[union-attr]
        except PlanTemplateError:
            return
        assert rendered == ["v1", payload]
    elif where == "instructions":
        assert project.plan("app").groups[1].before[0].instructions == payload  # type: ignore[union-attr]
    elif where == "action":
        assert any(s.action is not None and s.action.name == payload for s in steps)
    else:
        assert project.topology.host("h-west").address == payload


def test_names_with_control_characters_are_refused(tmp_path: Path) -> None:
    build(tmp_path, "topology", "name: v3", "line\nbreak")
    with pytest.raises(PlanError) as ei:
        load_project(tmp_path)
    assert any(p.path == "vms[2].name" and "not a valid name" in p.message for p in ei.value.problems)


def test_no_payload_ever_executed(tmp_path: Path) -> None:
    marker = Path("/tmp/siterecovery-pwned")
    marker.unlink(missing_ok=True)
    for payload in PAYLOADS[:3]:
        build(tmp_path, "plan", "'{{ vm.name }}'", payload)
        # the whole CLI path, as a user runs it
        subprocess.run([sys.executable, "-m", "siterecovery", "show", "app", "--project", str(tmp_path), "--json"],
                       capture_output=True, check=False, timeout=60)
    assert not marker.exists()


def test_jinja_payload_in_args_cannot_escape_the_sandbox() -> None:
    with pytest.raises(PlanTemplateError):
        render_args(["{{ vm.__class__.__mro__ }}"], {"vm": {"name": "v1"}})
    with pytest.raises(PlanTemplateError):
        render_args(["{% for c in ''.__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}"], {})


# ---- names are identifiers (issue 13, item 3) ---------------------------------------------------

HOSTILE_NAMES = ["../../../x", "./web-01", "..", ".hidden", "-rf", "a/b", "a\\b", "web..01", "x" * 64, "web 01"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize(("what", "old", "field"), [
    ("VM", "  - name: v3\n", "vms[2].name"),
    ("disk", "disks: [{name: os, path: /srv/east/v1.img", "vms[0].disks[0].name"),
    ("host", "  - name: h-west\n", "hosts[1].name"),
    ("site", "  - name: west\n", "sites[1].name"),
])
def test_names_that_would_be_paths_are_refused_with_file_and_line(tmp_path: Path, name: str, what: str, old: str,
                                                                  field: str) -> None:
    topo = TOPOLOGY
    assert old in topo
    new = old.replace("name: v3", f"name: {json.dumps(name)}").replace("name: os", f"name: {json.dumps(name)}")
    new = new.replace("name: h-west", f"name: {json.dumps(name)}").replace("name: west", f"name: {json.dumps(name)}")
    topo = topo.replace(old, new, 1)
    write(tmp_path, topology=topo, protection=PROTECTION, plan=PLAN)
    with pytest.raises(PlanError) as ei:
        load_project(tmp_path)
    mine = [p for p in ei.value.problems if p.path == field]
    assert mine, ei.value.problems
    line = topo.splitlines()[mine[0].line - 1]
    assert mine[0].file.endswith("topology.yaml") and json.dumps(name) in line, (mine[0], line)
    assert "not a valid name" in mine[0].message and "paths.py" in mine[0].message


def test_every_worked_example_name_is_an_identifier() -> None:
    """The charset refuses nothing the shipped project uses (plans/ is the README's worked example)."""
    project = load_project(Path(__file__).parent.parent / "plans")
    topo = project.topology
    names = ([s.name for s in topo.sites] + [h.name for h in topo.hosts] + [v.name for v in topo.vms]
             + [d.name for v in topo.vms for d in v.disks] + list(project.plans))
    assert names and all(is_ident(n) for n in names)


def test_paths_child_refuses_escapes() -> None:
    root = Path("/srv/root")
    assert child(root, "web-01", "meta", "os") == root / "web-01" / "meta" / "os"
    assert child(root, "vms", "web-01", suffix=".json") == root / "vms" / "web-01.json"
    for bad in ("..", ".", "", "../x", "./web-01", "a/b", "a\x00b"):
        with pytest.raises(UnsafeName, match="/srv/root"):
            child(root, "vms", bad)
    with pytest.raises(UnsafeName):
        child(root, "x" * 300)


def _placement(tmp: Path, vm: str, disk: str) -> Any:
    """A linux placement whose names never went through validation (Placement.vm and disk are plain
    strings, set with model_copy): what a caller that skips the
    loader, or a hand-written flow parameter, would hand the driver."""
    from siterecovery.fabric.base import Placement
    from siterecovery.model import Host
    from siterecovery.model.protection import ReplicationPolicy

    disk_img = tmp / "disk.img"
    disk_img.write_bytes(b"\0" * 65536)
    src = Host(name="src", site="a", fabric="linux", address="local", root=str(tmp / "root-a"))
    dst = Host(name="dst", site="b", fabric="linux", address="local", root=str(tmp / "root-b"))
    p = Placement.model_validate({"vm": "ok", "pairing": "a-b", "source": src, "target": dst,
                                  "policy": ReplicationPolicy(name="p"),
                                  "disks": [{"disk": "os", "source_path": str(disk_img), "target_location": None,
                                             "classification": None}]})
    dp = p.disks[0].model_copy(update={"disk": disk})
    return p.model_copy(update={"vm": vm, "disks": (dp,)})


@pytest.mark.parametrize(("vm", "disk"), [("../../../x", "os"), ("./web-01", "os"), ("..", "os"),
                                          ("web-01", "../meta/os"), ("web-01", "..")])
def test_the_linux_driver_refuses_escaping_names_even_without_validation(tmp_path: Path, vm: str, disk: str) -> None:
    from siterecovery.fabric import FabricContext
    from siterecovery.fabric.linux import LinuxFabric

    state = tmp_path / "state"
    fab = LinuxFabric(FabricContext(state_dir=state))
    p = _placement(tmp_path, vm, disk)
    with pytest.raises(UnsafeName):
        fab.enable_replication(p)
        fab.start_initial_replication(p)
    # nothing was written outside the roots and the state directory
    outside = [q for q in tmp_path.rglob("*") if not str(q).startswith((str(state), str(tmp_path / "root-")))
               and q.name != "disk.img"]
    assert outside == []
    assert not (tmp_path.parent / "x").exists()


def test_dot_slash_and_plain_names_never_share_a_record(tmp_path: Path) -> None:
    from siterecovery.fabric import FabricContext
    from siterecovery.fabric.linux import LinuxFabric
    from siterecovery.fabric.memory import MemoryFabric

    ok = _placement(tmp_path, "web-01", "os")
    dotted = _placement(tmp_path, "./web-01", "os")
    for fab in (LinuxFabric(FabricContext(state_dir=tmp_path / "state")), MemoryFabric()):
        assert fab.enable_replication(ok).changed
        with pytest.raises(UnsafeName):
            fab.enable_replication(dotted)  # before: "already enabled", nothing copied


def test_the_intent_parameter_cannot_leave_the_state_directory(tmp_path: Path) -> None:
    from siterecovery.intent import IntentJournal, RunLock, StepJournal

    state = tmp_path / "state"
    journal = IntentJournal(state)
    for bad in ("../../escape", "../x", "/etc", "a/b", ".."):
        with pytest.raises(UnsafeName):
            journal.begin("k", prefix="p", explicit=bad)
        with pytest.raises(UnsafeName):
            RunLock(state, bad)
        with pytest.raises(UnsafeName):
            StepJournal(state, bad)
    assert journal.begin("k", prefix="p", explicit="my-rerun.2").id == "my-rerun.2"
    assert not (tmp_path / "escape").exists() and not (tmp_path / "x").exists()
