"""The browser tests' stack: one `siterecovery ui up` for the session (tests/ui/uikit.py), shared by the test
files: starting one takes a minute or more on a loaded 2-core machine. The tests make no assumption about
runs the others made (they compare with counts taken first, or look for their own runs)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ui.uikit import Stack, running_stack


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    with running_stack() as st:
        yield st
