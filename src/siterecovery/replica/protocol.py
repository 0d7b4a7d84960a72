"""The agent's protocol: every command with its arguments, and the shape of every answer (stdlib only).

A command crosses to a host as the agent's argv (`python -m siterecovery.replica.agent status --replica
... --meta ...`; structured options as JSON) and its answer comes back as one JSON object. Both ends go
through this module: the orchestrator builds a `Command` and reads its answer with `parse_result`, the
agent reads its argv with `parse_command`; a wrong message is a ProtocolError naming the field.
"""

import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, NotRequired, TypedDict, TypeVar

from .engine import ReplicaError

# Lines of the agent's side channels. `send` writes its stream on stdout, so its progress (`P done
# total`), result (`R {json}`) and failure (`E {json}`) go to stderr; a receiver started with --ready
# prints READY once it holds the replica (peer.py waits for it before sending anything).
PROGRESS = "P"
RESULT = "R"
ERROR = "E"
READY = b"SITERECOVERY-PEER-READY"
AGENT_MODULE = "siterecovery.replica.agent"


class ProtocolError(ReplicaError):
    """A command or an answer that does not follow the protocol; `field` names the culprit."""

    code = "BadMessage"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.field))


# ---- answers ---------------------------------------------------------------------------------------


class Failure(TypedDict):
    """What a failed command answers (exit status 3): a stable code and a message for people."""

    error: str
    message: str
    path: NotRequired[str | None]


class Point(TypedDict):
    """A recovery point as the replica records it."""

    id: str
    created_at: str
    consistency: NotRequired[str]
    group: NotRequired[str | None]
    seq: int
    gen: str
    size: NotRequired[int]


class StatusResult(TypedDict):
    exists: bool
    initialized: bool
    gen: str | None
    seq: int
    size: int | None
    disk_matches: bool
    differs: list[str]
    corrupt: dict[str, Any] | None
    last_scrub: Any
    points: list[Point]
    undo_bytes: int
    writable: bool


class ReceiveResult(TypedDict):
    point: Point
    blocks: int
    mode: str
    undo_bytes: NotRequired[int]


class SendResult(TypedDict):
    gen: str
    size: int
    blocks: int
    zero_blocks: int
    bytes: int
    changed_bytes: int
    send_started: float
    send_seconds: float
    view: NotRequired[str]


class SendToResult(TypedDict):
    sent: SendResult
    received: ReceiveResult


class RehashResult(TypedDict):
    gen: str
    seq: int
    size: int
    points_kept: Any


class SeedResult(TypedDict):
    gen: str
    seq: int
    size: int
    manifest: str  # the digest of the manifest's digests
    point: Point | None


class AdoptResult(TypedDict):
    adopted: bool
    reason: str


class ManifestResult(TypedDict):
    bytes: int


class RebuildResult(TypedDict):
    seq: int
    dest: str
    copy: str
    undo_applied: int


class RevertResult(TypedDict):
    seq: int
    steps: Any


class PruneResult(TypedDict):
    dropped: list[int]


class DroppedResult(TypedDict):
    dropped: bool


class ScrubResult(TypedDict):
    next: int | None
    bytes_read: int
    blocks: int
    seconds: float
    corrupt_blocks: list[int]
    corrupt_undo: list[int]
    size: int | None


class CommitResult(TypedDict):
    committed: bool


class SourceStatusResult(TypedDict):
    tracked: bool
    pending_bytes: int | None
    how: str
    size: NotRequired[int]


class DigestResult(TypedDict):
    digest: str


class CopyResult(TypedDict):
    copy: str


class RemoveResult(TypedDict):
    removed: list[str]


class ExistsResult(TypedDict):
    exists: bool
    size: int | None


class HookResult(TypedDict):
    ran: bool


class SpawnResult(TypedDict):
    pid: int
    started: bool


class KillResult(TypedDict):
    stopped: bool
    signal: NotRequired[str]


class AliveResult(TypedDict):
    pid: int | None


class QemuStartResult(TypedDict):
    started: bool
    pid: int | None
    status: NotRequired[str | None]
    accel: NotRequired[str]
    kvm_failed: NotRequired[bool]
    bitmaps: NotRequired[dict[str, str]]  # spec track: node -> the dirty bitmap added before the guest ran
    track_error: NotRequired[str]  # spec track: why no bitmaps were added (the guest runs untracked)


class QemuStopResult(TypedDict):
    stopped: bool
    how: NotRequired[str]
    signal: NotRequired[str]


class QemuStatusResult(TypedDict):
    running: bool
    status: str | None
    pid: int | None
    dirty: NotRequired[dict[str, int]]
    error: NotRequired[str]


class QemuCaptureResult(TypedDict):
    socket: str
    tag: str
    disks: list[dict[str, Any]]
    window_seconds: NotRequired[float]
    was_running: NotRequired[bool]


class QemuAgentResult(TypedDict):
    answer: Any  # the guest agent's `return`


class QemuReleaseResult(TypedDict):
    released: bool
    errors: list[str]


# ---- commands --------------------------------------------------------------------------------------

R = TypeVar("R")


def _rest(min_items: int = 0) -> Any:
    """A list of positional arguments at the end of the argv (after `--`)."""
    return field(default_factory=list, metadata={"rest": min_items})


@dataclass(frozen=True)
class Command(Generic[R]):
    """One agent command. Fields are its options (`retention_hours` is `--retention-hours`); a bool is a
    flag; dicts and lists travel as JSON; `result` is the TypedDict its answer follows."""

    command: ClassVar[str]
    result: ClassVar[Any]

    def argv(self) -> list[str]:
        """The agent's argv for this command (without the interpreter and module)."""
        out, rest = [self.command], None
        for f, kind, _ in _fields(type(self)):
            v = getattr(self, f.name)
            if kind == "rest":
                rest = [str(x) for x in v]
                continue
            if v is None or (kind == "flag" and not v):
                continue
            if f.default is not dataclasses.MISSING and v == f.default and kind != "flag":
                continue  # the agent's default: the command line stays short
            flag = _flag(f)
            out += [flag] if kind == "flag" else [flag, json.dumps(v) if kind == "json" else str(v)]
        if rest is not None:
            out += ["--", *rest]
        return out


@dataclass(frozen=True)
class _ReplicaCommand(Command[R]):
    replica: str
    meta: str


@dataclass(frozen=True)
class Status(_ReplicaCommand[StatusResult]):
    command = "status"
    result = StatusResult


@dataclass(frozen=True)
class Receive(_ReplicaCommand[ReceiveResult]):
    """Apply a stream as a new recovery point: `point` is {id, created_at, consistency[, group]}."""

    command = "receive"
    result = ReceiveResult
    point: dict[str, Any]
    retention_hours: float = 0
    input: str | None = None  # read the stream from this file (offline import)
    ready: bool = False  # print READY on stdout once this agent holds the replica (send-to waits for it)


@dataclass(frozen=True)
class Rehash(_ReplicaCommand[RehashResult]):
    command = "rehash"
    result = RehashResult


@dataclass(frozen=True)
class SeedSource(_ReplicaCommand[SeedResult]):
    """Make the replica's disk a source whose base is its newest point (reverse replication)."""

    command = "seed-source"
    result = SeedResult
    state: str  # the source state to write on this host


@dataclass(frozen=True)
class Adopt(_ReplicaCommand[AdoptResult]):
    """Make a source disk, proved unchanged since it shipped generation `gen`, the replica of that point."""

    command = "adopt"
    result = AdoptResult
    state: str  # the disk's source state on this host
    gen: str
    manifest: str  # the digest of the other side's manifest of `gen`
    point: dict[str, Any]  # the recovery point the disk holds


@dataclass(frozen=True)
class Manifest(_ReplicaCommand[ManifestResult]):
    """The replica's manifest on stdout (8-byte length first); resynchronization sends it to the source."""

    command = "manifest"
    result = ManifestResult


@dataclass(frozen=True)
class Rebuild(_ReplicaCommand[RebuildResult]):
    command = "rebuild"
    result = RebuildResult
    seq: int
    dest: str


@dataclass(frozen=True)
class Revert(_ReplicaCommand[RevertResult]):
    command = "revert"
    result = RevertResult
    seq: int


@dataclass(frozen=True)
class Prune(_ReplicaCommand[PruneResult]):
    command = "prune"
    result = PruneResult
    hours: float


@dataclass(frozen=True)
class Drop(_ReplicaCommand[DroppedResult]):
    command = "drop"
    result = DroppedResult


@dataclass(frozen=True)
class Scrub(_ReplicaCommand[ScrubResult]):
    """One slice of a scrub: from block `start` for at most `max_seconds`; answers where to go on."""

    command = "scrub"
    result = ScrubResult
    start: int = 0
    max_seconds: float = 60.0
    rate: float = 0  # bytes/s, 0: unlimited
    points: bool = False  # also verify the undo logs (the recovery points)


@dataclass(frozen=True)
class _SendOptions(Command[R]):
    disk: str
    state: str
    mode: Literal["full", "delta", "base"] = "delta"
    expect_gen: str | None = None
    no_compress: bool = False
    freeze: list[str] = field(default_factory=list)
    thaw: list[str] = field(default_factory=list)
    seq: int = 0
    nbd: dict[str, Any] | None = None  # {socket, export[, bitmap]}: read this point-in-time view over NBD
    offline_format: Literal["raw", "qcow2"] | None = None  # a QEMU VM that is off: read it through qemu-nbd
    keepalive: float | None = None  # seconds of silence before a NOP record (default: dead-link deadline / 3)
    bandwidth: float | None = None  # bytes/s cap on everything this host sends, shared through the bucket
    bandwidth_bucket: str | None = None  # the host's token bucket file
    settle: float = 0  # the disk is still: wait up to this long for its stat to prove it later (engine.send)


@dataclass(frozen=True)
class Send(_SendOptions[SendResult]):
    """Write the stream on stdout (or to `output`, an offline export); mode base reads the replica's
    manifest from stdin first."""

    command = "send"
    result = SendResult
    output: str | None = None


@dataclass(frozen=True)
class SendTo(_SendOptions[SendToResult]):
    """Send, piped into `receive` on another host over this host's own ssh (peer.py)."""

    command = "send-to"
    result = SendToResult
    from_name: str = ""
    to_name: str = ""
    to_address: str = ""
    to_port: int = 22
    to_user: str = ""
    identity_file: str = ""  # on this host
    known_hosts: str = ""  # on this host
    connect_timeout: int = 15
    remote_argv: list[str] = field(default_factory=list)  # the receive command at the other host

    _required: ClassVar[tuple[str, ...]] = ("from_name", "to_name", "to_address", "to_user", "identity_file",
                                            "known_hosts", "remote_argv")

    @classmethod
    def of(cls, send: Send, **peer: Any) -> "SendTo":
        """`send`'s options, sent to the peer `peer` describes."""
        return cls(**{f.name: getattr(send, f.name) for f in dataclasses.fields(_SendOptions)}, **peer)


@dataclass(frozen=True)
class SourceCommit(Command[CommitResult]):
    command = "source-commit"
    result = CommitResult
    state: str
    gen: str


@dataclass(frozen=True)
class SourceDrop(Command[DroppedResult]):
    command = "source-drop"
    result = DroppedResult
    state: str


@dataclass(frozen=True)
class SourceStatus(Command[SourceStatusResult]):
    command = "source-status"
    result = SourceStatusResult
    disk: str
    state: str
    gen: str | None = None  # the generation the replica holds
    scan_limit: int = 1 << 30  # hash disks up to this size to count pending bytes


@dataclass(frozen=True)
class Digest(Command[DigestResult]):
    command = "digest"
    result = DigestResult
    path: str


@dataclass(frozen=True)
class Copy(Command[CopyResult]):
    command = "copy"
    result = CopyResult
    src: str
    dst: str


@dataclass(frozen=True)
class Remove(Command[RemoveResult]):
    command = "remove"
    result = RemoveResult
    paths: list[str] = _rest(1)


@dataclass(frozen=True)
class Exists(Command[ExistsResult]):
    command = "exists"
    result = ExistsResult
    path: str


@dataclass(frozen=True)
class Hook(Command[HookResult]):
    """Run a VM's freeze, thaw or quiesce command (the quiesce step of an app point; a consistency group's hold)."""

    command = "hook"
    result = HookResult
    what: Literal["freeze", "thaw", "quiesce"]
    argv_: list[str] = field(default_factory=list, metadata={"flag": "--argv"})


@dataclass(frozen=True)
class Spawn(Command[SpawnResult]):
    command = "spawn"
    result = SpawnResult
    pidfile: str
    log: str
    argv_: list[str] = _rest(1)


@dataclass(frozen=True)
class Kill(Command[KillResult]):
    command = "kill"
    result = KillResult
    pidfile: str
    grace: float = 10


@dataclass(frozen=True)
class Alive(Command[AliveResult]):
    command = "alive"
    result = AliveResult
    pidfile: str


@dataclass(frozen=True)
class _QemuCommand(Command[R]):
    run: str  # the VM's run directory on this host
    name: str  # vm or test


@dataclass(frozen=True)
class QemuStart(_QemuCommand[QemuStartResult]):
    command = "qemu-start"
    result = QemuStartResult
    spec: dict[str, Any]  # memory_mb, vcpus, kernel, initrd, append, disks, args, track


@dataclass(frozen=True)
class QemuStop(_QemuCommand[QemuStopResult]):
    command = "qemu-stop"
    result = QemuStopResult
    grace: float = 30


@dataclass(frozen=True)
class QemuStatus(_QemuCommand[QemuStatusResult]):
    command = "qemu-status"
    result = QemuStatusResult


@dataclass(frozen=True)
class QemuControl(_QemuCommand[QemuStatusResult]):
    command = "qemu-control"
    result = QemuStatusResult
    action: Literal["pause", "cont"]


@dataclass(frozen=True)
class QemuCapture(_QemuCommand[QemuCaptureResult]):
    command = "qemu-capture"
    result = QemuCaptureResult
    disks: list[dict[str, Any]]  # [{node, format, prev}]
    tag: str


@dataclass(frozen=True)
class QemuRelease(_QemuCommand[QemuReleaseResult]):
    command = "qemu-release"
    result = QemuReleaseResult
    view: dict[str, Any]  # what qemu-capture answered
    failed: bool = False  # the cycle failed: keep the bitmap chain


class LibvirtStartResult(TypedDict):
    started: bool
    status: NotRequired[str]
    bitmaps: NotRequired[dict[str, str]]  # track: disk key -> the dirty bitmap added before the guest ran
    track_error: NotRequired[str]  # track: why no bitmaps were added (the guest runs untracked)


class LibvirtStatusResult(TypedDict):
    running: bool
    status: str  # virsh's words; "absent" when libvirt has no such domain
    active: bool  # a QEMU process exists (running or paused)
    dirty: NotRequired[dict[str, int]]
    error: NotRequired[str]


@dataclass(frozen=True)
class _LibvirtCommand(Command[R]):
    uri: str  # the connection URI at this host ("" for libvirt's default)
    domain: str


@dataclass(frozen=True)
class LibvirtStart(_LibvirtCommand[LibvirtStartResult]):
    command = "libvirt-start"
    result = LibvirtStartResult
    copy_of: str = ""  # a test copy: a transient copy of this domain...
    disks: list[str] = field(default_factory=list)  # ...on these disks...
    network: str = ""  # ...with its NICs on this network
    # Started on its replica: [{path, format, node (key)}], disks that get a dirty bitmap before the guest
    # runs (the domain starts paused), so the first reversed cycle reads only what the guest wrote.
    track: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class LibvirtStop(_LibvirtCommand[QemuStopResult]):
    command = "libvirt-stop"
    result = QemuStopResult
    grace: float = 30


@dataclass(frozen=True)
class LibvirtStatus(_LibvirtCommand[LibvirtStatusResult]):
    command = "libvirt-status"
    result = LibvirtStatusResult


@dataclass(frozen=True)
class LibvirtControl(_LibvirtCommand[LibvirtStatusResult]):
    command = "libvirt-control"
    result = LibvirtStatusResult
    action: Literal["pause", "cont"]


@dataclass(frozen=True)
class LibvirtCapture(_LibvirtCommand[QemuCaptureResult]):
    command = "libvirt-capture"
    result = QemuCaptureResult
    run: str  # where the view's NBD socket and scratch files go
    disks: list[dict[str, Any]]  # [{path, format, prev}]
    tag: str


@dataclass(frozen=True)
class LibvirtRelease(_LibvirtCommand[QemuReleaseResult]):
    command = "libvirt-release"
    result = QemuReleaseResult
    run: str
    view: dict[str, Any]  # what libvirt-capture answered
    failed: bool = False


@dataclass(frozen=True)
class QemuAgent(_QemuCommand[QemuAgentResult]):
    """One command to the VM's guest agent (qga.py), within `timeout` seconds."""

    command = "qemu-agent"
    result = QemuAgentResult
    execute: Literal["guest-ping", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-fsfreeze-status"]
    timeout: float = 10


COMMANDS: dict[str, type[Command[Any]]] = {c.command: c for c in (
    Status, Receive, Rehash, SeedSource, Adopt, Manifest, Rebuild, Revert, Prune, Drop, Scrub, Send, SendTo, SourceCommit,
    SourceDrop, SourceStatus, Digest, Copy, Remove, Exists, Hook, Spawn, Kill, Alive, QemuStart, QemuStop,
    QemuStatus, QemuControl, QemuCapture, QemuRelease, QemuAgent, LibvirtStart, LibvirtStop, LibvirtStatus,
    LibvirtControl, LibvirtCapture, LibvirtRelease)}
REPLICA_COMMANDS = frozenset(n for n, c in COMMANDS.items() if issubclass(c, _ReplicaCommand))


# ---- reading a command -----------------------------------------------------------------------------

_Kind = Literal["flag", "scalar", "json", "rest"]


def _unoptional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


def _fields(cls: type[Command[Any]]) -> list[tuple[dataclasses.Field[Any], _Kind, Any]]:
    """Each field with its kind and its type (Optional removed)."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[dataclasses.Field[Any], _Kind, Any]] = []
    for f in dataclasses.fields(cls):
        tp, _ = _unoptional(hints[f.name])
        kind: _Kind
        if "rest" in f.metadata:
            kind = "rest"
        elif tp is bool:
            kind = "flag"
        elif tp in (str, int, float) or typing.get_origin(tp) is Literal:
            kind = "scalar"
        else:
            kind = "json"
        out.append((f, kind, tp))
    return out


def _flag(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("flag") or "--" + f.name.replace("_", "-"))


def _convert(command: str, flag: str, raw: str, tp: Any) -> Any:
    where = f"{command}: {flag}"
    if typing.get_origin(tp) is Literal:
        if raw not in typing.get_args(tp):
            raise ProtocolError(f"{where} is {raw!r}, not one of {', '.join(typing.get_args(tp))}", flag)
        return raw
    if tp is int or tp is float:
        try:
            return tp(raw)
        except ValueError:
            raise ProtocolError(f"{where} is {raw!r}, not {'an integer' if tp is int else 'a number'}", flag) from None
    if tp is str:
        return raw
    try:
        v = json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"{where} is not JSON ({exc}): {raw[:80]!r}", flag) from None
    want = typing.get_origin(tp) or tp
    if want in (list, dict) and not isinstance(v, want):
        raise ProtocolError(f"{where} must be a JSON {'list' if want is list else 'object'}, got {type(v).__name__}",
                            flag)
    return v


def parse_command(argv: Sequence[str]) -> Command[Any]:
    """The Command an agent argv names; a ProtocolError naming the command and option otherwise."""
    if not argv:
        raise ProtocolError(f"no command given (known: {', '.join(sorted(COMMANDS))})", "command")
    name, toks = argv[0], list(argv[1:])
    cls = COMMANDS.get(name)
    if cls is None:
        raise ProtocolError(f"unknown command {name!r} (known: {', '.join(sorted(COMMANDS))})", "command")
    specs = _fields(cls)
    by_flag = {_flag(f): (f, kind, tp) for f, kind, tp in specs if kind != "rest"}
    rest = next((f for f, kind, _ in specs if kind == "rest"), None)
    values: dict[str, Any] = {}
    i = 0
    while i < len(toks):
        tok = toks[i]
        if tok == "--" or not tok.startswith("--"):
            if rest is None:
                raise ProtocolError(f"{name}: unexpected argument {tok!r}", tok)
            values[rest.name] = toks[i + 1:] if tok == "--" else toks[i:]
            break
        flag, eq, inline = tok.partition("=")
        if flag not in by_flag:
            raise ProtocolError(f"{name}: unknown option {flag} (options: {', '.join(by_flag)})", flag)
        f, kind, tp = by_flag[flag]
        if kind == "flag":
            if eq:
                raise ProtocolError(f"{name}: {flag} is a flag and takes no value", flag)
            values[f.name] = True
        else:
            if not eq:
                i += 1
                if i >= len(toks):
                    raise ProtocolError(f"{name}: {flag} needs a value", flag)
                inline = toks[i]
            values[f.name] = _convert(name, flag, inline, tp)
        i += 1
    required = getattr(cls, "_required", ())
    for f, how, _ in specs:
        flag = _flag(f) if how != "rest" else f.name
        missing = f.name not in values and (
            (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING) or f.name in required)
        if missing or (how == "rest" and len(values.get(f.name, ())) < f.metadata["rest"]):
            raise ProtocolError(f"{name}: {flag} is missing", flag)
    return cls(**values)


# ---- reading an answer -----------------------------------------------------------------------------


def _matches(v: Any, tp: Any) -> bool:
    """A shallow check of one answer field against its declared type (containers by kind only)."""
    tp, optional = _unoptional(tp)
    if v is None:
        return optional or tp is Any
    if tp is Any or isinstance(tp, TypeVar):
        return True
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    origin = typing.get_origin(tp) or tp
    if typing.is_typeddict(origin):
        return isinstance(v, dict)
    if origin in (list, dict, str, bool):
        return isinstance(v, origin)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_matches(v, a) for a in typing.get_args(tp))
    return True


def check_answer(shape: Any, answer: Any, where: str) -> Any:
    """`answer` if it has every required field of the TypedDict `shape` with the right kind of value
    (nested TypedDicts too); a ProtocolError naming the first wrong field otherwise."""
    if not isinstance(answer, dict):
        raise ProtocolError(f"{where}: the answer is {type(answer).__name__}, not a JSON object", "answer")
    hints = typing.get_type_hints(shape)
    for key, tp in hints.items():
        if key not in answer:
            if key in shape.__required_keys__:
                raise ProtocolError(f"{where}: the answer has no {key!r}", key)
            continue
        if not _matches(answer[key], tp):
            raise ProtocolError(f"{where}: the answer's {key!r} is {answer[key]!r}, not {_name(tp)}", key)
        inner, _ = _unoptional(tp)
        if typing.is_typeddict(inner) and answer[key] is not None:
            check_answer(inner, answer[key], f"{where}: {key}")
        elif typing.get_origin(inner) is list and typing.get_args(inner) and typing.is_typeddict(typing.get_args(inner)[0]):
            for n, item in enumerate(answer[key]):
                check_answer(typing.get_args(inner)[0], item, f"{where}: {key}[{n}]")
    return answer


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def parse_result(cmd: Command[R], answer: Any) -> R:
    """The answer to `cmd`, checked against its declared shape."""
    checked: R = check_answer(cmd.result, answer, cmd.command)
    return checked


def parse_failure(answer: Any) -> Failure | None:
    """The Failure an answer carries, if it is one."""
    if isinstance(answer, dict) and "error" in answer:
        path = answer.get("path")
        return Failure(error=str(answer["error"]), message=str(answer.get("message", "")),
                       path=path if isinstance(path, str) else None)
    return None


def failure(code: str, message: str, path: str | None = None) -> Failure:
    return Failure(error=code, message=message, path=path)


def last_json(text: bytes | str, prefixes: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The last line of `text` that is a JSON object (after any of `prefixes`, such as "R ")."""
    s = text.decode(errors="replace") if isinstance(text, bytes) else text
    for line in reversed(s.strip().splitlines()):
        for p in prefixes:
            if line.startswith(p):
                line = line[len(p):]
                break
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict):
            return d
    return None


def progress_line(done: int, total: int) -> str:
    return f"{PROGRESS} {done} {total}\n"


def parse_progress(line: bytes) -> tuple[int, int] | None:
    """(done, total) of a `P done total` line, None for any other line."""
    parts = line.split()
    if len(parts) == 3 and parts[0] == PROGRESS.encode() and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1]), int(parts[2])
    return None

