"""The ``procs`` fixture: a ``testkit.Harness`` in the test's ``tmp_path``.

Whatever the test did not stop is killed at teardown, and every log is printed then (pytest
shows it for failing tests only). Tests stop what they started with ``proc.stop()``, which
checks the clean exit itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit import Harness


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Harness]:
    """Processes started in ``tmp_path``; killed at teardown if the test did not stop them."""
    group = Harness(tmp_path)
    try:
        yield group
    finally:
        group.kill_all()
        print(group.logs())
