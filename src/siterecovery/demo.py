"""The embedded demo's estate on one machine: two sites (directories, reached over a private sshd on
127.0.0.1 when /usr/sbin/sshd exists, else locally), the runtime copy of plans/demo, the three-tier
shop (scripts/demo/tier.py), its protection by the linux fabric and the checks the demo makes; or, with
`--qemu` (GUESTS), plans/demo/qemu: two real QEMU guests (the test guest kit) on the same two sites.
No Prefect here: commands/demo.py runs the recovery plan through Prefect on top of this.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .fabric import FabricContext, driver_for
from .fabric.base import OpResult, Placement
from .fabric.linux import LinuxFabric
from .model import Direction
from .placement import pairing_placements
from .project import Project, load_project
from .testing.guest import acks, records

SSHD = "/usr/sbin/sshd"
PLAN = "shop"
PAIRING = "shop"
VMS = ("db-01", "db-02", "app-01", "web-01")  # boot order (the databases before the app)
HOST_NUMBERS = (11, 12, 13, 14)  # db-01, app-01, web-01, db-02 on every subnet
SUBNET = {"primary": "127.10.0", "recovery": "127.20.0", "test": "127.30.0"}
TEMPLATE_PORT = 8080
DISK_MIB = {"db-01": 16, "db-02": 16, "app-01": 1, "web-01": 1}


@dataclass(frozen=True)
class Scenario:
    """What the demo protects: the shop (process VMs) or real QEMU guests. Same estate, flows, checks."""

    name: str
    project: str  # under the checkout
    plan: str
    pairing: str
    vms: tuple[str, ...]
    consistency: str  # of the demo's own cycles: app (the shop's freeze hooks) or crash (QEMU's views)


SHOP = Scenario("shop", "plans/demo", PLAN, PAIRING, VMS, "app")
# The guests have no guest agent: crash-consistent point-in-time views (QEMU's copy-before-write).
GUESTS = Scenario("qemu", "plans/demo/qemu", "guests", "guests", ("db", "app"), "crash")
GUEST_DISK_MIB = 16
GUEST_BOOT = 600.0  # seconds: TCG boots the Debian kernel in 20-60 s here, minutes on a loaded machine
QEMU_TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils", "qemu-nbd": "qemu-utils"}
KIT_KEEP = "/opt/siterecovery-guest"  # the guest kit's place in plans/demo/qemu/topology.yaml


def qemu_missing() -> str | None:
    """What `demo --qemu` lacks on this machine, said as what to install; None when QEMU is there."""
    gone = [t for t in QEMU_TOOLS if shutil.which(t) is None]
    if not gone:
        return None
    pkgs = " ".join(sorted({QEMU_TOOLS[t] for t in gone}))
    return (f"the QEMU demo needs {', '.join(gone)}: install {pkgs} (and the guest kit's linux-image-amd64, "
            "busybox-static): sudo bash scripts/setup-system.sh; `make demo` runs without QEMU")


class MissingKit(RuntimeError):
    """The guest kit cannot be built here (no Debian kernel or static busybox): what to install."""


def kvm_boots(kit: Path, timeout: float = 10.0) -> bool:
    """KVM runs the guest here: /dev/kvm opens AND the kernel prints its first line within `timeout`
    (measured: on this CI machine /dev/kvm opens but a KVM guest never runs, so `accel: auto` would
    hang the demo; TCG then)."""
    from .replica.qemu import kvm_usable

    if not kvm_usable():
        return False
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-m", "128", "-display", "none", "-nodefaults", "-no-user-config",
            "-serial", "stdio", "-kernel", str(kit / "vmlinuz"), "-initrd", str(kit / "initramfs.gz"),
            "-append", "console=ttyS0 srmode=check"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        got = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            if proc.stdout.readline().strip():
                got.set()

        threading.Thread(target=read, daemon=True).start()
        return got.wait(timeout)
    finally:
        proc.kill()
        proc.wait()


def guest_kit(checkout: Path) -> Path:
    """The tiny test guest (vmlinuz + initramfs.gz) built by scripts/build-test-guest.sh into its cache
    (shared with the QEMU tests: SITERECOVERY_GUEST_CACHE, default ~/.cache/siterecovery/test-guest)."""
    cache = Path(os.environ.get("SITERECOVERY_GUEST_CACHE", Path.home() / ".cache" / "siterecovery" / "test-guest"))
    r = subprocess.run(["sh", str(checkout / "scripts" / "build-test-guest.sh"), str(cache)], capture_output=True,
                       text=True, timeout=300, check=False)
    if r.returncode == 2:
        raise MissingKit(f"{r.stderr.strip()} (sudo bash scripts/setup-system.sh installs the guest kit's packages)")
    if r.returncode != 0:
        raise RuntimeError(f"scripts/build-test-guest.sh failed: {r.stderr.strip()[-500:]}")
    return cache


def web_url(where: str, port: int) -> str:
    """The shop's front door at 'primary', 'recovery' or 'test' (the isolated drill network)."""
    return f"http://{SUBNET[where]}.13:{port}"


def checkout_root() -> Path:
    """The checkout holding plans/demo and scripts/demo (the package is installed editable from it)."""
    for base in (Path.cwd(), *Path(__file__).resolve().parents):
        if (base / "plans" / "demo" / "topology.yaml").is_file() and (base / "scripts" / "demo" / "tier.py").is_file():
            return base
    raise FileNotFoundError("plans/demo not found: run the demo from a siterecovery checkout")


# ---- the private sshd ------------------------------------------------------------------------------
@dataclass
class Sshd:
    port: int
    dir: Path
    host_key: str
    client_key: Path
    user: str
    proc: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def free_port(hosts: list[str], start: int) -> int:
    """The first port from `start` that every address can bind (two demos, or a test, can coexist)."""
    for port in range(start, start + 500):
        try:
            for h in hosts:
                with socket.socket() as s:
                    s.bind((h, port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no free port in {start}-{start + 499} on {', '.join(hosts)}")


def start_sshd(d: Path) -> Sshd | None:
    """A private OpenSSH sshd on 127.0.0.1 (as tests/sshd.py): generated host key, pinned in the runtime
    topology; one generated client key; key auth only. None when sshd is not installed."""
    if not os.path.exists(SSHD) or not shutil.which("ssh-keygen"):
        return None
    d.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"siterecovery-demo-{name}",
                        "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port(["127.0.0.1"], 2222)
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nUsePAM no\nStrictModes no\nPermitRootLogin yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "MaxSessions 64\nMaxStartups 64\nLogLevel ERROR\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # Debian's sshd wants its privilege separation directory
    with open(d / "sshd.log", "wb") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    kind, b64 = (d / "host_key.pub").read_text().split()[:2]
    server = Sshd(port=port, dir=d, host_key=f"{kind} {b64}", client_key=d / "client_key", user=getpass.getuser(),
                  proc=proc)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"sshd did not start: {(d / 'sshd.log').read_text()[-2000:]}") from None
            time.sleep(0.05)


# ---- the runtime copy of plans/demo ---------------------------------------------------------------
def _rewrite(obj: Any, subst: dict[str, str]) -> Any:
    if isinstance(obj, str):
        for a, b in subst.items():
            obj = obj.replace(a, b)
        return obj
    if isinstance(obj, list):
        return [_rewrite(x, subst) for x in obj]
    if isinstance(obj, dict):
        return {k: _rewrite(v, subst) for k, v in obj.items()}
    return obj


def write_project(checkout: Path, state: Path, port: int, sshd: Sshd | None, scenario: Scenario = SHOP,
                  kit: Path | None = None, accel: str | None = None) -> Path:
    """plans/demo (or the scenario's project) with this run's values: hosts reach the private sshd (or
    run locally), data lives under <state>/sites, commands use this checkout's scripts and this Python,
    8080 becomes `port`, the QEMU guests boot the guest kit `kit` with `accel` (kvm or tcg)."""
    src, dst = checkout / scenario.project, state / "project"
    dst.mkdir(parents=True, exist_ok=True)
    kit_subst = {KIT_KEEP: str(kit)} if kit is not None else {}  # before /opt/siterecovery, its prefix
    subst = {"/var/lib/siterecovery": str(state / "sites"), **kit_subst, "/opt/siterecovery": str(checkout),
             f":{TEMPLATE_PORT}": f":{port}"}
    for f in sorted(src.glob("*.yaml")):
        doc = _rewrite(yaml.safe_load(f.read_text()), subst)
        if doc.get("kind") == "Topology":
            for h in doc["hosts"]:
                for k in ("port", "host_key", "credential", "known_hosts", "user"):
                    h.pop(k, None)
                if sshd is None:
                    h["address"] = "local"
                else:
                    h.update(address="127.0.0.1", port=sshd.port, user=sshd.user, host_key=sshd.host_key,
                             credential={"key_file": str(sshd.client_key)})
            for vm in doc["vms"]:
                c = vm.get("compute") or {}
                for k in ("command", "freeze", "thaw"):
                    if c.get(k) and c[k][0] == "python3":
                        c[k][0] = sys.executable
                if accel and c.get("backend") == "qemu":
                    c["accel"] = accel
        if doc.get("kind") == "RecoveryPlan":
            for g in doc["groups"]:
                for a in g.get("after", []) + g.get("before", []):
                    if a["type"] == "script":
                        a["path"] = str((f.parent / a["path"]).resolve())
                        a.setdefault("env", {})["SITERECOVERY_DEMO_EXPECT"] = str(state / "expected.json")
        header = (f"# Generated by `siterecovery demo` from {f} for this run; edit {src.name}/, not this file.\n")
        (dst / f.name).write_text(header + yaml.safe_dump(doc, sort_keys=False, width=120))
    return dst


# ---- the shop ------------------------------------------------------------------------------------
def http(url: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - the demo's loopback tiers
        out: dict[str, Any] = json.loads(r.read())
        return out


def wait_healthy(url: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http(url + "/health", timeout=2)
        except (urllib.error.URLError, OSError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def orders(url: str) -> list[str]:
    return [str(o.get("item")) for o in http(url + "/orders")["orders"]]


def answers(url: str) -> bool:
    try:
        http(url + "/health", timeout=1)
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Writer(threading.Thread):
    """The shop's customers: an order every `interval` seconds through the primary web tier, each one
    remembered with the moment it was acknowledged (acknowledged means fsynced on db's disk)."""

    def __init__(self, url: str, interval: float = 0.05) -> None:
        super().__init__(daemon=True, name="demo-writer")
        self.url, self.interval = url, interval
        self.acked: list[tuple[float, str]] = []
        self.errors = 0
        self._halt = threading.Event()
        self._n = 0

    def run(self) -> None:
        while not self._halt.is_set():
            self._n += 1
            item = f"order-{self._n:05d}"
            try:
                http(self.url + "/orders", {"item": item})
                self.acked.append((time.time(), item))
            except (urllib.error.URLError, OSError, ValueError):
                self.errors += 1
            self._halt.wait(self.interval)

    def acked_before(self, t: float) -> list[str]:
        return [i for ts, i in list(self.acked) if ts < t]

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


# ---- the estate ----------------------------------------------------------------------------------
@dataclass
class Estate:
    """The demo's two sites and the shop's four VMs, driven through the linux fabric."""

    checkout: Path
    state: Path
    use_ssh: bool = True
    port: int = 0
    sshd: Sshd | None = None
    project: Project | None = None
    fabric: LinuxFabric | None = None
    placements: dict[str, Placement] = field(default_factory=dict)
    scenario: Scenario = SHOP
    kit: Path | None = None  # the guest kit (GUESTS)
    accel: str | None = None  # the guests': kvm when it boots the kit here, else tcg

    @property
    def vms(self) -> tuple[str, ...]:
        return self.scenario.vms

    @property
    def project_dir(self) -> Path:
        return self.state / "project"

    @property
    def fabric_state(self) -> Path:
        """SITERECOVERY_STATE for this run: VM records, intents, reports, persisted task results."""
        return self.state / "state"

    @property
    def fabric_options(self) -> dict[str, Any]:
        # The agent runs as `<python> -m siterecovery.replica.agent` at each host: this venv's Python.
        return {"python": sys.executable, "stop_grace": 5}

    def url(self, where: str) -> str:
        return web_url(where, self.port)

    def start(self) -> None:
        clean(self.state)
        self.state.mkdir(parents=True)
        self.sshd = start_sshd(self.state / "sshd") if self.use_ssh else None
        hosts = [f"{SUBNET[s]}.{n}" for s in SUBNET for n in HOST_NUMBERS]
        self.port = free_port(hosts, TEMPLATE_PORT)
        if self.kit is not None and self.accel is None:
            self.accel = "kvm" if kvm_boots(self.kit) else "tcg"
        write_project(self.checkout, self.state, self.port, self.sshd, self.scenario, self.kit, self.accel)
        self.project = load_project(self.project_dir)
        pairing = self.project.protection.pairing(self.scenario.pairing)
        self.placements = pairing_placements(self.project, pairing, Direction.forward)
        self.fabric_state.mkdir(parents=True, exist_ok=True)
        drv = driver_for("linux", FabricContext(state_dir=self.fabric_state, options=self.fabric_options))
        assert isinstance(drv, LinuxFabric)
        self.fabric = drv
        if self.scenario is GUESTS:
            for p in self.placements.values():
                for d in p.disks:
                    path = Path(d.source_path)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with open(path, "wb") as f:
                        f.truncate(GUEST_DISK_MIB << 20)
            return
        tier = self.checkout / "scripts" / "demo" / "tier.py"
        for vm in VMS:
            disk = Path(self.placements[vm].disks[0].source_path)
            disk.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, str(tier), "mkdisk", str(disk), "--size-mib", str(DISK_MIB[vm])], check=True)

    @property
    def transport(self) -> str:
        return f"ssh root@127.0.0.1:{self.sshd.port}" if self.sshd else "local (no sshd)"

    def each(self, op: Callable[[Placement], OpResult], vms: tuple[str, ...] | None = None) -> list[OpResult]:
        return [op(self.placements[vm]) for vm in (self.vms if vms is None else vms)]

    def start_workload(self) -> dict[str, Any]:
        """Enable replication (the fabric then knows the VMs) and boot the shop (or the guests) at the
        primary site; a guest is up once it acknowledged its first records."""
        assert self.fabric is not None
        f = self.fabric
        self.each(f.enable_replication)
        self.each(lambda p: f.start_vm(p, side="source"))
        if self.scenario is GUESTS:
            wait_until("the guests' first records", lambda: all(self.acked(vm) >= 3 for vm in self.vms), GUEST_BOOT)
            return {vm: self.acked(vm) for vm in self.vms}
        return wait_healthy(self.url("primary"))

    # ---- the QEMU guests: what they said and wrote -------------------------------------------------
    def run_dir(self, vm: str, site: str) -> Path:
        """A VM's run directory (QEMU's serial console, pid, QMP socket) at 'primary' or 'recovery'."""
        assert self.fabric is not None
        p = self.placements[vm]
        return Path(self.fabric._run_dir(p.source if site == "primary" else p.target, vm))

    def acked(self, vm: str, site: str = "primary") -> int:
        return acks(self.run_dir(vm, site) / "vm.serial")

    def replica_records(self, vm: str) -> dict[str, int]:
        """disk -> the records the replica at the recovery site holds (raises Torn for a torn point)."""
        assert self.fabric is not None
        p = self.placements[vm]
        return {d.disk: records(Path(self.fabric._replica_image(p, d.disk, None)), d.disk) for d in p.disks}

    def guest_pause(self, vm: str) -> float | None:
        """The guest's pause in the last point-in-time capture (QMP stop/cont window), in seconds."""
        assert self.fabric is not None
        with self.fabric._vm(self.placements[vm]) as box:
            return box[0].view_seconds if box[0] is not None else None

    def running(self, vm: str, site: str) -> bool:
        """A QEMU guest's process is alive at 'primary' or 'recovery'."""
        from .replica import qemu

        return bool(qemu.status(str(self.run_dir(vm, site)), "vm").get("pid"))

    def guests_expectation(self, drill_records: dict[str, int]) -> dict[str, Any]:
        """scripts/demo/check_guests.py's expectation file: where each guest's console is, per site."""
        return {"vms": {vm: {s: str(self.run_dir(vm, s)) for s in ("primary", "recovery")} for vm in self.vms},
                "drill_records": drill_records}

    def initial_replication(self) -> list[OpResult]:
        assert self.fabric is not None
        return self.each(self.fabric.start_initial_replication)

    def cycle(self) -> list[OpResult]:
        """One delta cycle of every VM: a consistency group's members together (the shop's two databases,
        both held by tier.py freeze/thaw at one instant: app-consistent; the QEMU guests, both captured
        in one QMP window: crash-consistent), every other VM on its own."""
        assert self.fabric is not None and self.project is not None
        f = self.fabric
        c: Any = self.scenario.consistency
        out: list[OpResult] = []
        grouped: set[str] = set()
        for g in self.project.protection.consistency_groups:
            out += f.replicate_group([self.placements[vm] for vm in g.vms], g.name, consistency=c)
            grouped.update(g.vms)
        return out + self.each(lambda p: f.replicate(p, consistency=c),
                               tuple(vm for vm in self.vms if vm not in grouped))

    def stop_workload(self) -> None:
        """Stop the shop wherever it runs now (after the failback: the primary site)."""
        kill_vms(self.state)

    def close(self) -> None:
        if self.fabric is not None:
            self.fabric.close()
            self.fabric = None
        if self.sshd is not None:
            self.sshd.stop()


def _pidfiles(state: Path) -> list[Path]:
    return sorted((state / "sites").glob("*/*/run/*.pid")) if (state / "sites").is_dir() else []


def kill_vms(state: Path, grace: float = 5.0) -> list[str]:
    """TERM (then KILL) every VM process the demo's hosts started, by pid file; the names stopped."""
    from .replica.process import kill

    stopped = []
    for pf in _pidfiles(state):
        if kill(str(pf), grace)["stopped"]:
            stopped.append(f"{pf.parent.parent.name}/{pf.stem}")
    return stopped


def processes_under(path: Path) -> list[str]:
    """Command lines of live processes that mention `path` (VMs, agents, sshd of a demo state)."""
    needle = str(path)
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            raw = (d / "cmdline").read_bytes()
            st = (d / "stat").read_text()
        except OSError:
            continue
        if st.split(")")[-1].split()[0] == "Z":
            continue
        cmd = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        if needle in cmd:
            found.append(f"{d.name}: {cmd[:200]}")
    return found


def clean(state: Path) -> None:
    """Stop whatever an earlier (perhaps interrupted) demo left running under `state`, then delete it."""
    if not state.exists():
        return
    kill_vms(state, grace=2)
    pidfile = state / "sshd" / "sshd.pid"
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
    for line in processes_under(state / "sites") + processes_under(state / "sshd"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
    shutil.rmtree(state)


def drill_leftovers(state: Path, port: int | None) -> list[str]:
    """What a drill could have left behind: test copies on disk, test VM processes, an answering test
    network (port None: the VMs have no network, as the QEMU guests). Empty after a clean drill."""
    left = [str(p) for p in (state / "sites").glob("*/*/test")]
    left += [f"process {p}" for p in processes_under(state / "sites") if "/test/" in p]
    if port is not None:
        left += [f"{SUBNET['test']}.{n}:{port} answers" for n in HOST_NUMBERS
                 if answers(f"http://{SUBNET['test']}.{n}:{port}")]
    return left


def wait_until(what: str, cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)
