"""Consistency groups: recovery points shared by several VMs.

A group cycle captures every member at one instant (tagging each member's point with the group point's
id, `<group>@<seq>`) and ships them. A group point is read back from the replicas, never from a record
of our own: it exists only while every member holds its part. A cycle that failed on one member, or a
part that a member's retention already dropped, leaves no group point, so nothing can offer a point
whose parts are from different moments. Failing over a group picks one group point and takes each member
to exactly its part (PointChoice.id).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Literal

from .fabric.base import PointChoice, RecoveryPoint
from .model import ConsistencyGroup
from .model.common import Frozen


class GroupPoint(Frozen):
    id: str
    group: str
    created_at: datetime
    consistency: Literal["crash", "app"]
    members: dict[str, str]  # VM -> its part (a recovery point id)


def group_points(group: ConsistencyGroup, points: Mapping[str, Iterable[RecoveryPoint]]) -> list[GroupPoint]:
    """The group's complete points, oldest first: those every member holds its part of."""
    parts: dict[str, dict[str, RecoveryPoint]] = {}
    for vm in group.vms:
        for rp in points.get(vm, ()):
            if rp.group and rp.group.rsplit("@", 1)[0] == group.name:
                parts.setdefault(rp.group, {})[vm] = rp
    out = []
    for gid, have in parts.items():
        if set(have) != set(group.vms):
            continue
        # One capture gives every part the same moment and consistency; anything else is not one point.
        if len({rp.created_at for rp in have.values()}) != 1 or len({rp.consistency for rp in have.values()}) != 1:
            continue
        first = next(iter(have.values()))
        out.append(GroupPoint(id=gid, group=group.name, created_at=first.created_at, consistency=first.consistency,
                              members={vm: rp.id for vm, rp in have.items()}))
    return sorted(out, key=lambda g: g.created_at)


def choose_group_point(group: ConsistencyGroup, choice: PointChoice,
                       points: Mapping[str, Iterable[RecoveryPoint]]) -> GroupPoint | None:
    """The group point a failover asked for (latest, latest app-consistent, or the newest at or before a
    time); latest_processed is latest here (a group point is only ever whole once processed)."""
    return choice.model_copy(update={"id": None}).choose(group_points(group, points))


def member_choices(gp: GroupPoint) -> dict[str, PointChoice]:
    """Each member's exact part of the group point."""
    return {vm: PointChoice(kind="latest", id=pid) for vm, pid in gp.members.items()}
