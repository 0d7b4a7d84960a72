"""The `dr-drill` flow: a test failover of a plan on the isolated network, the plan's checks, cleanup
(always: also when anything fails) and the report, as one schedulable unit.

It shares the engine of the recovery-plan flow; its report artifact is `drill-<plan>`. Its parameters
are the `dr-drill/<plan>` form (flows/forms.py): everyday fields first, the rest under `advanced`.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from .forms import DrillAdvanced, drill_request
from .recovery_plan import MAX_WORKERS, execute_plan


@flow(name="dr-drill", task_runner=ThreadPoolTaskRunner(max_workers=MAX_WORKERS))  # type: ignore[arg-type]
def dr_drill(plan: str, requested_by: str, cleanup: Literal["immediate", "after_approval"] = "immediate",
             advanced: DrillAdvanced = DrillAdvanced()) -> dict[str, Any]:  # noqa: B008 - frozen model
    """Drill a recovery plan: test failover into the isolated network, the plan's checks, cleanup, a report.

    Args:
        plan: the recovery plan to drill (its name in the project).
        requested_by: who asks for this drill (name, team or ticket); scheduled drills say "schedule". The UI
            has no login: the report shows what is typed here as the requester.
        cleanup: immediate, or after_approval: the test VMs stay up until someone approves 'drill finished'.
        advanced: project directory, fabric, test network and driver options.
    """
    return execute_plan(drill_request(plan, requested_by, cleanup, advanced))
