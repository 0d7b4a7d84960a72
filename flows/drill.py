"""The `dr-drill` flow: a test failover of a plan on the isolated network, the plan's checks, cleanup
(always: also when anything fails) and the report, as one schedulable unit.

It shares the engine of the recovery-plan flow; its report artifact is `drill-<plan>`.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from siterecovery.compile import RunOptions
from siterecovery.model import FailoverType

from .recovery_plan import MAX_WORKERS, execute_plan


@flow(name="dr-drill", task_runner=ThreadPoolTaskRunner(max_workers=MAX_WORKERS))  # type: ignore[arg-type]
def dr_drill(plan: str, project: str = "plans", fabric: str | None = None,
             cleanup: Literal["immediate", "after_approval"] = "immediate",
             fabric_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Drill `plan`: test failover, checks, cleanup (immediately, or after a 'drill finished' approval)."""
    return execute_plan(plan, FailoverType.test, options=RunOptions(cleanup=cleanup), project=project,
                        fabric=fabric, fabric_options=fabric_options)
