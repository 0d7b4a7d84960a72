"""The browser tests' stack: one `siterecovery ui up` per test module (tests/ui/uikit.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ui.uikit import Stack, running_stack


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack() as st:
        yield st
