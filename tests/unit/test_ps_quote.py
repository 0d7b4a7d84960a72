"""ps_quote: the one PowerShell quoting function, checked against PowerShell's own tokenizer rule for
single-quoted strings (as the Hyper-V simulator implements it)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siterecovery.fabric.hyperv import SWITCH, Var, cmd
from siterecovery.render import ps_quote
from siterecovery.testing.hyperv_sim import Tok, tokenize


@pytest.mark.parametrize(("value", "quoted"), [
    ("plain", "'plain'"),
    ("it's", "'it''s'"),
    ("\u2018a\u2019", "'\u2018\u2018a\u2019\u2019'"),
    ("\u201a\u201b", "'\u201a\u201a\u201b\u201b'"),
    ("$(x) `n \"q\"", "'$(x) `n \"q\"'"),
    ("", "''"),
    (42, "'42'"),
])
def test_ps_quote_cases(value: object, quoted: str) -> None:
    assert ps_quote(value) == quoted


def test_ps_quote_refuses_nul() -> None:
    with pytest.raises(ValueError):
        ps_quote("a\x00b")


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=40)
       | st.text(alphabet="'\u2018\u2019\u201a\u201b\"$`;\n\r ab-\u2014", max_size=20))
def test_ps_quote_round_trips_through_the_tokenizer(text: str) -> None:
    assert tokenize(ps_quote(text)) == [Tok("LIT", text)]


def test_cmd_renders_only_literals_variables_and_switches() -> None:
    line = cmd("Start-VMFailover", VM=Var("vm"), Prepare=SWITCH, ReplicaServerName="a'b", RecoveryHistory=4,
               CompressionEnabled=True, Skipped=None)
    assert line == "Start-VMFailover -VM $vm -Prepare -ReplicaServerName 'a''b' -RecoveryHistory 4 -CompressionEnabled $true"
    for bad in ("Start-VM; x", "start-vm", "Start-VM$x"):
        with pytest.raises(ValueError):
            cmd(bad)
    with pytest.raises(ValueError):
        cmd("Start-VM", **{"VM;x": 1})
    with pytest.raises(ValueError):
        Var("vm)")
