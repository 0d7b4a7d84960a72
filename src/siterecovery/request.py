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
        repeating the parameters; `plan` is the plan's name (the request may name its file)."""
        return {"plan": plan, "failover_type": self.failover_type.value, "direction": self.direction.value,
                "recovery_point": self.recovery_point,
                "point_in_time": self.point_in_time.isoformat() if self.point_in_time else None,
                "options": self.options.model_dump(mode="json"), "fabric": self.fabric,
                "failure_policy": self.failure_policy.value if self.failure_policy else None,
                "fabric_options": self.fabric_options, "host_limit": self.host_limit, "site_limit": self.site_limit}

    @classmethod
    def resume(cls, params: dict[str, Any], intent: str, project: str, requested_by: str = "") -> RunRequest:
        """The request that runs the open intent `intent` again, from the `params` it keeps: confirmed, since
        resuming was confirmed by naming the plan."""
        return cls(plan=params["plan"], failover_type=FailoverType(params["failover_type"]),
                   direction=Direction(params["direction"]), recovery_point=params["recovery_point"],
                   point_in_time=datetime.fromisoformat(params["point_in_time"]) if params.get("point_in_time") else None,
                   options=RunOptions.model_validate(params["options"]), project=project, fabric=params.get("fabric"),
                   confirm=params["plan"], intent=intent, failure_policy=params.get("failure_policy"),
                   fabric_options=params.get("fabric_options"), host_limit=params.get("host_limit"),
                   site_limit=params.get("site_limit"), requested_by=requested_by)
