"""Fixtures shared by the test files."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from replicator.harness import NodeProcess


@pytest.fixture
def nodes() -> Iterator[list[NodeProcess]]:
    """The node processes a test starts (append each one); killed when the test ends."""
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.stop(signal.SIGKILL)
