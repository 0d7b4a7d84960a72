"""Progress of long copies inside protection tasks: a throttled log line per VM (bytes done of total,
percent, MB/s) and a Prefect progress artifact per VM copy, so the UI shows one bar per VM.

The core's Reporter does the throttling and also publishes every call to this process's listeners,
which is how `siterecovery protect` and `siterecovery resync` draw their bars while the flow runs
in-process. Only the VM name, the operation and numbers are written: nothing secret.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from siterecovery.progress import ProgressEvent, Reporter


def artifact_key(operation: str, vm: str) -> str:
    """`progress-initial-replication-web-01`: Prefect keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", f"progress-{operation}-{vm}".lower()).strip("-")


class FlowSink:
    """Where a Reporter's throttled events go in a task: the run log and one progress artifact."""

    def __init__(self, vm: str, operation: str) -> None:
        self.vm, self.operation = vm, operation
        self.key = artifact_key(operation, vm)
        self.log = get_run_logger()
        self.artifact_id: UUID | None = None
        self.artifact_broken = False

    def __call__(self, ev: ProgressEvent) -> None:
        self.log.info("%s", ev.line())
        pct = ev.percent
        if pct is None or self.artifact_broken:
            return  # no bar without a total
        try:
            if self.artifact_id is None:
                made = create_progress_artifact(progress=round(pct, 1), key=self.key, description=ev.line())
                self.artifact_id = made if isinstance(made, UUID) else None  # a sync task gets the id itself
            else:
                update_progress_artifact(self.artifact_id, round(pct, 1), description=ev.line())
        except Exception as exc:  # noqa: BLE001 - the copy goes on; the log lines still say where it is
            self.artifact_broken = True
            self.log.warning("%s: progress artifact not updated (%s); progress stays in this log",
                             self.vm, type(exc).__name__)


@contextlib.contextmanager
def reporting(vm: str, operation: str) -> Iterator[Reporter]:
    """A Reporter for one VM's copy in the current task (a line every $SITERECOVERY_PROGRESS_INTERVAL
    seconds, 5 by default); its last event is flushed when the block ends, also when the copy fails,
    so the log says how far it got."""
    rep = Reporter(vm, operation, FlowSink(vm, operation))
    try:
        yield rep
    finally:
        rep.finish()
