"""Safe YAML reading that keeps where every value came from.

Plans are YAML written by people at 3 a.m.: we read them with a YAML 1.2-style resolver (only
true/false are booleans, so a VM called `no` stays the string "no"), refuse duplicate keys, tags,
oversized files and alias bombs, and keep each value's line and column so that any later error can
point at the exact place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import PlanError, Problem

MAX_FILE_BYTES = 1 << 20  # 1 MiB: a topology of thousands of VMs fits; a runaway file does not
MAX_NODES = 200_000  # counted after alias expansion: defeats "billion laughs"
MAX_DEPTH = 64

Path_ = tuple[str | int, ...]

_INT = re.compile(r"^[-+]?(0|[1-9][0-9]*)$")
_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|(0|[1-9][0-9]*)\.[0-9]*|(0|[1-9][0-9]*)(\.[0-9]*)?[eE][-+]?[0-9]+)$")
YAML11_BOOLS = frozenset({"y", "yes", "n", "no", "on", "off"})


def path_str(path: Path_) -> str:
    """('groups', 1, 'vms', 0) -> 'groups[1].vms[0]'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass
class SourceMap:
    """Where each value of one YAML document stands in its file."""

    file: str
    marks: dict[Path_, tuple[int, int]] = field(default_factory=dict)

    def locate(self, path: Path_) -> tuple[int, int]:
        """Line and column of `path`, or of its nearest ancestor that has one (1-based)."""
        p = tuple(path)
        while p:
            if p in self.marks:
                return self.marks[p]
            p = p[:-1]
        return self.marks.get((), (1, 1))

    def problem(self, path: Path_, message: str) -> Problem:
        line, col = self.locate(path)
        return Problem(self.file, line, col, path_str(path), message)


@dataclass
class Document:
    data: Any
    source: SourceMap


class _Composer(yaml.SafeLoader):
    """SafeLoader's parser and composer with a resolver that knows YAML 1.2 core scalars only."""


# Drop every implicit resolver of YAML 1.1: plain scalars get one tag of ours and are typed by
# _Builder.scalar under the YAML 1.2 core schema; quoted ones stay strings.
_PLAIN = "tag:siterecovery,2026:plain"
_Composer.yaml_implicit_resolvers = {}
_Composer.add_implicit_resolver(_PLAIN, re.compile(r"^", re.S), None)


def _err(file: str, node: Node | None, message: str, path: Path_ = ()) -> Problem:
    if node is None:
        return Problem(file, 1, 1, path_str(path), message)
    return Problem(file, node.start_mark.line + 1, node.start_mark.column + 1, path_str(path), message)


class _Builder:
    def __init__(self, file: str) -> None:
        self.file = file
        self.source = SourceMap(file)
        self.problems: list[Problem] = []
        self.count = 0

    def build(self, node: Node, path: Path_, depth: int = 0) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise PlanError([_err(self.file, node, f"document expands to more than {MAX_NODES} values "
                                                   "(alias bomb or runaway file); refusing to read it", path)])
        if depth > MAX_DEPTH:
            raise PlanError([_err(self.file, node, f"nesting deeper than {MAX_DEPTH} levels", path)])
        self.source.marks.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, ScalarNode):
            return self.scalar(node, path)
        if isinstance(node, SequenceNode):
            self.check_tag(node, "tag:yaml.org,2002:seq", path)
            return [self.build(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]
        if isinstance(node, MappingNode):
            self.check_tag(node, "tag:yaml.org,2002:map", path)
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                if not isinstance(knode, ScalarNode):
                    self.problems.append(_err(self.file, knode, "mapping keys must be plain strings", path))
                    continue
                if knode.tag == "tag:yaml.org,2002:merge" or knode.value == "<<":
                    self.problems.append(_err(self.file, knode, "merge keys (<<) are not supported", path))
                    continue
                key = knode.value
                if key in out:
                    first = self.source.marks.get(path + (key,), (0, 0))
                    self.problems.append(_err(self.file, knode, f"duplicate key '{key}' (first at line {first[0]})",
                                              path + (key,)))
                    continue
                self.source.marks[path + (key,)] = (knode.start_mark.line + 1, knode.start_mark.column + 1)
                out[key] = self.build(vnode, path + (key,), depth + 1)
            return out
        raise PlanError([_err(self.file, node, "unsupported YAML node", path)])  # pragma: no cover

    def check_tag(self, node: Node, expected: str, path: Path_) -> None:
        if node.tag != expected:
            self.problems.append(_err(self.file, node, f"YAML tags ({node.tag}) are not allowed", path))

    def scalar(self, node: ScalarNode, path: Path_) -> Any:
        value: str = node.value
        if node.tag == "tag:yaml.org,2002:str":
            return value  # quoted, block or explicitly !!str: always a string
        if node.tag != _PLAIN:
            self.problems.append(_err(self.file, node, f"YAML tags ({node.tag}) are not allowed", path))
            return value
        if value in ("true", "True", "TRUE"):
            return True
        if value in ("false", "False", "FALSE"):
            return False
        if value in ("null", "Null", "NULL", "~", ""):
            return None
        if _INT.match(value):
            return int(value)
        if _FLOAT.match(value) and any(c.isdigit() for c in value):
            return float(value)
        return value  # includes yes/no/on/off: strings under YAML 1.2


def load_documents(path: Path | str, text: str | None = None) -> list[Document]:
    """Read every YAML document of a file, or raise PlanError naming the file, line and field."""
    p = Path(path)
    file = str(path)
    if text is None:
        try:
            size = p.stat().st_size
        except OSError as exc:
            raise PlanError([Problem(file, 1, 1, "", f"cannot read file: {exc.strerror}")]) from None
        if size > MAX_FILE_BYTES:
            raise PlanError([Problem(file, 1, 1, "", f"file is {size} bytes; the limit is {MAX_FILE_BYTES}")])
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise PlanError([Problem(file, 1, 1, "", f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
        except OSError as exc:
            raise PlanError([Problem(file, 1, 1, "", f"cannot read file: {exc.strerror}")]) from None
    elif len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise PlanError([Problem(file, 1, 1, "", f"document is larger than {MAX_FILE_BYTES} bytes")])
    docs: list[Document] = []
    loader: _Composer | None = None
    try:
        loader = _Composer(text)  # the reader checks characters already here
        while loader.check_node():
            node = loader.get_node()
            if node is None:  # pragma: no cover - check_node guards this
                break
            builder = _Builder(file)
            data = builder.build(node, ())
            if builder.problems:
                raise PlanError(builder.problems)
            docs.append(Document(data, builder.source))
    except yaml.reader.ReaderError as exc:
        before = text[: exc.position]
        line, col = before.count("\n") + 1, exc.position - (before.rfind("\n") + 1) + 1
        raise PlanError([Problem(file, line, col, "", f"invalid character U+{exc.character:04X} in YAML "
                                                      "(control characters are not allowed)")]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        msg = " ".join(x for x in (exc.context, exc.problem) if x) or "invalid YAML"
        raise PlanError([Problem(file, line, col, "", f"invalid YAML: {msg}")]) from None
    except yaml.YAMLError as exc:
        raise PlanError([Problem(file, 1, 1, "", f"invalid YAML: {exc}")]) from None
    except RecursionError:
        raise PlanError([Problem(file, 1, 1, "", "YAML nested too deeply")]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return docs
