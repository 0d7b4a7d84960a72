"""A Hyper-V host simulator behind a real SSH server (paramiko server mode), for tests and dry runs.

Several simulated hosts live in one process and see each other by name; an SSH login's user name picks
the host. The simulator decodes the driver's -EncodedCommand scripts, parses them with the strict
grammar of docs/HYPERV.md, and runs the Hyper-V Replica state machine of
shared/reference/hyperv-replica.md, answering the same error identifiers. Behaviours the reference marks
unverified are listed in docs/HYPERV.md and tagged `# guess` here.
"""

from __future__ import annotations

import base64
import fnmatch
import io
import ipaddress
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ..fabric.hyperv import BOOTSTRAP, EPILOGUE, PROLOGUE
from .hyperv_syntax import COMMON, BindError, bind, load_table

SYNTAX = load_table()
# The Windows firewall rules seed 003 names for a replica server (HTTP for Kerberos, HTTPS for certificates).
FIREWALL_RULES = ("Hyper-V Replica HTTP Listener (TCP-In)", "Hyper-V Replica HTTPS Listener (TCP-In)")

HV = "Microsoft.HyperV.PowerShell.Commands."
STATES = ["Disabled", "ReadyForInitialReplication", "InitialReplicationInProgress", "WaitingForInitialReplication",
          "Replicating", "PreparedForFailover", "FailedOverWaitingCompletion", "FailedOver", "Suspended", "Error",
          "WaitingForStartResynchronize", "Resynchronizing", "ResynchronizeSuspended", "RecoveryInProgress",
          "FailbackInProgress", "FailbackComplete", "WaitingForUpdateCompletion", "UpdateError",
          "WaitingForRepurposeCompletion", "PreparedForSyncReplication", "PreparedForGroupReverseReplication",
          "FiredrillInProgress"]
HEALTH = ["NotApplicable", "Normal", "Warning", "Critical"]
MODES = ["None", "Primary", "Replica", "TestReplica", "ExtendedReplica"]
RELS = ["Simple", "Extended"]
AUTH = {"Kerberos": 1, "Certificate": 2, "CertificateAndKerberos": 3}
SNAPTYPES = {"Standard": 0, "Recovery": 1, "Planned": 2, "Missing": 5, "Replica": 6, "AppConsistentReplica": 7,
             "SyncedReplica": 8}
VMSTATES = {"Other": 1, "Running": 2, "Off": 3, "Stopping": 4, "Saved": 6, "Paused": 9, "Starting": 10, "Reset": 11,
            "Saving": 32773, "Pausing": 32776, "Resuming": 32777, "FastSaved": 32779, "FastSaving": 32780,
            "ForceShutdown": 32781, "ForceReboot": 32782, "Hibernated": 32783, "ComponentServicing": 32784,
            "RunningCritical": 32785, "OffCritical": 32786, "StoppingCritical": 32787, "SavedCritical": 32788,
            "PausedCritical": 32789, "StartingCritical": 32790, "ResetCritical": 32791, "SavingCritical": 32792,
            "PausingCritical": 32793, "ResumingCritical": 32794, "FastSavedCritical": 32795,
            "FastSavingCritical": 32796}
INVALID_STATE_TEXT = ("Could not change the replication state. Virtual machine is not in a valid replication "
                      "state to perform the operation.")


class PSError(Exception):
    """A PowerShell error record: what the epilogue's catch block would serialise."""

    def __init__(self, error_id: str, cmdlet: str | None, category: str, message: str) -> None:
        super().__init__(message)
        self.fqid = error_id if (cmdlet is None or "," in error_id) else f"{error_id},{HV}{cmdlet.replace('-', '')}"
        self.category = category
        self.message = message


class GrammarError(Exception):
    """The script is outside the grammar the driver promises to emit."""


def invalid_state(cmdlet: str, vm: SimVM, extra: str = "") -> PSError:
    return PSError("InvalidState", cmdlet, "InvalidOperation",
                   f"{INVALID_STATE_TEXT} (OperationFailed_InvalidReplicationState: '{vm.name}' is "
                   f"{vm.mode}/{vm.state}{'; ' + extra if extra else ''})")


def bad_mode(cmdlet: str, vm: SimVM) -> PSError:
    mode = {"ExtendedReplica": "Replica"}.get(vm.mode, vm.mode)
    return PSError("OperationFailed", cmdlet, "InvalidOperation",
                   f"The operation is not applicable on a {vm.mode} virtual machine '{vm.name}'. "
                   f"(VMReplication_ActionNotApplicableOn{mode})")


# ---- the estate -----------------------------------------------------------------------------------
@dataclass
class Snapshot:
    id: str
    name: str
    type: str
    created: datetime
    vm_id: str
    host: str


@dataclass
class Nic:
    name: str
    vm: SimVM
    switch: str = ""
    test_switch: str = ""
    ip: str = ""
    mask: str = ""
    gateway: str = ""
    dns1: str = ""
    dns2: str = ""


@dataclass
class Rel:
    """One replication relationship as seen from one side."""

    mode: str
    state: str
    primary: str
    replica: str
    rtype: str = "Simple"
    health: str = "Normal"
    port: int = 80
    auth: str = "Kerberos"
    thumbprint: str = ""
    frequency: int = 300
    history: int = 0
    vss: int = 0
    compression: bool = True
    last_replication: datetime | None = None
    successful: int = 0
    missed: int = 0
    errors: int = 0
    details: list[str] = field(default_factory=list)
    scheduled_at: datetime | None = None
    scheduled_resync: datetime | None = None
    export_path: str = ""


@dataclass(eq=False)
class SimVM:
    name: str
    host: str
    id: str
    power: str = "Off"
    rel: Rel | None = None
    ext: Rel | None = None
    points: list[Snapshot] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)
    test_vm: str = ""
    is_test: bool = False
    failover_point: str = ""
    last_test_failover: datetime | None = None
    locked: bool = False  # a guest session is locked: Stop-VM without -Force prompts
    disks: list[str] = field(default_factory=list)  # VHD paths
    excluded: list[str] = field(default_factory=list)  # VHD paths not replicated (-ExcludedVhdPath)

    @property
    def mode(self) -> str:
        if self.is_test:
            return "TestReplica"
        return self.rel.mode if self.rel else "None"

    @property
    def state(self) -> str:
        return self.rel.state if self.rel else "Disabled"


@dataclass
class SimHost:
    name: str
    vms: list[SimVM] = field(default_factory=list)
    switches: set[str] = field(default_factory=set)
    server: dict[str, Any] = field(default_factory=lambda: {
        "ReplicationEnabled": False, "AllowedAuthenticationType": "Kerberos", "KerberosAuthenticationPort": 80,
        "CertificateAuthenticationPort": 443, "CertificateThumbprint": "", "ReplicationAllowedFromAnyServer": False,
        "DefaultStorageLocation": ""})
    entries: list[dict[str, str]] = field(default_factory=list)
    down: bool = False
    nodes: list[str] = field(default_factory=list)  # a Replica Broker's cluster nodes
    shell: str = "cmd"  # the OpenSSH DefaultShell: "cmd" (Windows' default) or "powershell"
    firewall: set[str] = field(default_factory=set)  # enabled inbound rules (display names)
    files: set[str] = field(default_factory=set)  # virtual disk files on this host
    broker: str = ""  # the broker a node belongs to
    owner: str = ""  # a broker: the node that owns its client access point now (default: the first)


@dataclass(frozen=True)
class LogEntry:
    """One cmdlet the simulator ran: its host, name, bound arguments (VMs by name) and source text."""

    host: str
    cmdlet: str
    args: tuple[tuple[str, Any], ...]
    line: str
    ok: bool = True

    def render(self) -> str:
        parts = [self.cmdlet]
        for k, v in self.args:
            if k.startswith("#"):
                parts.append(_show(v))
            elif v is True:
                parts.append(f"-{k}")
            elif v is False:
                parts.append(f"-{k}:$false")
            else:
                parts.append(f"-{k} {_show(v)}")
        return " ".join(parts)


def _show(v: Any) -> str:
    if isinstance(v, SimVM | Nic):
        return v.name
    if isinstance(v, Snapshot):
        return v.name
    if isinstance(v, list):
        return ",".join(_show(x) for x in v)
    return str(v)


READ_ONLY = {"Get-VM", "Get-VMSnapshot", "Get-VMNetworkAdapter", "Get-VMReplication", "Measure-VMReplication",
             "Get-VMReplicationServer", "Get-VMReplicationAuthorizationEntry", "Where-Object", "Select-Object",
             "ConvertTo-Json", "Get-VMNetworkAdapterFailoverConfiguration", "Wait-Job", "Receive-Job"}


class ShellError(Exception):
    """The default shell refused the exec request before PowerShell ran: what it printed, its status."""

    def __init__(self, output: str, status: int) -> None:
        super().__init__(output)
        self.output, self.status = output, status


def _compare(left: Any, op: str, right: Any) -> bool:
    """PowerShell's -eq/-ne/-gt/...: the right side converts to the left side's type; strings compare
    case-insensitively unless the operator starts with c."""
    if isinstance(left, list):  # a collection on the left filters
        return any(_compare(x, op, right) for x in left) if op in ("eq", "ceq") else \
            all(_compare(x, op, right) for x in left)
    if isinstance(left, EnumVal):
        left = left.name
    if isinstance(right, EnumVal):
        right = right.name
    if isinstance(left, int) and not isinstance(left, bool) and isinstance(right, str):
        try:
            right = int(right)
        except ValueError:
            return op in ("ne", "cne")
    if left is None or right is None:
        eq = left is None and right is None
    elif isinstance(left, str) or isinstance(right, str):
        a, b = str(left), str(right)
        if not op.startswith("c"):
            a, b = a.lower(), b.lower()
        eq = a == b
        if op in ("gt", "lt", "ge", "le"):
            return {"gt": a > b, "lt": a < b, "ge": a >= b, "le": a <= b}[op]
    else:
        eq = left == right
        if op in ("gt", "lt", "ge", "le"):
            return {"gt": left > right, "lt": left < right, "ge": left >= right, "le": left <= right}[op]
    if op in ("gt", "lt"):
        return False
    if op in ("ge", "le"):
        return eq
    return eq if op in ("eq", "ceq") else not eq


# ---- the script grammar ---------------------------------------------------------------------------
QUOTES = "'\u2018\u2019\u201a\u201b"
DASHES = "-\u2013\u2014\u2015"


@dataclass(frozen=True)
class Tok:
    kind: str  # LIT VAR PARAM WORD INT PIPE EQ NL COMMA LPAREN RPAREN LBRACE RBRACE ARRAY
    text: str
    colon: bool = False
    member: str = ""  # $x.Count: the property read


_PARAM_RE = re.compile(rf"[{DASHES}]([A-Za-z][A-Za-z0-9]*)(:?)")
_VAR_RE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z][A-Za-z0-9]*))?")
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z][A-Za-z0-9]*)*")
_INT_RE = re.compile(r"\d+")
_PUNCT = {",": "COMMA", "(": "LPAREN", ")": "RPAREN", "{": "LBRACE", "}": "RBRACE", "|": "PIPE", "=": "EQ"}


def tokenize(body: str) -> list[Tok]:
    """PowerShell's tokenizer rules for the subset the grammar allows; anything else is an error."""
    toks: list[Tok] = []
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c in " \t":
            i += 1
        elif c == "\r" and body[i + 1:i + 2] == "\n" or c == "\n":
            i += 2 if c == "\r" else 1
            toks.append(Tok("NL", "\n"))
        elif c in QUOTES:
            # As PowerShell's ScanStringLiteral: a quote followed by any quote is one literal quote.
            i += 1
            out = []
            while True:
                if i >= n:
                    raise GrammarError("unterminated string literal")
                ch = body[i]
                if ch in QUOTES:
                    if i + 1 < n and body[i + 1] in QUOTES:
                        out.append(body[i + 1])
                        i += 2
                        continue
                    i += 1
                    break
                out.append(ch)
                i += 1
            toks.append(Tok("LIT", "".join(out)))
        elif c == "$":
            m = _VAR_RE.match(body, i)
            if not m:
                raise GrammarError(f"bad variable at {body[i:i + 20]!r}")
            toks.append(Tok("VAR", m.group(1), member=m.group(2) or ""))
            i = m.end()
        elif c == "@" and body[i + 1:i + 2] == "(":
            toks.append(Tok("ARRAY", "@("))
            i += 2
        elif c in DASHES:
            m = _PARAM_RE.match(body, i)
            if not m:
                raise GrammarError(f"bad parameter at {body[i:i + 20]!r}")
            toks.append(Tok("PARAM", m.group(1), colon=bool(m.group(2))))
            i = m.end()
        elif c in _PUNCT:
            toks.append(Tok(_PUNCT[c], c))
            i += 1
        elif c.isdigit():
            m = _INT_RE.match(body, i)
            assert m is not None
            toks.append(Tok("INT", m.group(0)))
            i = m.end()
        elif c.isascii() and c.isalpha():
            m = _WORD_RE.match(body, i)
            assert m is not None
            toks.append(Tok("WORD", m.group(0)))
            i = m.end()
        else:
            raise GrammarError(f"character {c!r} outside a literal at {body[max(0, i - 20):i + 20]!r}")
    return toks


@dataclass
class Command:
    name: str
    args: list[Tok]


@dataclass
class Statement:
    """`[$x = ] [@(] pipeline [)]`, a bare literal (written out), or `if (a -op b) { throw 'text' }`."""

    target: str | None
    pipeline: list[Command]
    text: str
    head: Tok | None = None  # a pipeline that starts with a variable: `$vm | Select-Object ...`
    array: bool = False  # wrapped in @( ... )
    literal: str | None = None
    condition: tuple[Tok, str, Tok] | None = None
    throw: str = ""


COMPARE = ("eq", "ne", "gt", "lt", "ge", "le", "ceq", "cne")


def parse_script(text: str) -> list[Statement]:
    if not text.startswith(PROLOGUE) or not text.endswith(EPILOGUE):
        raise GrammarError("the script does not carry the driver's fixed prologue and epilogue")
    body = text[len(PROLOGUE):len(text) - len(EPILOGUE)]
    toks = tokenize(body)
    stmts: list[Statement] = []
    cur: list[Tok] = []
    for t in [*toks, Tok("NL", "\n")]:
        if t.kind != "NL":
            cur.append(t)
            continue
        if cur:
            stmts.append(_statement(cur))
        cur = []
    return stmts


def _statement(cur: list[Tok]) -> Statement:
    if len(cur) == 1 and cur[0].kind == "LIT":
        return Statement(None, [], cur[0].text, literal=cur[0].text)
    if cur[0].kind == "WORD" and cur[0].text.lower() == "if":
        shape = [t.kind for t in cur]
        if shape != ["WORD", "LPAREN", shape[2], "PARAM", shape[4], "RPAREN", "LBRACE", "WORD", "LIT", "RBRACE"] \
                or cur[3].text.lower() not in COMPARE or cur[7].text.lower() != "throw":
            raise GrammarError("if takes: if (<value> -op <value>) { throw '<text>' }")
        return Statement(None, [], "if", condition=(cur[2], cur[3].text.lower(), cur[4]), throw=cur[8].text)
    target = None
    if len(cur) >= 2 and cur[0].kind == "VAR" and not cur[0].member and cur[1].kind == "EQ":
        target, cur = cur[0].text, cur[2:]
    array = bool(cur) and cur[0].kind == "ARRAY"
    if array:
        if cur[-1].kind != "RPAREN":
            raise GrammarError("@( without its closing )")
        cur = cur[1:-1]
    head = None
    if cur and cur[0].kind == "VAR":
        head, cur = cur[0], cur[1:]
        if cur and cur[0].kind != "PIPE":
            raise GrammarError("a variable may only start a pipeline")
        cur = cur[1:]
    pipeline: list[Command] = []
    segment: list[Tok] = []
    for u in [*cur, Tok("PIPE", "|")] if cur else []:
        if u.kind == "PIPE":
            if not segment or segment[0].kind != "WORD" or "-" not in segment[0].text:
                raise GrammarError(f"expected a cmdlet name, got {segment[0].text if segment else 'nothing'!r}")
            if any(s.kind in ("EQ", "LPAREN", "RPAREN", "LBRACE", "RBRACE", "ARRAY") for s in segment):
                raise GrammarError(f"unexpected punctuation in {segment[0].text}")
            pipeline.append(Command(segment[0].text, segment[1:]))
            segment = []
        else:
            segment.append(u)
    if not pipeline and head is None:
        raise GrammarError("empty statement")
    return Statement(target, pipeline, " | ".join(c.name for c in pipeline), head=head, array=array)


# ---- PowerShell values: enums, objects with documented properties ---------------------------------
@dataclass(frozen=True)
class EnumVal:
    """An enum value: ConvertTo-Json writes its number; comparisons take its name."""

    name: str
    number: int

    def __str__(self) -> str:
        return self.name


@dataclass
class Job:
    """What -AsJob returns: State NotStarted/Running/Completed/Failed; the error a failed one holds."""

    id: int
    name: str
    state: str = "Running"
    error: PSError | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class ReplObj:
    """A VMReplication object (Get-VMReplication): one relationship of one VM."""

    vm: SimVM
    rel: Rel


@dataclass(frozen=True)
class MeasureObj:
    vm: SimVM
    rel: Rel


@dataclass(frozen=True)
class FailoverCfg:
    nic: Nic


@dataclass(frozen=True)
class ServerObj:
    host: SimHost


@dataclass(frozen=True)
class EntryObj:
    entry: dict[str, str]


# ---- cmdlet signatures ----------------------------------------------------------------------------
@dataclass(frozen=True)
class P:
    kind: str  # vm snapshot nic repl job str int bool switch datetime enum any list
    lo: int | None = None
    hi: int | None = None
    values: tuple[str, ...] = ()
    position: int | None = None
    pipeline: bool = False


# Hyper-V cmdlets bind against the documented parameter sets (hyperv_syntax.json). These core
# PowerShell cmdlets are outside that file; the simulator models the parts the driver uses.  # guess
CORE: dict[str, dict[str, P]] = {
    "Where-Object": {"Property": P("str", position=0), "Value": P("any", position=1), "CEQ": P("switch"),
                     "EQ": P("switch"), "InputObject": P("any", pipeline=True)},
    "Select-Object": {"Property": P("list", position=0), "Last": P("int", 0), "First": P("int", 0),
                      "InputObject": P("any", pipeline=True)},
    "ConvertTo-Json": {"Depth": P("int", 0, 100), "Compress": P("switch"), "InputObject": P("any", pipeline=True)},
    "Wait-Job": {"Job": P("job", position=0, pipeline=True), "Timeout": P("int", -1, 2**31 - 1)},
    "Receive-Job": {"Job": P("job", position=0, pipeline=True)},
    "Enable-NetFirewallRule": {"DisplayName": P("list")},
    "Get-NetFirewallRule": {"DisplayName": P("list")},
    "Get-VMHardDiskDrive": {"VM": P("vm")},
    "Get-ClusterNode": {},
    "Remove-Item": {"LiteralPath": P("list")},
}
COMMON_PARAMS = {"ErrorAction": P("enum", values=("Stop", "Continue", "SilentlyContinue", "Ignore"))}

# Ranges the reference gives for Hyper-V parameters (the syntax file has names and types only).
RANGES: dict[str, tuple[int, int]] = {"RecoveryHistory": (0, 24), "VSSSnapshotFrequencyHour": (1, 12),
                                      "ReplicaServerPort": (1, 65535), "KerberosAuthenticationPort": (1, 65535),
                                      "CertificateAuthenticationPort": (1, 65535)}
ENUMS: dict[str, tuple[str, ...]] = {
    "ReplicationAuthenticationType": ("Kerberos", "Certificate"),
    "RecoveryAuthenticationType": ("Kerberos", "Certificate", "CertificateAndKerberos"),
    "VMReplicationRelationshipType": tuple(RELS), "SnapshotType": tuple(SNAPTYPES),
}


def kind_of(doc_type: str) -> P:
    """The simulator's converter for a documented parameter type."""
    t = doc_type.removesuffix("[]")
    if doc_type == "switch":
        return P("switch")
    if t in ("VirtualMachine", "VirtualMachineBase"):
        return P("vm")
    if t in ("VMNetworkAdapter", "VMNetworkAdapterBase"):
        return P("nic")
    if t == "VMSnapshot":
        return P("snapshot")
    if t == "VMReplication":
        return P("repl")
    if t in ("String",):
        return P("list") if doc_type.endswith("[]") else P("str")
    if t in ("Int32", "UInt32", "Int64"):
        return P("int")
    if t == "Boolean":
        return P("bool")
    if t == "DateTime":
        return P("datetime")
    if t in ENUMS:
        return P("enum", values=ENUMS[t])
    return P("any")


_OBJ_KIND = {"vm": "SimVM", "nic": "Nic", "snapshot": "Snapshot", "repl": "ReplObj", "job": "Job"}


def _object_kind(x: Any) -> str:
    return {SimVM: "vm", Nic: "nic", Snapshot: "snapshot", ReplObj: "repl", Job: "job"}.get(type(x), "")


def _wild(pattern: str, text: str) -> bool:
    """PowerShell wildcard matching (case-insensitive): what -VMName and -Name do."""
    return fnmatch.fnmatchcase(text.lower(), pattern.lower())


def _parse_dt(text: str) -> datetime:
    t = text.strip().replace("Z", "+00:00")
    t = re.sub(r"(\.\d{6})\d+", r"\1", t)
    d = datetime.fromisoformat(t)
    return d.replace(tzinfo=UTC) if d.tzinfo is None else d.astimezone(UTC)


def _ipv4(cmdlet: str, name: str, value: str) -> str:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise PSError("InvalidParameter", cmdlet, "InvalidArgument",
                      f"'{value}' is not a valid IPv4 value for {name}.") from None  # guess: text
    return value


# ---- the simulator --------------------------------------------------------------------------------
class HyperVSimulator:
    """Simulated Hyper-V hosts served over SSH on 127.0.0.1 (user name = host name)."""

    def __init__(self, enum_style: str = "number", date_style: str = "iso", shell: str = "cmd") -> None:
        self.hosts: dict[str, SimHost] = {}  # lower-case name -> host (DNS names are case-insensitive)
        self.lock = threading.RLock()
        self.entries: list[LogEntry] = []
        self.delays: dict[str, float] = {}  # cmdlet (or "*") -> seconds slept before it runs
        self.faults: list[dict[str, Any]] = []
        self.enum_style, self.date_style, self.shell = enum_style, date_style, shell
        self.jobs: list[Job] = []
        self.refused: list[tuple[str, str, str]] = []  # (host, call, FQID) PowerShell would not bind
        self._job_ids = 0
        self.hold_resync = False  # keep a resynchronization running until finish_resync()
        self.clock_offset = timedelta(0)
        self.exports: dict[str, str] = {}  # export path -> VM id
        self.scripts: list[tuple[str, str]] = []  # (host, decoded script) as received
        self.host_key, _ = generate_key()
        self.authorized: list[paramiko.PKey] = []
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._transports: list[paramiko.Transport] = []
        self._stop = threading.Event()
        self.port = 0

    # ---- estate set-up ---------------------------------------------------------------------
    def now(self) -> datetime:
        return datetime.now(UTC) + self.clock_offset

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.clock_offset += timedelta(seconds=seconds)

    def add_host(self, name: str, switches: tuple[str, ...] = ("LAN",), replica_server: bool = True,
                 any_server: bool = True, storage: str = "D:\\Replica") -> SimHost:
        h = SimHost(name=name, switches=set(switches), shell=self.shell)
        if replica_server:
            h.server.update(ReplicationEnabled=True, ReplicationAllowedFromAnyServer=any_server,
                            DefaultStorageLocation=storage)
            h.firewall.update(FIREWALL_RULES)
        self.hosts[name.lower()] = h
        return h

    def add_broker(self, name: str, nodes: list[str]) -> SimHost:
        """A Replica Broker client access point; replicas land on its nodes (which must exist)."""
        b = self.add_host(name, replica_server=True)
        b.nodes = list(nodes)
        for n in nodes:
            self.host(n).broker = name
        return b

    def add_vm(self, host: str, name: str, nics: tuple[tuple[str, str], ...] = (("eth0", "LAN"),),
               running: bool = True, vm_id: str | None = None, disks: tuple[str, ...] | None = None) -> SimVM:
        h = self.host(host)
        vm = SimVM(name=name, host=h.name, id=vm_id or str(uuid.uuid4()), power="Running" if running else "Off")
        vm.nics = [Nic(name=n, vm=vm, switch=s) for n, s in nics]
        vm.disks = list(disks) if disks is not None else [f"C:\\VMs\\{name}\\{name}.vhdx"]
        h.files.update(vm.disks)
        h.vms.append(vm)
        return vm

    def host(self, name: str) -> SimHost:
        return self.hosts[name.lower()]

    def vms_on(self, host: SimHost) -> list[SimVM]:
        if host.nodes:
            return [vm for n in host.nodes for vm in self.host(n).vms]
        return list(host.vms)

    def vm(self, host: str, name: str) -> SimVM:
        found = [v for v in self.vms_on(self.host(host)) if v.name == name]
        if len(found) != 1:
            raise KeyError(f"{len(found)} VMs named {name!r} on {host}")
        return found[0]

    def by_id(self, host: str, vm_id: str) -> SimVM | None:
        h = self.hosts.get(host.lower())
        if h is None:
            return None
        return next((v for v in self.vms_on(h) if v.id == vm_id and not v.is_test), None)

    def set_down(self, host: str, down: bool = True, crash: bool = False) -> None:
        """Make a host unreachable (new SSH sessions refused); `crash` also powers its VMs off."""
        with self.lock:
            h = self.host(host)
            h.down = down
            if crash:
                for v in h.vms:
                    v.power = "Off"

    # ---- knobs -----------------------------------------------------------------------------
    def inject(self, host: str, cmdlet: str, error_id: str, message: str = "injected failure",
               category: str = "NotSpecified", times: int = 1) -> None:
        """Make the next `times` runs of `cmdlet` on `host` fail with `error_id` (FQID if it has a comma)."""
        with self.lock:
            self.faults.append({"host": host.lower(), "cmdlet": cmdlet, "id": error_id, "message": message,
                                "category": category, "times": times})

    def replicate(self, host: str, name: str, cycles: int = 1, app_consistent: bool = False,
                  every: timedelta = timedelta(minutes=5)) -> None:
        """Run `cycles` replication cycles of primary VM `name` on `host`, back-dated `every` apart."""
        with self.lock:
            vm = self.vm(host, name)
            assert vm.rel and vm.rel.mode == "Primary" and vm.rel.state == "Replicating", "not replicating"
            replica = self.by_id(vm.rel.replica, vm.id)
            assert replica is not None and replica.rel is not None
            for i in range(cycles):
                when = self.now() - every * (cycles - 1 - i)
                self._add_point(replica, when, app_consistent and i == cycles - 1)
                for r in (vm.rel, replica.rel):
                    r.last_replication, r.successful = when, r.successful + 1

    def add_checkpoint(self, host: str, name: str) -> Snapshot:
        """A Standard checkpoint (not a recovery point): failing over to it must be refused."""
        with self.lock:
            vm = self.vm(host, name)
            snap = Snapshot(id=str(uuid.uuid4()), name=f"{vm.name} - checkpoint", type="Standard",
                            created=self.now(), vm_id=vm.id, host=vm.host)
            vm.points.append(snap)
            return snap

    def require_resync(self, host: str, name: str) -> None:
        """What Hyper-V does when change logs outgrow 50% of the disks: WaitingForStartResynchronize, Critical."""
        with self.lock:
            vm = self.vm(host, name)
            assert vm.rel is not None
            vm.rel.state, vm.rel.health = "WaitingForStartResynchronize", "Critical"
            vm.rel.details = [f"Resynchronization is required for the virtual machine {vm.name}. "
                              "Resume replication to start resynchronization."]

    def finish_resync(self, host: str, name: str) -> None:
        with self.lock:
            self._resync_done(self.vm(host, name))

    def log(self, host: str | None = None) -> list[LogEntry]:
        with self.lock:
            return [e for e in self.entries if host is None or e.host.lower() == host.lower()]

    def actions(self, host: str | None = None) -> list[str]:
        """The state-changing cmdlets run (on `host`), rendered with VMs by name: for sequence asserts."""
        return [e.render() for e in self.log(host) if e.cmdlet not in READ_ONLY and e.ok]

    def clear_log(self) -> None:
        with self.lock:
            self.entries.clear()
            self.scripts.clear()

    # ---- helpers for the state machine ------------------------------------------------------
    def _add_point(self, replica: SimVM, when: datetime, app: bool = False) -> Snapshot:
        # Names as Hyper-V shows them: "n - Standard Replica - (12/2/2013 - 7:08:59 AM)".
        kind = "AppConsistentReplica" if app else "Replica"
        label = "Application-consistent Replica" if app else "Standard Replica"  # guess: the app label
        stamp = when.strftime("%m/%d/%Y - %I:%M:%S %p").lstrip("0").replace("/0", "/").replace("- 0", "- ")
        while any(p.created == when for p in replica.points):
            when += timedelta(microseconds=1)
        snap = Snapshot(id=str(uuid.uuid4()), name=f"{replica.name} - {label} - ({stamp})", type=kind,
                        created=when, vm_id=replica.id, host=replica.host)
        replica.points.append(snap)
        replica.points.sort(key=lambda s: s.created)
        if replica.rel is not None:
            # Recovery history: without it only the newest point stays; with it, points of the last
            # `history` hours (simplified: Hyper-V keeps one per hour beyond the newest).
            if replica.rel.history == 0:
                replica.points = replica.points[-1:]
            else:
                horizon = replica.points[-1].created - timedelta(hours=replica.rel.history)
                replica.points = [p for p in replica.points if p.created >= horizon]
        return snap

    def _resync_done(self, vm: SimVM) -> None:
        assert vm.rel is not None
        vm.rel.state, vm.rel.health, vm.rel.details = "Replicating", "Normal", []
        vm.rel.scheduled_resync = None
        replica = self.by_id(vm.rel.replica, vm.id)
        if replica is not None and replica.rel is not None:
            replica.rel.state, replica.rel.health = "Replicating", "Normal"
            self._add_point(replica, self.now())

    def _complete_initial(self, primary: SimVM, rel: Rel, replica: SimVM | None) -> None:
        rel.state, rel.health, rel.scheduled_at = "Replicating", "Normal", None
        rel.last_replication = self.now()
        rel.successful += 1
        if replica is not None and replica.rel is not None:
            replica.rel.state, replica.rel.health = "Replicating", "Normal"
            replica.rel.last_replication = rel.last_replication
            replica.rel.successful += 1
            self._add_point(replica, self.now())

    def _settle(self) -> None:
        """Complete scheduled initial replications and resynchronizations whose time has come."""
        now = self.now()
        for h in self.hosts.values():
            for vm in h.vms:
                for rel in (vm.rel, vm.ext):
                    if rel and rel.scheduled_at and rel.scheduled_at <= now:
                        self._complete_initial(vm, rel, self.by_id(rel.replica, vm.id))
                if vm.rel and vm.rel.scheduled_resync and vm.rel.scheduled_resync <= now:
                    self._resync_done(vm)

    # ---- script execution ------------------------------------------------------------------
    def execute(self, host_name: str, command: str, stdin: str = "") -> tuple[bytes, int]:
        """Run one SSH exec request for `host_name` as the host's default shell would; (stdout, status)."""
        def error(fqid: str, category: str, message: str) -> tuple[bytes, int]:
            return json.dumps({"ok": False, "id": fqid, "category": category, "message": message}).encode(), 1

        host = self.host(host_name)
        try:
            text = self.shell_command(host, command, stdin)
        except ShellError as exc:
            return exc.output.encode("utf-8"), exc.status
        with self.lock:
            self.scripts.append((host_name, text))
        try:
            stmts = parse_script(text)
        except GrammarError as exc:
            return error("SimulatorParseError", "ParserError", str(exc))
        variables: dict[str, Any] = {}
        out: list[str] = []
        try:
            for st in stmts:
                if st.literal is not None:
                    out.append(st.literal)
                    continue
                if st.condition is not None:
                    left, op, right = st.condition
                    if _compare(self._operand(left, variables), op, self._operand(right, variables)):
                        # `throw 'text'`: a RuntimeException whose FullyQualifiedErrorId is the text itself.
                        raise PSError(st.throw, None, "OperationStopped", st.throw)
                    continue
                value: list[Any] | None = None
                if st.head is not None:
                    v = self._operand(st.head, variables)
                    # A variable holding an array enumerates into the pipeline; $null goes down as one item.
                    value = list(v) if isinstance(v, list) else [v]
                for c in st.pipeline:
                    value = self._run(host, c, value, variables)
                items = value or []
                if st.array:
                    result: Any = list(items)
                else:
                    result = None if not items else items[0] if len(items) == 1 else list(items)
                if st.target is not None:
                    if st.target.lower() != "null":
                        variables[st.target] = result
                else:
                    out += [v if isinstance(v, str) else type(v).__name__ for v in items]
        except PSError as exc:
            return self._encode_out("\n".join(out) + "\n" + json.dumps(
                {"ok": False, "id": exc.fqid, "category": exc.category, "message": exc.message}) + "\n", text), 1
        except GrammarError as exc:
            return error("SimulatorParseError", "ParserError", str(exc))
        return self._encode_out("\n".join(out) + "\n", text), 0

    def _encode_out(self, out: str, script: str) -> bytes:
        """Console output: UTF-8 only when the script set it, else the OEM code page (437 here)."""
        if script.startswith(PROLOGUE) and "[Console]::OutputEncoding = [System.Text.Encoding]::UTF8" in PROLOGUE:
            return out.encode("utf-8")
        return out.encode("cp437", "replace")  # guess: the console code page of an en-US server

    def shell_command(self, host: SimHost, command: str, stdin: str) -> str:
        """What the default shell makes of an exec request: the script PowerShell is asked to run.

        cmd.exe (Windows OpenSSH's default): `cmd.exe /c <command>`, at most 8,191 characters. PowerShell as
        DefaultShell: `powershell.exe -c "<command>"`. Either way the command must start powershell.exe with
        `-Command -` and the script arrives on stdin, ended by an empty line."""
        mode = host.shell
        if mode == "cmd" and len(command) > 8191:
            raise ShellError("The command line is too long.\r\n", 1)
        if mode == "cmd" and any(ch in command for ch in "&<>^%!") :
            raise ShellError("cmd.exe would interpret a special character in the command\r\n", 1)  # guess
        if mode == "powershell" and any(ch in command for ch in "$`\"'"):
            raise ShellError("the outer powershell would expand or re-quote the command\r\n", 1)  # guess
        words = command.split()
        if not words or words[0].lower() not in ("powershell", "powershell.exe"):
            first = words[0] if words else ""
            raise ShellError(f"'{first}' is not recognized as an internal or external command,\r\noperable program "
                             "or batch file.\r\n" if mode == "cmd" else
                             f"The term '{first}' is not recognized as the name of a cmdlet\r\n", 1)
        flags = [w.lower() for w in words[1:]]
        if flags[-2:] not in (["-command", "-"], ["-c", "-"]):
            raise ShellError("the simulator runs only `powershell.exe ... -Command -` (script on stdin)\r\n", 1)
        if "-nonInteractive".lower() not in flags or "-noprofile" not in flags:
            raise ShellError("the simulator expects -NoProfile -NonInteractive\r\n", 1)
        # PowerShell reads -Command - line by line; a multi-line block runs once an empty line ends it.  # guess
        text = stdin.replace("\r\n", "\n")
        if not text.endswith("\n\n"):
            raise ShellError("", 0)  # PowerShell is still waiting for the rest of the block: no output
        head, _, tail = BOOTSTRAP.partition("{}")
        if not (text.startswith(head) and text.endswith(tail)):
            raise ShellError(json.dumps({"ok": False, "id": "SimulatorParseError", "category": "ParserError",
                                         "message": "stdin is not the driver's one-line bootstrap"}) + "\n", 1)
        try:
            return base64.b64decode(text[len(head):len(text) - len(tail)], validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ShellError(json.dumps({"ok": False, "id": "SimulatorParseError", "category": "ParserError",
                                         "message": f"cannot decode the script: {exc}"}) + "\n", 1) from None

    def _operand(self, t: Tok, variables: dict[str, Any]) -> Any:
        if t.kind == "INT":
            return int(t.text)
        if t.kind == "LIT":
            return t.text
        if t.kind != "VAR":
            raise GrammarError(f"unexpected {t.text!r} in a condition")
        low = t.text.lower()
        if low in ("true", "false", "null"):
            v: Any = {"true": True, "false": False, "null": None}[low]
        elif t.text not in variables:
            raise GrammarError(f"variable ${t.text} used before assignment")
        else:
            v = variables[t.text]
        if not t.member:
            return v
        if t.member.lower() in ("count", "length") and not isinstance(v, str):
            # PowerShell 3+: every object has .Count; $null's is 0, one object's is 1.
            return 0 if v is None else len(v) if isinstance(v, list) else 1
        if isinstance(v, list):  # member enumeration
            return [self.props(x).get(t.member) for x in v]
        return None if v is None else self.props(v).get(t.member)

    def _run(self, host: SimHost, c: Command, piped: list[Any] | None, variables: dict[str, Any]) -> list[Any]:
        core = CORE.get(c.name)
        if core is None and c.name not in SYNTAX:
            raise PSError("CommandNotFoundException", None, "ObjectNotFound",
                          f"The term '{c.name}' is not recognized as the name of a cmdlet, function, script file, "
                          "or operable program.")
        try:
            args, kinds = self._bind(c, core, piped, variables)
        except PSError as exc:
            with self.lock:  # PowerShell refused the call itself: no cmdlet ran
                self.refused.append((host.name, c.name + "".join(f" {t.text}" for t in c.args), exc.fqid))
            raise
        silent = str(args.pop("ErrorAction", "")).lower() in ("silentlycontinue", "ignore")
        if args.get("AsJob") and c.name in SYNTAX:
            return [self._start_job(host, c, args, kinds)]
        delay = self.delays.get(c.name, self.delays.get("*", 0.0))
        if delay:
            time.sleep(delay)
        try:
            return self._call(host, c, args, kinds)
        except PSError:
            if silent:
                return []
            raise

    def _call(self, host: SimHost, c: Command, args: dict[str, Any], kinds: dict[str, P]) -> list[Any]:
        with self.lock:
            self._settle()
            # Values of [bool] parameters render as $true/$false so they read apart from switches.
            entry_args = tuple((k, ("$true" if v else "$false") if kinds[k].kind == "bool" else v)
                               for k, v in args.items() if k not in ("InputObject", "AsJob"))
            line = c.name + "".join(f" {t.text}" for t in c.args)
            for f in self.faults:
                if f["times"] > 0 and f["host"] == host.name.lower() and f["cmdlet"] == c.name:
                    f["times"] -= 1
                    self.entries.append(LogEntry(host.name, c.name, entry_args, line, ok=False))
                    raise PSError(f["id"], c.name, f["category"], f["message"])
            try:
                result = getattr(self, "_c_" + c.name.replace("-", "_"))(host, args)
            except PSError:
                self.entries.append(LogEntry(host.name, c.name, entry_args, line, ok=False))
                raise
            self.entries.append(LogEntry(host.name, c.name, entry_args, line))
            return result  # type: ignore[no-any-return]

    def _start_job(self, host: SimHost, c: Command, args: dict[str, Any], kinds: dict[str, P]) -> Job:
        """-AsJob: the cmdlet runs in the background (after its configured delay); the job reports it."""
        with self.lock:
            self._job_ids += 1
            job = Job(id=self._job_ids, name=f"Job{self._job_ids}")
            self.jobs.append(job)
        delay = self.delays.get(c.name, self.delays.get("*", 0.0))

        def work() -> None:
            if delay:
                self._stop.wait(delay)
            try:
                self._call(host, c, args, kinds)
                job.state = "Completed"
            except PSError as exc:
                job.state, job.error = "Failed", exc
            job.done.set()

        threading.Thread(target=work, name=f"hyperv-sim-{job.name}", daemon=True).start()
        return job

    def _c_Wait_Job(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        jobs: list[Job] = a["Job"]
        timeout = a.get("Timeout", -1)
        deadline = time.monotonic() + (timeout if timeout >= 0 else 10**9)
        self.lock.release()  # the jobs need the lock to finish
        try:
            for j in jobs:
                j.done.wait(max(0.0, deadline - time.monotonic()))
        finally:
            self.lock.acquire()
        # Wait-Job -Timeout: returns the jobs only when all finished; nothing on a timeout.
        return list(jobs) if all(j.done.is_set() for j in jobs) else []

    def _c_Receive_Job(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        for j in a["Job"]:
            if j.state == "Failed" and j.error is not None:
                raise j.error  # with -ErrorAction Stop in effect, a job's error is re-thrown  # guess: FQID kept
        return []

    def _c_Get_ClusterNode(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        cluster = self.host(host.broker) if host.broker else host
        if not cluster.nodes:
            raise PSError("ClusterServiceNotRunning,Microsoft.FailoverClusters.PowerShell.GetClusterNodeCommand",
                          None, "ConnectionError", "The cluster service is not running.")  # guess: id and text
        return [{"Name": n, "State": EnumVal("Up", 0)} for n in cluster.nodes]

    def _c_Get_VMHardDiskDrive(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        return [{"VMName": vm.name, "Path": path} for vm in self._targets(host, "Get-VMHardDiskDrive", a)
                for path in vm.disks]

    def _c_Remove_Item(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        for path in a["LiteralPath"]:
            node = next((h for h in [host, *(self.host(n) for n in host.nodes)] if path in h.files), None)
            if node is None:
                raise PSError("PathNotFound,Microsoft.PowerShell.Commands.RemoveItemCommand", None, "ObjectNotFound",
                              f"Cannot find path '{path}' because it does not exist.")
            node.files.discard(path)
        return []

    def _c_Get_NetFirewallRule(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        # Enabled is the GpoBoolean enum: True = 1, False = 2.  # guess: numbers as 5.1 writes them
        return [{"DisplayName": n, "Enabled": EnumVal("True", 1) if n in host.firewall else EnumVal("False", 2)}
                for n in a["DisplayName"] if n in FIREWALL_RULES]

    def _c_Enable_NetFirewallRule(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        for name in a["DisplayName"]:
            if name not in FIREWALL_RULES:
                raise PSError("CmdletizationQuery_NotFound_DisplayName,Enable-NetFirewallRule", None,
                              "ObjectNotFound", f'No MSFT_NetFirewallRule objects found with property '
                              f"'DisplayName' equal to '{name}'.")
            host.firewall.add(name)
        return []

    def _bind(self, c: Command, core: dict[str, P] | None, piped: list[Any] | None,
              variables: dict[str, Any]) -> tuple[dict[str, Any], dict[str, P]]:
        named: list[tuple[str, Any]] = []
        positional: list[Any] = []
        toks = list(c.args)
        i = 0
        is_switch = self._switches(c.name, core)

        def value_at(j: int) -> tuple[Any, int]:
            vals = [self._value(toks[j], variables)]
            j += 1
            while j + 1 < len(toks) and toks[j].kind == "COMMA":
                vals.append(self._value(toks[j + 1], variables))
                j += 2
            return (vals if len(vals) > 1 else vals[0]), j

        known = self._known(c.name, core)
        while i < len(toks):
            t = toks[i]
            if t.kind == "PARAM":
                if not known(t.text):
                    raise PSError("NamedParameterNotFound", c.name, "InvalidArgument",
                                  f"A parameter cannot be found that matches parameter name '{t.text}'.")
                if t.colon:
                    if i + 1 >= len(toks):
                        raise GrammarError(f"-{t.text}: needs a value")
                    v, i = value_at(i + 1)
                    named.append((t.text, v))
                elif is_switch(t.text):
                    named.append((t.text, True))
                    i += 1
                else:
                    if i + 1 >= len(toks) or toks[i + 1].kind == "PARAM":
                        raise PSError("MissingArgument", c.name, "InvalidArgument",
                                      f"Missing an argument for parameter '{t.text}'. Specify a parameter of type "
                                      "'System.String' and try again.")
                    v, i = value_at(i + 1)
                    named.append((t.text, v))
            elif t.kind == "COMMA":
                raise GrammarError("a comma outside an argument list")
            else:
                v, i = value_at(i)
                positional.append(v)
        if core is None:
            try:
                b = bind(SYNTAX, c.name, named, positional, piped is not None,
                         lambda ty: bool(piped) and all(_object_kind(x) == kind_of(ty).kind for x in piped or []))
            except BindError as exc:
                raise PSError(exc.error_id, c.name, exc.category, exc.message) from None
            kinds = {k: kind_of(t) for k, t in b.types.items()}
            args = dict(b.named)
            if b.pipeline_param:
                args[b.pipeline_param] = piped
            for k, v in named:
                if k.lower() == "erroraction":
                    args["ErrorAction"], kinds["ErrorAction"] = v, COMMON_PARAMS["ErrorAction"]
        else:
            kinds = dict(core)
            kinds.update(COMMON_PARAMS)
            lower = {k.lower(): k for k in kinds}
            args = {}
            for k, v in named:
                name = lower.get(k.lower())
                if name is None:
                    raise PSError("NamedParameterNotFound", c.name, "InvalidArgument",
                                  f"A parameter cannot be found that matches parameter name '{k}'.")
                args[name] = v
            by_pos = sorted((p.position, k) for k, p in core.items() if p.position is not None and k not in args)
            if len(positional) > len(by_pos):
                raise PSError("PositionalParameterNotFound", c.name, "InvalidArgument",
                              f"A positional parameter cannot be found that accepts argument "
                              f"'{positional[len(by_pos)]}'.")
            for (_, k), v in zip(by_pos, positional, strict=False):
                args[k] = v
            if piped is not None:
                target = next((k for k, p in core.items() if p.pipeline and k not in args), None)
                if target is None:
                    raise PSError("InputObjectNotBound", c.name, "InvalidArgument",
                                  "The input object cannot be bound to any parameters for the command.")
                args[target] = piped
        for k, v in list(args.items()):
            p = kinds[k]
            if k in RANGES and p.kind == "int":
                p = P("int", *RANGES[k])
            args[k] = self._convert(c.name, k, p, v)
        return args, kinds

    def _known(self, cmdlet: str, core: dict[str, P] | None) -> Any:
        """Whether a written parameter name (or a unique prefix of one) exists for the cmdlet at all."""
        names = {k.lower() for k in (core or {})} | {k.lower() for k in COMMON_PARAMS}
        if core is None:
            names |= {p["name"].lower() for ps in SYNTAX[cmdlet]["sets"].values() for p in ps}
            names |= {k.lower() for k in COMMON}
        return lambda name: any(n.startswith(name.lower()) for n in names)

    def _switches(self, cmdlet: str, core: dict[str, P] | None) -> Any:
        if core is not None:
            return lambda name: any(k.lower() == name.lower() and p.kind == "switch" for k, p in core.items())
        names = {p["name"].lower() for ps in SYNTAX[cmdlet]["sets"].values() for p in ps if p["type"] == "switch"}
        return lambda name: name.lower() in names

    def _value(self, t: Tok, variables: dict[str, Any]) -> Any:
        if t.kind in ("LIT", "WORD"):
            return t.text
        if t.kind == "INT":
            return int(t.text)
        if t.kind == "VAR":
            return self._operand(t, variables)
        raise GrammarError(f"unexpected {t.kind} {t.text!r}")

    def _convert(self, cmdlet: str, name: str, p: P, v: Any) -> Any:
        def fail(msg: str) -> PSError:
            return PSError("ParameterArgumentValidationError", cmdlet, "InvalidData",
                           f"Cannot validate argument on parameter '{name}'. {msg}")
        if p.kind == "any":
            return v
        if p.kind == "list":
            items = v if isinstance(v, list) else [v]
            return [str(x) for x in items]
        if p.kind in _OBJ_KIND:
            items = v if isinstance(v, list) else [v]
            if v is None or not items or any(x is None for x in items):
                raise PSError("ParameterArgumentValidationErrorNullNotAllowed", cmdlet, "InvalidData",
                              f"Cannot validate argument on parameter '{name}'. The argument is null or empty. "
                              "Provide an argument that is not null or empty, and then try the command again.")
            if not all(_object_kind(x) == p.kind for x in items):
                raise PSError("CannotConvertArgumentNoMessage", cmdlet, "InvalidArgument",
                              f"Cannot convert the argument of '{name}' to the type it needs.")
            return items
        if p.kind == "switch":
            if not isinstance(v, bool):
                raise fail("a switch takes $true or $false")
            return v
        if p.kind == "bool":
            if not isinstance(v, bool):
                raise PSError("ParameterArgumentTransformationError", cmdlet, "InvalidData",
                              f"Cannot process argument transformation on parameter '{name}'. Cannot convert "
                              "value \"System.String\" to type \"System.Boolean\". Boolean parameters accept only "
                              "Boolean values and numbers, such as $True, $False, 1 or 0.")
            return v
        if p.kind == "int":
            try:
                n = int(v) if not isinstance(v, bool) else None
            except (TypeError, ValueError):
                n = None
            if n is None:
                raise PSError("ParameterArgumentTransformationError", cmdlet, "InvalidData",
                              f"Cannot process argument transformation on parameter '{name}'.")
            if (p.lo is not None and n < p.lo) or (p.hi is not None and n > p.hi):
                raise fail(f"The {n} argument is less than the minimum allowed range of {p.lo}." if
                           p.lo is not None and n < p.lo else
                           f"The {n} argument is greater than the maximum allowed range of {p.hi}.")
            return n
        if isinstance(v, list):
            raise PSError("CannotConvertArgument", cmdlet, "InvalidArgument",
                          f"Cannot convert 'System.Object[]' to the type 'System.String' required by parameter "
                          f"'{name}'. Specified method is not supported.")
        if v is None or not isinstance(v, str | int):
            raise fail("The argument is null or empty.")
        s = str(v)
        if p.kind == "enum":
            for val in p.values:
                if val.lower() == s.lower():
                    return val
            raise fail(f"The argument \"{s}\" does not belong to the set \"{','.join(p.values)}\".")
        if p.kind == "datetime":
            try:
                return _parse_dt(s)
            except ValueError:
                raise PSError("ParameterArgumentTransformationError", cmdlet, "InvalidData",
                              f"Cannot convert value \"{s}\" to type \"System.DateTime\".") from None
        return s

    # ---- VM resolution as the cmdlets do it ------------------------------------------------
    def _targets(self, host: SimHost, cmdlet: str, a: dict[str, Any], name_param: str = "VMName") -> list[SimVM]:
        given = [k for k in ("VM", name_param) if k in a]
        if len(given) > 1:
            raise PSError("AmbiguousParameterSet", cmdlet, "InvalidArgument",
                          "Parameter set cannot be resolved using the specified named parameters.")
        if not given:
            raise PSError("MissingMandatoryParameter", cmdlet, "InvalidArgument",
                          f"Cannot process command because of one or more missing mandatory parameters: {name_param}.")
        if "VM" in a:
            vms: list[SimVM] = a["VM"]
            for v in vms:
                if v not in self.vms_on(host):
                    raise PSError("InvalidParameter", cmdlet, "InvalidArgument",
                                  f'Hyper-V was unable to find a virtual machine with name "{v.name}".')
            return vms
        patterns = a[name_param] if isinstance(a[name_param], list) else [a[name_param]]
        found = [v for v in self.vms_on(host) if any(_wild(pat, v.name) for pat in patterns)]
        if not found:
            raise PSError("InvalidParameter", cmdlet, "InvalidArgument",
                          f'Hyper-V was unable to find a virtual machine with name "{a[name_param]}".')
        return found

    def _confirm(self, cmdlet: str, a: dict[str, Any]) -> None:
        if a.get("Confirm", True):
            # guess: the exact error of a ShouldProcess prompt under -NonInteractive.
            raise PSError("NonInteractivePrompt", cmdlet, "InvalidOperation",
                          "PowerShell is in NonInteractive mode. Read and Prompt functionality is not available.")

    def _server_host(self, cmdlet: str, name: str) -> SimHost:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            raise PSError("InvalidParameter_InvalidUri", cmdlet, "InvalidArgument",
                          f"The replica server name '{name}' is not valid: use a DNS name, not an IP address.")
        h = self.hosts.get(name.lower())
        if h is None or h.down:
            # guess: id and text of an unreachable or unknown replica server.
            raise PSError("VMReplication_ReplicaServerUnreachable", cmdlet, "ConnectionError",
                          f"Hyper-V cannot connect to the replica server '{name}'.")
        return h

    def _validate_settings(self, cmdlet: str, a: dict[str, Any], extended: bool, primary_freq: int = 30) -> None:
        freq = a.get("ReplicationFrequencySec")
        if freq is not None:
            if extended and (freq not in (300, 900) or freq < primary_freq):
                raise PSError("VMReplication_InvalidExtendedReplicationFrequency", cmdlet, "InvalidArgument",
                              "Extended replication frequency must be 300 or 900 seconds and not below the primary "
                              "relationship's.")
            if freq not in (30, 300, 900):
                raise PSError("InvalidArgument_ReplicationFrequencyNotValid", cmdlet, "InvalidArgument",
                              f"Replication frequency {freq} is not valid: use 30, 300 or 900 seconds.")
        if "VSSSnapshotFrequencyHour" in a:
            if not a.get("RecoveryHistory"):
                raise PSError("VMReplication_AppConsistentWithoutRecoveryHistory", cmdlet, "InvalidArgument",
                              "Application-consistent recovery points need additional recovery points "
                              "(RecoveryHistory above 0).")
            if extended:  # guess: the id for app-consistent points on an extended relationship
                raise PSError("VMReplication_InvalidExtendedReplicationFrequency", cmdlet, "InvalidArgument",
                              "Extended replication does not keep application-consistent recovery points.")
        auth = a.get("AuthenticationType")
        if auth == "Certificate" and not a.get("CertificateThumbprint"):
            raise PSError("ParameterNotProvided", cmdlet, "InvalidArgument",
                          "Certificate authentication needs the CertificateThumbprint parameter.")
        if auth in (None, "Kerberos") and a.get("CertificateThumbprint"):
            raise PSError("ParameterNotRequired", cmdlet, "InvalidArgument",
                          "Kerberos authentication takes no CertificateThumbprint.")

    def _check_server(self, cmdlet: str, target: SimHost, source: SimHost, a: dict[str, Any]) -> None:
        s = target.server
        if not s["ReplicationEnabled"]:
            raise PSError("VMReplication_ReplicaServerNotEnabled", cmdlet, "InvalidOperation",  # guess
                          f"The server '{target.name}' is not enabled as a replica server.")
        auth = a.get("AuthenticationType", "Kerberos")
        port = a.get("ReplicaServerPort", 80 if auth == "Kerberos" else 443)
        want_port = s["KerberosAuthenticationPort"] if auth == "Kerberos" else s["CertificateAuthenticationPort"]
        rule = FIREWALL_RULES[0] if auth == "Kerberos" else FIREWALL_RULES[1]
        if rule not in target.firewall:
            raise PSError("VMReplication_ReplicaServerUnreachable", cmdlet, "ConnectionError",  # guess: id
                          f"Hyper-V cannot connect to the replica server '{target.name}' on port {port}: "
                          f"the firewall rule '{rule}' is not enabled.")
        if auth not in (s["AllowedAuthenticationType"], "") and s["AllowedAuthenticationType"] != \
                "CertificateAndKerberos" \
                or port != want_port:
            raise PSError("VMReplication_ReplicaServerUnreachable", cmdlet, "ConnectionError",  # guess
                          f"The replica server '{target.name}' does not accept {auth} on port {port}.")
        if not s["ReplicationAllowedFromAnyServer"] and not any(_wild(e["AllowedPrimaryServer"], source.name) for e in target.entries):
            raise PSError("VMReplication_AuthorizationEntryNotFound", cmdlet, "PermissionDenied",
                          f"The replica server '{target.name}' has no authorization entry for '{source.name}'.")

    def _place(self, target: SimHost) -> SimHost:
        """Where a replica VM lands: the host itself, or a broker's least loaded node."""
        if not target.nodes:
            return target
        return min((self.host(n) for n in target.nodes), key=lambda h: len(h.vms))

    def _new_replica(self, target: SimHost, src: SimVM, rel: Rel) -> SimVM:
        node = self._place(target)
        vm = SimVM(name=src.name, host=node.name, id=src.id)
        vm.nics = [Nic(name=n.name, vm=vm) for n in src.nics]  # guess: replica NICs start disconnected
        storage = target.server["DefaultStorageLocation"] or "D:\\Replica"
        # guess: a replica's disks land under the storage location, in a folder named after the VM
        vm.disks = [f"{storage}\\{src.name}\\{d.rsplit(chr(92), 1)[-1]}" for d in src.disks if d not in src.excluded]
        node.files.update(vm.disks)
        vm.rel = rel
        node.vms.append(vm)
        return vm

    # ---- cmdlets: plumbing and reads -------------------------------------------------------
    def props(self, x: Any) -> dict[str, Any]:
        """The documented properties of a simulated object; anything else reads as $null."""
        if isinstance(x, dict):
            return x
        if isinstance(x, SimVM):
            return {"Name": x.name, "VMName": x.name, "Id": x.id, "VMId": x.id, "ComputerName": x.host,
                    "State": EnumVal(x.power, VMSTATES[x.power])}
        if isinstance(x, Snapshot):
            vm = next((v for h in self.hosts.values() for v in h.vms if v.id == x.vm_id and not v.is_test), None)
            return {"VMName": vm.name if vm else "", "Name": x.name, "Id": x.id,
                    "SnapshotType": EnumVal(x.type, SNAPTYPES[x.type]), "CreationTime": x.created}
        if isinstance(x, Nic):
            return {"Name": x.name, "VMName": x.vm.name, "SwitchName": x.switch or None,
                    "TestReplicaSwitchName": x.test_switch or None}  # guess: TestReplicaSwitchName is a property
        if isinstance(x, FailoverCfg):  # guess: the failover setting's property names mirror the Set parameters
            n = x.nic
            return {"VMName": n.vm.name, "VMNetworkAdapterName": n.name, "IPv4Address": n.ip or None,
                    "IPv4SubnetMask": n.mask or None, "IPv4DefaultGateway": n.gateway or None,
                    "IPv4PreferredDNSServer": n.dns1 or None, "IPv4AlternateDNSServer": n.dns2 or None}
        if isinstance(x, ReplObj | MeasureObj):
            r, vm = x.rel, x.vm
            base = {"VMName": vm.name, "ReplicationState": EnumVal(r.state, STATES.index(r.state)),
                    "ReplicationHealth": EnumVal(r.health, HEALTH.index(r.health)),
                    "ReplicationMode": EnumVal(r.mode, MODES.index(r.mode)),
                    "ReplicationRelationshipType": EnumVal(r.rtype, RELS.index(r.rtype))}
            if isinstance(x, MeasureObj):
                return {**base, "PendingReplicationSize": 0, "AverageReplicationSize": 0, "MaximumReplicationSize": 0,
                        "AverageReplicationLatency": None, "MaximumReplicationLatency": None,
                        "SuccessfulReplicationCount": r.successful, "MissedReplicationCount": r.missed,
                        "ReplicationErrors": r.errors,
                        "ReplicationHealthDetails": [{"Message": d} for d in r.details],  # guess: objects w/ Message
                        "LastTestFailoverInitiatedTime": vm.last_test_failover, "LastVSSSnapshotTime": None}
            return {**base, "PrimaryServerName": r.primary, "ReplicaServerName": r.replica,
                    "ReplicaServerPort": r.port,
                    "AuthenticationType": EnumVal(r.auth, {"Kerberos": 1, "Certificate": 2}[r.auth]),
                    "ReplicationFrequencySec": r.frequency, "RecoveryHistory": r.history,
                    "VSSSnapshotFrequencyHour": r.vss, "CompressionEnabled": r.compression,
                    "LastReplicationTime": r.last_replication}
        if isinstance(x, ServerObj):
            s = x.host.server
            auth = EnumVal(s["AllowedAuthenticationType"], AUTH[s["AllowedAuthenticationType"]])
            short = {"Kerberos": "Kerb", "Certificate": "Cert", "CertificateAndKerberos": "CertAndKerb"}  # guess
            return {"ComputerName": x.host.name, "ReplicationEnabled": s["ReplicationEnabled"],
                    "ReplicationAllowedFromAnyServer": s["ReplicationAllowedFromAnyServer"],
                    "AllowedAuthenticationType": auth, "CertificateThumbprint": s["CertificateThumbprint"] or None,
                    "KerberosAuthenticationPort": s["KerberosAuthenticationPort"],
                    "CertificateAuthenticationPort": s["CertificateAuthenticationPort"],
                    "KerberosAuthenticationPortMapping": None, "CertificateAuthenticationPortMapping": None,
                    "DefaultStorageLocation": s["DefaultStorageLocation"] or None,
                    "AuthorizationEntries": [dict(e) for e in x.host.entries],
                    "RepEnabled": s["ReplicationEnabled"], "KerbAuthPort": s["KerberosAuthenticationPort"],
                    "CertAuthPort": s["CertificateAuthenticationPort"],
                    "AllowAnyServer": s["ReplicationAllowedFromAnyServer"],
                    "AuthType": short[s["AllowedAuthenticationType"]]}
        if isinstance(x, EntryObj):
            return dict(x.entry)
        if isinstance(x, Job):
            return {"Id": x.id, "Name": x.name, "State": x.state}
        return {}

    def _c_Get_VM(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        # A session on a Replica Broker's client access point runs on the node that owns the CAP now:
        # Get-VM lists that node's VMs, or those of the nodes named by -ComputerName.
        if "ComputerName" in a:
            vms = [v for n in a["ComputerName"] for v in self.host(n).vms]
        elif host.nodes:
            vms = list(self.host(host.owner or host.nodes[0]).vms)
        else:
            vms = self.vms_on(host)
        if "Name" in a:
            out = []
            for pattern in a["Name"]:
                found = [v for v in vms if _wild(pattern, v.name)]
                if not found and not any(ch in pattern for ch in "*?["):
                    raise PSError("InvalidParameter", "Get-VM", "InvalidArgument",
                                  f'Hyper-V was unable to find a virtual machine with name "{pattern}".')
                out += found
            return out
        return list(vms)

    def _c_Where_Object(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        if a.get("CEQ") == a.get("EQ") or "Property" not in a or "Value" not in a:
            raise GrammarError("Where-Object takes: <Property> -ceq|-eq <value>")
        prop, want = a["Property"], a["Value"]
        op = "ceq" if a.get("CEQ") else "eq"
        return [x for x in a.get("InputObject") or [] if _compare(self.props(x).get(prop), op, want)]

    def _c_Select_Object(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        names = a.get("Property") or []
        items = list(a.get("InputObject") or [])
        if "Last" in a:
            items = items[-a["Last"]:] if a["Last"] else []
        if "First" in a:
            items = items[:a["First"]]
        if not names:
            return items
        out = []
        for x in items:
            if x is None:
                continue
            p = self.props(x)
            # A property the object does not have comes out as $null, without an error (as PowerShell does).
            out.append({n: p.get(n) for n in names})
        return out

    def _json(self, v: Any, depth: int) -> Any:
        if isinstance(v, EnumVal):
            return v.number if self.enum_style == "number" else v.name
        if isinstance(v, datetime):
            return self._date(v)
        if v is None or isinstance(v, bool | int | float | str):
            return v
        if depth < 0:
            return str(v)  # beyond -Depth ConvertTo-Json writes the object's ToString()
        if isinstance(v, list):
            return [self._json(x, depth - 1) for x in v]
        return {k: self._json(x, depth - 1) for k, x in self.props(v).items()}

    def _c_ConvertTo_Json(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        items = a.get("InputObject") or []
        if not items:
            return []
        depth = a.get("Depth", 2)
        obj = self._json(items[0], depth) if len(items) == 1 else [self._json(x, depth - 1) for x in items]
        return [json.dumps(obj, ensure_ascii=False, separators=(",", ":") if a.get("Compress") else (", ", ": "))]

    def _date(self, d: datetime | None) -> Any:
        if d is None:
            return None
        if self.date_style == "msdate":
            return f"/Date({int(d.timestamp() * 1000)})/"
        return d.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"

    def _c_Get_VMSnapshot(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        out = []
        for vm in self._targets(host, "Get-VMSnapshot", a):
            out += [s for s in vm.points if a.get("SnapshotType") in (None, s.type)]
        return out

    def _c_Get_VMNetworkAdapter(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        out = []
        for vm in self._targets(host, "Get-VMNetworkAdapter", a):
            out += [n for n in vm.nics if "Name" not in a or _wild(a["Name"], n.name)]
        return out

    def _c_Get_VMNetworkAdapterFailoverConfiguration(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        if "VMNetworkAdapter" in a:
            return [FailoverCfg(n) for n in a["VMNetworkAdapter"]]
        return [FailoverCfg(n) for vm in self._targets(host, "Get-VMNetworkAdapterFailoverConfiguration", a)
                for n in vm.nics if "VMNetworkAdapterName" not in a or n.name == a["VMNetworkAdapterName"]]

    def _c_Get_VMReplication(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        out: list[Any] = []
        for vm in self._targets(host, "Get-VMReplication", a):
            if vm.rel is None:
                raise PSError("VMReplication_NotEnabled", "Get-VMReplication", "InvalidOperation",  # guess
                              f"Replication is not enabled for virtual machine '{vm.name}'.")
            out += [ReplObj(vm, r) for r in (vm.rel, vm.ext) if r is not None
                    and a.get("ReplicationRelationshipType") in (None, r.rtype)]
        return out

    def _c_Measure_VMReplication(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        return [MeasureObj(x.vm, x.rel) for x in self._c_Get_VMReplication(host, a)]

    def _c_Get_VMReplicationServer(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        return [ServerObj(host)]

    def _c_Get_VMReplicationAuthorizationEntry(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        return [EntryObj(dict(e)) for e in host.entries]

    # ---- cmdlets: replica server -----------------------------------------------------------
    def _c_Set_VMReplicationServer(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        s = dict(host.server)
        for param in s:
            if param in a:
                s[param] = a[param]
        if s["AllowedAuthenticationType"] in ("Certificate", "CertificateAndKerberos") and not s["CertificateThumbprint"]:
            raise PSError("ParameterNotProvided", "Set-VMReplicationServer", "InvalidArgument",
                          "Certificate authentication needs the CertificateThumbprint parameter.")
        if s["ReplicationAllowedFromAnyServer"] and not s["DefaultStorageLocation"]:
            raise PSError("ParameterNotProvided", "Set-VMReplicationServer", "InvalidArgument",  # guess
                          "Replication from any server needs DefaultStorageLocation.")
        host.server = s
        return []

    def _c_New_VMReplicationAuthorizationEntry(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        for k in ("AllowedPrimaryServer", "ReplicaStorageLocation", "TrustGroup"):
            if k not in a:
                raise PSError("MissingMandatoryParameter", "New-VMReplicationAuthorizationEntry", "InvalidArgument",
                              f"Cannot process command because of one or more missing mandatory parameters: {k}.")
        if any(e["AllowedPrimaryServer"].lower() == a["AllowedPrimaryServer"].lower() for e in host.entries):
            raise PSError("VMReplication_AuthorizationEntryAlreadyExists",  # guess
                          "New-VMReplicationAuthorizationEntry", "ResourceExists",
                          f"An authorization entry for '{a['AllowedPrimaryServer']}' already exists.")
        host.entries.append({k: a[k] for k in ("AllowedPrimaryServer", "ReplicaStorageLocation", "TrustGroup")})
        return []

    # ---- cmdlets: VMs and adapters ---------------------------------------------------------
    def _c_Start_VM(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        for vm in self._targets(host, "Start-VM", a, "Name"):
            if vm.power == "Running":  # guess: Hyper-V refuses to start a running VM
                raise PSError("InvalidState", "Start-VM", "InvalidOperation",
                              f"'{vm.name}' failed to start: the operation cannot be performed while the object "
                              "is in its current state.")
            if vm.mode in ("Replica", "ExtendedReplica") and vm.state not in ("FailedOverWaitingCompletion",
                                                                                "FailedOver"):
                raise invalid_state("Start-VM", vm, "a replica starts only after a failover")  # guess
            vm.power = "Running"
        return []

    def _c_Stop_VM(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        for vm in self._targets(host, "Stop-VM", a, "Name"):
            if vm.locked and not a.get("Force") and not a.get("TurnOff"):
                # The Stop-VM reference: without -Force a locked guest or unsaved work makes it ask first;
                # under -NonInteractive that prompt fails.  # guess: the id and text
                raise PSError("NonInteractivePrompt", "Stop-VM", "InvalidOperation",
                              f"The virtual machine '{vm.name}' is locked. PowerShell is in NonInteractive mode. "
                              "Read and Prompt functionality is not available.")
            vm.power = "Off"  # guess: stopping a VM that is off is a no-op
        return []

    def _c_Remove_VM(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        for vm in self._targets(host, "Remove-VM", a, "Name"):
            if vm.power != "Off":
                raise PSError("InvalidState", "Remove-VM", "InvalidOperation",
                              f"'{vm.name}' must be turned off before it is removed.")
            self.host(vm.host).vms.remove(vm)
        return []

    def _nics(self, host: SimHost, cmdlet: str, a: dict[str, Any], name_param: str = "Name") -> list[Nic]:
        if "VMNetworkAdapter" in a:
            if "VMName" in a:
                raise PSError("AmbiguousParameterSet", cmdlet, "InvalidArgument",
                              "Parameter set cannot be resolved using the specified named parameters.")
            return list(a["VMNetworkAdapter"])
        vms = self._targets(host, cmdlet, a)
        return [n for v in vms for n in v.nics if name_param not in a or _wild(a[name_param], n.name)]

    def _c_Set_VMNetworkAdapter(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        for n in self._nics(host, "Set-VMNetworkAdapter", a):
            if "TestReplicaSwitchName" in a:
                n.test_switch = a["TestReplicaSwitchName"]
        return []

    def _c_Connect_VMNetworkAdapter(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        if "SwitchName" not in a:
            raise PSError("MissingMandatoryParameter", "Connect-VMNetworkAdapter", "InvalidArgument",
                          "Cannot process command because of one or more missing mandatory parameters: SwitchName.")
        for n in self._nics(host, "Connect-VMNetworkAdapter", a):
            if a["SwitchName"] not in self.host(n.vm.host).switches:
                raise PSError("InvalidParameter", "Connect-VMNetworkAdapter", "InvalidArgument",  # guess: id
                              f'Hyper-V was unable to find a virtual switch with name "{a["SwitchName"]}".')
            n.switch = a["SwitchName"]
        return []

    def _c_Disconnect_VMNetworkAdapter(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        for n in self._nics(host, "Disconnect-VMNetworkAdapter", a):
            n.switch = ""
        return []

    def _c_Set_VMNetworkAdapterFailoverConfiguration(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        c = "Set-VMNetworkAdapterFailoverConfiguration"
        if "IPv4Address" in a and "IPv4SubnetMask" not in a:
            raise PSError("InvalidParameter", c, "InvalidArgument",  # guess: id; the reference: a parameter error
                          "An IPv4 address needs IPv4SubnetMask.")
        for k in ("IPv4Address", "IPv4SubnetMask", "IPv4DefaultGateway", "IPv4PreferredDNSServer",
                  "IPv4AlternateDNSServer"):
            if k in a:
                _ipv4(c, k, a[k])
        for n in self._nics(host, c, a, "VMNetworkAdapterName"):
            if n.vm.mode not in ("Replica", "ExtendedReplica", "Primary"):  # guess: refused without replication
                raise bad_mode(c, n.vm)
            n.ip, n.mask = a.get("IPv4Address", n.ip), a.get("IPv4SubnetMask", n.mask)
            n.gateway = a.get("IPv4DefaultGateway", "")
            n.dns1, n.dns2 = a.get("IPv4PreferredDNSServer", ""), a.get("IPv4AlternateDNSServer", "")
        return []

    # ---- cmdlets: replication --------------------------------------------------------------
    def _c_Enable_VMReplication(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        c = "Enable-VMReplication"
        for vm in self._targets(host, c, a):
            if a.get("AsReplica"):
                if vm.rel is not None:
                    raise PSError("VMReplication_AlreadyEnabled", c, "InvalidOperation",
                                  f"Replication is already enabled for virtual machine '{vm.name}'.")
                allowed = a.get("AllowedPrimaryServer", "")
                s = host.server
                ok = s["ReplicationEnabled"] and (s["ReplicationAllowedFromAnyServer"] or any(
                    _wild(e["AllowedPrimaryServer"], allowed) if allowed else True for e in host.entries))
                if not ok or (not s["ReplicationAllowedFromAnyServer"] and not host.entries):
                    raise PSError("VMReplication_AuthorizationEntryNotFound", c, "PermissionDenied",
                                  f"No authorization entry matches primary server '{allowed}'.")
                vm.power = "Off"
                vm.rel = Rel(mode="Replica", state="WaitingForInitialReplication", primary=allowed,
                             replica=host.name)
                continue
            if "ReplicaServerName" not in a:
                raise PSError("MissingMandatoryParameter", c, "InvalidArgument",
                              "Cannot process command because of one or more missing mandatory parameters: "
                              "ReplicaServerName.")
            extended = vm.rel is not None and vm.rel.mode == "Replica" and vm.ext is None
            if vm.rel is not None and not extended:
                raise PSError("VMReplication_AlreadyEnabled", c, "InvalidOperation",
                              f"Replication is already enabled for virtual machine '{vm.name}'.")
            self._validate_settings(c, a, extended, vm.rel.frequency if extended and vm.rel else 30)
            target = self._server_host(c, a["ReplicaServerName"])
            self._check_server(c, target, host if not host.broker else self.host(host.broker), a)
            unknown = [x for x in a.get("ExcludedVhdPath", []) if x not in vm.disks]
            if unknown:
                raise PSError("InvalidParameter", c, "InvalidArgument",  # guess: id and text
                              f"'{unknown[0]}' is not a virtual hard disk of '{vm.name}'.")
            vm.excluded = list(a.get("ExcludedVhdPath", []))
            existing = self.by_id(target.name, vm.id)
            rel = Rel(mode="Primary", state="ReadyForInitialReplication", primary=host.broker or host.name,
                      replica=target.name, rtype="Extended" if extended else "Simple",
                      port=a.get("ReplicaServerPort", 80), auth=a.get("AuthenticationType", "Kerberos"),
                      thumbprint=a.get("CertificateThumbprint", ""), frequency=a.get("ReplicationFrequencySec", 300),
                      history=a.get("RecoveryHistory", 0), vss=a.get("VSSSnapshotFrequencyHour", 0),
                      compression=a.get("CompressionEnabled", True))
            mirror = Rel(mode="ExtendedReplica" if extended else "Replica", state="WaitingForInitialReplication",
                         primary=rel.primary, replica=target.name, port=rel.port, auth=rel.auth,
                         frequency=rel.frequency, history=rel.history, vss=rel.vss, compression=rel.compression)
            if existing is not None:
                if existing.rel is None or existing.rel.mode != "Replica" or existing.rel.state != \
                        "WaitingForInitialReplication":
                    raise PSError("VMReplication_AlreadyEnabled", c, "InvalidOperation",  # guess
                                  f"A virtual machine with the same ID already exists on '{target.name}'.")
                existing.rel = mirror
            else:
                self._new_replica(target, vm, mirror)
            if extended:
                vm.ext = rel
            else:
                vm.rel = rel
        return []

    def _c_Start_VMInitialReplication(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        c = "Start-VMInitialReplication"
        if "DestinationPath" in a and "InitialReplicationStartTime" in a:
            raise PSError("AmbiguousParameterSet", c, "InvalidArgument",
                          "Parameter set cannot be resolved using the specified named parameters.")
        for vm in self._targets(host, c, a):
            rel = vm.ext if vm.ext is not None and vm.mode == "Replica" else vm.rel
            if rel is None or rel.mode not in ("Primary",):
                raise bad_mode(c, vm)
            if rel.state != "ReadyForInitialReplication":
                raise invalid_state(c, vm)
            replica = self.by_id(rel.replica, vm.id)
            if replica is None or replica.rel is None or replica.rel.state != "WaitingForInitialReplication":
                raise PSError("VMReplication_ReplicaNotReady", c, "InvalidOperation",  # guess
                              f"The replica virtual machine on '{rel.replica}' is not waiting for initial "
                              "replication (run Set-VMReplication -AsReplica there).")
            if "InitialReplicationStartTime" in a:
                at = a["InitialReplicationStartTime"]
                if at < self.now() - timedelta(minutes=1):
                    raise PSError("StartTimeOccursInPast", c, "InvalidArgument",
                                  "The start time occurs in the past.")
                if at > self.now() + timedelta(days=7):
                    raise PSError("StartTimeOccursTooMuchInFuture", c, "InvalidArgument",
                                  "The start time cannot be more than 7 days in the future.")
                rel.state, rel.scheduled_at = "InitialReplicationInProgress", at  # guess: state while scheduled
            elif "DestinationPath" in a:
                # guess: the export lands in a folder named after the VM under the destination path
                folder = a["DestinationPath"].rstrip("\\/") + "\\" + vm.name
                rel.state, rel.export_path = "InitialReplicationInProgress", folder
                self.exports[folder] = vm.id
                replica.rel.health = "Warning"
            else:
                self._complete_initial(vm, rel, replica)
        return []

    def _c_Import_VMInitialReplication(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        c = "Import-VMInitialReplication"
        for vm in self._targets(host, c, a):
            if vm.mode not in ("Replica", "ExtendedReplica"):
                raise bad_mode(c, vm)
            if vm.state != "WaitingForInitialReplication":
                raise invalid_state(c, vm)
            if self.exports.get(a.get("Path", "")) != vm.id:
                raise PSError("InvalidParameter", c, "InvalidArgument",  # guess
                              f"The path '{a.get('Path')}' holds no initial copy of '{vm.name}'.")
            assert vm.rel is not None
            primary = self.by_id(vm.rel.primary, vm.id)
            prel = None
            if primary is not None:
                prel = primary.ext if primary.ext and primary.ext.replica.lower() == vm.host.lower() else primary.rel
            if prel is None:
                raise PSError("VMReplication_ReplicaNotReady", c, "InvalidOperation", "The primary is gone.")  # guess
            self._complete_initial(primary, prel, vm)  # type: ignore[arg-type]
            del self.exports[a["Path"]]
        return []

    def _pick_rel(self, vm: SimVM, a: dict[str, Any]) -> Rel | None:
        return vm.ext if a.get("ReplicationRelationshipType") == "Extended" else vm.rel

    def _c_Suspend_VMReplication(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        c = "Suspend-VMReplication"
        for vm in self._targets(host, c, a):
            rel = self._pick_rel(vm, a)
            if rel is None or rel.state not in ("InitialReplicationInProgress", "WaitingForInitialReplication",
                                                "Resynchronizing", "Replicating"):
                raise invalid_state(c, vm)
            rel.state = "Suspended" if rel.state != "Resynchronizing" else "ResynchronizeSuspended"
            rel.health = "Warning"
        return []

    def _c_Resume_VMReplication(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        c = "Resume-VMReplication"
        for vm in self._targets(host, c, a):
            if a.get("Continue"):
                if vm.mode not in ("Replica",):
                    raise PSError("ActionOnlyApplicableOnReplica", c, "InvalidOperation",
                                  f"The operation is only applicable on a replica virtual machine ('{vm.name}').")
                if vm.state not in ("FailedOverWaitingCompletion", "FailedOver") or vm.ext is None:
                    raise invalid_state(c, vm, "needs a failed-over replica with an extended relationship")
                ext = vm.ext
                onward = self.by_id(ext.replica, vm.id)
                vm.points = [p for p in vm.points if p.id == vm.failover_point]
                vm.rel = Rel(mode="Primary", state="Replicating" if ext.state == "Replicating" else ext.state,
                             primary=host.broker or host.name, replica=ext.replica, port=ext.port, auth=ext.auth,
                             frequency=ext.frequency, history=ext.history, compression=ext.compression,
                             last_replication=ext.last_replication)
                vm.ext = None
                if onward is not None and onward.rel is not None:
                    onward.rel.mode, onward.rel.primary = "Replica", vm.rel.primary
                continue
            rel = self._pick_rel(vm, a)
            if rel is None or rel.state not in ("Suspended", "WaitingForStartResynchronize", "ResynchronizeSuspended",
                                                "Error"):
                raise invalid_state(c, vm)
            resync = a.get("Resynchronize") or rel.state in ("WaitingForStartResynchronize", "ResynchronizeSuspended")
            if a.get("Resynchronize") and rel.mode != "Primary":
                raise bad_mode(c, vm)
            if "ResynchronizeStartTime" in a:
                if not a.get("Resynchronize"):
                    raise PSError("ParameterNotProvided", c, "InvalidArgument",  # guess
                                  "ResynchronizeStartTime needs -Resynchronize.")
                at = a["ResynchronizeStartTime"]
                if at < self.now() - timedelta(minutes=1):
                    raise PSError("StartTimeOccursInPast", c, "InvalidArgument", "The start time occurs in the past.")
                if at > self.now() + timedelta(days=7):
                    raise PSError("StartTimeOccursTooMuchInFuture", c, "InvalidArgument",
                                  "The start time cannot be more than 7 days in the future.")
                rel.state, rel.scheduled_resync = "WaitingForStartResynchronize", at
                continue
            if resync:
                rel.state, rel.details = "Resynchronizing", []
                if not self.hold_resync:
                    self._resync_done(vm)
            else:
                rel.state, rel.health = "Replicating", "Normal"
        return []

    def _c_Stop_VMReplication(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        c = "Stop-VMReplication"
        for vm in self._targets(host, c, a):
            rel = self._pick_rel(vm, a)
            if rel is None or rel.state != "Resynchronizing":
                raise invalid_state(c, vm)
            rel.state = "WaitingForStartResynchronize"
        return []

    def _c_Remove_VMReplication(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        c = "Remove-VMReplication"
        if "VMReplication" in a:
            for r in a["VMReplication"]:
                if r.rel.rtype == "Extended":
                    r.vm.ext = None  # the extended replica's VM is orphaned, as the reference says
                else:
                    r.vm.rel, r.vm.ext, r.vm.points = None, None, []
            return []
        for vm in self._targets(host, c, a):
            if a.get("ReplicationRelationshipType") == "Extended":
                if vm.ext is None:
                    raise invalid_state(c, vm, "no extended relationship")
                vm.ext = None  # the extended replica's VM is orphaned, as the reference says
                continue
            if vm.rel is None:
                raise invalid_state(c, vm)
            vm.rel, vm.ext = None, None
            vm.points = []
        return []

    def _c_Start_VMFailover(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        c = "Start-VMFailover"
        given = [k for k in ("VM", "VMName", "VMRecoverySnapshot") if k in a]
        if len(given) != 1:
            raise PSError("AmbiguousParameterSet" if given else "MissingMandatoryParameter", c, "InvalidArgument",
                          "Parameter set cannot be resolved using the specified named parameters.")
        snap: Snapshot | None = None
        if "VMRecoverySnapshot" in a:
            snaps = a["VMRecoverySnapshot"]
            if len(snaps) != 1:
                raise PSError("VMFailover_InvalidSnapshot", c, "InvalidArgument", "Give exactly one recovery point.")
            snap = snaps[0]
            owner = next((v for v in self.vms_on(host) if v.id == snap.vm_id and not v.is_test
                          and v.host == snap.host), None)
            if owner is None or snap.type not in ("Replica", "AppConsistentReplica") or snap not in owner.points:
                raise PSError("VMFailover_InvalidSnapshot", c, "InvalidArgument",
                              f"'{snap.name}' is not a recovery point of a replica virtual machine.")
            vms = [owner]
        else:
            vms = self._targets(host, c, a)
        for vm in vms:
            self._confirm(c, a)
            if vm.mode == "Primary":
                if a.get("AsTest"):
                    raise PSError("VMFailover_OnlyValidParameterOnPrimary", c, "InvalidArgument",
                                  "Only -Prepare is valid on a primary virtual machine.")
                if not a.get("Prepare"):
                    raise PSError("ParameterNotProvided", c, "InvalidArgument",
                                  "On a primary virtual machine, Start-VMFailover needs -Prepare.")
                if vm.power != "Off" or vm.state != "Replicating":
                    raise invalid_state(c, vm, "turn the VM off first" if vm.power != "Off" else "")
                assert vm.rel is not None
                vm.rel.state = "PreparedForFailover"
                replica = self.by_id(vm.rel.replica, vm.id)
                if replica is not None and replica.rel is not None:
                    self._add_point(replica, self.now())  # the pending changes, sent
                    replica.rel.last_replication = vm.rel.last_replication = self.now()
                continue
            if vm.mode not in ("Replica", "ExtendedReplica") or a.get("Prepare"):
                raise bad_mode(c, vm)
            assert vm.rel is not None
            if a.get("AsTest"):
                if vm.state not in ("Replicating", "Suspended", "FailedOverWaitingCompletion"):
                    raise invalid_state(c, vm)
                if vm.test_vm:
                    raise PSError("VMFailover_TestFailoverAlreadyInProgress", c, "InvalidOperation",  # guess
                                  f"A test failover is already running for '{vm.name}'.")
                if not vm.points:
                    raise invalid_state(c, vm, "it has not replicated yet")
                node = self.host(vm.host)
                test = SimVM(name=f"{vm.name} - Test", host=node.name, id=str(uuid.uuid4()), is_test=True)
                test.nics = [Nic(name=n.name, vm=test, switch=n.test_switch) for n in vm.nics]
                node.vms.append(test)
                vm.test_vm, vm.last_test_failover = test.name, self.now()
                continue
            if vm.power != "Off" or vm.state not in ("Replicating", "Resynchronizing", "Suspended"):
                raise invalid_state(c, vm)
            if not vm.points:
                raise invalid_state(c, vm, "it has not replicated yet")
            if vm.test_vm:
                raise invalid_state(c, vm, "a test failover is running")  # guess
            vm.failover_point = (snap or max(vm.points, key=lambda p: p.created)).id
            vm.rel.state, vm.rel.health = "FailedOverWaitingCompletion", "Warning"  # guess: health while pending
        return []

    def _c_Stop_VMFailover(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        c = "Stop-VMFailover"
        for vm in self._targets(host, c, a):
            if vm.test_vm:
                test = next((v for v in self.host(vm.host).vms if v.is_test and v.name == vm.test_vm), None)
                if test is not None:
                    test.power = "Off"
                    self.host(vm.host).vms.remove(test)
                vm.test_vm = ""
            elif vm.mode in ("Replica", "ExtendedReplica") and vm.state == "FailedOverWaitingCompletion":
                assert vm.rel is not None
                vm.power = "Off"  # guess: a started failed-over VM is turned off when the failover is undone
                vm.rel.state, vm.rel.health, vm.failover_point = "Replicating", "Normal", ""
            elif vm.mode == "Primary" and vm.state == "PreparedForFailover":
                assert vm.rel is not None
                vm.rel.state = "Replicating"
            else:
                raise invalid_state(c, vm)
        return []

    def _c_Complete_VMFailover(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        c = "Complete-VMFailover"
        for vm in self._targets(host, c, a):
            self._confirm(c, a)
            if vm.mode not in ("Replica", "ExtendedReplica"):
                raise bad_mode(c, vm)
            if vm.state != "FailedOverWaitingCompletion":
                raise invalid_state(c, vm)
            assert vm.rel is not None
            vm.rel.state, vm.rel.health = "FailedOver", "Warning"
            vm.points = [p for p in vm.points if p.id == vm.failover_point]
        return []

    def _c_Set_VMReplication(self, host: SimHost, a: dict[str, Any]) -> list[Any]:
        c = "Set-VMReplication"
        if a.get("Reverse") and a.get("AsReplica"):
            raise PSError("AmbiguousParameterSet", c, "InvalidArgument",
                          "Parameter set cannot be resolved using the specified named parameters.")
        for vm in self._targets(host, c, a):
            if a.get("AsReplica"):
                if vm.rel is None:
                    raise invalid_state(c, vm, "replication is not enabled")
                if vm.power != "Off":
                    raise invalid_state(c, vm, "turn the VM off first")  # guess
                vm.rel = Rel(mode="Replica", state="WaitingForInitialReplication",
                             primary=a.get("AllowedPrimaryServer", ""), replica=host.broker or host.name,
                             frequency=vm.rel.frequency, history=vm.rel.history, compression=vm.rel.compression)
                vm.points, vm.failover_point = [], ""
                continue
            if a.get("Reverse"):
                if vm.mode == "Primary" or vm.mode == "None":
                    raise bad_mode(c, vm)
                if vm.state not in ("FailedOverWaitingCompletion", "FailedOver"):
                    raise invalid_state(c, vm, "reverse needs a failed-over replica")
                if vm.ext is not None:
                    raise PSError("OperationFailed", c, "InvalidOperation",  # guess: id and key
                                  f"'{vm.name}' has an extended replica: remove it before reversing "
                                  "(VMReplication_ExtendedReplicaExists).")
                assert vm.rel is not None
                old_name = a.get("ReplicaServerName", vm.rel.primary)
                old_host = self._server_host(c, old_name)
                old = self.by_id(old_host.name, vm.id)
                planned = old is not None and old.rel is not None and old.state == "PreparedForFailover"
                me = host.broker or host.name
                rel = Rel(mode="Primary", state="Replicating" if planned else "ReadyForInitialReplication",
                          primary=me, replica=old_host.name, port=a.get("ReplicaServerPort", vm.rel.port),
                          auth=vm.rel.auth, frequency=vm.rel.frequency, history=vm.rel.history, vss=vm.rel.vss,
                          compression=vm.rel.compression, last_replication=self.now() if planned else None)
                vm.rel, vm.points, vm.failover_point = rel, [], ""
                if planned and old is not None and old.rel is not None:
                    old.rel = Rel(mode="Replica", state="Replicating", primary=me, replica=old_host.name,
                                  port=rel.port, auth=rel.auth, frequency=rel.frequency, history=rel.history,
                                  compression=rel.compression, last_replication=rel.last_replication)
                    old.points = []
                    self._add_point(old, self.now())
                continue
            if vm.rel is None:
                raise invalid_state(c, vm, "replication is not enabled")
            self._validate_settings(c, a, vm.rel.rtype == "Extended")
            for k, attr in (("ReplicationFrequencySec", "frequency"), ("RecoveryHistory", "history"),
                            ("VSSSnapshotFrequencyHour", "vss"), ("CompressionEnabled", "compression"),
                            ("ReplicaServerPort", "port")):
                if k in a:
                    setattr(vm.rel, attr, a[k])
        return []

    # ---- the SSH server --------------------------------------------------------------------
    def authorize(self, key: paramiko.PKey) -> None:
        self.authorized.append(key)

    @property
    def host_key_line(self) -> str:
        return f"{self.host_key.get_name()} {self.host_key.get_base64()}"

    def start(self) -> HyperVSimulator:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(32)
        sock.settimeout(0.2)
        self._sock, self.port = sock, sock.getsockname()[1]
        t = threading.Thread(target=self._accept_loop, name="hyperv-sim-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), name="hyperv-sim-conn", daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = _SimTransport(conn)
        self._transports.append(transport)
        transport.add_server_key(self.host_key)
        server = _Server(self)
        try:
            transport.start_server(server=server)
        except (paramiko.SSHException, EOFError, OSError):
            transport.close()
            return
        while transport.is_active() and not self._stop.is_set():
            chan = transport.accept(timeout=0.2)
            if chan is None:
                continue
            command = server.wait_command(chan.get_id())
            if command is None:
                try:
                    chan.close()
                except (OSError, EOFError, paramiko.SSHException):
                    pass
                continue
            t = threading.Thread(target=self._exec, args=(chan, transport, server.user, command), daemon=True)
            t.start()
        transport.close()

    def _exec(self, chan: paramiko.Channel, transport: _SimTransport, user: str, command: str) -> None:
        # Answer only after the exec request's SUCCESS reply went out, as sshd does: output and a close
        # arriving before it make the client's exec_command fail with "Channel closed".
        transport.wait_replied(chan.remote_chanid)
        try:
            try:
                # The script arrives on stdin; the client closes its side when it has sent it all.
                chan.settimeout(30.0)
                data = bytearray()
                while True:
                    chunk = chan.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                # PowerShell decodes stdin with the console's input code page (OEM 437 on an en-US server).
                out, status = self.execute(user, command, data.decode("cp437"))  # guess: the code page
            except Exception as exc:  # a simulator bug must not hang the client: answer it as an error
                out, status = json.dumps({"ok": False, "id": "SimulatorInternalError", "category": "NotSpecified",
                                          "message": f"{type(exc).__name__}: {exc}"}).encode(), 1
            chan.sendall(out)
            chan.send_exit_status(status)
            chan.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the client went away (a test closed its driver): nothing left to answer

    def close(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        for t in list(self._transports):
            t.close()
        for th in list(self._threads):
            th.join(timeout=2)

    def __enter__(self) -> HyperVSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SimTransport(paramiko.Transport):
    """A server transport that records which channels' requests it has answered (paramiko sends the
    reply after check_channel_exec_request returns, in its own thread)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self._replied: set[int] = set()
        self._replied_cond = threading.Condition()

    def _send_user_message(self, data: Any) -> None:
        super()._send_user_message(data)
        raw = data.asbytes() if hasattr(data, "asbytes") else bytes(data)
        if raw[:1] == bytes([99]):  # MSG_CHANNEL_SUCCESS, then the recipient channel id
            with self._replied_cond:
                self._replied.add(int.from_bytes(raw[1:5], "big"))
                self._replied_cond.notify_all()

    def wait_replied(self, remote_chanid: int, timeout: float = 10.0) -> None:
        with self._replied_cond:
            self._replied_cond.wait_for(lambda: remote_chanid in self._replied, timeout=timeout)
            self._replied.discard(remote_chanid)


class _Server(paramiko.ServerInterface):
    def __init__(self, sim: HyperVSimulator) -> None:
        self.sim = sim
        self.user = ""
        self._commands: dict[int, str] = {}
        self._cond = threading.Condition()

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if username.lower() in self.sim.hosts and any(k.asbytes() == key.asbytes() for k in self.sim.authorized):
            self.user = username
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session":
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        if self.sim.host(self.user).down:
            return paramiko.OPEN_FAILED_CONNECT_FAILED
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        with self._cond:
            self._commands[channel.get_id()] = command.decode("utf-8", "replace")
            self._cond.notify_all()
        return True

    def wait_command(self, chanid: int, timeout: float = 10.0) -> str | None:
        with self._cond:
            self._cond.wait_for(lambda: chanid in self._commands, timeout=timeout)
            return self._commands.pop(chanid, None)


def generate_key() -> tuple[paramiko.Ed25519Key, str]:
    """A fresh Ed25519 key: (paramiko key, OpenSSH private key text)."""
    priv = ed25519.Ed25519PrivateKey.generate()
    text = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                              serialization.NoEncryption()).decode("ascii")
    return paramiko.Ed25519Key.from_private_key(io.StringIO(text)), text


__all__ = ["HyperVSimulator", "LogEntry", "PSError", "SimHost", "SimVM", "generate_key", "parse_script", "tokenize"]
