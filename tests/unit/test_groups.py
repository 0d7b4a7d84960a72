"""siterecovery.groups: which group points exist and which one a failover takes. A group point is only
ever read back from the members' own points, so every way a part can be missing or foreign is here."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from siterecovery.fabric.base import PointChoice, RecoveryPoint
from siterecovery.groups import choose_group_point, group_points, member_choices
from siterecovery.model import ConsistencyGroup

T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
G = ConsistencyGroup(name="orders", vms=("db", "app"))


def rp(vm: str, seq: int, minutes: int, group: str | None = None, consistency: str = "crash") -> RecoveryPoint:
    return RecoveryPoint(id=f"{vm}@{seq}", vm=vm, created_at=T0 + timedelta(minutes=minutes), group=group,
                         consistency=consistency)  # type: ignore[arg-type]


def test_only_points_every_member_holds_are_group_points() -> None:
    points = {
        "db": [rp("db", 1, 0, "orders@1"), rp("db", 2, 5, "orders@2"), rp("db", 3, 10, "orders@3"), rp("db", 4, 12)],
        # orders@2 was dropped by app's retention; orders@3 never reached app (its cycle failed there)
        "app": [rp("app", 7, 0, "orders@1"), rp("app", 9, 11)],
    }
    assert [g.id for g in group_points(G, points)] == ["orders@1"]
    gp = choose_group_point(G, PointChoice(), points)
    assert gp is not None and member_choices(gp) == {"db": PointChoice(id="db@1"), "app": PointChoice(id="app@7")}


def test_parts_of_different_instants_are_not_one_point() -> None:
    # The same group id twice (a lost sequence write reused it): the parts' instants differ, so no point.
    points = {"db": [rp("db", 1, 0, "orders@1")], "app": [rp("app", 1, 3, "orders@1")]}
    assert group_points(G, points) == []


def test_another_groups_parts_and_plain_points_are_ignored() -> None:
    points = {"db": [rp("db", 1, 0, "billing@1"), rp("db", 2, 1)], "app": [rp("app", 1, 0, "billing@1")]}
    assert group_points(G, points) == []


def test_the_choice_applies_to_group_points() -> None:
    points = {
        "db": [rp("db", 1, 0, "orders@1", "app"), rp("db", 2, 5, "orders@2"), rp("db", 3, 10, "orders@3")],
        "app": [rp("app", 1, 0, "orders@1", "app"), rp("app", 2, 5, "orders@2"), rp("app", 3, 10, "orders@3")],
    }
    pick = lambda c: getattr(choose_group_point(G, c, points), "id", None)  # noqa: E731
    assert pick(PointChoice()) == "orders@3"
    assert pick(PointChoice(kind="latest_app_consistent")) == "orders@1"
    assert pick(PointChoice(kind="point_in_time", at=T0 + timedelta(minutes=7))) == "orders@2"
    assert pick(PointChoice(kind="point_in_time", at=T0 - timedelta(minutes=1))) is None
    # a member's exact part, and nothing else, is what a member's failover takes
    assert PointChoice(id="db@2").choose(points["db"]) == points["db"][1]
    assert PointChoice(id="db@9").choose(points["db"]) is None
