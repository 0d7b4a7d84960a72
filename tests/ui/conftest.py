"""The browser tests' stack: one `siterecovery ui up` per test file (tests/ui/uikit.py), shared by that file's
tests: starting one takes a minute or more on a loaded 2-core machine. The tests make no assumption about
runs the others made (they compare with counts taken first, or look for their own runs).

Per file, not per session: one project has one estate (siterecovery.estate), and a file that starts a stack
of its own (test_ui_first_hour.py, live schedules) must not meet another file's stack still running on the
same project; a session-wide stack lived until the end of the run and made it fail with EstateError."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ui.uikit import Stack, running_stack


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack() as st:
        yield st
