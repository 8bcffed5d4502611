"""Fixtures shared by the protocol tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture
def make_fds() -> Iterator[Callable[[int], list[int]]]:
    """Creates memfds on demand (each has its own inode, so fds can be told apart) and at
    teardown closes those the test left open, never an fd number that was reused since.
    """
    made: list[tuple[int, int]] = []

    def make(count: int) -> list[int]:
        fds = [os.memfd_create("test-fd", os.MFD_CLOEXEC) for _ in range(count)]
        made.extend((fd, os.fstat(fd).st_ino) for fd in fds)
        return fds

    yield make
    for fd, inode in made:
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == inode:
                os.close(fd)
