"""Replication alerts in tests: watch what replication-health hands to Prefect, and read the same events
back from the server's events API."""

from __future__ import annotations

import time
from typing import Any

import pytest

Sent = list[tuple[str, str, tuple[str, ...], str]]  # (event, vm, reasons, event id)


def observe_alerts(monkeypatch: pytest.MonkeyPatch) -> Sent:
    """Alerts as the flow emits them (they still go to the server), in order."""
    from prefect.events.worker import EventsWorker

    import flows.protection as fp

    # Event workers are per process and bind their clients to the server current when they start: one
    # left by an earlier test (pointing at a server that has since stopped) would drop every event.
    EventsWorker.drain_all(timeout=10, at_exit=False)
    sent: Sent = []
    real = fp.emit_alert

    def observed(alert: Any) -> Any:
        sent.append((alert.event, alert.vm, alert.reasons, alert.id))
        return real(alert)

    monkeypatch.setattr(fp, "emit_alert", observed)
    return sent


def server_events(ids: set[str], timeout: float = 60) -> list[dict[str, Any]]:
    """The events with these ids once the server has stored them all (or what it has at the timeout).
    Filtered by id: earlier tests in the session emit many events of the same kind, more than a page."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"filter": {"id": {"id": sorted(ids)}, "event": {"prefix": ["siterecovery.replication."]}}, "limit": 50}
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10)
        r.raise_for_status()
        got = [ev for ev in r.json()["events"] if ev["id"] in ids]
        if len(got) == len(ids) or time.monotonic() > deadline:
            return got
        time.sleep(0.5)
