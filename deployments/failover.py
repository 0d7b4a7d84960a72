"""Entrypoint of the `failover/<plan>` deployments: a planned or unplanned failover of one plan, with the
form operators see in the UI (flows/forms.py): `confirm` first and required, then the everyday choices,
the expert ones under `advanced`. Drills have their own deployment (`dr-drill/<plan>`); the way on from
a stopped failover is `recover/<plan>`. Same engine, guard and report as the recovery-plan flow.
"""

from typing import Any, Literal

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.forms import FailoverAdvanced, FailoverOptions, failover_request
from flows.recovery_plan import MAX_WORKERS, execute_plan
from siterecovery.fabric.base import PointKind
from siterecovery.model import Direction


@flow(name="failover", task_runner=ThreadPoolTaskRunner(max_workers=MAX_WORKERS))  # type: ignore[arg-type]
def failover(confirm: str, failover_type: Literal["planned", "unplanned"], requested_by: str, plan: str,
             recovery_point: PointKind = "latest", direction: Direction = Direction.forward,
             options: FailoverOptions = FailoverOptions(),  # noqa: B008 - frozen model
             advanced: FailoverAdvanced = FailoverAdvanced()) -> dict[str, Any]:  # noqa: B008
    """Fail a recovery plan over to its recovery site (or back): this changes production.

    Args:
        confirm: type the plan's name to go ahead; anything else refuses the run before it touches a VM.
        failover_type: planned (sources shut down and synced first: no data loss) or unplanned (the source
            site is lost: fail over to a recovery point).
        requested_by: who asks for this failover (name, team or ticket). The UI has no login: the report
            shows what is typed here as the requester.
        plan: the recovery plan (its name in the project).
        recovery_point: unplanned: latest, latest_processed, latest_app_consistent or point_in_time
            (then give advanced.point_in_time).
        direction: forward (to the recovery site) or failback (home again, once replication was reversed).
        options: shut down the sources, commit, reverse replication.
        advanced: project, fabric, point in time, failure policy, intent, limits, driver options.
    """
    return execute_plan(failover_request(confirm, failover_type, requested_by, plan, recovery_point, direction, options,
                                         advanced))
