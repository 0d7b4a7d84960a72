"""Core-tier tests: the YAML reader, quoting, the exception tree, and that the core never imports prefect."""

from __future__ import annotations

import pickle
import shlex
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from siterecovery.errors import (
    ApprovalRejected,
    InvalidStateError,
    PlanError,
    Problem,
    SiteRecoveryError,
    StorageError,
    TransientFabricError,
)
from siterecovery.render import PlanTemplateError, check_template, ps_quote, render_arg, render_args, sh_quote
from siterecovery.yamlload import MAX_FILE_BYTES, load_documents


def test_core_imports_without_prefect() -> None:
    code = (
        "import sys, importlib, pkgutil, siterecovery\n"
        "skip = {'siterecovery.__main__'}\n"
        "for m in pkgutil.walk_packages(siterecovery.__path__, 'siterecovery.'):\n"
        "    if not any(m.name == s or m.name.startswith(s + '.') for s in skip):\n"
        "        importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n == 'prefect' or n.startswith('prefect.'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core modules imported prefect: {out.stdout}"


def test_yaml_12_booleans_stay_names() -> None:
    doc = load_documents("t.yaml", "a: no\nb: yes\nc: off\nd: true\ne: 'true'\nf: 010\ng: 1.5\nh: ~\n")[0]
    assert doc.data == {"a": "no", "b": "yes", "c": "off", "d": True, "e": "true", "f": "010", "g": 1.5, "h": None}


def test_yaml_locations_point_at_keys_and_items() -> None:
    doc = load_documents("t.yaml", "top:\n  items:\n    - one\n    - {name: two}\n")[0]
    assert doc.source.locate(("top", "items", 1, "name")) == (4, 8)
    assert doc.source.locate(("top", "items", 0)) == (3, 7)
    # an unknown deeper path falls back to its nearest known ancestor
    assert doc.source.locate(("top", "items", 1, "missing")) == (4, 7)


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("a: 1\nb: 2\na: 3\n", 3, "duplicate key 'a' (first at line 1)"),
        ("a: !!python/object:os.system x\n", 1, "YAML tags"),
        ("a: !custom x\n", 1, "YAML tags"),
        ("base: &b {x: 1}\nother:\n  <<: *b\n", 3, "merge keys"),
        ("a: [1, 2\nb: 3\n", 2, "invalid YAML"),
        ("a:\n\t- 1\n", 2, "invalid YAML"),
        ("a: 1\nb: x\x1fy\n", 2, "invalid character U+001F"),
    ],
)
def test_yaml_refusals_are_located(text: str, line: int, needle: str) -> None:
    with pytest.raises(PlanError) as ei:
        load_documents("bad.yaml", text)
    (p,) = ei.value.problems
    assert p.file == "bad.yaml" and p.line == line and needle in p.message


def test_yaml_alias_bomb_is_refused_quickly() -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    with pytest.raises(PlanError, match="alias bomb"):
        load_documents("bomb.yaml", "\n".join(lines) + "\n")


def test_yaml_oversized_file_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    big = tmp_path / "big.yaml"
    big.write_text("a: " + "x" * (MAX_FILE_BYTES + 1) + "\n")
    with pytest.raises(PlanError, match="limit"):
        load_documents(big)


def test_yaml_not_utf8(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "latin.yaml"
    f.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(PlanError, match="not UTF-8"):
        load_documents(f)


HOSTILE = ["plain", "it's", "a'b'c", "\u2018curly\u2019", "\u201a\u201b", "$(rm -rf /)", "`whoami`", "a;b", "a\nb",
           "*?[]", "naïve ☃", "\"double\"", "--flag", "", "$env:PATH", "@(1)", "a|b&c"]


@pytest.mark.parametrize("value", HOSTILE)
def test_sh_quote_round_trips_through_a_real_shell(value: str) -> None:
    out = subprocess.run(["sh", "-c", f"printf %s {sh_quote(value)}"], capture_output=True, text=True, check=True)
    assert out.stdout == value


@pytest.mark.parametrize("value", HOSTILE)
def test_ps_quote_doubles_every_single_quote_kind(value: str) -> None:
    q = ps_quote(value)
    assert q[0] == "'" and q[-1] == "'"
    inner = q[1:-1]
    # Undo the doubling: every quote-like character must come in pairs and the result is the input.
    out, i = [], 0
    quotes = "'\u2018\u2019\u201a\u201b"
    while i < len(inner):
        ch = inner[i]
        if ch in quotes:
            assert i + 1 < len(inner) and inner[i + 1] == ch, f"lone quote in {q!r}"
            i += 2
        else:
            i += 1
        out.append(ch)
    assert "".join(out) == value


@given(st.text())
def test_sh_quote_is_one_word(value: str) -> None:
    if "\x00" in value:
        with pytest.raises(ValueError):
            sh_quote(value)
        return
    assert shlex.split(sh_quote(value)) == [value]


def test_quoting_refuses_nul() -> None:
    with pytest.raises(ValueError):
        ps_quote("a\x00b")


def test_sandbox_renders_each_arg_as_one_argv_element() -> None:
    ctx = {"vm": {"name": "web 01; rm -rf /"}, "plan": {"name": "p"}}
    assert render_args(["{{ vm.name }}", "--plan={{ plan.name }}"], ctx) == ["web 01; rm -rf /", "--plan=p"]


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ vm.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ missing_variable }}",
        "{{ vm.update({'name': 'x'}) }}",
    ],
)
def test_sandbox_refuses_reaching_out(template: str) -> None:
    with pytest.raises(PlanTemplateError):
        render_arg(template, {"vm": {"name": "a"}})


def test_check_template_reports_syntax_errors() -> None:
    assert check_template("{{ vm.name }}") is None
    assert "template error" in (check_template("{{ vm.name ") or "")


@pytest.mark.parametrize(
    "exc",
    [
        InvalidStateError("state Off does not allow it", vm="web-01", host="hv1", operation="failover",
                          hint="start it", error_id="InvalidState,Microsoft.HyperV.PowerShell.Commands.StartVMFailover"),
        TransientFabricError("connection reset", vm="a", host="b"),
        PlanError([Problem("f.yaml", 3, 5, "groups[0].vms[1]", "unknown VM 'x'")]),
        StorageError("no space left", path="/srv/replicas/a.img", host="dst-1", error_id="ENOSPC"),
        ApprovalRejected("'go' was rejected by alice", operation="manual", hint="re-run",
                         record={"decision": "rejected", "approver": "alice"}),
    ],
)
def test_exceptions_survive_pickling(exc: Exception) -> None:
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc)
    if isinstance(exc, SiteRecoveryError):
        assert isinstance(back, SiteRecoveryError)
        assert (back.message, back.fields) == (exc.message, exc.fields)
        for key, value in exc.fields.items():  # everything it carries, as attributes, after the trip
            assert getattr(back, key) == value
    if isinstance(exc, PlanError):
        assert back.problems == exc.problems  # type: ignore[attr-defined]


def test_context_is_attributes_rendered_by_str_never_parsed_back() -> None:
    e = InvalidStateError("state Off does not allow it", error_id="InvalidState", hint="start it")
    assert e.message == "state Off does not allow it" and str(e).startswith(e.message)
    moved = e.with_context(vm="web-01", host="hv1", operation="failover")
    assert type(moved) is InvalidStateError and moved.message == e.message  # the message is not re-rendered
    assert (moved.vm, moved.host, moved.operation, moved.hint, moved.error_id) == (
        "web-01", "hv1", "failover", "start it", "InvalidState")
    assert str(moved) == ("state Off does not allow it [vm=web-01, host=hv1, operation=failover] "
                          "(error id: InvalidState) Next: start it")
    assert moved.with_context(vm="other").vm == "web-01"  # what it already knows is kept


def test_execution_error_says_what_to_do_next() -> None:
    e = InvalidStateError("nope", vm="web-01", host="hv1", operation="commit_failover", hint="fail over first")
    assert "vm=web-01" in str(e) and "host=hv1" in str(e) and "Next: fail over first" in str(e)
