"""The project's one exception tree.

Plan errors are about input (a file, a line, a field); execution errors are about the estate (a VM,
a host, an operation) and always say what to do next. Every exception survives pickling, because
Prefect serialises task exceptions between processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class SiteRecoveryError(Exception):
    """Root of every error this project raises on purpose.

    `message` is what went wrong, bare; everything else the error knows is an attribute, also kept in
    `fields` (so pickling carries it); `__str__` renders both. Nothing parses a rendered message back.
    """

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields
        for key, value in fields.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.fields))

    def __str__(self) -> str:
        return self.message

    def with_context(self, **fields: Any) -> SiteRecoveryError:
        """A copy of this error, of the same type, with these fields set where they were missing (None)."""
        merged = dict(self.fields)
        merged.update({k: v for k, v in fields.items() if merged.get(k) is None})
        return _rebuild(type(self), self.message, merged)


def _rebuild(cls: type[SiteRecoveryError], message: str, fields: dict[str, Any]) -> SiteRecoveryError:
    err = cls.__new__(cls)
    SiteRecoveryError.__init__(err, message, **fields)
    return err


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with an input file, located precisely enough to jump to."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        field = f" {self.path}:" if self.path else ""
        return f"{where}:{field} {self.message}"


class PlanError(SiteRecoveryError):
    """Input that cannot be used: every problem found, not just the first."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]) -> None:
        probs = tuple(sorted(set(problems)))
        lines = "\n".join(f"  {p}" for p in probs)
        noun = "problem" if len(probs) == 1 else "problems"
        super().__init__(f"{len(probs)} {noun} found:\n{lines}", problems=probs)
        self.problems = probs

    def __reduce__(self) -> tuple[Any, ...]:
        return (PlanError, (self.problems,))


class ExecutionError(SiteRecoveryError):
    """Something went wrong while acting on the estate.

    Carries the VM, host and operation it concerns and a hint that tells the operator what to do next.
    """

    def __init__(
        self,
        message: str,
        *,
        vm: str | None = None,
        host: str | None = None,
        operation: str | None = None,
        hint: str | None = None,
        error_id: str | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message, vm=vm, host=host, operation=operation, hint=hint, error_id=error_id, **extra)
        self.vm, self.host, self.operation, self.hint, self.error_id = vm, host, operation, hint, error_id

    def __str__(self) -> str:
        return self.render()

    def render(self, context: bool = True) -> str:
        """The message, then (with `context`) the VM, host and operation, the error id and the hint. Without
        context it reads the same for every VM it hit (a report's shared failure line)."""
        parts = [self.message]
        ctx = ", ".join(f"{k}={v}" for k, v in (("vm", self.vm), ("host", self.host), ("operation", self.operation)) if v)
        if ctx and context:
            parts.append(f"[{ctx}]")
        if self.error_id:
            parts.append(f"(error id: {self.error_id})")
        if self.hint:
            parts.append(f"Next: {self.hint}")
        return " ".join(parts)


class FabricError(ExecutionError):
    """A fabric refused or failed an operation."""


class TransientFabricError(FabricError):
    """A failure worth retrying: connection lost, timeout, host busy."""


class InvalidStateError(FabricError):
    """The VM is not in a state that allows the operation."""


class NotFoundError(FabricError):
    """A VM, host or recovery point does not exist."""


class HostKeyError(ExecutionError):
    """An SSH host key is unknown or does not match what the topology pins."""


class ConnectionFailed(TransientFabricError):
    """A host could not be reached."""


class LinkDown(ConnectionFailed):
    """A network path went silent: nothing from the host within the dead-link deadline."""


class CommandTimedOut(TransientFabricError):
    """A remote command (siterecovery.ssh.Pool.run) passed its deadline and was killed. `sent`: whether
    it had received all its stdin, i.e. may have acted; a caller for whom that is not safe to retry
    says so (the Hyper-V driver's OperationTimeout)."""

    def __init__(self, message: str, *, sent: bool = False, **kw: Any) -> None:
        super().__init__(message, sent=sent, **kw)
        self.sent = sent


class StorageError(FabricError):
    """A filesystem refused a write: full (ENOSPC, EDQUOT) or read-only (EROFS). `error_id` is the
    errno's name; `path` the file or directory, `host` where it lives ("orchestrator" for the state
    directory)."""

    def __init__(self, message: str, *, path: str | None = None, **kw: Any) -> None:
        super().__init__(message, path=path, **kw)
        self.path = path


class ScriptError(ExecutionError):
    """A plan's script failed, timed out or could not be started."""


class ApprovalError(ExecutionError):
    """A manual action that was not approved; `record` is its approval record (flows.approval), carried
    through pickling like every other field."""

    def __init__(self, message: str, *, record: Any = None, **kw: Any) -> None:
        super().__init__(message, record=record, **kw)
        self.record = record


class ApprovalRejected(ApprovalError):
    """A manual action was rejected by its approver."""


class ApprovalTimedOut(ApprovalError):
    """Nobody answered a manual action before its timeout."""


class ConfigurationError(SiteRecoveryError):
    """The environment is not set up as required (a missing credential, an unknown fabric kind)."""
