"""Every validation rule, each with a failing example whose problem must name the right file, line
and field path. The base project is valid; each case edits one place, marked by a unique token."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from siterecovery.errors import PlanError, Problem
from siterecovery.project import load_project

TOPOLOGY = """\
kind: Topology
sites:
  - name: east
  - name: west
hosts:
  - name: h-east
    site: east
    fabric: memory
    address: 127.0.0.1
    default_storage: /srv/east
  - name: h-west
    site: west
    fabric: memory
    address: 127.0.0.1
    default_storage: /srv/west
clouds:
  - name: c-east
    site: east
    host_groups: [{name: g, hosts: [h-east]}]
  - name: c-west
    site: west
    host_groups: [{name: g, hosts: [h-west]}]
vm_networks:
  - name: n-east
    site: east
    subnets: [{name: s1, cidr: 10.0.1.0/24}, {name: s2, cidr: 10.0.2.0/24}]
  - name: n-west
    site: west
    subnets: [{name: s2, cidr: 10.1.2.0/24}, {name: s1, cidr: 10.1.1.0/24, pool: {start: 10.1.1.10, end: 10.1.1.20}}]
storage_classifications:
  - {name: fast, site: east, locations: [/srv/east/fast]}
  - {name: fast-w, site: west, locations: [/srv/west/fast]}
vms:
  - name: v1
    host: h-east
    cloud: c-east
    disks: [{name: os, path: /srv/east/v1.img, classification: fast}]
    nics: [{network: n-east, subnet: s1, address: 10.0.1.5}]
  - name: v2
    host: h-east
    cloud: c-east
    nics: [{network: n-east, subnet: s2}]
  - name: v3
    host: h-east
    cloud: c-east
"""

PROTECTION = """\
kind: Protection
policies:
  - name: pol
    copy_frequency_seconds: 300
    recovery_history_hours: 4
    app_consistent_frequency_hours: 1
pairings:
  - name: east-west
    protected_cloud: c-east
    protecting_cloud: c-west
    policy: pol
network_mappings:
  - {source: n-east, target: n-west}
storage_mappings:
  - {source: fast, target: fast-w}
"""

PLAN = """\
kind: RecoveryPlan
name: app
source: c-east
target: c-west
groups:
  - name: first
    vms: [v1, {name: v2, depends_on: [v1]}]
    after:
      - type: script
        name: check
        path: check.sh
        args: ['{{ vm.name }}']
  - name: second
    vms: [v3]
    before:
      - type: manual
        name: ok
        instructions: Confirm.
"""


def write(tmp: Path, topology: str = TOPOLOGY, protection: str = PROTECTION, plan: str = PLAN, **extra: str) -> Path:
    (tmp / "topology.yaml").write_text(topology)
    (tmp / "protection.yaml").write_text(protection)
    (tmp / "plan.yaml").write_text(plan)
    (tmp / "check.sh").write_text("#!/bin/sh\nexit 0\n")
    for name, text in extra.items():
        (tmp / f"{name}.yaml").write_text(text)
    return tmp


def problems(tmp: Path) -> list[Problem]:
    with pytest.raises(PlanError) as ei:
        load_project(tmp)
    return list(ei.value.problems)


def line_of(text: str, token: str) -> int:
    hits = [i for i, line in enumerate(text.splitlines(), start=1) if token in line]
    assert len(hits) == 1, f"token {token!r} must appear once, found on lines {hits}"
    return hits[0]


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} must appear once"
    return text.replace(old, new)


def expect(tmp: Path, file: str, text: str, token: str, path: str, needle: str) -> None:
    found = problems(tmp)
    line = line_of(text, token)
    matches = [p for p in found if p.file.endswith(file) and needle in p.message]
    assert matches, f"no problem containing {needle!r} in {file}; got:\n" + "\n".join(map(str, found))
    assert any(p.line == line and p.path == path for p in matches), (
        f"expected {file}:{line} {path}; got:\n" + "\n".join(map(str, matches)))


def test_base_project_is_valid(tmp_path: Path) -> None:
    project = load_project(write(tmp_path))
    assert set(project.plans) == {"app"}
    assert [g.name for g in project.plan("app").groups] == ["first", "second"]


# ---- topology -------------------------------------------------------------------------------------
TOPO_CASES = [
    ("unknown host of a VM", "    host: h-east\n    cloud: c-east\n    nics: [{network: n-east, subnet: s2}]",
     "    host: h-nowhere\n    cloud: c-east\n    nics: [{network: n-east, subnet: s2}]", "h-nowhere", "vms[1].host",
     "unknown host 'h-nowhere'"),
    ("unknown cloud of a VM", "  - name: v3\n    host: h-east\n    cloud: c-east",
     "  - name: v3\n    host: h-east\n    cloud: c-nowhere", "c-nowhere", "vms[2].cloud", "unknown cloud 'c-nowhere'"),
    ("unknown network of a NIC", "nics: [{network: n-east, subnet: s2}]", "nics: [{network: n-mars, subnet: s2}]",
     "n-mars", "vms[1].nics[0].network", "unknown VM network 'n-mars'"),
    ("unknown subnet", "nics: [{network: n-east, subnet: s2}]", "nics: [{network: n-east, subnet: s9}]",
     "s9", "vms[1].nics[0].subnet", "unknown subnet of 'n-east' 's9'"),
    ("address outside its subnet", "address: 10.0.1.5", "address: 10.9.9.9", "10.9.9.9",
     "vms[0].nics[0].address", "outside subnet"),
    ("host in another site's cloud", "host_groups: [{name: g, hosts: [h-west]}]",
     "host_groups: [{name: g, hosts: [h-west, h-east]}]", "h-west, h-east", "clouds[1].host_groups[0].hosts[1]",
     "is in site 'east'"),
    ("duplicate VM", "  - name: v3\n", "  - name: v2\n    host: h-east\n    cloud: c-east\n  - name: v3\n",
     None, "vms[2].name", "VM 'v2' is defined twice"),
    ("unknown storage classification", "classification: fast}", "classification: slowest}", "slowest",
     "vms[0].disks[0].classification", "unknown storage classification 'slowest'"),
    ("unknown field with a hint", "    default_storage: /srv/west\n", "    default_storage: /srv/west\n    adress: x\n",
     "adress", "hosts[1].adress", "did you mean 'address'"),
    ("missing required field", "    address: 127.0.0.1\n    default_storage: /srv/west\n",
     "    default_storage: /srv/west\n", None, "hosts[1].address", "required field 'address' is missing"),
    ("an unquoted true as a name", "  - name: v3\n", "  - name: true\n", "name: true", "vms[2].name",
     "YAML read a boolean"),
    ("duplicate key", "    fabric: memory\n    address: 127.0.0.1\n    default_storage: /srv/west",
     "    fabric: memory\n    address: 127.0.0.1\n    fabric: hyperv\n    default_storage: /srv/west", "fabric: hyperv",
     "hosts[1].fabric", "duplicate key 'fabric'"),
    ("unknown fabric kind", "    fabric: memory\n    address: 127.0.0.1\n    default_storage: /srv/west",
     "    fabric: vmware\n    address: 127.0.0.1\n    default_storage: /srv/west", "vmware", "hosts[1].fabric",
     "'vmware'"),
]


@pytest.mark.parametrize(("label", "old", "new", "token", "path", "needle"), TOPO_CASES, ids=[c[0] for c in TOPO_CASES])
def test_topology_rules(tmp_path: Path, label: str, old: str, new: str, token: str | None, path: str, needle: str) -> None:
    text = edit(TOPOLOGY, old, new)
    write(tmp_path, topology=text)
    if token is None:
        found = problems(tmp_path)
        assert any(needle in p.message and p.path == path for p in found), "\n".join(map(str, found))
        return
    expect(tmp_path, "topology.yaml", text, token, path, needle)


def test_vm_named_no_is_a_name_not_a_boolean(tmp_path: Path) -> None:
    topo = edit(TOPOLOGY, "  - name: v3\n", "  - name: no\n")
    plan = edit(PLAN, "vms: [v3]", "vms: [no]")
    project = load_project(write(tmp_path, topology=topo, plan=plan))
    assert project.plan("app").groups[1].vm_names == ("no",)


# ---- protection -----------------------------------------------------------------------------------
def test_hyperv_copy_frequency_must_be_30_300_or_900(tmp_path: Path) -> None:
    topo = TOPOLOGY.replace("fabric: memory", "fabric: hyperv")
    prot = edit(PROTECTION, "copy_frequency_seconds: 300", "copy_frequency_seconds: 60")
    write(tmp_path, topology=topo, protection=prot)
    expect(tmp_path, "protection.yaml", prot, "copy_frequency_seconds: 60", "policies[0].copy_frequency_seconds",
           "exactly 30, 300 or 900")


def test_hyperv_refuses_a_bandwidth_cap(tmp_path: Path) -> None:
    # Memory and linux take a policy's cap; Hyper-V Replica has none of its own (QoS does it there).
    prot = edit(PROTECTION, "copy_frequency_seconds: 300", "copy_frequency_seconds: 300\n    bandwidth_mbps: 40")
    write(tmp_path, protection=prot)
    assert load_project(tmp_path).protection.policy("pol").bandwidth_bytes_per_second == 5_000_000
    write(tmp_path, topology=TOPOLOGY.replace("fabric: memory", "fabric: hyperv"), protection=prot)
    expect(tmp_path, "protection.yaml", prot, "bandwidth_mbps: 40", "policies[0].bandwidth_mbps", "New-NetQoSPolicy")


def test_linux_copy_frequency_floor(tmp_path: Path) -> None:
    topo = TOPOLOGY.replace("fabric: memory", "fabric: linux")
    topo = topo.replace("    cloud: c-east\n", "    cloud: c-east\n    compute: {command: [sleep, '1000'], consistency: none}\n")
    prot = edit(PROTECTION, "copy_frequency_seconds: 300", "copy_frequency_seconds: 2")
    write(tmp_path, topology=topo, protection=prot)
    expect(tmp_path, "protection.yaml", prot, "copy_frequency_seconds: 2", "policies[0].copy_frequency_seconds",
           "at most every 5 seconds")


def test_linux_vm_needs_compute(tmp_path: Path) -> None:
    topo = TOPOLOGY.replace("fabric: memory", "fabric: linux")
    write(tmp_path, topology=topo)
    found = problems(tmp_path)
    assert any(p.path == "vms[0]" and "needs 'compute'" in p.message and p.line == line_of(topo, "name: v1")
               for p in found), found


def test_linux_vm_without_consistent_capture_is_refused(tmp_path: Path) -> None:
    """A process VM without a freeze command would get recovery points read over time (torn): refused,
    with the file and line of its compute, unless it says consistency: none."""
    topo = TOPOLOGY.replace("fabric: memory", "fabric: linux")
    bare = topo.replace("    cloud: c-east\n", "    cloud: c-east\n    compute: {command: [sleep, '1000']}\n", 1)
    write(tmp_path, topology=bare)
    found = [p for p in problems(tmp_path) if p.path == "vms[0].compute"]
    assert len(found) == 1 and "no consistent way to capture" in found[0].message, found
    assert found[0].line == line_of(bare, "compute: {command") and found[0].file.endswith("topology.yaml")
    for ok in ("{command: [sleep, '1000'], consistency: none}", "{command: [sleep, '1000'], freeze: ['true'], thaw: ['true']}",
               "{backend: qemu, kernel: /boot/vmlinuz}", "{backend: libvirt, domain: web, uri: 'qemu:///system'}"):
        write(tmp_path, topology=topo.replace("    cloud: c-east\n", f"    cloud: c-east\n    compute: {ok}\n", 1))
        assert not [p for p in problems(tmp_path) if p.path.startswith("vms[0].compute")], ok


def test_guest_agent_needs_backend_qemu(tmp_path: Path) -> None:
    topo = TOPOLOGY.replace("fabric: memory", "fabric: linux")
    bad = topo.replace("    cloud: c-east\n", "    cloud: c-east\n    compute: {command: [sleep, '1000'], consistency: none, "
                       "guest_agent: true}\n", 1)
    write(tmp_path, topology=bad)
    found = [p for p in problems(tmp_path) if p.path == "vms[0].compute.guest_agent"]
    assert len(found) == 1 and "guest_agent needs backend qemu" in found[0].message, found
    write(tmp_path, topology=topo.replace("    cloud: c-east\n", "    cloud: c-east\n    compute: {backend: qemu, "
                                          "kernel: /boot/vmlinuz, guest_agent: true}\n", 1))
    assert not [p for p in problems(tmp_path) if p.path.startswith("vms[0].compute")]


def test_app_consistent_frequency_below_retention(tmp_path: Path) -> None:
    prot = edit(PROTECTION, "app_consistent_frequency_hours: 1", "app_consistent_frequency_hours: 6")
    write(tmp_path, protection=prot)
    expect(tmp_path, "protection.yaml", prot, "name: pol", "policies[0]", "must be below recovery_history_hours (4)")


def test_recovery_history_limit(tmp_path: Path) -> None:
    prot = edit(PROTECTION, "recovery_history_hours: 4", "recovery_history_hours: 25")
    write(tmp_path, protection=prot)
    expect(tmp_path, "protection.yaml", prot, "recovery_history_hours: 25", "policies[0].recovery_history_hours",
           "less than or equal to 24")


def test_initial_replication_start_within_seven_days(tmp_path: Path) -> None:
    when = (datetime.now(UTC) + timedelta(days=9)).strftime("%Y-%m-%dT%H:%M:%SZ")
    prot = edit(PROTECTION, "    app_consistent_frequency_hours: 1\n",
                f"    app_consistent_frequency_hours: 1\n    initial_replication: {{method: network, start_at: '{when}'}}\n")
    write(tmp_path, protection=prot)
    expect(tmp_path, "protection.yaml", prot, "start_at", "policies[0].initial_replication.start_at", "7 days")


def test_offline_initial_replication_needs_paths(tmp_path: Path) -> None:
    prot = edit(PROTECTION, "    app_consistent_frequency_hours: 1\n",
                "    app_consistent_frequency_hours: 1\n    initial_replication: {method: offline, export_path: /x}\n")
    write(tmp_path, protection=prot)
    expect(tmp_path, "protection.yaml", prot, "method: offline", "policies[0].initial_replication.import_path",
           "required field 'import_path'")


@pytest.mark.parametrize(
    ("old", "new", "token", "path", "needle"),
    [
        ("policy: pol", "policy: gold", "policy: gold", "pairings[0].policy", "unknown policy 'gold'"),
        ("protecting_cloud: c-west", "protecting_cloud: c-mars", "c-mars", "pairings[0].protecting_cloud",
         "unknown cloud 'c-mars'"),
        ("{source: n-east, target: n-west}", "{source: n-east, target: n-moon}", "n-moon", "network_mappings[0].target",
         "unknown VM network 'n-moon'"),
        ("{source: n-east, target: n-west}", "{source: n-east, target: n-east}", "target: n-east",
         "network_mappings[0]", "both in site 'east'"),
        ("{source: fast, target: fast-w}", "{source: fast, target: fast-x}", "fast-x", "storage_mappings[0].target",
         "unknown storage classification 'fast-x'"),
    ],
)
def test_protection_references(tmp_path: Path, old: str, new: str, token: str, path: str, needle: str) -> None:
    prot = edit(PROTECTION, old, new)
    write(tmp_path, protection=prot)
    expect(tmp_path, "protection.yaml", prot, token, path, needle)


# ---- plans ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("old", "new", "token", "path", "needle"),
    [
        ("vms: [v3]", "vms: [v9]", "v9", "groups[1].vms[0]", "unknown VM 'v9'"),
        ("vms: [v3]", "vms: [v3, v1]", "v3, v1", "groups[1].vms[1]", "already in group 'first'"),
        ("depends_on: [v1]", "depends_on: [v3]", "depends_on: [v3]", "groups[0].vms[1].depends_on[0]",
         "of another group"),
        ("vms: [v1, {name: v2, depends_on: [v1]}]", "vms: [{name: v1, depends_on: [v2]}, {name: v2, depends_on: [v1]}]",
         "depends_on: [v2]", "groups[0].vms", "boot dependency cycle"),
        ("target: c-west", "target: c-east", "target: c-east", "target", "not a configured pairing"),
        ("source: c-east", "source: c-north", "c-north", "source", "unknown cloud 'c-north'"),
        ("path: check.sh", "path: missing.sh", "missing.sh", "groups[0].after[0].path", "not found"),
        ("args: ['{{ vm.name }}']", "args: ['{{ vm.name ']", "vm.name '", "groups[0].after[0].args[0]",
         "template error"),
        ("        instructions: Confirm.\n", "        instructions: Confirm.\n        host: h-east\n", "host: h-east",
         "groups[1].before[0].host", "unknown field 'host'"),
        ("        name: check\n", "        name: check\n        host: h-moon\n", "h-moon", "groups[0].after[0].host",
         "unknown host 'h-moon'"),
        ("type: manual", "type: pause", "type: pause", "groups[1].before[0]", "'pause'"),
        ("name: app", "name: App_1", "App_1", "name", "should match pattern"),
    ],
)
def test_plan_rules(tmp_path: Path, old: str, new: str, token: str, path: str, needle: str) -> None:
    plan = edit(PLAN, old, new)
    write(tmp_path, plan=plan)
    expect(tmp_path, "plan.yaml", plan, token, path, needle)


def test_two_plans_with_conflicting_roles(tmp_path: Path) -> None:
    topo = TOPOLOGY.replace("  - name: v3\n    host: h-east\n    cloud: c-east\n",
                            "  - name: v3\n    host: h-east\n    cloud: c-east\n"
                            "  - name: w1\n    host: h-west\n    cloud: c-west\n")
    prot = edit(PROTECTION, "network_mappings:", "  - name: west-east\n    protected_cloud: c-west\n"
                                                "    protecting_cloud: c-east\n    policy: pol\nnetwork_mappings:")
    other = "kind: RecoveryPlan\nname: zback\nsource: c-west\ntarget: c-east\ngroups:\n  - name: g\n    vms: [w1, v1]\n"
    write(tmp_path, topology=topo, protection=prot, other=other)
    found = problems(tmp_path)
    assert any("v1" in p.message and "fails over c-west -> c-east here but c-east -> c-west" in p.message
               and p.file.endswith("other.yaml") and p.line == 7 for p in found), found
    # and the VM is also not in the second plan's source cloud
    assert any("not the plan's source cloud" in p.message for p in found)


def test_duplicate_plan_names_across_files(tmp_path: Path) -> None:
    write(tmp_path, other=PLAN)
    found = problems(tmp_path)
    assert any("plan name 'app' is already used" in p.message and p.line == 2 for p in found), found


# ---- secrets --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("old", "new", "token", "path"),
    [
        ("    default_storage: /srv/west\n", "    default_storage: /srv/west\n    password: hunter2\n", "hunter2",
         "hosts[1].password"),
        ("    default_storage: /srv/west\n",
         "    default_storage: /srv/west\n    credential: {env: X, token: abc}\n", "token: abc",
         "hosts[1].credential.token"),
        ("    address: 127.0.0.1\n    default_storage: /srv/west",
         "    address: 127.0.0.1\n    host_key: '-----BEGIN OPENSSH PRIVATE KEY----- abc'\n    default_storage: /srv/west",
         "PRIVATE KEY", "hosts[1].host_key"),
    ],
)
def test_inline_secrets_are_refused(tmp_path: Path, old: str, new: str, token: str, path: str) -> None:
    text = edit(TOPOLOGY, old, new)
    write(tmp_path, topology=text)
    expect(tmp_path, "topology.yaml", text, token, path, "secrets do not belong in plans")


def test_secret_in_script_args_is_refused(tmp_path: Path) -> None:
    plan = edit(PLAN, "args: ['{{ vm.name }}']", "args: ['{{ vm.name }}', '--password=hunter2']")
    write(tmp_path, plan=plan)
    expect(tmp_path, "plan.yaml", plan, "hunter2", "groups[0].after[0].args[1]", "secrets do not belong")


def test_credential_reference_is_fine(tmp_path: Path) -> None:
    topo = edit(TOPOLOGY, "    default_storage: /srv/west\n",
                "    default_storage: /srv/west\n    credential: {secret_block: west-ssh-key}\n")
    project = load_project(write(tmp_path, topology=topo))
    cred = project.topology.host("h-west").credential
    assert cred is not None and cred.secret_block == "west-ssh-key"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    plan = edit(edit(PLAN, "vms: [v3]", "vms: [v9]"), "path: check.sh", "path: nope.sh")
    prot = edit(PROTECTION, "policy: pol", "policy: gold")
    write(tmp_path, plan=plan, protection=prot)
    found = problems(tmp_path)
    files = {Path(p.file).name for p in found}
    assert {"plan.yaml", "protection.yaml"} <= files and len(found) >= 3


def test_schema_errors_from_several_files_at_once(tmp_path: Path) -> None:
    write(tmp_path, topology=TOPOLOGY + "bogus: 1\n", plan=PLAN.replace("name: app", "name: app\nextra: 2"))
    found = problems(tmp_path)
    assert {Path(p.file).name for p in found} == {"topology.yaml", "plan.yaml"}


def test_no_topology(tmp_path: Path) -> None:
    (tmp_path / "plan.yaml").write_text(PLAN)
    found = problems(tmp_path)
    assert any("no Topology document" in p.message for p in found)


def test_every_project_in_plans_dir_is_valid() -> None:
    from siterecovery.project import project_dirs

    root = Path(__file__).resolve().parent.parent / "plans"
    dirs = project_dirs([root])
    assert root in dirs
    for d in dirs:
        project = load_project(d)
        assert project.plans, f"{d} has no plans"


# ---- host-to-host replication (linux peer_ssh) ------------------------------------------------------
@pytest.mark.parametrize(
    ("new", "token", "path", "needle"),
    [
        ("    peer_ssh: {identity_file: keys/peer, known_hosts: /etc/sr/known_hosts}\n", "keys/peer",
         "hosts[1].peer_ssh.identity_file", "must be an absolute path on the host"),
        ("    peer_ssh: {identity_file: /etc/sr/peer, known_hosts: '/etc/sr/known hosts'}\n", "known hosts",
         "hosts[1].peer_ssh.known_hosts", "must not contain whitespace"),
        ("    peer_ssh: {identity_file: /etc/sr/peer}\n", "peer_ssh", "hosts[1].peer_ssh.known_hosts",
         "required field 'known_hosts' is missing"),
        ("    peer_ssh: {identity_file: /etc/sr/peer, known_hosts: /etc/sr/kh}\n", "peer_ssh",
         "hosts[1].peer_ssh", "peer_ssh applies to linux hosts only; host 'h-west' is memory"),
    ],
)
def test_peer_ssh_rules(tmp_path: Path, new: str, token: str, path: str, needle: str) -> None:
    text = edit(TOPOLOGY, "    default_storage: /srv/west\n", "    default_storage: /srv/west\n" + new)
    write(tmp_path, topology=text)
    expect(tmp_path, "topology.yaml", text, token, path, needle)


def test_peer_ssh_on_a_linux_host_is_valid() -> None:
    from siterecovery.model import Host
    h = Host.model_validate({"name": "h", "site": "s", "fabric": "linux", "address": "10.0.0.1",
                             "peer_ssh": {"identity_file": "/etc/sr/peer", "known_hosts": "/etc/sr/kh"}})
    assert h.peer_ssh is not None and h.peer_ssh.known_hosts == "/etc/sr/kh"
    assert Host(name="h", site="s", fabric="linux", address="10.0.0.1").peer_ssh is None



def test_explicit_disk_classification_contradicting_its_location(tmp_path: Path) -> None:
    # Classifications belong to storage locations: a disk on slow's location is slow, whatever it says.
    topo = edit(TOPOLOGY, "  - {name: fast-w, site: west, locations: [/srv/west/fast]}\n",
                "  - {name: fast-w, site: west, locations: [/srv/west/fast]}\n"
                "  - {name: slow, site: east, locations: [/srv/east/slow]}\n")
    write(tmp_path, topology=topo)
    assert load_project(tmp_path) is not None  # explicit 'fast' on an unclassified location: fine
    topo = edit(topo, "path: /srv/east/v1.img, classification: fast", "path: /srv/east/slow/v1.img, classification: fast")
    write(tmp_path, topology=topo)
    expect(tmp_path, "topology.yaml", topo, "/srv/east/slow/v1.img", "vms[0].disks[0].classification",
           "is on a location of storage classification 'slow'")
    # Without the field the disk simply takes its location's classification.
    write(tmp_path, topology=topo.replace("path: /srv/east/slow/v1.img, classification: fast", "path: /srv/east/slow/v1.img"))
    assert load_project(tmp_path) is not None


# ---- consistency groups ----------------------------------------------------------------------------
GROUPS = PROTECTION + "consistency_groups:\n  - name: tier\n    vms: [v1, v2]\n"


def test_a_consistency_group_on_the_memory_fabric_is_valid(tmp_path: Path) -> None:
    project = load_project(write(tmp_path, protection=GROUPS))
    assert project.protection.group_of("v2") is not None and project.protection.group_of("v3") is None


def test_hyperv_refuses_a_consistency_group(tmp_path: Path) -> None:
    write(tmp_path, topology=TOPOLOGY.replace("fabric: memory", "fabric: hyperv"), protection=GROUPS)
    expect(tmp_path, "protection.yaml", GROUPS, "vms: [v1, v2]", "consistency_groups[0].vms[0]",
           "Hyper-V Replica keeps each VM's recovery points on its own")


def test_a_group_member_must_be_known_and_in_one_group(tmp_path: Path) -> None:
    prot = GROUPS + "  - name: other\n    vms: [v2, v9]\n"
    write(tmp_path, protection=prot)
    found = problems(tmp_path)
    assert any(p.path == "consistency_groups[1].vms[0]" and "already in consistency group 'tier'" in p.message
               for p in found), found
    assert any(p.path == "consistency_groups[1].vms[1]" and "unknown VM 'v9'" in p.message for p in found), found
    assert all(p.file.endswith("protection.yaml") and p.line == line_of(prot, "vms: [v2, v9]")
               for p in found if p.path.startswith("consistency_groups[1]"))


def test_a_linux_member_needs_something_that_holds_it_still(tmp_path: Path) -> None:
    topo = TOPOLOGY.replace("fabric: memory", "fabric: linux").replace(
        "    cloud: c-east\n    nics: [{network: n-east, subnet: s2}]",
        "    cloud: c-east\n    nics: [{network: n-east, subnet: s2}]\n"
        "    compute: {command: [sleep, '1000'], consistency: none}")
    write(tmp_path, topology=topo, protection=GROUPS)
    expect(tmp_path, "protection.yaml", GROUPS, "vms: [v1, v2]", "consistency_groups[0].vms[1]",
           "has no freeze command and does not run under QEMU")


def test_a_plan_fails_over_a_whole_group_or_none_of_it(tmp_path: Path) -> None:
    plan = edit(PLAN, "vms: [v1, {name: v2, depends_on: [v1]}]", "vms: [v1]")
    write(tmp_path, protection=GROUPS, plan=plan)
    expect(tmp_path, "plan.yaml", plan, "vms: [v1]", "groups[0].vms[0]",
           "VM 'v1' is in consistency group 'tier' with v2, which this plan does not fail over")
