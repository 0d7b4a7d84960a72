"""plans/demo as the linux fabric sees it: each VM's address at the primary, recovery and isolated
test network, and the runtime copy the demo writes (valid, local transport, no template values)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    for vm, n in (("db-01", 11), ("app-01", 12), ("web-01", 13), ("db-02", 14)):
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


def test_the_database_tier_is_one_consistency_group() -> None:
    """The demo's database tier (orders and payments) shares recovery points: the plan's database group
    is exactly one consistency group of the pairing, so a drill takes both databases to one moment."""
    proj = load_project(ROOT / "plans" / "demo")
    (group,) = proj.protection.consistency_groups
    database = next(g for g in proj.plan("shop").groups if g.name == "database")
    assert set(group.vms) == {v if isinstance(v, str) else v.name for v in database.vms} == {"db-01", "db-02"}


def test_the_shop_check_refuses_databases_from_different_moments() -> None:
    """check-shop's cross-database invariant: payments trail orders by at most one and each is for its
    order. Recovered from two different moments, the databases break it and the check says so."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_shop", ROOT / "scripts" / "demo" / "check_shop.py")
    assert spec is not None and spec.loader is not None
    check_shop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_shop)
    orders = [{"item": f"order-{i}"} for i in range(1, 6)]
    paid = [{"order": i, "item": f"order-{i}"} for i in range(1, 6)]
    assert check_shop.agree(orders, paid) == "5 payments match their orders"
    assert check_shop.agree(orders, paid[:4])  # the last order's payment not yet written: one moment
    with pytest.raises(check_shop.InconsistentDatabases, match="5 orders but 3 payments"):
        check_shop.agree(orders, paid[:3])  # orders newer than payments by two: two moments
    with pytest.raises(check_shop.InconsistentDatabases, match="3 orders but 5 payments"):
        check_shop.agree(orders[:3], paid)  # payments for orders the orders replica never saw
    with pytest.raises(check_shop.InconsistentDatabases, match="payment 2"):
        check_shop.agree(orders, [paid[0], {"order": 2, "item": "order-9"}, *paid[2:]])
