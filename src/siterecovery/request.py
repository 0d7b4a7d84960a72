"""One run of a recovery plan as it was asked for: the frozen request that every way of starting a run
builds once (the recovery-plan, dr-drill, failover and recover flows, the `run` command) and the engine
(flows/recovery_plan.py execute_plan) takes whole. Its field names are the recovery-plan flow's
parameters, so the CLI hands a request to that flow as keywords and the flow turns them back into one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .compile import RunOptions
from .errors import ConfigurationError
from .fabric.base import PointChoice, PointKind
from .model import Direction, FailoverType, FailurePolicy
from .model.common import Frozen


class ConfirmationRequired(ConfigurationError):
    """A planned or unplanned failover was started without `confirm` naming the plan."""


# Not kept with an intent: where the project is, who asks and the confirmation belong to the run that
# resumes it, and the intent's id is the intent itself.
PER_RUN = frozenset({"project", "confirm", "intent", "requested_by"})


class RunRequest(Frozen):
    plan: str
    failover_type: FailoverType = FailoverType.test
    direction: Direction = Direction.forward
    recovery_point: PointKind = "latest"
    point_in_time: datetime | None = None
    options: RunOptions = RunOptions()
    project: str = "plans"
    fabric: str | None = None
    confirm: str = ""
    intent: str | None = None
    failure_policy: FailurePolicy | None = None
    fabric_options: dict[str, Any] | None = None
    host_limit: int | None = None
    site_limit: int | None = None
    requested_by: str = ""

    @property
    def point(self) -> PointChoice:
        return PointChoice(kind=self.recovery_point, at=self.point_in_time)

    def check(self, plan: str) -> None:
        """Refuse what must not start (before any lock or fabric call): a planned or unplanned failover of
        `plan` (its name) not confirmed by naming it; a point in time without its time."""
        if self.failover_type != FailoverType.test and self.confirm != plan:
            raise ConfirmationRequired(
                f"a {self.failover_type.value} failover of '{plan}' changes production; confirm it by passing "
                f"confirm='{plan}' (CLI: --confirm {plan}). Drills (test failovers) need no confirmation")
        if self.recovery_point == "point_in_time" and self.point_in_time is None:
            raise ConfigurationError("recovery_point 'point_in_time' needs point_in_time")

    def flow_parameters(self) -> dict[str, Any]:
        """The recovery-plan flow's keyword arguments for this request."""
        return {name: getattr(self, name) for name in type(self).model_fields}

    def params(self, plan: str) -> dict[str, Any]:
        """What an open intent keeps (JSON), so that `recover/<plan>` can resume it without the operator
        repeating the parameters; `plan` is the plan's name (the request may name its file). Every field
        but the per-run ones, so a field added to the request is kept without another list to update."""
        return {**self.model_dump(mode="json", exclude=set(PER_RUN)), "plan": plan}

    @classmethod
    def resume(cls, params: dict[str, Any], intent: str, project: str, requested_by: str = "") -> RunRequest:
        """The request that runs the open intent `intent` again, from the `params` it keeps: confirmed, since
        resuming was confirmed by naming the plan."""
        kept = {k: v for k, v in params.items() if k not in PER_RUN}
        return cls.model_validate({**kept, "project": project, "confirm": params["plan"], "intent": intent,
                                   "requested_by": requested_by})
