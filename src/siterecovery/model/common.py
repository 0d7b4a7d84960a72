"""Shared model plumbing: the frozen, strict base class and the small vocabularies every layer uses."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

# Names of things (sites, hosts, VMs, networks, plans) appear in commands, file names and Prefect
# task names: keep them printable, single-line and of a sane length. Quoting still happens everywhere.
NAME_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")
Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=NAME_RE.pattern)]
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
