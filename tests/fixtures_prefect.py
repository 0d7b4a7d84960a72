"""The one Prefect test harness of a pytest session, shared by every flow test (plans and protection):
a real Prefect server in a subprocess with a fresh SQLite database, 16-24 s to start here (hence the
90 s timeout). Two harnesses in one session would start two servers and leave clients (the events
worker) bound to whichever came first, so there is exactly one fixture that starts it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    # A cold first start (migrations, no bytecode cache) on a loaded 2-core machine took over 90 s here.
    with prefect_test_harness(server_startup_timeout=300):
        yield
