"""GuestMemory: DMA regions from real memfds, ordered lookup, exact ownership of fds (lent to
``map``; a region keeps a dup)."""

from __future__ import annotations

import ctypes
import os

import pytest

from emulator.memory import GuestMemory
from testkit.procfs import fd_count as open_fd_count
from wire.errors import RemoteProtocolError

PAGE = 4096


def ram(size: int, fill: bytes = b"") -> int:
    fd = os.memfd_create("ram")
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    return fd


def map_ram(memory: GuestMemory, gpa: int, size: int, *, fd_offset: int = 0) -> None:
    """Map a fresh memfd; ``map`` only borrows it, so it is closed right after."""
    fd = ram(size)
    try:
        memory.map(gpa, size, fd=fd, fd_offset=fd_offset)
    finally:
        os.close(fd)


def test_map_gives_host_view_of_the_memfd() -> None:
    memory = GuestMemory()
    fd = ram(4 * PAGE, b"guest ram")
    memory.map(0x100000, 4 * PAGE, fd=fd)
    os.close(fd)
    addr = memory.host_address(0x100000)
    assert addr is not None
    assert ctypes.string_at(addr, 9) == b"guest ram"
    assert memory.host_address(0x100000 + 4 * PAGE) is None
    assert memory.find(0x100000 + PAGE, PAGE) is not None
    assert memory.find(0x100000 + 3 * PAGE, 2 * PAGE) is None
    memory.close()


def test_overlap_is_refused_and_nothing_kept() -> None:
    memory = GuestMemory()
    map_ram(memory, 0, 4 * PAGE)
    before = open_fd_count()
    fd = ram(PAGE)
    with pytest.raises(RemoteProtocolError) as info:
        memory.map(3 * PAGE, 2 * PAGE, fd=fd)
    assert info.value.errno == 17
    os.close(fd)
    assert open_fd_count() == before
    assert len(memory) == 1
    memory.close()


def test_unmap_removes_whole_regions_only() -> None:
    memory = GuestMemory()
    map_ram(memory, 0, 2 * PAGE)
    memory.map(2 * PAGE, 2 * PAGE, fd=None)
    with pytest.raises(RemoteProtocolError):
        memory.unmap(0, PAGE)
    assert memory.unmap(0, 4 * PAGE) == 2
    assert len(memory) == 0


def test_listeners_and_fd_hygiene_over_many_cycles() -> None:
    memory = GuestMemory()
    changes: list[int] = []
    memory.on_change(lambda: changes.append(len(memory)))
    before = open_fd_count()
    for _ in range(200):
        map_ram(memory, 0x1000, PAGE)
        memory.unmap(0x1000, PAGE)
    map_ram(memory, 0, PAGE)
    memory.unmap_all()
    assert open_fd_count() == before
    assert changes[:2] == [1, 0]
    assert len(changes) == 402


def test_unmappable_fd_is_refused_without_a_leak() -> None:
    memory = GuestMemory()
    before = open_fd_count()
    read_end, write_end = os.pipe()
    os.close(write_end)
    with pytest.raises(RemoteProtocolError):
        memory.map(0, PAGE, fd=read_end)
    os.close(read_end)
    assert open_fd_count() == before


@pytest.mark.parametrize("offset", [1 << 63, (1 << 64) - 4096, 123])
def test_fd_offset_outside_off_t_or_unaligned_is_refused(offset: int) -> None:
    memory = GuestMemory()
    before = open_fd_count()
    with pytest.raises(RemoteProtocolError):
        map_ram(memory, 0, PAGE, fd_offset=offset)
    assert open_fd_count() == before
    assert len(memory) == 0
