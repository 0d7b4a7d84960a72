"""Entrypoint of the `failover/<plan>` deployments: the recovery-plan flow under the name operators
look for in the UI. Same parameters, form, guard and report; only the flow's name differs, so the
deployment reads `failover/three-tier` rather than `recovery-plan/three-tier`.
"""

from flows.recovery_plan import recovery_plan

failover = recovery_plan.with_options(name="failover")
