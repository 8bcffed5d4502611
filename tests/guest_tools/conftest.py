"""Fixtures for the guest tools: the package on sys.path and libvguest.so built once."""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUEST_TOOLS = REPO / "guest-tools"

for _path in (str(REPO), str(GUEST_TOOLS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)


@pytest.fixture(scope="session", autouse=True)
def libvguest() -> Iterator[Path]:
    """Build libvguest.so (make is incremental) so a fresh clone's pytest works."""
    subprocess.run(["make", "-s", "-C", str(GUEST_TOOLS)], check=True)
    lib = GUEST_TOOLS / "vguest" / "libvguest.so"
    assert lib.is_file()
    os.environ.pop("VGUEST_LIB", None)
    yield lib
