"""Shared model plumbing: the frozen, strict base class and the small vocabularies every layer uses."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints

from ..paths import IDENT_RULE, is_ident

# Names of things (sites, hosts, VMs, networks, plans) appear in commands, file names and Prefect
# task names: keep them printable, single-line and of a sane length. Quoting still happens everywhere.
NAME_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")
Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=NAME_RE.pattern)]


def _ident(v: str) -> str:
    if not is_ident(v):
        raise ValueError(f"{v!r} is not a valid name: {IDENT_RULE} (the rule: siterecovery/paths.py)")
    return v


# Names of sites, hosts, VMs and disks become file and directory names: identifiers (paths.IDENT_RE).
Ident = Annotated[str, AfterValidator(_ident)]
# Plan and pairing names also become Prefect deployment names and artifact keys.
Slug = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9-]*$")]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)


class FabricKind(StrEnum):
    hyperv = "hyperv"
    linux = "linux"
    memory = "memory"


class FailoverType(StrEnum):
    test = "test"
    planned = "planned"
    unplanned = "unplanned"


class Direction(StrEnum):
    forward = "forward"
    failback = "failback"


class FailurePolicy(StrEnum):
    stop = "stop"
    continue_ = "continue"
