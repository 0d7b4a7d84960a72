"""Fixtures of the protection flow tests: one Prefect test server for the session (16-24 s to start
here, hence the 90 s timeout)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def protection_prefect() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
