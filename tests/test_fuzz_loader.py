"""Fuzz the plan loader with mutated YAML: only the project's own PlanError may come out, never a
traceback from inside a library."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siterecovery.errors import PlanError
from siterecovery.project import parse_document
from siterecovery.yamlload import load_documents

ROOT = Path(__file__).resolve().parent.parent
SEEDS = [(ROOT / "plans" / f).read_text() for f in ("topology.yaml", "protection.yaml", "three-tier.yaml", "web-only.yaml")]
TOKENS = ["", " ", ":", "- ", "{", "}", "[", "]", "'", '"', "&a", "*a", "!!str", "!x", "<<", "\n", "\t", "yes", "no",
          "~", "null", "1e9", "-1", "0x10", "\u2018", "\x00", "\ufeff", "%YAML 1.1\n---\n", "---\n", "...\n", "? ",
          "| ", "> ", "#", "\\", "ü", "9" * 40]


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(text)))
        kind = draw(st.integers(0, 2))
        if kind == 0:
            text = text[:pos] + draw(st.sampled_from(TOKENS)) + text[pos:]
        elif kind == 1:
            end = min(len(text), pos + draw(st.integers(1, 40)))
            text = text[:pos] + text[end:]
        else:
            text = text[:pos] + draw(st.text(max_size=8)) + text[pos:]
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_yaml_gives_plan_errors_only(text: str) -> None:
    try:
        docs = load_documents("fuzz.yaml", text)
    except PlanError as exc:
        assert exc.problems and all(p.file == "fuzz.yaml" and p.line >= 1 for p in exc.problems)
        return
    for doc in docs:
        model, problems = parse_document(doc.data, doc.source)
        assert model is not None or problems, "a document was refused without saying why"
        for p in problems:
            assert p.file == "fuzz.yaml" and p.line >= 1 and p.message


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=20))
def test_any_data_shape_gives_problems_not_crashes(data: object) -> None:
    from siterecovery.yamlload import SourceMap

    for kind in ("Topology", "Protection", "RecoveryPlan"):
        doc = dict(data) if isinstance(data, dict) else {"x": data}
        doc["kind"] = kind
        model, problems = parse_document(doc, SourceMap("shape.yaml"))
        assert model is not None or problems


def test_a_kind_that_is_a_list_or_a_mapping_is_a_problem_not_a_crash() -> None:
    # Found by test_mutated_yaml_gives_plan_errors_only in CI: `kind:` followed by a list raised TypeError.
    for text in ("kind:\n  - name: x\n", "kind: {a: 1}\n"):
        (doc,) = load_documents("fuzz.yaml", text)
        model, problems = parse_document(doc.data, doc.source)
        assert model is None and problems and "'kind' must be one of" in problems[0].message
