"""Microsoft's documented parameter sets of the Hyper-V cmdlets the driver uses, and a binder that
resolves a call to exactly one of them the way PowerShell does.

The table (hyperv_syntax.json beside this file) is generated from the SYNTAX sections collected in
shared/reference/hyperv-cmdlet-syntax.md (one `###` block per parameter set) by
`python -m siterecovery.testing.hyperv_syntax <path-to-md>`; tests/fabric/test_hyperv_syntax.py checks
that the checked-in table still matches the file when the file is there. Nothing in the table comes from
the driver: it is the independent oracle the simulator binds every Hyper-V cmdlet call against.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE_PATH = Path(__file__).with_name("hyperv_syntax.json")

# PowerShell's common parameters ([<CommonParameters>]) and the risk-mitigation pair every set of a
# ShouldProcess cmdlet carries ([-WhatIf] [-Confirm] are listed per set in the syntax already).
COMMON = ("Verbose", "Debug", "ErrorAction", "WarningAction", "InformationAction", "ErrorVariable",
          "WarningVariable", "InformationVariable", "OutVariable", "OutBuffer", "PipelineVariable")

_TOKENS = [
    ("optpos", re.compile(r"\[\[-(\w+)\]\s+<([^>]+)>\]")),    # [[-Name] <T>]  optional, positional
    ("mandpos", re.compile(r"\[-(\w+)\]\s+<([^>]+)>")),       # [-Name] <T>    mandatory, positional
    ("optnamed", re.compile(r"\[-(\w+)\s+<([^>]+)>\]")),      # [-Name <T>]    optional, named
    ("switch", re.compile(r"\[-(\w+)\]")),                    # [-Name]        optional switch
    ("mandnamed", re.compile(r"-(\w+)\s+<([^>]+)>")),         # -Name <T>      mandatory, named
    ("mandswitch", re.compile(r"-(\w+)(?=\s|$)")),            # -Name          mandatory switch
    ("common", re.compile(r"\[<CommonParameters>\]")),
]


def parse_syntax(text: str) -> dict[str, dict[str, Any]]:
    """{cmdlet: {"default": set name, "sets": {set: [{name, type, mandatory, position, switch}]}}}."""
    out: dict[str, dict[str, Any]] = {}
    cmdlet: str | None = None
    set_name: str | None = None
    default: str | None = None
    block: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            cmdlet, set_name = line[3:].strip(), None
            out[cmdlet] = {"default": None, "sets": {}}
            continue
        if line.startswith("### "):
            head = line[4:].strip()
            default = head.removesuffix("(Default)").strip() if head.endswith("(Default)") else None
            set_name = head.removesuffix("(Default)").strip()
            continue
        if line.strip() == "```":
            if block is None:
                block = []
                continue
            if cmdlet is None:
                raise ValueError("a syntax block outside a cmdlet section")
            name = set_name or "__AllParameterSets"
            out[cmdlet]["sets"][name] = _parse_block(cmdlet, " ".join(block))
            if default or set_name is None:
                out[cmdlet]["default"] = name
            block, set_name, default = None, None, None
            continue
        if block is not None:
            block.append(line.strip())
    return out


def _parse_block(cmdlet: str, text: str) -> list[dict[str, Any]]:
    text = text.strip()
    if not text.startswith(cmdlet):
        raise ValueError(f"{cmdlet}: syntax block does not start with the cmdlet name: {text[:60]!r}")
    i, params, position = len(cmdlet), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        kind, m = _token(cmdlet, text, i)
        i = m.end()
        if kind == "common":
            continue
        p: dict[str, Any] = {"name": m.group(1), "type": m.group(2) if m.lastindex and m.lastindex > 1 else "switch",
                             "mandatory": kind in ("mandpos", "mandnamed", "mandswitch"), "position": None}
        if kind in ("optpos", "mandpos"):
            p["position"] = position
            position += 1
        params.append(p)
    return params


def _token(cmdlet: str, text: str, i: int) -> tuple[str, re.Match[str]]:
    for kind, rx in _TOKENS:
        m = rx.match(text, i)
        if m:
            return kind, m
    raise ValueError(f"{cmdlet}: cannot read the syntax at {text[i:i + 40]!r}")


def load_table() -> dict[str, dict[str, Any]]:
    return json.loads(TABLE_PATH.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def render_table(table: dict[str, dict[str, Any]]) -> str:
    return json.dumps(table, indent=1, sort_keys=True) + "\n"


# ---- binding ---------------------------------------------------------------------------------------
class BindError(Exception):
    """PowerShell refused the call: error id (ErrorId part of the FQID), category, English text."""

    def __init__(self, error_id: str, category: str, message: str) -> None:
        super().__init__(message)
        self.error_id, self.category, self.message = error_id, category, message


@dataclass(frozen=True)
class Bound:
    set_name: str
    named: dict[str, Any]  # parameter name as documented -> the raw value (positionals included)
    pipeline_param: str | None
    types: dict[str, str]  # parameter -> documented type ("switch" for switches)


AMBIGUOUS = "Parameter set cannot be resolved using the specified named parameters."


def bind(table: dict[str, dict[str, Any]], cmdlet: str, named: list[tuple[str, Any]], positional: list[Any],
         piped: bool, accepts_pipe: Any = None) -> Bound:
    """Resolve one call to exactly one documented parameter set.

    named: (name as written, value) pairs, a switch's value True; positional: the bare arguments in order;
    piped: whether pipeline input arrives; accepts_pipe(type) says whether a parameter of that documented
    type takes the piped objects by value (the simulator decides from the objects' types).
    """
    spec = table[cmdlet]
    sets: dict[str, list[dict[str, Any]]] = spec["sets"]
    every = {p["name"].lower(): p["name"] for ps in sets.values() for p in ps}
    chosen: dict[str, Any] = {}
    for written, value in named:
        low = written.lower()
        if low in (c.lower() for c in COMMON):
            continue
        name = every.get(low)
        if name is None:
            prefixed = sorted({n for k, n in every.items() if k.startswith(low)})
            if len(prefixed) == 1:
                name = prefixed[0]
            elif len(prefixed) > 1:
                raise BindError("AmbiguousParameter", "InvalidArgument",
                                f"Parameter cannot be processed because the parameter name '{written}' is ambiguous. "
                                f"Possible matches include: {' '.join('-' + n for n in prefixed)}.")
            else:
                raise BindError("NamedParameterNotFound", "InvalidArgument",
                                f"A parameter cannot be found that matches parameter name '{written}'.")
        if name in chosen:
            raise BindError("ParameterAlreadyBound", "InvalidArgument",
                            f"Cannot bind parameter because parameter '{name}' is specified more than once. To "
                            "provide multiple values to parameters that can accept multiple values, use the array "
                            "syntax. For example, \"-parameter value1,value2,value3\".")
        chosen[name] = value
    candidates = {s: ps for s, ps in sets.items() if all(any(p["name"] == n for p in ps) for n in chosen)}
    if not candidates:
        raise BindError("AmbiguousParameterSet", "InvalidArgument", AMBIGUOUS)
    fits: dict[str, tuple[dict[str, Any], str | None]] = {}
    too_many: Any = None
    for s, ps in candidates.items():
        args = dict(chosen)
        free = sorted((p for p in ps if p["position"] is not None and p["name"] not in args),
                      key=lambda p: p["position"])
        if len(positional) > len(free):
            too_many = positional[len(free)]
            continue
        for p, v in zip(free, positional, strict=False):
            args[p["name"]] = v
        pipe_to = None
        if piped:
            pipe_to = next((p["name"] for p in ps if p["name"] not in args and p["type"] != "switch"
                            and accepts_pipe is not None and accepts_pipe(p["type"])), None)
            if pipe_to is None:
                continue
        if all(p["name"] in args or p["name"] == pipe_to for p in ps if p["mandatory"]):
            fits[s] = (args, pipe_to)
    if not fits:
        if too_many is not None and len(candidates) >= 1 and not any(
                len(positional) <= len([p for p in ps if p["position"] is not None]) for ps in candidates.values()):
            raise BindError("PositionalParameterNotFound", "InvalidArgument",
                            f"A positional parameter cannot be found that accepts argument '{too_many}'.")
        if piped and accepts_pipe is not None:
            raise BindError("InputObjectNotBound", "InvalidArgument",
                            "The input object cannot be bound to any parameters for the command either because "
                            "the command does not take pipeline input or the input and its properties do not "
                            "match any of the parameters that take pipeline input.")
        target = spec["default"] if spec["default"] in candidates else (next(iter(candidates))
                                                                         if len(candidates) == 1 else None)
        if target is None:
            raise BindError("AmbiguousParameterSet", "InvalidArgument", AMBIGUOUS)
        missing = [p["name"] for p in candidates[target] if p["mandatory"] and p["name"] not in chosen]
        raise BindError("MissingMandatoryParameter", "InvalidArgument",
                        "Cannot process command because of one or more missing mandatory parameters: "
                        f"{' '.join(missing)}.")
    if len(fits) > 1:
        if spec["default"] in fits:
            fits = {spec["default"]: fits[spec["default"]]}
        else:
            # guess: with several sets fitting and the default not among them, PowerShell's tie-break is
            # taken to prefer the set whose name the others extend (VMObject over VMObject_Test).
            base = [s for s in fits if all(o == s or o.startswith(s + "_") for o in fits)]
            if len(base) != 1:
                raise BindError("AmbiguousParameterSet", "InvalidArgument", AMBIGUOUS)
            fits = {base[0]: fits[base[0]]}
    (set_name, (args, pipe_to)), = fits.items()
    types = {p["name"]: p["type"] for p in sets[set_name]}
    return Bound(set_name=set_name, named=args, pipeline_param=pipe_to, types=types)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m siterecovery.testing.hyperv_syntax <hyperv-cmdlet-syntax.md>", file=sys.stderr)
        return 2
    table = parse_syntax(Path(argv[0]).read_text(encoding="utf-8"))
    TABLE_PATH.write_text(render_table(table), encoding="utf-8")
    print(f"wrote {TABLE_PATH} ({len(table)} cmdlets, {sum(len(c['sets']) for c in table.values())} sets)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
