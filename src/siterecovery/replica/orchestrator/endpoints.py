"""Where an agent runs: in this process for a local host, over a paramiko exec channel for a remote one.

An endpoint takes a protocol Command (or its argv, which it reads through the protocol first, so a
malformed command fails here, naming the option, before anything reaches a host) and answers the
command's result, checked against the shape protocol.py declares for it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

import paramiko

from ... import ssh
from ...model import Host
from .. import agent
from ..engine import ReplicaError
from ..protocol import (
    AGENT_MODULE,
    ERROR,
    RESULT,
    Command,
    ProtocolError,
    last_json,
    parse_command,
    parse_failure,
    parse_result,
)

R = TypeVar("R")


def command(cmd: Command[R] | Sequence[str]) -> Command[R]:
    """`cmd` as a Command (an argv is read through the protocol)."""
    return cmd if isinstance(cmd, Command) else parse_command(list(cmd))


def agent_error(payload: bytes | str, rc: int, where: str, host: str | None = None) -> ReplicaError:
    """The ReplicaError a failed agent reported (its last `{"error": ...}` line), or its exit status."""
    text = payload.decode(errors="replace") if isinstance(payload, bytes) else payload
    for line in reversed(text.strip().splitlines()):
        failed = parse_failure(last_json(line, (f"{ERROR} ", f"{RESULT} ")))
        if failed is not None:
            return ReplicaError(f"{where}: {failed['message']}", code=failed["error"], path=failed.get("path"), host=host)
    tail = text.strip()[-400:]
    return ReplicaError(f"{where}: agent exited {rc}: {tail or 'no output'}", code="AgentFailed", host=host)


def on_host(host: str, exc: BaseException) -> BaseException:
    """`exc` marked with the host it happened on (an in-process agent's error names no host itself)."""
    if isinstance(exc, ReplicaError) and exc.host is None:
        exc.host = host
    return exc


class Endpoint:
    """One host's agent. `call` runs a control command, `raw` one that answers bytes on stdout."""

    name: str
    local: bool

    @overload
    def call(self, cmd: Command[R], stdin: bytes = b"") -> R: ...

    @overload
    def call(self, cmd: Sequence[str], stdin: bytes = b"") -> dict[str, Any]: ...

    def call(self, cmd: Command[Any] | Sequence[str], stdin: bytes = b"") -> Any:
        return self._call(command(cmd), stdin)

    def raw(self, cmd: Command[Any] | Sequence[str], stdin: bytes = b"") -> bytes:
        raise NotImplementedError

    def _call(self, cmd: Command[R], stdin: bytes) -> R:
        raise NotImplementedError


@dataclass
class LocalEndpoint(Endpoint):
    name: str = "local"
    local: bool = True

    def _call(self, cmd: Command[R], stdin: bytes) -> R:
        try:
            return agent.execute(cmd, io.BytesIO(stdin), io.BytesIO())
        except ReplicaError as exc:
            raise on_host(self.name, exc) from None

    def raw(self, cmd: Command[Any] | Sequence[str], stdin: bytes = b"") -> bytes:
        out = io.BytesIO()
        try:
            agent.execute(command(cmd), io.BytesIO(stdin), out)
        except ReplicaError as exc:
            raise on_host(self.name, exc) from None
        return out.getvalue()


@dataclass
class SSHEndpoint(Endpoint):
    """An agent reached over SSH: `python -m siterecovery.replica.agent` on the host, through the
    orchestrator's one connection pool (ssh.Pool) for both commands and streams."""

    name: str
    pool: ssh.Pool
    host: Host
    python: str = "python3"
    local: bool = False
    timeout: float = 600.0
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, cmd: Command[Any] | Sequence[str]) -> list[str]:
        """The command line that runs `cmd` at this host."""
        pre = ["env", *(f"{k}={v}" for k, v in self.env.items())] if self.env else []
        return [*pre, self.python, "-m", AGENT_MODULE, *command(cmd).argv()]

    def channel(self, cmd: Command[Any] | Sequence[str]) -> paramiko.Channel:
        return self.pool.channel(self.host, self.argv(cmd), timeout=self.timeout)

    def raw(self, cmd: Command[Any] | Sequence[str], stdin: bytes = b"") -> bytes:
        c = command(cmd)
        r = self.pool.run(self.host, self.argv(c), stdin=stdin or None, deadline=self.timeout)
        if r.rc != 0:
            raise agent_error(r.stdout + b"\n" + r.stderr, r.rc, f"{self.name}: {c.command}", self.name)
        return r.stdout

    def _call(self, cmd: Command[R], stdin: bytes) -> R:
        out = self.raw(cmd, stdin)
        lines = out.strip().splitlines()
        answer = last_json(lines[-1]) if lines else None
        if answer is None:
            raise ReplicaError(f"{self.name}: {cmd.command} answered no JSON", code="AgentFailed", host=self.name)
        try:
            return parse_result(cmd, answer)
        except ProtocolError as exc:
            exc.host = self.name
            raise

