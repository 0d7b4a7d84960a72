"""The parameter forms of the deployments operators run from the Prefect UI (`dr-drill/<plan>`,
`failover/<plan>`): everyday fields first, expert ones under `advanced`, help text on every field,
choices instead of free text, and no optional (None) types, which the UI renders as "Property is type
None". Pure pydantic: the flows turn these into one RunRequest (drill_request, failover_request).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from siterecovery.compile import RunOptions
from siterecovery.errors import ConfigurationError
from siterecovery.fabric.base import PointKind
from siterecovery.model import Direction, FailoverType, FailurePolicy
from siterecovery.request import RunRequest

# "topology": every host on the fabric the topology gives it; otherwise every host on this kind.
FabricChoice = Literal["topology", "memory", "linux", "hyperv"]


class _Form(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _project() -> Any:
    return Field("plans", description="the project directory holding the topology, protection and plans "
                                      "(relative to the repository root)")


def _fabric() -> Any:
    return Field("topology", description="run every host on this fabric kind instead of the topology's "
                                         "(memory: a dry run that touches no host)")


def _fabric_options() -> Any:
    return Field(default_factory=dict, description="driver options (memory fabric: latency, state_file)")


class DrillAdvanced(_Form):
    project: str = _project()
    fabric: FabricChoice = _fabric()
    test_network: str = Field("", description="the isolated network (switch) for the test VMs; empty: each "
                                              "VM's mapping")
    fabric_options: dict[str, Any] = _fabric_options()


class FailoverOptions(_Form):
    shut_down_source: bool = Field(True, description="unplanned: try to shut the source VMs down first")
    commit: bool = Field(True, description="commit the failover once every group is up (untick to inspect "
                                           "first; then recover/<plan> commits or cancels it)")
    reverse_replication: bool = Field(False, description="after commit, replicate back to the old source")
    consistency_groups: Literal["together", "each"] = Field(
        "together", description="together: every member of a consistency group to one group point; each: every "
                                "member to its own point (NOT one moment: only when no group point exists)")


class FailoverAdvanced(_Form):
    project: str = _project()
    fabric: FabricChoice = _fabric()
    point_in_time: str = Field("", description="with recovery point 'point_in_time': an ISO 8601 time "
                                               "(2026-11-30T02:00:00Z); the newest point at or before it is used")
    failure_policy: Literal["plan", "stop", "continue"] = Field(
        "plan", description="when a VM fails: the plan's policy, stop after the batch, or continue with the rest")
    intent: str = Field("", description="resume exactly this intent; empty: the open one with the same "
                                        "parameters, else a new one")
    host_limit: int = Field(0, ge=0, description="concurrent VM operations per host touched; 0: keep the "
                                                 "server's limit (4 when missing)")
    site_limit: int = Field(0, ge=0, description="concurrent VM operations per site touched; 0: keep the "
                                                 "server's limit (16 when missing)")
    fabric_options: dict[str, Any] = _fabric_options()


class RecoverAdvanced(_Form):
    project: str = _project()
    fabric: FabricChoice = Field("topology", description="run every host on this fabric kind; topology: the "
                                                         "stopped failover's (else the topology's)")


def fabric_of(choice: str) -> str | None:
    return None if choice == "topology" else choice


def point_in_time(text: str, kind: str) -> datetime | None:
    if kind != "point_in_time":
        return None
    if not text:
        raise ConfigurationError("recovery point 'point_in_time' needs advanced.point_in_time (an ISO 8601 time)")
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigurationError(f"advanced.point_in_time: '{text}' is not an ISO 8601 time "
                                 "(e.g. 2026-11-30T02:00:00Z)") from None


def failover_options(o: FailoverOptions) -> RunOptions:
    return RunOptions(shut_down_source=o.shut_down_source, commit=o.commit, reverse_replication=o.reverse_replication,
                      consistency_groups=o.consistency_groups)


def policy(choice: str) -> FailurePolicy | None:
    return None if choice == "plan" else FailurePolicy(choice)


def requester(requested_by: str) -> str:
    who = requested_by.strip()
    if not who:
        raise ConfigurationError("requested_by is empty: name the person (or ticket) asking for this run; "
                                 "the Prefect UI has no login, so the report can only say what is typed here")
    return who


def drill_request(plan: str, requested_by: str, cleanup: Literal["immediate", "after_approval"],
                  advanced: DrillAdvanced) -> RunRequest:
    """The `dr-drill` form as a run request: a test failover."""
    return RunRequest(plan=plan, failover_type=FailoverType.test,
                      options=RunOptions(cleanup=cleanup, test_network=advanced.test_network or None),
                      project=advanced.project, fabric=fabric_of(advanced.fabric),
                      fabric_options=advanced.fabric_options or None, requested_by=requester(requested_by))


def failover_request(confirm: str, failover_type: Literal["planned", "unplanned"], requested_by: str, plan: str,
                     recovery_point: PointKind, direction: Direction, options: FailoverOptions,
                     advanced: FailoverAdvanced) -> RunRequest:
    """The `failover` form as a run request: a planned or unplanned failover."""
    return RunRequest(plan=plan, failover_type=FailoverType(failover_type), direction=direction,
                      recovery_point=recovery_point, point_in_time=point_in_time(advanced.point_in_time, recovery_point),
                      options=failover_options(options), project=advanced.project, fabric=fabric_of(advanced.fabric),
                      confirm=confirm, intent=advanced.intent or None, failure_policy=policy(advanced.failure_policy),
                      fabric_options=advanced.fabric_options or None, host_limit=advanced.host_limit or None,
                      site_limit=advanced.site_limit or None, requested_by=requester(requested_by))
