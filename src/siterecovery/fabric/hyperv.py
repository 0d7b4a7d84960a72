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
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import paramiko

from .. import ssh
from ..errors import (
    ConfigurationError,
    ConnectionFailed,
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
# The prologue is fixed text (no interpolated value); the simulator compares it byte for byte and
# implements its three functions natively. Warnings are silenced so stdout carries only the JSON.
PROLOGUE = """$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$WarningPreference = 'SilentlyContinue'
function ConvertTo-SrDate($d) { if ($null -eq $d) { $null } else { $d.ToUniversalTime().ToString('o') } }
function Assert-SrOne($Found, [string]$Name, [string]$What) {
  $n = @($Found).Count
  if ($n -eq 1) { return }
  if ($n -eq 0) { $id = 'ObjectNotFound,SiteRecovery.Resolve'; $cat = 'ObjectNotFound' }
  else { $id = 'AmbiguousName,SiteRecovery.Resolve'; $cat = 'InvalidArgument' }
  $msg = 'found ' + $n + ' ' + $What + ' named ' + $Name + ', expected exactly one'
  throw [System.Management.Automation.ErrorRecord]::new([System.Exception]::new($msg), $id, $cat, $Name)
}
function Out-SrState($VM) {
  $repl = @(Get-VMReplication -VM $VM -ErrorAction SilentlyContinue | ForEach-Object { [ordered]@{
    VMName = $_.VMName; ReplicationState = $_.ReplicationState; ReplicationHealth = $_.ReplicationHealth
    ReplicationMode = $_.ReplicationMode; ReplicationRelationshipType = $_.ReplicationRelationshipType
    PrimaryServerName = $_.PrimaryServerName; ReplicaServerName = $_.ReplicaServerName
    ReplicaServerPort = $_.ReplicaServerPort; AuthenticationType = $_.AuthenticationType
    ReplicationFrequencySec = $_.ReplicationFrequencySec; RecoveryHistory = $_.RecoveryHistory
    VSSSnapshotFrequencyHour = $_.VSSSnapshotFrequencyHour; CompressionEnabled = $_.CompressionEnabled
    LastReplicationTime = ConvertTo-SrDate $_.LastReplicationTime; TestVirtualMachine = [string]$_.TestVirtualMachine } })
  $measure = @(Measure-VMReplication -VM $VM -ErrorAction SilentlyContinue | ForEach-Object { [ordered]@{
    ReplicationRelationshipType = $_.ReplicationRelationshipType; PendingReplicationSize = $_.PendingReplicationSize
    AverageReplicationLatency = $_.AverageReplicationLatency.TotalSeconds; SuccessfulReplicationCount = $_.SuccessfulReplicationCount
    MissedReplicationCount = $_.MissedReplicationCount; ReplicationErrors = $_.ReplicationErrors
    ReplicationHealthDetails = @($_.ReplicationHealthDetails | ForEach-Object { [string]$_.Message })
    LastTestFailoverInitiatedTime = ConvertTo-SrDate $_.LastTestFailoverInitiatedTime
    LastVSSSnapshotTime = ConvertTo-SrDate $_.LastVSSSnapshotTime } })
  $points = @(Get-VMSnapshot -VM $VM -ErrorAction SilentlyContinue | Where-Object { [int]$_.SnapshotType -in 6, 7 } |
    ForEach-Object { [ordered]@{ Id = [string]$_.Id; Name = $_.Name; SnapshotType = $_.SnapshotType
      CreationTime = ConvertTo-SrDate $_.CreationTime } })
  $nics = @(Get-VMNetworkAdapter -VM $VM | ForEach-Object {
    $f = Get-VMNetworkAdapterFailoverConfiguration -VMNetworkAdapter $_ -ErrorAction SilentlyContinue
    [ordered]@{ Name = $_.Name; SwitchName = $_.SwitchName; TestReplicaSwitchName = $_.TestReplicaSwitchName
      FailoverIPv4Address = [string]$f.IPv4Address; FailoverIPv4SubnetMask = [string]$f.IPv4SubnetMask
      FailoverIPv4DefaultGateway = [string]$f.IPv4DefaultGateway
      FailoverIPv4PreferredDNSServer = [string]$f.IPv4PreferredDNSServer
      FailoverIPv4AlternateDNSServer = [string]$f.IPv4AlternateDNSServer } })
  [ordered]@{ ok = $true; vm = [ordered]@{ Name = $VM.Name; Id = [string]$VM.Id; State = $VM.State }
    repl = $repl; measure = $measure; points = $points; nics = $nics }
}
function Out-SrOk { [ordered]@{ ok = $true } }
function Out-SrServer {
  $s = Get-VMReplicationServer
  [ordered]@{ ok = $true; server = [ordered]@{ ReplicationEnabled = $s.RepEnabled
    AllowedAuthenticationType = $s.AllowedAuthType; KerberosAuthenticationPort = $s.KerbAuthPort
    CertificateAuthenticationPort = $s.CertAuthPort; CertificateThumbprint = $s.CertificateThumbprint
    ReplicationAllowedFromAnyServer = $s.AllowAnyServer; DefaultStorageLocation = $s.DefaultStorageLocation }
    entries = @(Get-VMReplicationAuthorizationEntry -ErrorAction SilentlyContinue | ForEach-Object { [ordered]@{
      AllowedPrimaryServer = $_.AllowedPrimaryServer; ReplicaStorageLocation = $_.ReplicaStorageLocation
      TrustGroup = $_.TrustGroup } }) }
}
try {
"""
EPILOGUE = """} catch {
  [ordered]@{ ok = $false; id = [string]$_.FullyQualifiedErrorId; category = [string]$_.CategoryInfo.Category
    message = [string]$_.Exception.Message } | ConvertTo-Json -Compress
  exit 1
}
"""
EMIT = "ConvertTo-Json -Depth 4 -Compress"
COMMAND_PREFIX = "powershell -NoProfile -NonInteractive -EncodedCommand "

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


def find(var: str, name: str, source: str = "Get-VM", what: str = "VM", prop: str = "Name") -> list[str]:
    """Resolve exactly one object by exact, case-sensitive name: never a wildcard (-VMName takes them)."""
    v = Var(var)
    op = "-ceq" if prop == "Name" else "-eq"
    return [f"${v.name} = {source} | Where-Object {prop} {op} {ps_quote(name)}",
            f"Assert-SrOne ${v.name} {ps_quote(name)} {ps_quote(what)}"]


def script(lines: Iterable[str]) -> str:
    body = list(lines)
    for line in body:
        # A line may hold a newline only inside a quoted literal (a hostile VM name); the grammar's
        # statement separator is a newline outside literals, which the simulator checks.
        if not line or line != line.strip(" "):
            raise ValueError(f"malformed script line {line!r}")
    return PROLOGUE + "".join(f"  {line}\n" for line in body) + EPILOGUE


def encode(text: str) -> str:
    """The full command line: the script UTF-16LE, base64, so the remote shell never parses it."""
    return COMMAND_PREFIX + base64.b64encode(text.encode("utf-16-le")).decode("ascii")


# ---- parsing the answers --------------------------------------------------------------------------
_STATE_NAMES = [s.value for s in S]
_HEALTH_NAMES = ["NotApplicable", "Normal", "Warning", "Critical"]
_MODE_NAMES = ["None", "Primary", "Replica", "TestReplica", "ExtendedReplica"]
_REL_NAMES = ["Simple", "Extended"]
_AUTH_NAMES = {1: "Kerberos", 2: "Certificate", 3: "CertificateAndKerberos"}
_SNAP_NAMES = {0: "Standard", 1: "Recovery", 2: "Planned", 5: "Missing", 6: "Replica", 7: "AppConsistentReplica",
               8: "SyncedReplica"}
_VMSTATE_NAMES = {2: "Running", 3: "Off", 4: "Stopping", 6: "Saved", 9: "Paused", 10: "Starting"}
_MSDATE = re.compile(r"^\\?/Date\((-?\d{1,15})([+-]\d{4})?\)\\?/$")


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
    test_vm: str
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


def decode_answer(stdout: str, status: int) -> dict[str, Any]:
    """The one JSON object a script answers; raises FabricError for an error answer or garbage."""
    text = stdout.strip()
    obj: Any = None
    candidates = [text] + [ln for ln in reversed(text.splitlines()) if ln.lstrip().startswith("{")]
    for cand in candidates:
        try:
            obj = json.loads(cand)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            break
        obj = None
    if obj is None:
        raise OutputError(f"the host answered no JSON object (exit status {status}): {text[:200]!r}",
                          error_id="UnexpectedOutput",
                          hint="check that the host's SSH shell is PowerShell with the Hyper-V module")
    if obj.get("ok") is True and status == 0:
        return obj
    if obj.get("ok") is False:
        raise _error_from_answer(obj)
    raise OutputError(f"the host answered ok={obj.get('ok')!r} with exit status {status}",
                      error_id="UnexpectedOutput", hint="check the script's output on the host by hand")


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


def parse_vm_state(answer: dict[str, Any]) -> VMState:
    """Parse Out-SrState's answer; any odd shape becomes an OutputError, never a Python exception."""
    try:
        vm = _obj(answer.get("vm"), "vm")
        name = _str(vm.get("Name"))
        power = enum_name(vm.get("State"), _VMSTATE_NAMES, "VM state") if vm.get("State") is not None else "Off"
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
                history=_int(r.get("RecoveryHistory")), test_vm=_str(r.get("TestVirtualMachine")),
                last_replication=parse_date(r.get("LastReplicationTime"))))
        measures = []
        for m in _list(answer.get("measure")):
            m = _obj(m, "measure")
            measures.append(Measure(
                relationship=enum_name(m.get("ReplicationRelationshipType", 0), _REL_NAMES, "RelationshipType"),
                pending_bytes=_int(m.get("PendingReplicationSize")),
                successful=_int(m.get("SuccessfulReplicationCount")),
                missed=_int(m.get("MissedReplicationCount")), errors=_int(m.get("ReplicationErrors")),
                details=tuple(_str(d) for d in _list(m.get("ReplicationHealthDetails")))))
        points = []
        for p in _list(answer.get("points")):
            p = _obj(p, "recovery point")
            kind = enum_name(p.get("SnapshotType"), _SNAP_NAMES, "SnapshotType")
            created = parse_date(p.get("CreationTime"))
            if created is None or kind not in ("Replica", "AppConsistentReplica"):
                continue
            points.append(RecoveryPoint(id=_str(p.get("Id")) or _str(p.get("Name")), vm=name, created_at=created,
                                        consistency="app" if kind == "AppConsistentReplica" else "crash"))
        nics = []
        for n in _list(answer.get("nics")):
            n = _obj(n, "network adapter")
            dns = tuple(x for x in (_str(n.get("FailoverIPv4PreferredDNSServer")),
                                    _str(n.get("FailoverIPv4AlternateDNSServer"))) if x)
            nics.append(NicState(name=_str(n.get("Name")), switch=_str(n.get("SwitchName")),
                                 test_switch=_str(n.get("TestReplicaSwitchName")),
                                 ip=_str(n.get("FailoverIPv4Address")), mask=_str(n.get("FailoverIPv4SubnetMask")),
                                 gateway=_str(n.get("FailoverIPv4DefaultGateway")), dns=dns))
        return VMState(name=name, power=power, relationships=tuple(rels), measures=tuple(measures),
                       points=tuple(sorted(points, key=lambda x: x.created_at)), nics=tuple(nics))
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        raise OutputError(f"cannot read the host's answer: {exc}", error_id="UnexpectedOutput",
                          hint="check the Hyper-V module version on the host; report it with the answer") from None


def parse_server_state(answer: dict[str, Any]) -> ServerState:
    try:
        s = _obj(answer.get("server"), "server")
        entries = []
        for e in _list(answer.get("entries")):
            e = _obj(e, "authorization entry")
            entries.append((_str(e.get("AllowedPrimaryServer")), _str(e.get("ReplicaStorageLocation")),
                            _str(e.get("TrustGroup"))))
        return ServerState(enabled=_bool(s.get("ReplicationEnabled")),
                           auth=enum_name(s.get("AllowedAuthenticationType", 1), _AUTH_NAMES, "auth"),
                           kerberos_port=_int(s.get("KerberosAuthenticationPort")),
                           certificate_port=_int(s.get("CertificateAuthenticationPort")),
                           thumbprint=_str(s.get("CertificateThumbprint")),
                           any_server=_bool(s.get("ReplicationAllowedFromAnyServer")),
                           storage=_str(s.get("DefaultStorageLocation")), entries=tuple(entries))
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


def _mask(prefix: int) -> str:
    return str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)


class HyperVFabric:
    """Hyper-V Replica over SSH. Standalone hosts and Replica Broker client access points alike:
    a broker is addressed by its client access point name, which is what primaries replicate to."""

    kind = "hyperv"

    def __init__(self, context: FabricContext | None = None) -> None:
        self.context = context or FabricContext()
        self.timeout = float(self.context.options.get("timeout", 120.0))
        self._clients: dict[str, paramiko.SSHClient] = {}
        self._lock = threading.Lock()
        self.connect: Callable[[Host], paramiko.SSHClient] = lambda h: ssh.connect(h, self.context.secrets)

    # ---- transport ---------------------------------------------------------------------------
    def _client(self, host: Host) -> paramiko.SSHClient:
        key = host.model_dump_json()  # a different pinned key or credential is a different connection
        with self._lock:
            c = self._clients.get(key)
            t = c.get_transport() if c is not None else None
            if c is not None and t is not None and t.is_active():
                return c
            if c is not None:
                c.close()
            c = self.connect(host)
            self._clients[key] = c
            return c

    def _drop(self, host: Host) -> None:
        key = host.model_dump_json()
        with self._lock:
            c = self._clients.pop(key, None)
        if c is not None:
            c.close()

    def run(self, host: Host, lines: list[str], operation: str, vm: str | None = None) -> dict[str, Any]:
        """Run one script on `host` and return its JSON answer; errors carry vm, host and operation."""
        command = encode(script(lines))
        ctx = {"vm": vm, "host": host.name, "operation": operation}
        try:
            transport = self._client(host).get_transport()
            if transport is None:
                raise paramiko.SSHException("no transport")
            chan = transport.open_session(timeout=self.timeout)
            try:
                chan.settimeout(self.timeout)
                chan.exec_command(command)
                out, err = bytearray(), bytearray()
                while True:
                    data = chan.recv(65536)
                    if not data:
                        break
                    out += data
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                status = chan.recv_exit_status() if chan.exit_status_ready() or not chan.closed else -1
            finally:
                chan.close()
        except SiteRecoveryError as exc:
            if isinstance(exc, FabricError | HostKeyError) and exc.operation is None:
                raise type(exc)(exc.message.split(" [")[0], vm=vm, host=host.name, operation=operation,
                                hint=exc.hint, error_id=exc.error_id) from None
            raise
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self._drop(host)
            raise ConnectionFailed(f"SSH session to {host.name} failed: {exc or type(exc).__name__}",
                                   hint="check the host and the network, then re-run (transient)", **ctx) from None
        if status == -1:
            self._drop(host)
            raise ConnectionFailed("the connection closed before the script finished", error_id="ConnectionLost",
                                   hint="check the host; re-run the step (it is idempotent)", **ctx)
        try:
            return decode_answer(out.decode("utf-8", "replace"), status)
        except FabricError as exc:
            raise type(exc)(exc.message.split(" [")[0].split(" (error id")[0], hint=exc.hint,
                            error_id=exc.error_id, **ctx) from None

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()

    # ---- reading state -----------------------------------------------------------------------
    def vm_state(self, host: Host, vm: str, operation: str = "read_state") -> VMState:
        answer = self.run(host, [*find("vm", vm), f"Out-SrState $vm | {EMIT}"], operation, vm)
        return self._parsed(parse_vm_state, answer, host, vm, operation)

    def _act(self, host: Host, vm: str, operation: str, lines: list[str], var: str = "vm") -> VMState:
        """Resolve the VM, run `lines`, and answer the VM's state afterwards."""
        answer = self.run(host, [*find(var, vm), *lines, f"Out-SrState ${var} | {EMIT}"], operation, vm)
        return self._parsed(parse_vm_state, answer, host, vm, operation)

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
        cur = self._parsed(parse_server_state, self.run(host, [f"Out-SrServer | {EMIT}"], op), host, None, op)
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
        if not lines:
            return ReplicaServerResult(host=host.name, changed=False, message="replica server already configured")
        self.run(host, [*lines, f"Out-SrServer | {EMIT}"], op)
        return ReplicaServerResult(host=host.name, changed=True, message="replica server configured",
                                   commands=tuple(lines))

    # ---- protection --------------------------------------------------------------------------
    def _enable_params(self, policy: ReplicationPolicy, target: Host) -> dict[str, Any]:
        rs = target.replica_server
        cert = policy.authentication == "certificate"
        params: dict[str, Any] = {
            "ReplicaServerName": _server_name(target),
            "ReplicaServerPort": rs.port if rs is not None else (443 if cert else 80),
            "AuthenticationType": "Certificate" if cert else "Kerberos",
            "CertificateThumbprint": policy.certificate_thumbprint if cert else None,
            "ReplicationFrequencySec": policy.copy_frequency_seconds,
            "RecoveryHistory": policy.recovery_history_hours,
            "VSSSnapshotFrequencyHour": policy.app_consistent_frequency_hours,
            "CompressionEnabled": policy.compression,
        }
        return params

    def enable_replication(self, p: Placement) -> OpResult:
        t0, op = utcnow(), "enable_replication"
        st = self.vm_state(p.source, p.vm, op)
        if st.simple is not None:
            if st.mode == "Primary" and st.simple.replica.lower() == _server_name(p.target).lower():
                return result(p, op, False, S(st.state), "replication already enabled", t0, host=p.source.name)
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
                                                **self._enable_params(p.policy, p.target))])
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
            st = self._act(p.source, p.vm, op, [cmd("Start-VMInitialReplication", VM=Var("vm"), **params)])
            changed = True
        elif st.state != S.InitialReplicationInProgress.value:
            # Wrong state or mode: let Hyper-V refuse with its documented error.
            self._act(p.source, p.vm, op, [cmd("Start-VMInitialReplication", VM=Var("vm"))])
        if init.method == "offline":
            rst = self.vm_state(p.target, p.vm, op)
            if rst.state == S.WaitingForInitialReplication.value:
                self._act(p.target, p.vm, op, [cmd("Import-VMInitialReplication", VM=Var("vm"),
                                                   Path=init.import_path)])
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
                lines += [cmd("Stop-VM", VM=Var("vm"), TurnOff=SWITCH, Force=SWITCH)] if st.power != "Off" else []
                lines.append(cmd("Remove-VM", VM=Var("vm"), Force=SWITCH))
                self.run(host, [*find("vm", p.vm), *lines, f"Out-SrOk | {EMIT}"], op, p.vm)
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
        test_active = bool(rel and rel.test_vm)
        try:
            # Test failovers live on the replica: only its Get-VMReplication names the test VM.
            rst = self.vm_state(p.target, p.vm, "replication_health")
            test_active = test_active or bool(rst.simple and rst.simple.test_vm)
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
        if point.kind == "latest":
            return [], (st.points[-1] if st.points else None)
        if point.kind == "latest_processed":
            chosen = next((x for x in reversed(st.points) if x.consistency == "crash"), None) or \
                (st.points[-1] if st.points else None)
        else:
            chosen = point.choose(st.points)
        if chosen is None:
            raise NotFoundError(f"no recovery point matches {point.kind}"
                                + (f" at {point.at.isoformat()}" if point.at else ""),
                                vm=p.vm, host=host.name, operation=operation, error_id="NoRecoveryPoint",
                                hint="list the points (siterecovery points) and choose one that exists")
        return find("snap", chosen.id, "Get-VMSnapshot -VM $vm", "recovery point", prop="Id"), chosen

    def test_failover(self, p: Placement, point: PointChoice = LATEST, network: str | None = None) -> OpResult:
        t0, op = utcnow(), "test_failover"
        st = self.vm_state(p.target, p.vm, op)
        if st.simple is not None and st.simple.test_vm:
            return result(p, op, False, S(st.state), f"test VM {st.simple.test_vm!r} already exists", t0)
        lines, chosen = self._point_lines(p, p.target, st, point, op)
        switch = network or p.test_network
        if switch:
            lines.insert(0, "Get-VMNetworkAdapter -VM $vm | " + cmd("Set-VMNetworkAdapter",
                                                                     TestReplicaSwitchName=switch))
        if point.kind == "latest":
            lines.append(cmd("Start-VMFailover", VM=Var("vm"), AsTest=SWITCH, Confirm=NO_CONFIRM))
        else:
            lines.append(cmd("Start-VMFailover", VMRecoverySnapshot=Var("snap"), AsTest=SWITCH, Confirm=NO_CONFIRM))
        st = self._act(p.target, p.vm, op, lines)
        test_vm = st.simple.test_vm if st.simple else ""
        return result(p, op, True, S(st.state), f"test VM {test_vm!r} created", t0, point=chosen,
                      details={"test_vm": test_vm, "network": switch})

    def cleanup_test_failover(self, p: Placement) -> OpResult:
        t0, op = utcnow(), "cleanup_test_failover"
        st = self.vm_state(p.target, p.vm, op)
        if st.simple is None or not st.simple.test_vm:
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
        lines = [cmd("Stop-VM", VM=Var("vm"))] if st.power != "Off" and ready else []
        lines.append(cmd("Start-VMFailover", VM=Var("vm"), Prepare=SWITCH, Confirm=NO_CONFIRM))
        st = self._act(p.source, p.vm, op, lines)
        return result(p, op, True, S(st.state), "primary shut down, pending changes sent", t0, host=p.source.name)

    def failover(self, p: Placement, point: PointChoice = LATEST) -> OpResult:
        """Replica side (planned or unplanned): Start-VMFailover [-VMRecoverySnapshot]. The VM is not started."""
        t0, op = utcnow(), "failover"
        st = self.vm_state(p.target, p.vm, op)
        if st.state in (S.FailedOverWaitingCompletion.value, S.FailedOver.value):
            return result(p, op, False, S(st.state), "already failed over", t0)
        lines, chosen = self._point_lines(p, p.target, st, point, op)
        if point.kind == "latest":
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
                st = self._act(p.target, p.vm, op, [cmd("Start-VMInitialReplication", VM=Var("vm"))])
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
        st = self._act(p.target, p.vm, op, [cmd("Set-VMReplication", VM=Var("vm"), Reverse=SWITCH,
                                                ReplicaServerName=old),
                                            cmd("Start-VMInitialReplication", VM=Var("vm"))])
        return result(p, op, True, S(st.state),
                      f"now replicating {p.target.name} -> {p.source.name} (block-compare resync)", t0)

    def start_vm(self, p: Placement, side: Side = "target", test: bool = False) -> OpResult:
        t0, op = utcnow(), "start_vm"
        host = p.target if side == "target" else p.source
        name = p.vm
        if test:
            st = self.vm_state(host, p.vm, op)
            if st.simple is None or not st.simple.test_vm:
                raise self._invalid(p, host, op, st, "a test failover (no test VM exists)")
            name = st.simple.test_vm
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
        st = self._act(host, p.vm, op, [cmd("Stop-VM", VM=Var("vm"))])
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
                lines += find(var, n.nic, "Get-VMNetworkAdapter -VM $vm", "network adapter") + nic_lines
        if not lines:
            return result(p, op, False, S(st.state), "network settings already applied", t0)
        st = self._act(p.target, p.vm, op, lines)
        return result(p, op, True, S(st.state), f"{len(p.nics)} network adapter(s) configured", t0,
                      details={"commands": len(lines)})

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
        st = self._act(p.target, p.vm, op, [cmd("Remove-VMReplication", VM=Var("vm"),
                                                ReplicationRelationshipType="Extended")])
        return result(p, op, True, S(st.state), "extended relationship removed", t0)
