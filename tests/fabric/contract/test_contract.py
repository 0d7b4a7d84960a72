"""The fabric contract (siterecovery/fabric/base.py), the same cases on every fabric (subjects.py): the memory
fabric, the linux fabric over the real sshd, and the Hyper-V driver on the simulator. Every operation is
idempotent (asking again for a state the VM is in says `changed=False`), a failover takes the point it
was asked for and says which, and a drill leaves replication as it found it."""

from __future__ import annotations

import pytest

from siterecovery.fabric.base import PointChoice, ReplicationState

from .subjects import Subject, protected

S = ReplicationState


def test_enable_and_initial_replication_are_idempotent(subject: Subject) -> None:
    f, p = subject.fabric, subject.p
    assert f.enable_replication(p).changed
    again = f.enable_replication(p)
    assert not again.changed
    first = f.start_initial_replication(p)
    assert first.changed
    assert not f.start_initial_replication(p).changed
    assert f.replication_health(p).state == S.Replicating


def test_a_drill_is_idempotent_and_leaves_replication_as_it_was(subject: Subject) -> None:
    f, p = subject.fabric, subject.p
    protected(subject)
    before = [rp.id for rp in f.recovery_points(p)]
    assert before, "no recovery point after two cycles"
    r = f.test_failover(p)
    assert r.changed and r.point is not None and r.point.id == before[-1]
    assert not f.test_failover(p).changed
    assert f.cleanup_test_failover(p).changed
    assert not f.cleanup_test_failover(p).changed
    assert f.replication_health(p).state == S.Replicating
    assert [rp.id for rp in f.recovery_points(p)][: len(before)] == before  # the drill dropped no point


def test_failover_and_commit_are_idempotent(subject: Subject) -> None:
    f, p = subject.fabric, subject.p
    protected(subject)
    r = f.failover(p)
    assert r.changed and r.state == S.FailedOverWaitingCompletion
    again = f.failover(p)
    assert not again.changed and again.state == S.FailedOverWaitingCompletion
    assert f.commit_failover(p).state == S.FailedOver
    assert not f.commit_failover(p).changed


def test_cancel_returns_to_replicating_and_is_idempotent(subject: Subject) -> None:
    f, p = subject.fabric, subject.p
    protected(subject)
    f.failover(p)
    r = f.cancel_failover(p)
    assert r.changed and r.state == S.Replicating
    assert not f.cancel_failover(p).changed
    assert f.replication_health(p).state == S.Replicating


def test_failover_to_an_exact_older_point_takes_that_point(subject: Subject) -> None:
    """The contract a consistency group relies on: PointChoice.id is that point or an error, never
    "latest" instead."""
    f, p = subject.fabric, subject.p
    protected(subject, points=3)
    pts = f.recovery_points(p)
    assert len(pts) >= 2, pts
    older = pts[-2]
    r = f.failover(p, PointChoice(id=older.id))
    assert r.changed and r.point is not None and r.point.id == older.id, r


def test_failover_to_a_point_that_is_not_there_is_refused(subject: Subject) -> None:
    from siterecovery.errors import NotFoundError

    f, p = subject.fabric, subject.p
    protected(subject)
    with pytest.raises(NotFoundError, match="no recovery point matches point nosuch"):
        f.failover(p, PointChoice(id="nosuch"))
    assert f.replication_health(p).state == S.Replicating  # nothing moved


def test_suspend_and_resume_are_idempotent(subject: Subject) -> None:
    f, p = subject.fabric, subject.p
    protected(subject, points=1)
    r = f.suspend(p)
    assert r.changed and r.state == S.Suspended
    assert not f.suspend(p).changed
    assert f.replication_health(p).state == S.Suspended
    r = f.resume(p)
    assert r.changed and r.state == S.Replicating
    assert not f.resume(p).changed
