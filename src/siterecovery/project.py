"""Loading a project: a directory of YAML files holding one Topology, one Protection and any number
of RecoveryPlans, each document tagged with `kind:`.

Loading never stops at the first problem: schema errors from every file are gathered, then the
cross-reference rules of validate.py run, and one PlanError lists them all with file, line, column
and field path.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import PlanError, Problem
from .model import Protection, RecoveryPlan, Topology
from .yamlload import Path_, SourceMap, load_documents

KINDS: dict[str, type[BaseModel]] = {"Topology": Topology, "Protection": Protection, "RecoveryPlan": RecoveryPlan}
YAML_SUFFIXES = (".yaml", ".yml")

# Keys that would hold a secret. Plans name where a secret lives (credential.secret_block/env), never it.
SECRET_KEYS = re.compile(r"^(password|passwd|passphrase|secret|token|api_?key|private_?key|client_?secret)$", re.I)
SECRET_VALUE = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|(?i:\b(password|passwd|pwd|token|secret)=(?!\{\{)\S+)")
SECRET_HINT = ("secrets do not belong in plans: name a Prefect Secret block (credential.secret_block) "
               "or an environment variable (credential.env)")


@dataclass(frozen=True)
class PlanSource:
    plan: RecoveryPlan
    file: Path
    source: SourceMap


@dataclass
class Project:
    root: Path
    topology: Topology
    protection: Protection
    plans: dict[str, PlanSource] = field(default_factory=dict)
    topology_source: SourceMap | None = None
    protection_source: SourceMap | None = None

    def plan(self, name: str) -> RecoveryPlan:
        try:
            return self.plans[name].plan
        except KeyError:
            known = ", ".join(sorted(self.plans)) or "none"
            raise KeyError(f"unknown plan '{name}' in {self.root} (known: {known})") from None


_FIELD_NAMES: set[str] = set()


def _all_field_names(model: type[BaseModel]) -> None:
    for name, info in model.model_fields.items():
        if name in _FIELD_NAMES:
            continue
        _FIELD_NAMES.add(name)
        for arg in _walk_types(info.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                _all_field_names(arg)


def _walk_types(tp: Any) -> list[Any]:
    out = [tp]
    for arg in getattr(tp, "__args__", ()) or ():
        out.extend(_walk_types(arg))
    meta = getattr(tp, "__origin__", None)
    if meta is not None:
        out.append(meta)
    return out


for _m in KINDS.values():
    _all_field_names(_m)


def _clean_loc(loc: tuple[Any, ...], source: SourceMap) -> Path_:
    """Drop the parts pydantic adds (union tags, validator names) that are not in the document."""
    path: tuple[str | int, ...] = ()
    for i, part in enumerate(loc):
        cand = path + (part,)
        if cand in source.marks or (i == len(loc) - 1 and isinstance(part, str) and part in _FIELD_NAMES):
            path = cand
    return path


def _message(err: Any) -> str:
    kind = err["type"]
    inp = err.get("input")
    loc = err["loc"]
    last = loc[-1] if loc else ""
    if kind == "extra_forbidden":
        name = str(last)
        if SECRET_KEYS.match(name):
            return f"field '{name}' is not allowed: {SECRET_HINT}"
        close = difflib.get_close_matches(name, sorted(_FIELD_NAMES), n=1)
        return f"unknown field '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
    if kind == "missing":
        return f"required field '{last}' is missing"
    if kind == "string_type" and isinstance(inp, bool):
        return f"expected text but YAML read a boolean ({str(inp).lower()}): quote it if it is a name"
    msg = str(err["msg"])
    msg = msg.removeprefix("Value error, ")
    if kind in ("literal_error", "enum") or kind.startswith("union_tag"):
        return f"{msg} (got {inp!r})"
    return msg


def validation_problems(exc: ValidationError, source: SourceMap, prefix: Path_ = ()) -> list[Problem]:
    out = []
    for err in exc.errors():
        path = _clean_loc(tuple(prefix) + tuple(err["loc"]), source)
        out.append(source.problem(path, _message(err)))
    return out


def scan_secrets(data: Any, source: SourceMap, path: Path_ = ()) -> list[Problem]:
    """Find secret-looking keys and values anywhere in a raw document."""
    out: list[Problem] = []
    if isinstance(data, dict):
        for k, v in data.items():
            if SECRET_KEYS.match(k):
                out.append(source.problem(path + (k,), f"'{k}' looks like a secret: {SECRET_HINT}"))
            else:
                out.extend(scan_secrets(v, source, path + (k,)))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out.extend(scan_secrets(v, source, path + (i,)))
    elif isinstance(data, str) and SECRET_VALUE.search(data):
        out.append(source.problem(path, f"value looks like a secret: {SECRET_HINT}"))
    return out


def parse_document(data: Any, source: SourceMap) -> tuple[BaseModel | None, list[Problem]]:
    """One YAML document -> its model, or the problems that stop it."""
    if not isinstance(data, dict):
        return None, [source.problem((), "expected a mapping with a 'kind' field at the top")]
    problems = scan_secrets(data, source)
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:  # a list or a mapping is no kind (and cannot be hashed)
        msg = f"'kind' must be one of {', '.join(KINDS)}" + (f" (got {kind!r})" if kind is not None else "")
        return None, problems + [source.problem(("kind",) if "kind" in data else (), msg)]
    try:
        model = KINDS[kind].model_validate(data)
    except ValidationError as exc:
        return None, problems + validation_problems(exc, source)
    return model, problems


def yaml_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in YAML_SUFFIXES)


def load_project(root: Path | str, *, check: bool = True) -> Project:
    """Load and validate the project in `root` (a directory, or one file whose directory is the project)."""
    from .validate import validate_project

    root = Path(root)
    directory = root if root.is_dir() else root.parent
    if not directory.exists():
        raise PlanError([Problem(str(root), 1, 1, "", "no such file or directory")])
    problems: list[Problem] = []
    topo: tuple[Topology, SourceMap] | None = None
    prot: tuple[Protection, SourceMap] | None = None
    plans: dict[str, PlanSource] = {}
    for file in yaml_files(directory):
        try:
            docs = load_documents(file)
        except PlanError as exc:
            problems.extend(exc.problems)
            continue
        for doc in docs:
            if doc.data is None:
                continue
            model, probs = parse_document(doc.data, doc.source)
            problems.extend(probs)
            if isinstance(model, Topology):
                if topo is not None:
                    problems.append(doc.source.problem(("kind",), f"a second Topology (first in {topo[1].file}); "
                                                                  "keep one per project directory"))
                else:
                    topo = (model, doc.source)
            elif isinstance(model, Protection):
                if prot is not None:
                    problems.append(doc.source.problem(("kind",), f"a second Protection (first in {prot[1].file})"))
                else:
                    prot = (model, doc.source)
            elif isinstance(model, RecoveryPlan):
                if model.name in plans:
                    first = plans[model.name]
                    problems.append(doc.source.problem(("name",), f"plan name '{model.name}' is already used in "
                                                                  f"{first.file}:{first.source.locate(('name',))[0]}"))
                else:
                    plans[model.name] = PlanSource(model, file, doc.source)
    if topo is None and not problems:
        problems.append(Problem(str(directory), 1, 1, "", "no Topology document (kind: Topology) in this directory"))
    if problems:
        raise PlanError(problems)
    assert topo is not None
    protection, psrc = prot if prot else (Protection(), None)
    project = Project(directory, topo[0], protection, plans, topo[1], psrc)
    if check:
        problems = validate_project(project)
        if problems:
            raise PlanError(problems)
    return project


def project_dirs(paths: list[Path]) -> list[Path]:
    """Directories holding a project among `paths`, walking into subdirectories."""
    out: list[Path] = []
    for p in paths:
        if p.is_file():
            out.append(p.parent)
            continue
        for d in sorted([p, *[x for x in p.rglob("*") if x.is_dir()]]):
            if any(f.suffix in YAML_SUFFIXES for f in d.iterdir() if f.is_file()):
                out.append(d)
    seen: list[Path] = []
    for d in out:
        if d not in seen:
            seen.append(d)
    return seen
