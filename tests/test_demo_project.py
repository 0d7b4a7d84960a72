"""plans/demo as the linux fabric sees it: each VM's address at the primary, recovery and isolated
test network, and the runtime copy the demo writes (valid, local transport, no template values)."""

from __future__ import annotations

from pathlib import Path

from siterecovery.demo import write_project
from siterecovery.fabric.linux import LinuxFabric
from siterecovery.model import Direction
from siterecovery.placement import pairing_placements
from siterecovery.project import load_project

ROOT = Path(__file__).resolve().parents[1]


def test_addresses_per_site_and_test_network() -> None:
    proj = load_project(ROOT / "plans" / "demo")
    pair = proj.protection.pairing("shop")
    fwd = pairing_placements(proj, pair, Direction.forward)
    back = pairing_placements(proj, pair, Direction.failback)
    for vm, n in (("db-01", 11), ("app-01", 12), ("web-01", 13)):
        p, b = fwd[vm], back[vm]
        assert LinuxFabric._address(p, p.source, test=False) == f"127.10.0.{n}"
        assert LinuxFabric._address(p, p.target, test=False) == f"127.20.0.{n}"
        assert LinuxFabric._address(p, p.target, test=True) == f"127.30.0.{n}"
        assert LinuxFabric._address(b, b.source, test=False) == f"127.20.0.{n}"
        assert LinuxFabric._address(b, b.target, test=False) == f"127.10.0.{n}"


def test_runtime_copy(tmp_path: Path) -> None:
    out = write_project(ROOT, tmp_path, 18080, None)
    proj = load_project(out)
    assert {h.address for h in proj.topology.hosts} == {"local"}
    text = "".join(f.read_text() for f in out.glob("*.yaml"))
    assert "/var/lib/siterecovery" not in text and "/opt/siterecovery" not in text and ":8080" not in text
    assert str(tmp_path / "sites") in text and ":18080" in text
