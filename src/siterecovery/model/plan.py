"""Recovery plans: ordered groups of VMs with actions before and after each group.

An action is a script (on the orchestrator or on a named host over SSH) or a manual action (a pause
for a person's approval). Every action can be limited to failover types and directions.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from .common import Direction, FailoverType, FailurePolicy, Frozen, Ident, Name, Slug


class Scope(Frozen):
    """When an action applies; empty means always."""

    failover_types: tuple[FailoverType, ...] = ()
    directions: tuple[Direction, ...] = ()

    def applies(self, failover_type: FailoverType, direction: Direction) -> bool:
        return (not self.failover_types or failover_type in self.failover_types) and (
            not self.directions or direction in self.directions
        )


class ScriptAction(Frozen):
    type: Literal["script"]
    name: Name
    path: str = Field(..., min_length=1, description="script file, relative to the plan's directory")
    host: Ident | None = Field(None, description="run over SSH on this host; default: on the orchestrator")
    args: tuple[str, ...] = Field((), description="jinja2 templates rendered in a sandbox")
    timeout_seconds: int = Field(300, ge=1, le=86_400)
    when: Scope = Scope()
    per_vm: bool = Field(False, description="run once per VM of the group instead of once per group")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment (no secrets)")


class ManualAction(Frozen):
    type: Literal["manual"]
    name: Name
    instructions: str = Field(..., min_length=1)
    approver_group: Name | None = None
    timeout_seconds: int = Field(3600, ge=1, le=7 * 86_400)
    when: Scope = Scope()


Action = Annotated[ScriptAction | ManualAction, Field(discriminator="type")]


class GroupVM(Frozen):
    name: Ident
    depends_on: tuple[Ident, ...] = Field((), description="VMs of the same group that must be up first")


class VMGroup(Frozen):
    name: Name
    vms: tuple[GroupVM, ...] = Field(..., min_length=1)
    before: tuple[Action, ...] = ()
    after: tuple[Action, ...] = ()

    @field_validator("vms", mode="before")
    @classmethod
    def _names(cls, v: object) -> object:
        # `vms: [web-01, {name: web-02, depends_on: [web-01]}]`: a bare name is a VM without dependencies.
        if isinstance(v, list | tuple):
            return [{"name": x} if isinstance(x, str) else x for x in v]
        return v

    @property
    def vm_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.vms)


class Objectives(Frozen):
    """What the business asks of this plan: every report says whether a run met it."""

    rpo_seconds: float | None = Field(None, gt=0, description="most data (age of the recovery point) one may lose")
    rto_seconds: float | None = Field(None, gt=0, description="longest time from the start of a run to the "
                                                              "last VM started")


class RecoveryPlan(Frozen):
    kind: Literal["RecoveryPlan"] = "RecoveryPlan"
    name: Slug
    description: str = ""
    version: str = Field("1", description="shown in every report; bump it when the plan changes")
    source: Name = Field(..., description="the protected cloud")
    target: Name = Field(..., description="the protecting cloud")
    failure_policy: FailurePolicy = FailurePolicy.stop
    groups: tuple[VMGroup, ...] = Field(..., min_length=1)
    objectives: Objectives = Field(default_factory=Objectives, description="RPO and RTO objectives")

    @property
    def vm_names(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g.vm_names)
