"""The `hyperv` fabric driver: Hyper-V Replica driven by PowerShell scripts over SSH.

Each operation reads the VM's state with one script, decides in Python whether anything is left to do
(idempotence), and sends one more script with the cmdlet lines that are. Scripts follow the grammar in
docs/HYPERV.md (fixed prologue, one pipeline per line, every value a ps_quote literal) and answer one
JSON object; PowerShell errors become siterecovery.errors exceptions carrying the FullyQualifiedErrorId.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from .. import ssh
from ..errors import (
    CommandTimedOut,
    ConfigurationError,
    ConnectionFailed,
    ExecutionError,
    FabricError,
    HostKeyError,
    InvalidStateError,
    NotFoundError,
    SiteRecoveryError,
)
from ..model import Host, ReplicationPolicy
from ..model.common import Frozen
from ..render import ps_quote
from . import FabricContext
from .base import (
    LATEST,
    Consistency,
    Health,
    OpResult,
    Placement,
    PointChoice,
    Progress,
    RecoveryPoint,
    ReplicationHealth,
    ReplicationMode,
    ReplicationState,
    Side,
    result,
    utcnow,
)

S = ReplicationState

# ---- the script grammar ---------------------------------------------------------------------------
# The prologue is fixed text (no interpolated value, no function: the simulator runs every line of the
# body with PowerShell's own semantics, so nothing here can agree with it by construction). Warnings are
# silenced and the console writes UTF-8, so stdout carries only our markers and JSON, names intact.
PROLOGUE = """$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$WarningPreference = 'SilentlyContinue'
[Console]::OutputEncoding = [System.Text.Encoding]::UTF8
try {
"""
EPILOGUE = """} catch {
  [ordered]@{ ok = $false; id = [string]$_.FullyQualifiedErrorId; category = [string]$_.CategoryInfo.Category
    message = [string]$_.Exception.Message } | ConvertTo-Json -Compress
  exit 1
}
"""
EMIT = "ConvertTo-Json -Depth 4 -Compress"
# The command line is short and the same for every script: Windows' OpenSSH runs it through its default
# shell (cmd.exe, 8,191 characters at most, or PowerShell). The script goes on stdin as one ASCII line
# that decodes the UTF-8 script from base64, so neither the console's input code page nor a shell's
# quoting ever sees a script character.
COMMAND = "powershell.exe -NoProfile -NonInteractive -Command -"
BOOTSTRAP = ("$s = [System.Text.Encoding]::UTF8.GetString([System.Convert]::FromBase64String('{}')); "
             "Invoke-Expression $s\n\n")

# What the state read selects: documented properties only (shared/reference/hyperv-replica.md, seed 003).
REPL_PROPS = ("VMName", "ReplicationState", "ReplicationHealth", "ReplicationMode", "ReplicationRelationshipType",
              "PrimaryServerName", "ReplicaServerName", "ReplicaServerPort", "AuthenticationType",
              "ReplicationFrequencySec", "RecoveryHistory", "VSSSnapshotFrequencyHour", "CompressionEnabled",
              "LastReplicationTime")
MEASURE_PROPS = ("ReplicationRelationshipType", "PendingReplicationSize", "SuccessfulReplicationCount",
                 "MissedReplicationCount", "ReplicationErrors", "ReplicationHealthDetails",
                 "LastTestFailoverInitiatedTime", "LastVSSSnapshotTime")
FAILOVER_PROPS = ("VMNetworkAdapterName", "IPv4Address", "IPv4SubnetMask", "IPv4DefaultGateway",
                  "IPv4PreferredDNSServer", "IPv4AlternateDNSServer")
SERVER_PROPS = ("RepEnabled", "AllowedAuthenticationType", "KerbAuthPort", "CertAuthPort", "CertificateThumbprint",
                "AllowAnyServer", "DefaultStorageLocation")
FIREWALL_RULES = {"Kerberos": "Hyper-V Replica HTTP Listener (TCP-In)",
                  "Certificate": "Hyper-V Replica HTTPS Listener (TCP-In)"}


def server_lines() -> list[str]:
    return [*select("Get-VMReplicationServer", SERVER_PROPS, "server"),
            *select("Get-VMReplicationAuthorizationEntry", ("AllowedPrimaryServer", "ReplicaStorageLocation",
                                                           "TrustGroup"), "entries"),
            *select(f"Get-NetFirewallRule -DisplayName {', '.join(ps_quote(r) for r in FIREWALL_RULES.values())}",
                    ("DisplayName", "Enabled"), "firewall")]


def select(source: str, props: Iterable[str], section: str) -> list[str]:
    """A marker line, then `source | Select-Object props | ConvertTo-Json`: one JSON line, or none when
    the source yields nothing (ConvertTo-Json writes nothing for no input)."""
    return [ps_quote("#" + section), f"{source} | Select-Object {', '.join(props)} | {EMIT}"]


def state_lines(var: str, name: str, vms: str = "Get-VM") -> list[str]:
    """Everything the driver reads about one VM; `$var` holds it (resolved by `find`)."""
    v = "$" + Var(var).name
    return [*select(v, ("Name", "Id", "State"), "vm"),
            *select(f"Get-VMReplication -VM {v} -ErrorAction SilentlyContinue", REPL_PROPS, "repl"),
            *select(f"Measure-VMReplication -VM {v} -ErrorAction SilentlyContinue", MEASURE_PROPS, "measure"),
            *select(f"Get-VMSnapshot -VM {v}", ("Id", "Name", "SnapshotType", "CreationTime"), "points"),
            *select(f"Get-VMNetworkAdapter -VM {v}", ("Name", "SwitchName", "TestReplicaSwitchName"), "nics"),
            *select(f"Get-VMNetworkAdapterFailoverConfiguration -VM {v}", FAILOVER_PROPS, "failover"),
            # A test failover's VM is "<name> - Test" (seed 003, the Start-VMFailover reference).
            *select(f"{vms} | Where-Object Name -ceq {ps_quote(test_vm_name(name))}", ("Name", "State"), "test"),
            ps_quote("#end")]


# Per-operation deadlines (seconds) for the cmdlets that legitimately take minutes; each runs as a job.
DEADLINES = {"stop": 900.0, "prepare": 1800.0, "export": 6 * 3600.0, "import": 6 * 3600.0}


def test_vm_name(vm: str) -> str:
    return f"{vm} - Test"


def run_as_job(line: str, var: str, deadline: float) -> list[str]:
    """A long cmdlet (`... -AsJob`) waited for at most `deadline` seconds: a failed job re-throws its
    error; one still running after the deadline throws OperationTimeout (it keeps running on the host)."""
    j = "$" + Var(var).name
    return [f"{j} = {line} -AsJob", f"$null = Wait-Job -Job {j} -Timeout {int(deadline)}", f"Receive-Job -Job {j}",
            f"if ({j}.State -ne 'Completed') {{ throw 'OperationTimeout' }}"]


_IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_CMDLET = re.compile(r"^[A-Z][A-Za-z]*-[A-Z][A-Za-z0-9]*$")


@dataclass(frozen=True)
class Var:
    """A reference to a script variable ($vm, $nic, $snap): the only unquoted value a line may hold."""

    name: str

    def __post_init__(self) -> None:
        if not _IDENT.match(self.name):
            raise ValueError(f"bad variable name {self.name!r}")


class _Switch:
    def __repr__(self) -> str:
        return "SWITCH"


SWITCH: Any = _Switch()  # `-Prepare`: a switch parameter, present
NO_CONFIRM: Any = object()  # `-Confirm:$false`


def _value(v: object) -> str:
    if isinstance(v, list | tuple):
        if not v:
            raise ValueError("an empty list has no PowerShell literal here")
        return ", ".join(_value(x) for x in v)
    if isinstance(v, Var):
        return "$" + v.name
    if isinstance(v, bool):
        return "$true" if v else "$false"
    if isinstance(v, int):
        return str(v)
    # Everything else, numbers in strings included, is a single-quoted literal: PowerShell converts
    # it to the parameter's type, and nothing in it is ever parsed as code.
    return ps_quote(v)


def cmd(name: str, *positional: object, **params: object) -> str:
    """One cmdlet call: `Name [positional values] [-Param value | -Switch | -Confirm:$false]`."""
    if not _CMDLET.match(name):
        raise ValueError(f"bad cmdlet name {name!r}")
    parts = [name, *(_value(p) for p in positional)]
    for key, v in params.items():
        if not _IDENT.match(key):
            raise ValueError(f"bad parameter name {key!r}")
        if v is None:
            continue
        if v is SWITCH:
            parts.append(f"-{key}")
        elif v is NO_CONFIRM:
            parts.append(f"-{key}:$false")
        else:
            parts.append(f"-{key} {_value(v)}")
    return " ".join(parts)


def find(var: str, name: str, source: str = "Get-VM", prop: str = "Name") -> list[str]:
    """Resolve exactly one object by exact, case-sensitive name: never a wildcard (-VMName takes them).
    `@(pipeline)` counts what the pipeline wrote: 0 when nothing matched (`@($null)` would count 1)."""
    v = Var(var)
    op = "-ceq" if prop == "Name" else "-eq"
    return [f"${v.name} = @({source} | Where-Object {prop} {op} {ps_quote(name)})",
            f"if (${v.name}.Count -eq 0) {{ throw 'ObjectNotFound' }}",
            f"if (${v.name}.Count -gt 1) {{ throw 'AmbiguousName' }}"]


def script(lines: Iterable[str]) -> str:
    body = list(lines)
    for line in body:
        # A line may hold a newline only inside a quoted literal (a hostile VM name); the grammar's
        # statement separator is a newline outside literals, which the simulator checks.
        if not line or line != line.strip(" "):
            raise ValueError(f"malformed script line {line!r}")
    return PROLOGUE + "".join(f"  {line}\n" for line in body) + EPILOGUE


def stdin_payload(text: str) -> bytes:
    """What goes to powershell.exe's stdin: one ASCII line carrying the UTF-8 script in base64."""
    return BOOTSTRAP.format(base64.b64encode(text.encode("utf-8")).decode("ascii")).encode("ascii")


# ---- parsing the answers --------------------------------------------------------------------------
_STATE_NAMES = [s.value for s in S]
_HEALTH_NAMES = ["NotApplicable", "Normal", "Warning", "Critical"]
_MODE_NAMES = ["None", "Primary", "Replica", "TestReplica", "ExtendedReplica"]
_REL_NAMES = ["Simple", "Extended"]
_AUTH_NAMES = {1: "Kerberos", 2: "Certificate", 3: "CertificateAndKerberos"}
_SNAP_NAMES = {0: "Standard", 1: "Recovery", 2: "Planned", 5: "Missing", 6: "Replica", 7: "AppConsistentReplica",
               8: "SyncedReplica"}
# Microsoft.HyperV.PowerShell.VMState, every documented value; a *Critical state is its base state with
# the VM's storage in trouble, and the driver treats it as the base state for power decisions.
_VMSTATE_NAMES = {1: "Other", 2: "Running", 3: "Off", 4: "Stopping", 6: "Saved", 9: "Paused", 10: "Starting",
                  11: "Reset", 32773: "Saving", 32776: "Pausing", 32777: "Resuming", 32779: "FastSaved",
                  32780: "FastSaving", 32781: "ForceShutdown", 32782: "ForceReboot", 32783: "Hibernated",
                  32784: "ComponentServicing", 32785: "RunningCritical", 32786: "OffCritical",
                  32787: "StoppingCritical", 32788: "SavedCritical", 32789: "PausedCritical",
                  32790: "StartingCritical", 32791: "ResetCritical", 32792: "SavingCritical",
                  32793: "PausingCritical", 32794: "ResumingCritical", 32795: "FastSavedCritical",
                  32796: "FastSavingCritical"}


def base_power(state: str) -> str:
    """RunningCritical -> Running: what the VM is doing, whatever its storage's health."""
    return state.removesuffix("Critical")
_MSDATE = re.compile(r"^\\?/Date\((-?\d{1,15})([+-]\d{4})?\)\\?/$")


def _hyperv_latest(point: PointChoice) -> bool:
    """Hyper-V's own "latest" (Start-VMFailover without a snapshot: everything received, pending logs
    applied first); a choice naming an exact point never is, whatever its kind."""
    return point.kind == "latest" and point.id is None


class OutputError(FabricError):
    """The host answered something that is not the JSON object the script promises."""


def _table(names: list[str] | dict[int, str]) -> dict[int, str]:
    return dict(enumerate(names)) if isinstance(names, list) else names


def enum_name(value: Any, names: list[str] | dict[int, str], what: str) -> str:
    """An enum value that may arrive as a number, a numeric string or a name (any case)."""
    table = _table(names)
    if isinstance(value, bool):
        raise ValueError(f"{what}: unexpected boolean")
    if isinstance(value, int):
        if value in table:
            return table[value]
        raise ValueError(f"{what}: unknown value {value}")
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return enum_name(int(text), names, what)
        for name in table.values():
            if name.lower() == text.lower():
                return name
    raise ValueError(f"{what}: unknown value {value!r}")


def parse_date(value: Any) -> datetime | None:
    """`/Date(ms)/` (Windows PowerShell 5.1), ISO 8601 (our projection) or null; always aware UTC."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"date: unexpected {type(value).__name__}")
    m = _MSDATE.match(value.strip())
    if m:
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=int(m.group(1)))
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    # .NET's 'o' format has seven fractional digits; Python takes at most six.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    d = datetime.fromisoformat(text)
    return d.replace(tzinfo=UTC) if d.tzinfo is None else d.astimezone(UTC)


def _list(value: Any) -> list[Any]:
    # ConvertTo-Json unrolls one-element arrays into the bare object and writes empty ones as null.
    if value is None:
        return []
    if isinstance(value, list):
        return value
    return [value]


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what}: expected an object, got {type(value).__name__}")
    return value


def _int(value: Any, default: int = 0) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str):
        return int(float(value))
    raise ValueError(f"number: unexpected {type(value).__name__}")


def _str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str | int | float | bool):
        return str(value)
    raise ValueError(f"text: unexpected {type(value).__name__}")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return False


@dataclass(frozen=True)
class Relationship:
    state: str
    health: str
    mode: str
    relationship: str
    primary: str
    replica: str
    port: int
    frequency: int
    history: int
    last_replication: datetime | None


@dataclass(frozen=True)
class Measure:
    relationship: str
    pending_bytes: int
    successful: int
    missed: int
    errors: int
    details: tuple[str, ...]


@dataclass(frozen=True)
class NicState:
    name: str
    switch: str
    test_switch: str
    ip: str
    mask: str
    gateway: str
    dns: tuple[str, ...]


@dataclass(frozen=True)
class VMState:
    """What Out-SrState answers about one VM on one host, parsed and checked."""

    name: str
    power: str
    relationships: tuple[Relationship, ...]
    measures: tuple[Measure, ...]
    points: tuple[RecoveryPoint, ...]
    nics: tuple[NicState, ...]
    test_vm: str = ""  # "<name> - Test" when a test failover's VM exists on this host
    test_power: str = ""
    power_state: str = ""  # as reported, *Critical included

    @property
    def simple(self) -> Relationship | None:
        return next((r for r in self.relationships if r.relationship == "Simple"), None)

    @property
    def extended(self) -> Relationship | None:
        return next((r for r in self.relationships if r.relationship == "Extended"), None)

    @property
    def state(self) -> str:
        return self.simple.state if self.simple else S.Disabled.value

    @property
    def mode(self) -> str:
        return self.simple.mode if self.simple else "None"


@dataclass(frozen=True)
class ServerState:
    enabled: bool
    auth: str
    kerberos_port: int
    certificate_port: int
    thumbprint: str
    any_server: bool
    storage: str
    entries: tuple[tuple[str, str, str], ...] = field(default=())
    firewall: tuple[str, ...] = ()  # enabled Hyper-V Replica listener rules


def decode_answer(stdout: str, status: int) -> dict[str, Any]:
    """The sections a script wrote (`#name` marker lines, each followed by at most one JSON line), up to
    its `#end`; raises FabricError for an error answer or anything else."""
    sections: dict[str, Any] = {}
    current: str | None = None
    ended = False
    error: dict[str, Any] | None = None
    for raw in stdout.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            current, ended = line[1:], line == "#end"
            sections.setdefault(current, None)
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            current = None  # noise (a stray line from a profile or a module): never part of an answer
            continue
        if isinstance(obj, dict) and obj.get("ok") is False:
            error = obj
        elif current is not None and sections.get(current) is None:
            sections[current] = obj
    if error is not None:
        raise _error_from_answer(error)
    if not ended:
        raise OutputError(f"the host answered no complete result (exit status {status}): {stdout.strip()[:200]!r}",
                          error_id="UnexpectedOutput",
                          hint="check that the host's SSH shell starts powershell.exe and the Hyper-V module loads")
    if status != 0:
        raise OutputError(f"the script finished with exit status {status}", error_id="UnexpectedOutput",
                          hint="check the script's output on the host by hand")
    return sections


def _error_from_answer(obj: dict[str, Any]) -> FabricError:
    try:
        fqid = _str(obj.get("id")) or "Unknown"
        message = _str(obj.get("message")) or fqid
        category = _str(obj.get("category"))
    except ValueError:
        fqid, message, category = "Unknown", repr(obj)[:300], ""
    return make_error(fqid, message, category)


# ErrorId (the part of the FullyQualifiedErrorId before the comma) -> what to do next.
_HINTS: dict[str, str] = {
    "InvalidState": "read the VM's replication state (siterecovery status) and bring it to a state that allows "
                    "this operation, or re-run the step that should have come before",
    "OperationFailed": "this side of the relationship cannot do that: run the operation on the other host",
    "ObjectNotFound": "check the VM's name (exact, case-sensitive) and the host it should be on",
    "AmbiguousName": "several VMs share this name on the host: rename one so the name is unique",
    "InvalidParameter": "check the VM's name and the value given; the host refused it",
    "VMReplication_AlreadyEnabled": "replication is already configured: remove it or use the existing one",
    "VMReplication_AuthorizationEntryNotFound": "add the primary to the replica server's authorization entries "
                                                "(configure_replica_server)",
    "VMReplication_ReplicaServerNotEnabled": "configure the target host as a replica server first "
                                             "(configure_replica_server)",
    "InvalidArgument_ReplicationFrequencyNotValid": "use a copy frequency of 30, 300 or 900 s "
                                                    "(extended replication: 300 or 900, not below the primary's)",
    "VMReplication_InvalidExtendedReplicationFrequency": "use 300 or 900 s, not below the primary relationship's",
    "VMReplication_AppConsistentWithoutRecoveryHistory": "set recovery_history_hours above 0 to keep "
                                                         "app-consistent points",
    "InvalidParameter_InvalidUri": "name the replica server by its DNS name, not an IP address",
    "StartTimeOccursInPast": "schedule the start in the future (at most 7 days ahead)",
    "StartTimeOccursTooMuchInFuture": "schedule the start at most 7 days ahead",
    "VMFailover_InvalidSnapshot": "pick a recovery point of this VM (siterecovery points)",
    "ParameterNotProvided": "the cmdlet needs a parameter this call did not give; report it as a driver bug",
    "CommandNotFoundException": "the Hyper-V PowerShell module is missing on the host: install it",
    "NamedParameterNotFound": "the host's Hyper-V module does not know this parameter (older Windows?)",
}
_DEFAULT_HINT = "read the message, fix the cause on the host, then re-run the step (it is idempotent)"


def make_error(fqid: str, message: str, category: str = "", **ctx: Any) -> FabricError:
    """The project exception for a PowerShell error answer."""
    error_id = fqid.split(",", 1)[0]
    hint = _HINTS.get(error_id, _DEFAULT_HINT)
    cls: type[FabricError] = FabricError
    if error_id == "InvalidState" or category == "InvalidOperation" and "state" in message.lower():
        cls = InvalidStateError
    elif error_id == "ObjectNotFound" or (error_id == "InvalidParameter" and "unable to find" in message):
        cls = NotFoundError
    return cls(message, error_id=fqid, hint=hint, **ctx)


def _id(value: Any) -> str:
    # Windows PowerShell 5.1 writes a Guid as {"Guid": "..."}; PowerShell 7 as the bare string.
    if isinstance(value, dict):
        return _str(value.get("Guid"))
    return _str(value)


def parse_vm_state(answer: dict[str, Any]) -> VMState:
    """Parse the state sections; any odd shape becomes an OutputError, never a Python exception."""
    try:
        vm = _obj(answer.get("vm"), "vm")
        name = _str(vm.get("Name"))
        power_state = enum_name(vm.get("State"), _VMSTATE_NAMES, "VM state") if vm.get("State") is not None else "Off"
        rels = []
        for r in _list(answer.get("repl")):
            r = _obj(r, "replication")
            rels.append(Relationship(
                state=enum_name(r.get("ReplicationState"), _STATE_NAMES, "ReplicationState"),
                health=enum_name(r.get("ReplicationHealth", 0), _HEALTH_NAMES, "ReplicationHealth"),
                mode=enum_name(r.get("ReplicationMode", 0), _MODE_NAMES, "ReplicationMode"),
                relationship=enum_name(r.get("ReplicationRelationshipType", 0), _REL_NAMES, "RelationshipType"),
                primary=_str(r.get("PrimaryServerName")), replica=_str(r.get("ReplicaServerName")),
                port=_int(r.get("ReplicaServerPort")), frequency=_int(r.get("ReplicationFrequencySec")),
                history=_int(r.get("RecoveryHistory")), last_replication=parse_date(r.get("LastReplicationTime"))))
        measures = []
        for m in _list(answer.get("measure")):
            m = _obj(m, "measure")
            details = tuple(_str(d.get("Message")) if isinstance(d, dict) else _str(d)
                            for d in _list(m.get("ReplicationHealthDetails")))
            measures.append(Measure(
                relationship=enum_name(m.get("ReplicationRelationshipType", 0), _REL_NAMES, "RelationshipType"),
                pending_bytes=_int(m.get("PendingReplicationSize")),
                successful=_int(m.get("SuccessfulReplicationCount")),
                missed=_int(m.get("MissedReplicationCount")), errors=_int(m.get("ReplicationErrors")),
                details=details))
        points = []
        for p in _list(answer.get("points")):
            p = _obj(p, "recovery point")
            kind = enum_name(p.get("SnapshotType"), _SNAP_NAMES, "SnapshotType")
            created = parse_date(p.get("CreationTime"))
            if created is None or kind not in ("Replica", "AppConsistentReplica"):
                continue
            points.append(RecoveryPoint(id=_id(p.get("Id")) or _str(p.get("Name")), vm=name, created_at=created,
                                        consistency="app" if kind == "AppConsistentReplica" else "crash"))
        failover = {}
        for f in _list(answer.get("failover")):
            f = _obj(f, "failover configuration")
            failover[_str(f.get("VMNetworkAdapterName"))] = f
        nics = []
        for n in _list(answer.get("nics")):
            n = _obj(n, "network adapter")
            f = failover.get(_str(n.get("Name")), {})
            dns = tuple(x for x in (_str(f.get("IPv4PreferredDNSServer")), _str(f.get("IPv4AlternateDNSServer"))) if x)
            nics.append(NicState(name=_str(n.get("Name")), switch=_str(n.get("SwitchName")),
                                 test_switch=_str(n.get("TestReplicaSwitchName")),
                                 ip=_str(f.get("IPv4Address")), mask=_str(f.get("IPv4SubnetMask")),
                                 gateway=_str(f.get("IPv4DefaultGateway")), dns=dns))
        tests = _list(answer.get("test"))
        test = _obj(tests[0], "test VM") if len(tests) == 1 else None
        test_power = enum_name(test.get("State"), _VMSTATE_NAMES, "VM state") if test and test.get("State") else ""
        return VMState(name=name, power=base_power(power_state), relationships=tuple(rels), measures=tuple(measures),
                       points=tuple(sorted(points, key=lambda x: x.created_at)), nics=tuple(nics),
                       test_vm=_str(test.get("Name")) if test else "", test_power=base_power(test_power),
                       power_state=power_state)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        raise OutputError(f"cannot read the host's answer: {exc}", error_id="UnexpectedOutput",
                          hint="check the Hyper-V module version on the host; report it with the answer") from None


def parse_server_state(answer: dict[str, Any]) -> ServerState:
    """Get-VMReplicationServer's documented properties (seed 003 lists them), the authorization entries and
    the state of the two Hyper-V Replica listener firewall rules."""
    try:
        s = _obj(answer.get("server"), "server")
        entries = []
        for e in _list(answer.get("entries")):
            e = _obj(e, "authorization entry")
            entries.append((_str(e.get("AllowedPrimaryServer")), _str(e.get("ReplicaStorageLocation")),
                            _str(e.get("TrustGroup"))))
        rules = []
        for r in _list(answer.get("firewall")):
            r = _obj(r, "firewall rule")
            if enum_name(r.get("Enabled"), {1: "True", 2: "False"}, "Enabled") == "True":
                rules.append(_str(r.get("DisplayName")))
        return ServerState(enabled=_bool(s.get("RepEnabled")),
                           auth=enum_name(s.get("AllowedAuthenticationType"), _AUTH_NAMES, "auth"),
                           kerberos_port=_int(s.get("KerbAuthPort")),
                           certificate_port=_int(s.get("CertAuthPort")),
                           thumbprint=_str(s.get("CertificateThumbprint")),
                           any_server=_bool(s.get("AllowAnyServer")),
                           storage=_str(s.get("DefaultStorageLocation")), entries=tuple(entries),
                           firewall=tuple(rules))
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        raise OutputError(f"cannot read the host's answer: {exc}", error_id="UnexpectedOutput",
                          hint="check the Hyper-V module version on the host") from None


# ---- the driver -----------------------------------------------------------------------------------
class ReplicaServerResult(Frozen):
    host: str
    changed: bool
    message: str = ""
    commands: tuple[str, ...] = ()


def _server_name(host: Host) -> str:
    """The name Hyper-V knows a replica server by: a DNS name (an IP address is refused)."""
    try:
        ipaddress.ip_address(host.address)
    except ValueError:
        return host.address
    return host.name


def export_folder(path: str | None, vm: str) -> str:
    """Where Start-VMInitialReplication -DestinationPath puts one VM's initial copy: a folder named after
    the VM under the path."""
    base = (path or "").rstrip("\\/")
    return f"{base}\\{vm}"


def _thumbprint(host: Host, policy: ReplicationPolicy) -> str | None:
    """The certificate a host presents (seed 003: each host its own, CN/SAN naming that host or its
    broker); the policy's thumbprint only when the host names none."""
    rs = host.replica_server
    return (rs.certificate_thumbprint if rs is not None and rs.certificate_thumbprint else None) \
        or policy.certificate_thumbprint


def _mask(prefix: int) -> str:
    return str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)


class HyperVFabric:
    """Hyper-V Replica over SSH. Standalone hosts and Replica Broker client access points alike:
    a broker is addressed by its client access point name, which is what primaries replicate to."""

    kind = "hyperv"

    def __init__(self, context: FabricContext | None = None) -> None:
        self.context = context or FabricContext()
        self.timeout = float(self.context.options.get("timeout", 120.0))
        # One connection per host identity (ssh.identity); brokers accept each node's pinned key.
        self.pool = ssh.Pool(self.context.secrets)

    # ---- transport ---------------------------------------------------------------------------
    def run(self, host: Host, lines: list[str], operation: str, vm: str | None = None,
            timeout: float | None = None) -> dict[str, Any]:
        """Run one script on `host` and return its answer's sections; errors carry vm, host and operation.

        `timeout` bounds the whole script (default: the driver's timeout). Once the script was sent, a
        timeout is never a transient connection error: the host may still be running it, so the step
        fails as OperationTimeout and the next run reads the VM's state before doing anything."""
        payload = stdin_payload(script([*lines, ps_quote("#end")]))
        ctx = {"vm": vm, "host": host.name, "operation": operation}
        limit = timeout or self.timeout
        try:
            # The command line is short and fixed; the script goes on stdin (cmd.exe, Windows' default
            # SSH shell, cuts command lines at 8191 characters).
            result = self.pool.run(host, COMMAND.split(), stdin=payload, deadline=limit)
        except CommandTimedOut as exc:
            if exc.sent:
                raise FabricError(f"no answer within {limit:.0f} s; the script may still be running on the host",
                                  error_id="OperationTimeout", hint="read the VM's state (siterecovery status) "
                                  "before re-running the step; raise the operation's timeout if it is legitimately "
                                  "slow", **ctx) from None
            raise ConnectionFailed(f"SSH session to {host.name} timed out before the script was sent",
                                   hint="check the host and the network, then re-run (transient)", **ctx) from None
        except SiteRecoveryError as exc:
            if isinstance(exc, ExecutionError) and exc.error_id == "ConnectionLost":
                raise ConnectionFailed("the connection closed before the script finished", error_id="ConnectionLost",
                                       hint="check the host; re-run the step (it is idempotent)", **ctx) from None
            if isinstance(exc, FabricError | HostKeyError) and exc.operation is None:
                raise exc.with_context(vm=vm, host=host.name, operation=operation) from None
            raise
        status = result.rc
        if status == -1:  # killed by a signal: no answer
            raise ConnectionFailed("the connection closed before the script finished", error_id="ConnectionLost",
                                   hint="check the host; re-run the step (it is idempotent)", **ctx)
        try:
            return decode_answer(result.stdout.decode("utf-8", "replace"), status)
        except FabricError as exc:
            message = exc.message
            if exc.error_id in ("ObjectNotFound", "AmbiguousName") and vm is not None:
                message = (f"no VM named {vm!r} on {host.name}" if exc.error_id == "ObjectNotFound" else
                           f"several VMs named {vm!r} on {host.name}, expected exactly one")
            if exc.error_id == "OperationTimeout":
                message = "the cmdlet did not finish within its deadline; it may still be running on the host"
            raise type(exc)(message, hint=exc.hint, error_id=exc.error_id, **ctx) from None

    def close(self) -> None:
        self.pool.close()

    # ---- reading state -----------------------------------------------------------------------
    def vm_state(self, host: Host, vm: str, operation: str = "read_state") -> VMState:
        answer = self.run(host, [*self._find(host, "vm", vm), *state_lines("vm", vm, self._vms(host))], operation, vm)
        return self._parsed(parse_vm_state, answer, host, vm, operation)

    def _act(self, host: Host, vm: str, operation: str, lines: list[str], var: str = "vm",
             timeout: float | None = None) -> VMState:
        """Resolve the VM, run `lines`, and answer the VM's state afterwards."""
        answer = self.run(host, [*self._find(host, var, vm), *lines, *state_lines(var, vm, self._vms(host))],
                          operation, vm, timeout)
        return self._parsed(parse_vm_state, answer, host, vm, operation)

    @staticmethod
    def _vms(host: Host) -> str:
        """Where a VM is looked up. On a Replica Broker's client access point the session runs on one node
        and Get-VM lists that node's VMs only: ask every cluster node (the VM object then carries its
        node, and the cmdlets given -VM act there)."""
        return "Get-VM -ComputerName $nodes.Name" if host.broker else "Get-VM"

    def _find(self, host: Host, var: str, vm: str) -> list[str]:
        return (["$nodes = @(Get-ClusterNode)"] if host.broker else []) + find(var, vm, self._vms(host))

    def deadline(self, kind: str) -> float:
        """Seconds a long cmdlet (stop, export, import, prepare) may run: context option `deadlines`."""
        return float(self.context.options.get("deadlines", {}).get(kind, DEADLINES[kind]))

    def _job(self, host: Host, vm: str, operation: str, lines: list[str], job_line: str, kind: str) -> VMState:
        """`lines`, then `job_line` as a job waited for up to its deadline, then the state."""
        limit = self.deadline(kind)
        return self._act(host, vm, operation, [*lines, *run_as_job(job_line, "job", limit)],
                         timeout=limit + self.timeout)

    @staticmethod
    def _parsed(fn: Callable[[dict[str, Any]], Any], answer: dict[str, Any], host: Host, vm: str | None,
                operation: str) -> Any:
        try:
            return fn(answer)
        except FabricError as exc:
            raise OutputError(exc.message, vm=vm, host=host.name, operation=operation, hint=exc.hint,
                              error_id=exc.error_id) from None

    @staticmethod
    def _invalid(p: Placement, host: Host, operation: str, st: VMState, needs: str) -> InvalidStateError:
        return InvalidStateError(
            f"{p.vm} is {st.mode}/{st.state} on {host.name}; {operation} needs {needs}", vm=p.vm, host=host.name,
            operation=operation, error_id="InvalidState,SiteRecovery.HyperV",
            hint="read the VM's replication state and bring it to a state that allows this operation")

    # ---- replica server ----------------------------------------------------------------------
    def configure_replica_server(self, host: Host, allowed_primaries: Iterable[Host] | None = None) -> ReplicaServerResult:
        """Set-VMReplicationServer from host.replica_server, and one authorization entry per allowed primary."""
        rs = host.replica_server
        if rs is None:
            raise ConfigurationError(f"host {host.name} has no replica_server settings")
        op = "configure_replica_server"
        cur = self._parsed(parse_server_state, self.run(host, server_lines(), op), host, None, op)
        primaries = [_server_name(h) for h in (allowed_primaries or ())] or list(rs.allowed_primaries)
        storage = rs.storage_location or host.default_storage
        auth = "Certificate" if rs.authentication == "certificate" else "Kerberos"
        lines: list[str] = []
        want_any = not primaries
        if (not cur.enabled or cur.auth != auth or cur.any_server != want_any
                or (auth == "Kerberos" and cur.kerberos_port != rs.port)
                or (auth == "Certificate" and (cur.certificate_port != rs.port
                                               or cur.thumbprint.lower() != (rs.certificate_thumbprint or "").lower()))
                or (want_any and storage and cur.storage != storage)):
            params: dict[str, Any] = {"ReplicationEnabled": True, "AllowedAuthenticationType": auth,
                                      "ReplicationAllowedFromAnyServer": want_any}
            if auth == "Kerberos":
                params["KerberosAuthenticationPort"] = rs.port
            else:
                params["CertificateAuthenticationPort"] = rs.port
                params["CertificateThumbprint"] = rs.certificate_thumbprint
            if want_any and storage:
                params["DefaultStorageLocation"] = storage
            lines.append(cmd("Set-VMReplicationServer", **params, Force=SWITCH))
        have = {e[0].lower() for e in cur.entries}
        for prim in primaries:
            if prim.lower() in have:
                continue
            if not storage:
                raise ConfigurationError(f"host {host.name}: authorization entries need a storage location "
                                         "(replica_server.storage_location or default_storage)")
            lines.append(cmd("New-VMReplicationAuthorizationEntry", AllowedPrimaryServer=prim,
                             ReplicaStorageLocation=storage, TrustGroup="siterecovery"))
        # The listener rule for the port in use (seed 003: built in, but not enabled by the configuration).
        rule = FIREWALL_RULES[auth]
        if rule not in cur.firewall:
            lines.append(cmd("Enable-NetFirewallRule", DisplayName=rule))
        if not lines:
            return ReplicaServerResult(host=host.name, changed=False, message="replica server already configured")
        self.run(host, [*lines, *server_lines()], op)
        return ReplicaServerResult(host=host.name, changed=True, message="replica server configured",
                                   commands=tuple(lines))

    # ---- protection --------------------------------------------------------------------------
    def _enable_params(self, policy: ReplicationPolicy, target: Host, source: Host) -> dict[str, Any]:
        rs = target.replica_server
        cert = policy.authentication == "certificate"
        params: dict[str, Any] = {
            "ReplicaServerName": _server_name(target),
            "ReplicaServerPort": rs.port if rs is not None else (443 if cert else 80),
            "AuthenticationType": "Certificate" if cert else "Kerberos",
            "CertificateThumbprint": _thumbprint(source, policy) if cert else None,
            "ReplicationFrequencySec": policy.copy_frequency_seconds,
            "RecoveryHistory": policy.recovery_history_hours,
            "VSSSnapshotFrequencyHour": policy.app_consistent_frequency_hours,
            "CompressionEnabled": policy.compression,
        }
        return params

    @staticmethod
    def _excluded(p: Placement) -> list[str] | None:
        """The VHD paths left out of replication (topology disks with `replicate: false`)."""
        return [d.source_path for d in p.disks if not d.replicate] or None

    def enable_replication(self, p: Placement) -> OpResult:
        t0, op = utcnow(), "enable_replication"
        st = self.vm_state(p.source, p.vm, op)
        if st.simple is not None:
            if st.mode == "Primary" and st.simple.replica.lower() == _server_name(p.target).lower():
                # Onboarded before: apply what changed in the policy since (Set-VMReplication).
                want = {"ReplicationFrequencySec": p.policy.copy_frequency_seconds,
                        "RecoveryHistory": p.policy.recovery_history_hours}
                have = {"ReplicationFrequencySec": st.simple.frequency, "RecoveryHistory": st.simple.history}
                changed = {k: v for k, v in want.items() if have[k] != v}
                if not changed:
                    return result(p, op, False, S(st.state), "replication already enabled", t0, host=p.source.name)
                st = self._act(p.source, p.vm, op, [cmd("Set-VMReplication", VM=Var("vm"), **changed)])
                return result(p, op, True, S(st.state), "replication settings updated: " + ", ".join(sorted(changed)),
                              t0, host=p.source.name)
            # Enabled toward another host: send the cmdlet anyway so the host answers its own error
            # (VMReplication_AlreadyEnabled) rather than one we made up.
        if p.policy.initial_replication.method == "existing_replica":
            # The replica VM already exists (restored from a backup): make it a replica first, so the
            # primary's Enable-VMReplication pairs with it instead of creating a new one.
            tst = self.vm_state(p.target, p.vm, op)
            if tst.simple is None:
                self._act(p.target, p.vm, op, [cmd("Enable-VMReplication", VM=Var("vm"), AsReplica=SWITCH,
                                                   AllowedPrimaryServer=_server_name(p.source))])
        st = self._act(p.source, p.vm, op, [cmd("Enable-VMReplication", VM=Var("vm"),
                                                **self._enable_params(p.policy, p.target, p.source),
                                                ExcludedVhdPath=self._excluded(p))])
        return result(p, op, True, S(st.state), f"replication {p.source.name} -> {p.target.name} enabled", t0,
                      host=p.source.name)

    def start_initial_replication(self, p: Placement, progress: Progress | None = None) -> OpResult:
        t0, op = utcnow(), "start_initial_replication"
        init = p.policy.initial_replication
        st = self.vm_state(p.source, p.vm, op)
        if st.state in (S.Replicating.value, S.Resynchronizing.value):
            return result(p, op, False, S(st.state), "initial replication already done", t0, host=p.source.name)
        changed = False
        if st.state == S.ReadyForInitialReplication.value:
            params: dict[str, Any] = {}
            if init.method == "offline":
                params["DestinationPath"] = init.export_path
            elif init.method == "network" and init.start_at is not None:
                at = init.start_at if init.start_at.tzinfo else init.start_at.replace(tzinfo=UTC)
                params["InitialReplicationStartTime"] = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            elif init.method == "existing_replica":
                # The replica was restored from a backup: compare blocks, do not copy the disks again.
                params["UseBackup"] = SWITCH
            line = cmd("Start-VMInitialReplication", VM=Var("vm"), **params)
            if init.method == "offline":
                st = self._job(p.source, p.vm, op, [], line, "export")
            else:
                st = self._act(p.source, p.vm, op, [line])
            changed = True
        elif st.state != S.InitialReplicationInProgress.value:
            # Wrong state or mode: let Hyper-V refuse with its documented error.
            self._act(p.source, p.vm, op, [cmd("Start-VMInitialReplication", VM=Var("vm"))])
        if init.method == "offline":
            rst = self.vm_state(p.target, p.vm, op)
            if rst.state == S.WaitingForInitialReplication.value:
                # Each VM's initial copy is its own folder under the export path, named after the VM.
                self._job(p.target, p.vm, op, [], cmd("Import-VMInitialReplication", VM=Var("vm"),
                                                      Path=export_folder(init.import_path, p.vm)), "import")
                changed = True
                st = self.vm_state(p.source, p.vm, op)
        # No progress call: Start-VMInitialReplication only starts the copy (Hyper-V moves the data on
        # its own); reporting 100 % here would show a finished bar for a copy that has just begun.
        msg = {"offline": "initial copy exported and imported", "network": "initial replication started",
               "existing_replica": "initial replication against the existing replica started"}[init.method]
        if init.method == "network" and init.start_at is not None:
            msg = f"initial replication scheduled for {init.start_at.isoformat()}"
        return result(p, op, changed, S(st.state), msg, t0, host=p.source.name)

    def replicate(self, p: Placement, consistency: Consistency = "crash", progress: Progress | None = None) -> OpResult:
        # Hyper-V Replica ships changes on its own schedule (every 30/300/900 s); there is no cmdlet for
        # "one cycle now", so this only reports where the relationship stands.
        t0 = utcnow()
        st = self.vm_state(p.source, p.vm, "replicate")
        if st.state not in (S.Replicating.value, S.Resynchronizing.value):
            raise self._invalid(p, p.source, "replicate", st, "Replicating")
        return result(p, "replicate", False, S(st.state),
                      f"Hyper-V Replica replicates by itself every {st.simple.frequency if st.simple else '?'} s",
                      t0, host=p.source.name)

    def resynchronize(self, p: Placement, progress: Progress | None = None) -> OpResult:
        t0, op = utcnow(), "resynchronize"
        st = self.vm_state(p.source, p.vm, op)
        if st.state in (S.Replicating.value, S.Resynchronizing.value):
            return result(p, op, False, S(st.state), "no resynchronization needed" if st.state == "Replicating"
                          else "resynchronization already running", t0, host=p.source.name)
        st = self._act(p.source, p.vm, op, [cmd("Resume-VMReplication", VM=Var("vm"), Resynchronize=SWITCH)])
        return result(p, op, True, S(st.state), "resynchronization started", t0, host=p.source.name)

    def suspend(self, p: Placement) -> OpResult:
        t0, op = utcnow(), "suspend"
        st = self.vm_state(p.source, p.vm, op)
        if st.state == S.Suspended.value:
            return result(p, op, False, S.Suspended, "already suspended", t0, host=p.source.name)
        st = self._act(p.source, p.vm, op, [cmd("Suspend-VMReplication", VM=Var("vm"))])
        return result(p, op, True, S(st.state), "replication suspended", t0, host=p.source.name)

    def resume(self, p: Placement) -> OpResult:
        t0, op = utcnow(), "resume"
        st = self.vm_state(p.source, p.vm, op)
        if st.state in (S.Replicating.value, S.Resynchronizing.value):
            return result(p, op, False, S(st.state), "already replicating", t0, host=p.source.name)
        st = self._act(p.source, p.vm, op, [cmd("Resume-VMReplication", VM=Var("vm"))])
        return result(p, op, True, S(st.state), "replication resumed", t0, host=p.source.name)

    def disable_replication(self, p: Placement, delete_replica: bool = False) -> OpResult:
        t0, op = utcnow(), "disable_replication"
        changed = False
        for host in (p.source, p.target):
            try:
                st = self.vm_state(host, p.vm, op)
            except NotFoundError:
                continue
            lines = []
            if st.simple is not None:
                lines.append(cmd("Remove-VMReplication", VM=Var("vm")))
            if host is p.target and delete_replica:
                # Remove-VM keeps the virtual disks: read their paths first, delete them after the VM.
                disks = _list(self.run(host, [*self._find(host, "vm", p.vm), *select("Get-VMHardDiskDrive -VM $vm", ("Path",),
                                                                          "disks")], op, p.vm).get("disks"))
                paths = [_str(d.get("Path")) for d in disks if isinstance(d, dict) and d.get("Path")]
                lines += [cmd("Stop-VM", VM=Var("vm"), TurnOff=SWITCH, Force=SWITCH)] if st.power != "Off" else []
                lines.append(cmd("Remove-VM", VM=Var("vm"), Force=SWITCH))
                if paths:
                    lines.append(cmd("Remove-Item", LiteralPath=paths))
                self.run(host, [*self._find(host, "vm", p.vm), *lines], op, p.vm)
                changed = True
            elif lines:
                self._act(host, p.vm, op, lines)
                changed = True
        return result(p, op, changed, S.Disabled, "replication removed" if changed else "replication not enabled",
                      t0, host=p.source.name)

    def replication_health(self, p: Placement) -> ReplicationHealth:
        st = self.vm_state(p.source, p.vm, "replication_health")
        rel = st.simple
        m = next((x for x in st.measures if x.relationship == "Simple"), None)
        last = rel.last_replication if rel else None
        details = "; ".join(m.details) if m else ""
        test_active = bool(st.test_vm)
        try:
            # Test failovers live on the replica: the test VM "<name> - Test" exists there.
            rst = self.vm_state(p.target, p.vm, "replication_health")
            test_active = test_active or bool(rst.test_vm)
        except FabricError:
            pass  # health of the primary is still worth reporting with the replica host down
        return ReplicationHealth(
            vm=p.vm, state=S(st.state), health=Health(rel.health) if rel else Health.NotApplicable,
            mode=ReplicationMode(st.mode), primary_host=rel.primary or None if rel else None,
            replica_host=rel.replica or None if rel else None, last_replication_time=last,
            pending_bytes=m.pending_bytes if m else 0, successful_cycles=m.successful if m else 0,
            missed_cycles=m.missed if m else 0,
            current_rpo_seconds=(utcnow() - last).total_seconds() if last else None,
            resync_required=st.state == S.WaitingForStartResynchronize.value or "Resynchronization is required"
            in details, test_failover_active=test_active, details=details)

    def recovery_points(self, p: Placement) -> tuple[RecoveryPoint, ...]:
        return self.vm_state(p.target, p.vm, "recovery_points").points

    # ---- failover ----------------------------------------------------------------------------
    def _point_lines(self, p: Placement, host: Host, st: VMState, point: PointChoice,
                     operation: str) -> tuple[list[str], RecoveryPoint | None]:
        """Lines that put the chosen recovery point in $snap, or none for "latest" (Hyper-V's default:
        everything received, pending logs applied first)."""
        if _hyperv_latest(point):
            return [], (st.points[-1] if st.points else None)
        if point.kind == "latest_processed" and point.id is None:
            chosen = next((x for x in reversed(st.points) if x.consistency == "crash"), None) or \
                (st.points[-1] if st.points else None)
        else:
            chosen = point.choose(st.points)
        if chosen is None:
            raise NotFoundError(f"no recovery point matches {point.describe()}",
                                vm=p.vm, host=host.name, operation=operation, error_id="NoRecoveryPoint",
                                hint="list the points (siterecovery points) and choose one that exists")
        return find("snap", chosen.id, "Get-VMSnapshot -VM $vm", prop="Id"), chosen

    def test_failover(self, p: Placement, point: PointChoice = LATEST, network: str | None = None) -> OpResult:
        t0, op = utcnow(), "test_failover"
        st = self.vm_state(p.target, p.vm, op)
        if st.test_vm:
            return result(p, op, False, S(st.state), f"test VM {st.test_vm!r} already exists", t0)
        lines, chosen = self._point_lines(p, p.target, st, point, op)
        switch = network or p.test_network
        if switch:
            lines.insert(0, "Get-VMNetworkAdapter -VM $vm | " + cmd("Set-VMNetworkAdapter",
                                                                     TestReplicaSwitchName=switch))
        if _hyperv_latest(point):
            lines.append(cmd("Start-VMFailover", VM=Var("vm"), AsTest=SWITCH, Confirm=NO_CONFIRM))
        else:
            lines.append(cmd("Start-VMFailover", VMRecoverySnapshot=Var("snap"), AsTest=SWITCH, Confirm=NO_CONFIRM))
        st = self._act(p.target, p.vm, op, lines)
        test_vm = st.test_vm
        return result(p, op, True, S(st.state), f"test VM {test_vm!r} created", t0, point=chosen,
                      details={"test_vm": test_vm, "network": switch})

    def cleanup_test_failover(self, p: Placement) -> OpResult:
        t0, op = utcnow(), "cleanup_test_failover"
        st = self.vm_state(p.target, p.vm, op)
        if not st.test_vm:
            return result(p, op, False, S(st.state), "no test failover to clean up", t0)
        st = self._act(p.target, p.vm, op, [cmd("Stop-VMFailover", VM=Var("vm"))])
        return result(p, op, True, S(st.state), "test VM deleted", t0)

    def prepare_planned_failover(self, p: Placement) -> OpResult:
        """Primary side of a planned failover: Stop-VM, then Start-VMFailover -Prepare (ships pending changes)."""
        t0, op = utcnow(), "prepare_planned_failover"
        st = self.vm_state(p.source, p.vm, op)
        if st.state == S.PreparedForFailover.value:
            return result(p, op, False, S(st.state), "already prepared", t0, host=p.source.name)
        # Shut the VM down only when the prepare can succeed; otherwise send the prepare alone and let
        # Hyper-V refuse it (InvalidState), so a wrong call never stops a production VM.
        ready = st.mode == "Primary" and st.state == S.Replicating.value
        if st.power != "Off" and ready:
            # -Force: a guest with a locked console or unsaved work would otherwise prompt (and hang).
            self._job(p.source, p.vm, op, [], cmd("Stop-VM", VM=Var("vm"), Force=SWITCH), "stop")
        st = self._job(p.source, p.vm, op, [], cmd("Start-VMFailover", VM=Var("vm"), Prepare=SWITCH,
                                                    Confirm=NO_CONFIRM), "prepare")
        return result(p, op, True, S(st.state), "primary shut down, pending changes sent", t0, host=p.source.name)

    def failover(self, p: Placement, point: PointChoice = LATEST) -> OpResult:
        """Replica side (planned or unplanned): Start-VMFailover [-VMRecoverySnapshot]. The VM is not started."""
        t0, op = utcnow(), "failover"
        st = self.vm_state(p.target, p.vm, op)
        if st.state in (S.FailedOverWaitingCompletion.value, S.FailedOver.value):
            return result(p, op, False, S(st.state), "already failed over", t0)
        lines, chosen = self._point_lines(p, p.target, st, point, op)
        if _hyperv_latest(point):
            lines.append(cmd("Start-VMFailover", VM=Var("vm"), Confirm=NO_CONFIRM))
        else:
            lines.append(cmd("Start-VMFailover", VMRecoverySnapshot=Var("snap"), Confirm=NO_CONFIRM))
        st = self._act(p.target, p.vm, op, lines)
        return result(p, op, True, S(st.state), "failed over" + (f" to {chosen.id}" if chosen else ""), t0,
                      point=chosen)

    def commit_failover(self, p: Placement) -> OpResult:
        t0, op = utcnow(), "commit_failover"
        st = self.vm_state(p.target, p.vm, op)
        if st.state == S.FailedOver.value:
            return result(p, op, False, S.FailedOver, "already committed", t0)
        st = self._act(p.target, p.vm, op, [cmd("Complete-VMFailover", VM=Var("vm"), Confirm=NO_CONFIRM)])
        return result(p, op, True, S(st.state), "failover committed", t0)

    def cancel_failover(self, p: Placement) -> OpResult:
        """Stop-VMFailover where a failover is pending: the replica (FailedOverWaitingCompletion) and/or
        the primary (PreparedForFailover). An unreachable primary is left alone once the replica is reverted."""
        t0, op = utcnow(), "cancel_failover"
        changed = False
        st = self.vm_state(p.target, p.vm, op)
        if st.state == S.FailedOverWaitingCompletion.value:
            st = self._act(p.target, p.vm, op, [cmd("Stop-VMFailover", VM=Var("vm"))])
            changed = True
        try:
            src = self.vm_state(p.source, p.vm, op)
        except ConnectionFailed:
            if changed:
                return result(p, op, True, S(st.state), "replica reverted; primary unreachable", t0)
            raise
        if src.state == S.PreparedForFailover.value:
            self._act(p.source, p.vm, op, [cmd("Stop-VMFailover", VM=Var("vm"))])
            changed = True
        return result(p, op, changed, S(st.state), "failover cancelled" if changed else "no failover to cancel", t0)

    def reverse_replication(self, p: Placement) -> OpResult:
        """After a planned failover: Set-VMReplication -Reverse on the new primary (p.target).
        After an unplanned one: -AsReplica on the old primary (p.source), then -Reverse and
        Start-VMInitialReplication on the new one."""
        t0, op = utcnow(), "reverse_replication"
        st = self.vm_state(p.target, p.vm, op)
        old = _server_name(p.source)
        if st.mode == "Primary" and st.simple and st.simple.replica.lower() == old.lower():
            if st.state == S.ReadyForInitialReplication.value:
                st = self._act(p.target, p.vm, op, [cmd("Start-VMInitialReplication", VM=Var("vm"),
                                                        UseBackup=SWITCH)])
                return result(p, op, True, S(st.state), "reverse initial replication started", t0)
            return result(p, op, False, S(st.state), "replication already reversed", t0)
        if st.state not in (S.FailedOverWaitingCompletion.value, S.FailedOver.value):
            # Not failed over: never touch the old primary; Hyper-V refuses the reverse itself.
            self._act(p.target, p.vm, op, [cmd("Set-VMReplication", VM=Var("vm"), Reverse=SWITCH,
                                               ReplicaServerName=old)])
        src = self.vm_state(p.source, p.vm, op)
        if src.state == S.PreparedForFailover.value:
            st = self._act(p.target, p.vm, op, [cmd("Set-VMReplication", VM=Var("vm"), Reverse=SWITCH,
                                                    ReplicaServerName=old)])
            return result(p, op, True, S(st.state), f"now replicating {p.target.name} -> {p.source.name}", t0)
        if not (src.mode == "Replica" and src.state == S.WaitingForInitialReplication.value):
            # The old primary may have come back running (it crashed, someone started it): it must be
            # off before it can become a replica.
            off = [cmd("Stop-VM", VM=Var("vm"), TurnOff=SWITCH, Force=SWITCH)] if src.power != "Off" else []
            self._act(p.source, p.vm, op, [*off, cmd("Set-VMReplication", VM=Var("vm"), AsReplica=SWITCH,
                                                     AllowedPrimaryServer=_server_name(p.target))])
        # -UseBackup: the old primary's disks are the starting point; only differing blocks cross the WAN.
        st = self._act(p.target, p.vm, op, [cmd("Set-VMReplication", VM=Var("vm"), Reverse=SWITCH,
                                                ReplicaServerName=old),
                                            cmd("Start-VMInitialReplication", VM=Var("vm"), UseBackup=SWITCH)])
        return result(p, op, True, S(st.state),
                      f"now replicating {p.target.name} -> {p.source.name} (block-compare resync)", t0)

    def start_vm(self, p: Placement, side: Side = "target", test: bool = False) -> OpResult:
        t0, op = utcnow(), "start_vm"
        host = p.target if side == "target" else p.source
        name = p.vm
        if test:
            st = self.vm_state(host, p.vm, op)
            if not st.test_vm:
                raise self._invalid(p, host, op, st, "a test failover (no test VM exists)")
            name = st.test_vm
        st = self.vm_state(host, name, op)
        if st.power == "Running":
            return result(p, op, False, S(st.state), f"{name!r} already running", t0, host=host.name)
        st = self._act(host, name, op, [cmd("Start-VM", VM=Var("vm"))])
        return result(p, op, True, S(st.state), f"{name!r} started", t0, host=host.name)

    def stop_vm(self, p: Placement, side: Side = "source") -> OpResult:
        t0, op = utcnow(), "stop_vm"
        host = p.target if side == "target" else p.source
        st = self.vm_state(host, p.vm, op)
        if st.power == "Off":
            return result(p, op, False, S(st.state), "already off", t0, host=host.name)
        st = self._job(host, p.vm, op, [], cmd("Stop-VM", VM=Var("vm"), Force=SWITCH), "stop")
        return result(p, op, True, S(st.state), "shut down", t0, host=host.name)

    def apply_network(self, p: Placement) -> OpResult:
        """Connect each replica NIC to its mapped switch and inject its failover IP configuration."""
        t0, op = utcnow(), "apply_network"
        st = self.vm_state(p.target, p.vm, op)
        have = {n.name: n for n in st.nics}
        lines: list[str] = []
        for i, n in enumerate(p.nics):
            cur = have.get(n.nic)
            if cur is None:
                raise NotFoundError(f"the replica has no network adapter named {n.nic!r} "
                                    f"(it has {', '.join(sorted(have)) or 'none'})", vm=p.vm, host=p.target.name,
                                    operation=op, error_id="ObjectNotFound,SiteRecovery.Resolve",
                                    hint="fix the NIC name in the topology to match the VM's adapter")
            var = f"nic{i}"
            nic_lines = []
            switch = n.switch or n.target_network
            if switch and cur.switch != switch:
                nic_lines.append(cmd("Connect-VMNetworkAdapter", VMNetworkAdapter=Var(var), SwitchName=switch))
            elif not switch and cur.switch:
                nic_lines.append(cmd("Disconnect-VMNetworkAdapter", VMNetworkAdapter=Var(var)))
            if n.ip is not None:
                mask, gw = _mask(n.ip.prefix_length), str(n.ip.gateway) if n.ip.gateway else ""
                dns = tuple(str(d) for d in n.ip.dns[:2])
                if (cur.ip, cur.mask, cur.gateway, cur.dns) != (str(n.ip.address), mask, gw, dns):
                    nic_lines.append(cmd(
                        "Set-VMNetworkAdapterFailoverConfiguration", VMNetworkAdapter=Var(var),
                        IPv4Address=str(n.ip.address), IPv4SubnetMask=mask, IPv4DefaultGateway=gw or None,
                        IPv4PreferredDNSServer=dns[0] if dns else None,
                        IPv4AlternateDNSServer=dns[1] if len(dns) > 1 else None))
            if nic_lines:
                lines += find(var, n.nic, "Get-VMNetworkAdapter -VM $vm") + nic_lines
        if not lines:
            return result(p, op, False, S(st.state), "network settings already applied", t0)
        st = self._act(p.target, p.vm, op, lines)
        return result(p, op, True, S(st.state), f"{len(p.nics)} network adapter(s) configured", t0,
                      details={"commands": len(lines)})

    def vm_networks(self, p: Placement, side: Side = "source") -> dict[str, str | None] | None:
        """The VM network each NIC of the VM at that side is on now, from its adapter's switch
        (Get-VMNetworkAdapter): None when disconnected. A switch is named as its network through the
        placement's failback choices (the networks of that site); a switch that backs none of them, or
        several, is reported as `switch:<name>`, a network the topology does not know (unmapped)."""
        host = p.source if side == "source" else p.target
        st = self.vm_state(host, p.vm, "vm_networks")
        choices = {n.nic: n.failback_choices for n in p.nics}
        out: dict[str, str | None] = {}
        for nic in st.nics:
            if not nic.switch:
                out[nic.name] = None
                continue
            nets = {c.replica_network for c in choices.get(nic.name, ()) if c.replica_switch == nic.switch}
            out[nic.name] = nets.pop() if len(nets) == 1 else f"switch:{nic.switch}"
        return out

    # ---- extended replication (A -> B -> C) -------------------------------------------------
    def enable_extended_replication(self, p: Placement, extended: Host, frequency_seconds: int = 300) -> OpResult:
        """On B (p.target), replicate its replica VM to C: 300 or 900 s, no app-consistent points."""
        t0, op = utcnow(), "enable_extended_replication"
        st = self.vm_state(p.target, p.vm, op)
        if st.extended is not None:
            if st.extended.replica.lower() == _server_name(extended).lower():
                if st.extended.state == S.ReadyForInitialReplication.value:
                    self._act(p.target, p.vm, op, [cmd("Start-VMInitialReplication", VM=Var("vm"))])
                    return result(p, op, True, S(st.state), "extended initial replication started", t0)
                return result(p, op, False, S(st.state), "extended replication already enabled", t0)
        rs = extended.replica_server
        cert = p.policy.authentication == "certificate"
        st = self._act(p.target, p.vm, op, [
            cmd("Enable-VMReplication", VM=Var("vm"), ReplicaServerName=_server_name(extended),
                ReplicaServerPort=rs.port if rs else (443 if cert else 80),
                AuthenticationType="Certificate" if cert else "Kerberos",
                CertificateThumbprint=p.policy.certificate_thumbprint if cert else None,
                ReplicationFrequencySec=frequency_seconds, RecoveryHistory=p.policy.recovery_history_hours,
                CompressionEnabled=p.policy.compression),
            cmd("Start-VMInitialReplication", VM=Var("vm"))])
        return result(p, op, True, S(st.state), f"extended replication {p.target.name} -> {extended.name}", t0)

    def continue_extended_replication(self, p: Placement) -> OpResult:
        """After failing A over to B without reversing: B becomes the primary toward C (Resume -Continue)."""
        t0, op = utcnow(), "continue_extended_replication"
        st = self.vm_state(p.target, p.vm, op)
        # Done already: B is now a primary replicating onward (to C), not back to the old primary.
        if st.mode == "Primary" and st.extended is None and st.simple is not None \
                and st.simple.replica.lower() != _server_name(p.source).lower():
            return result(p, op, False, S(st.state), "already replicating onward", t0)
        st = self._act(p.target, p.vm, op, [cmd("Resume-VMReplication", VM=Var("vm"), Continue=SWITCH)])
        return result(p, op, True, S(st.state), "extended replication continues from the failed-over replica", t0)

    def remove_extended_replication(self, p: Placement) -> OpResult:
        """Break B -> C (needed before reversing B -> A; C's VM is orphaned)."""
        t0, op = utcnow(), "remove_extended_replication"
        st = self.vm_state(p.target, p.vm, op)
        if st.extended is None:
            return result(p, op, False, S(st.state), "no extended relationship", t0)
        # Remove-VMReplication takes -ReplicationRelationshipType only with -VMName (a wildcard): pass the
        # extended relationship's object instead.
        st = self._act(p.target, p.vm, op, [
            f"$rep = {cmd('Get-VMReplication', VM=Var('vm'), ReplicationRelationshipType='Extended')}",
            cmd("Remove-VMReplication", VMReplication=Var("rep"))])
        return result(p, op, True, S(st.state), "extended relationship removed", t0)
