"""What every task of both kinds of flow shares: when a task is retried, and how a finished task's
outcome is read. (The drivers come from tasks.fabric; slots from tasks.limits.)"""

from __future__ import annotations

from typing import Any, Literal

from siterecovery.errors import TransientFabricError

RETRIES = 2
RETRY_DELAY_SECONDS = 1

Status = Literal["completed", "failed", "skipped"]


def only_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: transient fabric errors only (connection lost, host busy)."""
    try:
        state.result()
    except TransientFabricError:
        return True
    except BaseException:  # noqa: BLE001 - every other failure is final
        return False
    return False


def task_outcome(fut: Any) -> tuple[Status, Any, BaseException | None]:
    """(status, value, error) of a settled task future: completed with its value; failed with the task's
    own error; skipped when it never ran (an upstream it waited for did not complete)."""
    state = fut.state
    if state.is_completed():
        return "completed", fut.result(), None
    if state.is_failed() or state.is_crashed():
        try:
            fut.result()
        except BaseException as exc:  # noqa: BLE001 - the task's own error, reported as its reason
            return "failed", None, exc
        return "failed", None, None
    return "skipped", None, None
