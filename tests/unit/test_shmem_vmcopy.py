"""``SafeCopier``: copies through our own memory where some pages fault, without a signal.

The faulting pages are real: ``PROT_NONE`` pages and pages past the end of a memfd.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from emulator.mman import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    map_memory,
    unmap_memory,
)
from emulator.shmem.vmcopy import SafeCopier

PAGE = 4096


@pytest.fixture
def copier() -> Iterator[SafeCopier]:
    copier = SafeCopier(4 * PAGE)
    yield copier
    copier.close()


@pytest.fixture
def holed() -> Iterator[tuple[int, int]]:
    """(address, memfd): 4 pages of a 3-page memfd, the second page PROT_NONE, the fourth past
    EOF. Page i holds bytes i+1."""
    fd = os.memfd_create("vmcopy-test")
    os.ftruncate(fd, 3 * PAGE)
    for page in range(3):
        os.pwrite(fd, bytes([page + 1]) * PAGE, page * PAGE)
    address = map_memory(0, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd=fd)
    map_memory(address + PAGE, PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    yield address, fd
    unmap_memory(address, 4 * PAGE)
    os.close(fd)


def test_reads_and_writes_where_nothing_faults(copier: SafeCopier, holed: tuple[int, int]) -> None:
    address, fd = holed
    assert copier.read(address + 10, 8) == b"\x01" * 8
    assert copier.write(address + 2 * PAGE + 5, b"written") == 0
    assert os.pread(fd, 7, 2 * PAGE + 5) == b"written"
    assert copier.read(address, 0) == b""
    assert copier.write(address, b"") == 0


def test_a_read_over_holes_reads_zero_there_and_copies_the_rest(
    copier: SafeCopier, holed: tuple[int, int]
) -> None:
    address, _ = holed
    got = copier.read(address + PAGE - 2, 3 * PAGE + 2)
    assert got == b"\x01" * 2 + bytes(PAGE) + b"\x03" * PAGE + bytes(PAGE)
    assert copier.read(address + PAGE + 7, 9) == bytes(9)  # starts in a hole
    assert copier.read(address + 3 * PAGE, 16) == bytes(16)  # past EOF


def test_a_write_over_holes_lands_around_them_and_counts_what_was_dropped(
    copier: SafeCopier, holed: tuple[int, int]
) -> None:
    address, fd = holed
    dropped = copier.write(address + PAGE - 2, b"\xee" * (3 * PAGE + 2))
    assert dropped == 2 * PAGE
    first, untouched, third = b"\x01" * (PAGE - 2) + b"\xee" * 2, b"\x02" * PAGE, b"\xee" * PAGE
    assert os.pread(fd, 3 * PAGE, 0) == first + untouched + third
    assert os.fstat(fd).st_size == 3 * PAGE, "a write past EOF grew the file"


def test_accesses_larger_than_the_scratch_buffer_are_split(holed: tuple[int, int]) -> None:
    address, fd = holed
    small = SafeCopier(1)
    try:
        assert small.capacity == PAGE
        assert small.read(address + 2 * PAGE - 8, PAGE + 16) == bytes(8) + b"\x03" * PAGE + bytes(8)
        assert small.write(address + 2 * PAGE - 8, b"\x44" * (PAGE + 16)) == 16
        assert os.pread(fd, PAGE, 2 * PAGE) == b"\x44" * PAGE
    finally:
        small.close()


def test_readable_tells_a_page_the_kernel_can_copy(
    copier: SafeCopier, holed: tuple[int, int]
) -> None:
    address, _ = holed
    assert [copier.readable(address + page * PAGE) for page in range(4)] == [
        True,
        False,
        True,
        False,
    ]


def test_a_forked_child_copies_its_own_memory(copier: SafeCopier) -> None:
    """The pid is refreshed at fork: the child must not read its parent's pages."""
    buffer = map_memory(0, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    try:
        copier.write(buffer, b"parent")
        pid = os.fork()
        if pid == 0:
            copier.write(buffer, b"child!")
            os._exit(0 if copier.read(buffer, 6) == b"child!" else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert copier.read(buffer, 6) == b"parent"
    finally:
        unmap_memory(buffer, PAGE)


def test_close_is_idempotent() -> None:
    copier = SafeCopier(PAGE)
    copier.close()
    copier.close()
