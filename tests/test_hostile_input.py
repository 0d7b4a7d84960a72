"""Hostile input through the loader, validation, placement and compilation: every payload either is
refused with a located PlanError or comes out as the exact literal, never interpreted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_validation import PLAN, PROTECTION, TOPOLOGY, write

from siterecovery.compile import compile_plan
from siterecovery.errors import PlanError
from siterecovery.model import FailoverType
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
    assert any(p.path == "vms[2].name" and "pattern" in p.message for p in ei.value.problems)


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
