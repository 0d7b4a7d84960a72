"""The run request: the one frozen value every way of starting a run builds (flows, UI forms, CLI)."""

from __future__ import annotations

import inspect
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from siterecovery.compile import RunOptions
from siterecovery.errors import ConfigurationError
from siterecovery.model import Direction, FailoverType, FailurePolicy
from siterecovery.request import ConfirmationRequired, RunRequest


def test_its_fields_are_the_recovery_plan_flows_parameters() -> None:
    from flows.recovery_plan import recovery_plan

    params = inspect.signature(recovery_plan.fn).parameters
    assert list(params) == list(RunRequest.model_fields)
    for name, p in params.items():
        if p.default is not inspect.Parameter.empty:
            assert RunRequest.model_fields[name].default == p.default, name


def test_frozen_and_checked() -> None:
    r = RunRequest(plan="app")
    with pytest.raises(ValidationError):
        r.plan = "other"  # type: ignore[misc]
    r.check("app")  # a drill needs no confirmation
    with pytest.raises(ConfirmationRequired, match="confirm='app'"):
        RunRequest(plan="app", failover_type=FailoverType.planned).check("app")
    RunRequest(plan="app", failover_type=FailoverType.planned, confirm="app").check("app")
    with pytest.raises(ConfigurationError, match="needs point_in_time"):
        RunRequest(plan="app", recovery_point="point_in_time").check("app")


def test_an_open_intent_resumes_the_same_request() -> None:
    at = datetime(2026, 11, 30, 2, tzinfo=UTC)
    r = RunRequest(plan="plans/app.yaml", failover_type=FailoverType.unplanned, direction=Direction.failback,
                   recovery_point="point_in_time", point_in_time=at, options=RunOptions(commit=False),
                   project="elsewhere", fabric="memory", confirm="app", failure_policy=FailurePolicy.stop,
                   fabric_options={"latency": {"failover": 0.1}}, host_limit=2, site_limit=8, requested_by="ann")
    again = RunRequest.resume(r.params("app"), "app-unplanned-1", "elsewhere", "bob")
    assert again == r.model_copy(update={"plan": "app", "intent": "app-unplanned-1", "requested_by": "bob"})
    assert again.point.kind == "point_in_time" and again.point.at == at
