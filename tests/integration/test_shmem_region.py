"""The shared-memory BAR with real fds of every kind, real mmaps and real files.

Everything a guest sees goes through ``bar.read``/``bar.write``; what the back-end sees is checked
on its own fd with ``os.pread``; what the host really mapped is checked in ``/proc/self/maps``.
Tests where a page past EOF is touched run in a forked child, so a SIGBUS fails the test instead
of killing pytest.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from emulator.shmem import (
    FdKind,
    MappingInfo,
    MappingRefused,
    RefusalReason,
    SharedMemoryBar,
    SharedMemoryRegion,
    ShmemLayout,
)
from emulator.shmem.region import default_max_mappings
from testkit.fuse import FuseOpcode
from testkit.procfs import fd_count
from tests.helpers.fdkinds import FILE_KINDS, file_fd, fuse_file, secret_memfd
from wire.errors import RemoteProtocolError, StateError

PAGE = 4096
MIB = 1 << 20
REGION0 = 2 * MIB
REGION1 = MIB


def memfd(pages: int, *, name: str = "shm-test") -> int:
    """A sealable memfd of ``pages`` pages holding a pattern (byte i = i*7 mod 251)."""
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, pages * PAGE)
    os.pwrite(fd, pattern(0, pages * PAGE), 0)
    return fd


def map_memfd(
    bar: SharedMemoryBar,
    shmid: int,
    pages: int,
    *request: int,
    writable: bool,
) -> None:
    """Map a fresh pattern memfd; the fd is only lent to ``map``, so it is closed right after."""
    fd = memfd(pages)
    try:
        bar.map(shmid, fd, *request, writable=writable)
    finally:
        os.close(fd)


def pattern(start: int, size: int) -> bytes:
    return bytes((i * 7) % 251 for i in range(start, start + size))


def maps_lines() -> list[str]:
    return Path("/proc/self/maps").read_text().splitlines()


def bar_vmas(bar: SharedMemoryBar) -> int:
    """How many VMAs the BAR's reservation is split into right now."""
    count = 0
    for line in maps_lines():
        low, high = (int(x, 16) for x in line.split()[0].split("-"))
        if low < bar.host_address + bar.bar_size and bar.host_address < high:
            count += 1
    return count


def vma_at(address: int) -> str:
    """The /proc/self/maps line covering ``address``."""
    for line in maps_lines():
        low, high = (int(x, 16) for x in line.split()[0].split("-"))
        if low <= address < high:
            return line
    raise AssertionError(f"nothing mapped at {address:#x}")


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def bar() -> Iterator[SharedMemoryBar]:
    with SharedMemoryBar(ShmemLayout.from_sizes({0: REGION0, 1: REGION1})) as shm:
        yield shm


def region(bar: SharedMemoryBar, shmid: int) -> SharedMemoryRegion:
    found = bar.region(shmid)
    assert found is not None
    return found


def test_readonly_pattern_reads_back_at_every_width(bar: SharedMemoryBar) -> None:
    fd = memfd(4)
    bar.map(1, fd, PAGE, 2 * PAGE, 2 * PAGE, writable=False)
    base = REGION0 + 2 * PAGE
    for width in (1, 2, 3, 4, 8, 16, 4096):
        for offset in (0, 1, 7, 4095 - width + 1, 4096, 2 * PAGE - width):
            got = bar.read(base + offset, width)
            assert got == pattern(PAGE + offset, width), (width, offset)
    assert bar.read(base - 4, 8) == bytes(4) + pattern(PAGE, 4)
    assert bar.read(base + 2 * PAGE - 4, 8) == pattern(3 * PAGE - 4, 4) + bytes(4)
    line = vma_at(region(bar, 1).host_address + 2 * PAGE)
    assert "r--s" in line
    assert "memfd:shm-test" in line


def test_readwrite_guest_writes_land_in_the_memfd(bar: SharedMemoryBar) -> None:
    fd = memfd(2)
    probe = os.dup(fd)
    try:
        bar.map(0, fd, 0, 16 * PAGE, 2 * PAGE, writable=True)
        assert "rw-s" in vma_at(region(bar, 0).host_address + 16 * PAGE)
        base = 16 * PAGE
        bar.write(base + 8, b"\x11")
        bar.write(base + 16, b"\x22\x33")
        bar.write(base + 32, (0xDEADBEEF).to_bytes(4, "little"))
        bar.write(base + 40, (0x0123456789ABCDEF).to_bytes(8, "little"))
        bar.write(base + PAGE - 2, b"span")
        assert os.pread(probe, 1, 8) == b"\x11"
        assert os.pread(probe, 2, 16) == b"\x22\x33"
        assert os.pread(probe, 4, 32) == (0xDEADBEEF).to_bytes(4, "little")
        assert os.pread(probe, 8, 40) == (0x0123456789ABCDEF).to_bytes(8, "little")
        assert os.pread(probe, 4, PAGE - 2) == b"span"
        assert bar.read(base + 40, 8) == (0x0123456789ABCDEF).to_bytes(8, "little")
        os.pwrite(probe, b"backend", 100)
        assert bar.read(base + 100, 7) == b"backend"
    finally:
        os.close(probe)


def test_guest_write_to_readonly_mapping_changes_nothing_and_warns_once(
    bar: SharedMemoryBar, caplog: pytest.LogCaptureFixture
) -> None:
    fd = memfd(1)
    probe = os.dup(fd)
    try:
        bar.map(0, fd, 0, 0, PAGE, writable=False)
        with caplog.at_level(logging.WARNING, logger="emulator.shmem.region"):
            for offset in range(0, 64, 8):
                bar.write(offset, b"\xff" * 8)
            bar.write(PAGE - 4, b"\xff" * 8)
        assert bar.read(0, PAGE) == pattern(0, PAGE)
        assert os.pread(probe, PAGE, 0) == pattern(0, PAGE)
        warnings = [r for r in caplog.records if "read-only" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        os.close(probe)


def test_unmap_reads_zero_and_the_same_place_can_be_mapped_again(bar: SharedMemoryBar) -> None:
    reg = region(bar, 0)
    map_memfd(bar, 0, 1, 0, 5 * PAGE, PAGE, writable=True)
    assert bar.read(5 * PAGE + 1, 4) == pattern(1, 4)
    bar.unmap(0, 5 * PAGE, PAGE)
    assert len(reg) == 0
    assert bar.read(5 * PAGE, PAGE) == bytes(PAGE)
    bar.write(5 * PAGE, b"lost")
    assert bar.read(5 * PAGE, 4) == bytes(4)
    assert "---p" in vma_at(reg.host_address + 5 * PAGE)
    map_memfd(bar, 0, 2, PAGE, 5 * PAGE, PAGE, writable=False)
    assert bar.read(5 * PAGE, 4) == pattern(PAGE, 4)
    assert reg.mappings()[0].fd_offset == PAGE


def test_large_accesses_span_mappings_holes_and_regions(bar: SharedMemoryBar) -> None:
    map_memfd(bar, 0, 2, 0, REGION0 - 2 * PAGE, 2 * PAGE, writable=True)
    map_memfd(bar, 1, 1, 0, 0, PAGE, writable=False)
    map_memfd(bar, 1, 1, 0, 2 * PAGE, PAGE, writable=True)
    start = REGION0 - 3 * PAGE
    got = bar.read(start, 6 * PAGE)
    assert got == bytes(PAGE) + pattern(0, 2 * PAGE) + pattern(0, PAGE) + bytes(PAGE) + pattern(
        0, PAGE
    )
    bar.write(start, b"\xab" * 6 * PAGE)
    assert bar.read(start, 6 * PAGE) == (
        bytes(PAGE) + b"\xab" * 2 * PAGE + pattern(0, PAGE) + bytes(PAGE) + b"\xab" * PAGE
    )
    whole = bar.read(REGION0 - MIB, MIB)
    assert whole[-2 * PAGE :] == b"\xab" * 2 * PAGE
    assert whole[: -2 * PAGE] == bytes(MIB - 2 * PAGE)
    tail = bar.read(REGION0 + REGION1 - PAGE, MIB)
    assert tail == bytes(MIB)
    bar.write(REGION0 + REGION1, b"\x01" * MIB)


def test_out_of_bar_access_is_a_protocol_error(bar: SharedMemoryBar) -> None:
    with pytest.raises(RemoteProtocolError):
        bar.read(bar.bar_size - 4, 8)
    with pytest.raises(RemoteProtocolError):
        bar.read(-1, 1)
    with pytest.raises(RemoteProtocolError):
        bar.write(bar.bar_size, b"x")
    with pytest.raises(RemoteProtocolError):
        bar.read(0, bar.max_access + 1)
    assert bar.read(bar.bar_size, 0) == b""


def _snapshot(bar: SharedMemoryBar) -> tuple[object, ...]:
    return (
        len(bar),
        tuple(reg.mappings() for reg in bar.regions),
        bar.read(0, 8 * PAGE),
        bar.read(REGION0, 4 * PAGE),
    )


def _map_case(case: str) -> tuple[int, int, int, int, int, bool, Callable[[], None]]:
    """(shmid, fd, fd_offset, shm_offset, length, writable, cleanup) for one hostile request."""
    nothing: Callable[[], None] = lambda: None  # noqa: E731
    if case == "pipe":
        r, w = os.pipe()
        return 0, r, 0, 4 * PAGE, PAGE, False, lambda: os.close(w)
    if case == "socket":
        a, b = socket.socketpair()
        fd = a.detach()
        return 0, fd, 0, 4 * PAGE, PAGE, False, b.close
    if case == "eventfd":
        return 0, os.eventfd(0), 0, 4 * PAGE, PAGE, True, nothing
    if case == "directory":
        return 0, os.open("/", os.O_RDONLY | os.O_DIRECTORY), 0, 4 * PAGE, PAGE, False, nothing
    if case == "readonly-fd-writable":
        source = memfd(1)
        fd = os.open(f"/proc/self/fd/{source}", os.O_RDONLY)
        return 0, fd, 0, 4 * PAGE, PAGE, True, lambda: os.close(source)
    if case == "write-sealed-writable":
        fd = memfd(1)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        return 0, fd, 0, 4 * PAGE, PAGE, True, nothing
    if case == "write-only":
        source = memfd(1)
        fd = os.open(f"/proc/self/fd/{source}", os.O_WRONLY)
        return 0, fd, 0, 4 * PAGE, PAGE, False, lambda: os.close(source)
    if case == "o-path":
        return 0, os.open("/dev/shm", os.O_PATH), 0, 4 * PAGE, PAGE, False, nothing
    if case == "closed":
        fd = memfd(1)
        os.close(fd)
        return 0, fd, 0, 4 * PAGE, PAGE, False, nothing
    if case == "secretmem":
        fd = secret_memfd(PAGE)
        return 0, fd, 0, 4 * PAGE, PAGE, True, nothing
    raise AssertionError(case)


REQUESTS: list[tuple[str, RefusalReason, tuple[int, int, int, int, bool] | str]] = [
    ("zero length", RefusalReason.LENGTH, (0, 0, 4 * PAGE, 0, False)),
    ("negative length", RefusalReason.LENGTH, (0, 0, 4 * PAGE, -PAGE, False)),
    ("unaligned shm_offset", RefusalReason.ALIGNMENT, (0, 0, 4 * PAGE + 8, PAGE, False)),
    ("unaligned fd_offset", RefusalReason.ALIGNMENT, (0, 512, 4 * PAGE, PAGE, False)),
    ("unaligned length", RefusalReason.ALIGNMENT, (0, 0, 4 * PAGE, 100, False)),
    ("past region end", RefusalReason.RANGE, (1, 0, REGION1 - PAGE, 2 * PAGE, False)),
    ("u64 wrap", RefusalReason.RANGE, (0, 0, (1 << 64) - PAGE, 2 * PAGE, False)),
    ("negative offset", RefusalReason.RANGE, (0, 0, -PAGE, PAGE, False)),
    ("file offset overflow", RefusalReason.RANGE, (0, (1 << 64) - PAGE, 4 * PAGE, PAGE, False)),
    ("overlap start", RefusalReason.OVERLAP, (0, 0, PAGE, PAGE, False)),
    ("overlap straddle", RefusalReason.OVERLAP, (0, 0, 0, 4 * PAGE, False)),
    ("unknown shmid", RefusalReason.SHMID, (9, 0, 0, PAGE, False)),
    ("closed fd", RefusalReason.FD, "closed"),
    ("pipe", RefusalReason.MMAP, "pipe"),
    ("socket", RefusalReason.MMAP, "socket"),
    ("eventfd", RefusalReason.MMAP, "eventfd"),
    ("directory", RefusalReason.MMAP, "directory"),
    ("O_PATH fd", RefusalReason.MMAP, "o-path"),
    ("write-only fd", RefusalReason.MMAP, "write-only"),
    ("read-only fd mapped writable", RefusalReason.MMAP, "readonly-fd-writable"),
    ("write-sealed memfd mapped writable", RefusalReason.MMAP, "write-sealed-writable"),
    ("memfd_secret", RefusalReason.UNCOPYABLE, "secretmem"),
]


@pytest.mark.parametrize(("name", "reason", "request_"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_every_refusal_leaves_everything_unchanged(
    bar: SharedMemoryBar,
    name: str,
    reason: RefusalReason,
    request_: tuple[int, int, int, int, bool] | str,
) -> None:
    map_memfd(bar, 0, 2, 0, PAGE, 2 * PAGE, writable=True)
    map_memfd(bar, 1, 1, 0, 0, PAGE, writable=False)
    before = _snapshot(bar)
    fds_before = fd_count()
    cleanup: Callable[[], None] = lambda: None  # noqa: E731
    if isinstance(request_, str):
        shmid, fd, fd_offset, shm_offset, length, writable, cleanup = _map_case(request_)
    else:
        shmid, fd_offset, shm_offset, length, writable = request_
        fd = memfd(4)
    try:
        with pytest.raises(MappingRefused) as refused:
            bar.map(shmid, fd, fd_offset, shm_offset, length, writable=writable)
        assert refused.value.reason == reason
        assert refused.value.errno > 0
        assert is_open(fd) or name == "closed fd", "on refusal the caller keeps the fd"
        assert _snapshot(bar) == before
        assert "---p" in vma_at(region(bar, 0).host_address + 4 * PAGE), "reservation intact"
    finally:
        if is_open(fd):
            os.close(fd)
        cleanup()
    assert fd_count() <= fds_before


@pytest.mark.parametrize(
    ("shmid", "shm_offset", "length"),
    [
        (0, PAGE, PAGE),
        (0, 2 * PAGE, PAGE),
        (0, 0, 3 * PAGE),
        (0, PAGE, 4 * PAGE),
        (0, 8 * PAGE, PAGE),
        (0, PAGE, 0),
        (1, 0, 2 * PAGE),
        (7, 0, PAGE),
    ],
)
def test_unmap_refuses_anything_but_one_whole_mapping(
    bar: SharedMemoryBar, shmid: int, shm_offset: int, length: int
) -> None:
    map_memfd(bar, 0, 2, 0, PAGE, 2 * PAGE, writable=True)
    map_memfd(bar, 0, 1, 0, 3 * PAGE, PAGE, writable=True)
    map_memfd(bar, 1, 1, 0, 0, PAGE, writable=False)
    before = _snapshot(bar)
    with pytest.raises(MappingRefused) as refused:
        bar.unmap(shmid, shm_offset, length)
    assert refused.value.reason in {RefusalReason.NOT_MAPPED, RefusalReason.SHMID}
    assert _snapshot(bar) == before


def test_mapping_caps_refuse_with_reason_limit() -> None:
    layout = ShmemLayout.from_sizes({0: 64 * PAGE, 1: 64 * PAGE})
    with SharedMemoryBar(layout, max_mappings_per_region=3, max_mappings=5) as bar:
        source = memfd(1)
        try:
            for page in range(3):
                bar.map(0, source, 0, page * PAGE, PAGE, writable=False)
            fd = os.dup(source)
            with pytest.raises(MappingRefused) as refused:
                bar.map(0, fd, 0, 10 * PAGE, PAGE, writable=False)
            assert refused.value.reason == RefusalReason.LIMIT
            for page in range(2):
                bar.map(1, source, 0, page * PAGE, PAGE, writable=False)
            with pytest.raises(MappingRefused) as refused:
                bar.map(1, fd, 0, 10 * PAGE, PAGE, writable=False)
            assert refused.value.reason == RefusalReason.LIMIT
            assert len(bar) == 5
            os.close(fd)
            bar.unmap(0, 0, PAGE)
            bar.map(1, source, 0, 10 * PAGE, PAGE, writable=False)
            assert len(bar) == 5
        finally:
            os.close(source)


def test_default_bar_cap_leaves_room_in_the_vma_limit() -> None:
    limit = int(Path("/proc/sys/vm/max_map_count").read_text())
    cap = default_max_mappings()
    assert 0 <= cap <= 262_144
    assert 2 * cap < limit


def test_mapping_keeps_no_fd_and_outlives_the_lent_one(bar: SharedMemoryBar) -> None:
    fd = memfd(2)
    fds_before = fd_count()
    bar.map(0, fd, 0, 0, PAGE, writable=True)
    bar.map(0, fd, PAGE, PAGE, PAGE, writable=True)
    assert fd_count() == fds_before, "the mapping holds the file, no fd is kept"
    assert is_open(fd), "the fd is lent, never closed by map"
    os.close(fd)
    bar.write(8, b"no fd kept")
    assert bar.read(8, 10) == b"no fd kept"
    assert bar.read(PAGE, 8) == pattern(PAGE, 8)
    bar.unmap(0, 0, PAGE)
    bar.unmap(0, PAGE, PAGE)
    assert fd_count() == fds_before - 1


def _in_child(check: Callable[[], None]) -> None:
    """Run ``check`` in a forked child so a SIGBUS fails this test instead of killing pytest."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        status = 0
        try:
            check()
        except BaseException:
            os.write(write_end, traceback.format_exc().encode())
            status = 1
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert not os.WIFSIGNALED(status), f"child killed by signal {os.WTERMSIG(status)}"
    assert os.WEXITSTATUS(status) == 0, report


def _shrink_and_regrow() -> None:
    with SharedMemoryBar(ShmemLayout.from_sizes({0: 16 * PAGE})) as bar:
        fd = memfd(4)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        bar.map(0, fd, 0, 0, 4 * PAGE, writable=True)
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == seals, "map added a seal"
        os.ftruncate(fd, PAGE)  # EPERM if anyone had sealed it against shrinking
        assert bar.read(0, 4 * PAGE) == pattern(0, PAGE) + bytes(3 * PAGE)
        bar.write(2 * PAGE, b"dropped")
        assert os.fstat(fd).st_size == PAGE, "a guest write grew the file"
        os.ftruncate(fd, 4 * PAGE)
        assert bar.read(2 * PAGE, 8) == bytes(8), "the write past EOF landed after all"
        os.pwrite(fd, b"regrown", 3 * PAGE)
        assert bar.read(3 * PAGE, 7) == b"regrown"
        bar.write(3 * PAGE + 8, b"guest")
        assert os.pread(fd, 5, 3 * PAGE + 8) == b"guest"
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == seals
        os.close(fd)


def test_backend_memfd_gets_no_seal_and_can_shrink_and_regrow_under_the_mapping() -> None:
    _in_child(_shrink_and_regrow)


def _truncate_after_mapping(make_fd: Callable[[], int]) -> None:
    with SharedMemoryBar(ShmemLayout.from_sizes({0: 16 * PAGE})) as bar:
        fd = make_fd()
        probe = os.dup(fd)
        bar.map(0, fd, 0, 4 * PAGE, 4 * PAGE, writable=True)
        os.ftruncate(probe, PAGE + 100)
        assert bar.read(4 * PAGE, 4 * PAGE) == pattern(0, PAGE + 100) + bytes(3 * PAGE - 100)
        assert bar.read(6 * PAGE, 8) == bytes(8)
        bar.write(4 * PAGE + PAGE + 96, b"12345678")
        bar.write(7 * PAGE, b"gone")
        assert os.fstat(probe).st_size == PAGE + 100
        assert os.pread(probe, 8, PAGE + 96) == b"1234"
        os.ftruncate(probe, 0)
        assert bar.read(4 * PAGE, 4 * PAGE) == bytes(4 * PAGE)
        bar.unmap(0, 4 * PAGE, 4 * PAGE)
        os.close(probe)


def test_truncated_memfd_reads_zero_past_eof_without_sigbus() -> None:
    _in_child(lambda: _truncate_after_mapping(lambda: memfd(4)))


def test_truncated_regular_file_reads_zero_past_eof_without_sigbus(tmp_path: Path) -> None:
    _in_child(
        lambda: _truncate_after_mapping(lambda: file_fd("regular", pattern(0, 4 * PAGE), tmp_path))
    )


def test_readonly_fd_maps_readonly_and_sees_the_file_shrink(bar: SharedMemoryBar) -> None:
    source = memfd(1)
    fd = os.open(f"/proc/self/fd/{source}", os.O_RDONLY)
    try:
        bar.map(0, fd, 0, 0, PAGE, writable=False)
        os.ftruncate(source, 16)
        assert bar.read(0, 32) == pattern(0, 16) + bytes(16)
    finally:
        os.close(fd)
        os.close(source)


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_each_file_kind_maps_with_its_kind_and_size(
    bar: SharedMemoryBar, kind: str, tmp_path: Path
) -> None:
    fd = file_fd(kind, pattern(0, 3 * PAGE), tmp_path)
    try:
        bar.map(0, fd, PAGE, 0, 2 * PAGE, writable=True)
        assert region(bar, 0).mappings() == (
            MappingInfo(0, 2 * PAGE, PAGE, True, FdKind(kind), 3 * PAGE),
        )
        assert bar.read(0, 2 * PAGE) == pattern(PAGE, 2 * PAGE)
        bar.write(100, b"guest")
        assert os.pread(fd, 5, PAGE + 100) == b"guest"
        os.pwrite(fd, b"back-end", 2 * PAGE + 8)
        assert bar.read(PAGE + 8, 8) == b"back-end"
    finally:
        os.close(fd)


class Warnings(logging.Handler):
    """Collects log messages (a forked child has no caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _past_eof(kind: str, tmp_path: Path) -> None:
    """A DAX-like window: 2 MiB of a 1-byte file."""
    warnings = Warnings()
    logging.getLogger("emulator.shmem.region").addHandler(warnings)
    with SharedMemoryBar(ShmemLayout.from_sizes({0: 2 * MIB})) as bar:
        fd = file_fd(kind, b"\xa5", tmp_path)
        bar.map(0, fd, 0, 0, 2 * MIB, writable=True)
        assert region(bar, 0).mappings()[0].fd_size == 1
        assert bar.read(0, MIB) + bar.read(MIB, MIB) == b"\xa5" + bytes(2 * MIB - 1)
        bar.write(1, b"tail")  # past EOF but in EOF's page: the file never sees it
        bar.write(5 * PAGE - 2, b"hole")  # across two pages past EOF's: dropped
        bar.write(2 * MIB - 4, b"last")
        assert bar.read(5 * PAGE - 2, 4) == bytes(4)
        assert bar.read(2 * MIB - 4, 4) == bytes(4)
        assert os.fstat(fd).st_size == 1
        assert os.pread(fd, 16, 0) == b"\xa5"
        assert bar.read(0, 1) == b"\xa5"
        os.close(fd)
    assert len([m for m in warnings.messages if "past the end" in m]) == 1, warnings.messages


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_mapping_past_eof_reads_zero_and_never_grows_the_file(kind: str, tmp_path: Path) -> None:
    _in_child(lambda: _past_eof(kind, tmp_path))


def test_dev_zero_maps_as_a_char_device_of_unknown_size(bar: SharedMemoryBar) -> None:
    fd = os.open("/dev/zero", os.O_RDWR)
    try:
        bar.map(0, fd, 0, 0, 4 * PAGE, writable=True)
        assert region(bar, 0).mappings() == (
            MappingInfo(0, 4 * PAGE, 0, True, FdKind.CHAR_DEVICE, None),
        )
        assert bar.read(0, 4 * PAGE) == bytes(4 * PAGE)
        bar.write(PAGE + 3, b"kept")  # a shared mapping of /dev/zero is shared anonymous memory
        assert bar.read(PAGE + 3, 4) == b"kept"
        assert os.read(fd, 4) == bytes(4)
    finally:
        os.close(fd)


def test_fuse_file_is_refused_and_only_statfs_reaches_the_daemon(
    bar: SharedMemoryBar, tmp_path: Path
) -> None:
    with fuse_file(tmp_path / "fuse", pattern(0, PAGE)) as fuse:
        fd = fuse.open()
        try:
            sent = len(fuse.requests)
            with pytest.raises(MappingRefused) as refused:
                bar.map(0, fd, 0, 0, PAGE, writable=False)
            assert refused.value.reason == RefusalReason.BLOCKING_FS
            assert refused.value.errno == errno.EOPNOTSUPP
            assert "FUSE" in str(refused.value)
            assert fuse.requests[sent:] == [FuseOpcode.FUSE_STATFS]
            assert len(bar) == 0
            assert "---p" in vma_at(region(bar, 0).host_address)
        finally:
            os.close(fd)


def test_ten_thousand_map_unmap_cycles_leak_no_fds_or_vmas() -> None:
    with SharedMemoryBar(ShmemLayout.from_sizes({0: 64 * PAGE})) as bar:
        source = memfd(4)
        bar.map(0, source, 0, 0, PAGE, writable=False)
        fds, vmas = fd_count(), bar_vmas(bar)
        for cycle in range(10_000):
            offset = (1 + cycle % 8) * PAGE
            bar.map(0, source, (cycle % 4) * PAGE, offset, PAGE, writable=cycle % 2 == 0)
            bar.unmap(0, offset, PAGE)
        assert (fd_count(), bar_vmas(bar)) == (fds, vmas)
        assert len(bar) == 1
        os.close(source)


def test_reset_drops_everything_and_close_releases_the_address_space() -> None:
    bar = SharedMemoryBar(ShmemLayout.from_sizes({0: 64 * PAGE, 3: 64 * PAGE}))
    fds = fd_count()
    for page in range(4):
        map_memfd(bar, 0, 1, 0, page * PAGE, PAGE, writable=True)
        map_memfd(bar, 3, 1, 0, page * PAGE, PAGE, writable=True)
    assert len(bar) == 8
    bar.reset()
    assert len(bar) == 0
    assert fd_count() == fds
    assert bar.read(0, bar.bar_size) == bytes(bar.bar_size)
    map_memfd(bar, 3, 1, 0, 0, PAGE, writable=False)
    address = bar.host_address
    assert "---p" in vma_at(address)
    bar.close()
    bar.close()
    assert all(
        not (int(line.split("-")[0], 16) <= address < int(line.split()[0].split("-")[1], 16))
        for line in maps_lines()
    )
    fd = memfd(1)
    try:
        with pytest.raises(MappingRefused) as refused:
            bar.map(3, fd, 0, 0, PAGE, writable=False)
        assert refused.value.reason == RefusalReason.CLOSED
        with pytest.raises(StateError):
            bar.read(0, 4)
    finally:
        os.close(fd)


def test_hugetlb_misaligned_mapping_is_refused_not_crashed(bar: SharedMemoryBar) -> None:
    try:
        fd = os.memfd_create("huge", os.MFD_HUGETLB | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 2 * MIB)
    except OSError as exc:
        if exc.errno in {errno.EINVAL, errno.ENOMEM, errno.ENOSYS, errno.EPERM}:
            pytest.skip(f"no hugetlb memfds here: {exc}")
        raise
    try:
        with pytest.raises(MappingRefused) as refused:
            bar.map(0, fd, 0, PAGE, 2 * MIB - PAGE, writable=False)
        assert refused.value.reason in {RefusalReason.MMAP, RefusalReason.RANGE}
        assert len(bar) == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("live", [16, 65_536])
def test_costs_with_many_live_mappings(live: int) -> None:
    """Map ``live`` one-page mappings, then time map/unmap/read; prints costs, checks counts."""
    layout = ShmemLayout.from_sizes({0: 2 * 65_536 * PAGE})
    with SharedMemoryBar(layout, max_mappings_per_region=live, max_mappings=live) as bar:
        source = memfd(0)
        os.ftruncate(source, live * PAGE)
        marks = range(0, live, max(1, live // 64))
        for page in marks:
            os.pwrite(source, page.to_bytes(4, "little"), page * PAGE + 12)
        fds, vmas = fd_count(), bar_vmas(bar)
        start = time.perf_counter()
        for page in range(live):
            bar.map(0, source, page * PAGE, page * PAGE, PAGE, writable=True)
        map_cost = (time.perf_counter() - start) / live
        assert len(bar) == live
        assert fd_count() == fds
        with pytest.raises(MappingRefused) as refused:
            bar.map(0, source, 0, live * PAGE, PAGE, writable=True)
        assert refused.value.reason == RefusalReason.LIMIT
        for page in marks:
            assert bar.read(page * PAGE + 12, 4) == page.to_bytes(4, "little")
        reads = 20_000
        offsets = [((i * 7919) % live) * PAGE + 12 for i in range(reads)]
        start = time.perf_counter()
        for offset in offsets:
            bar.read(offset, 4)
        cold_cost = (time.perf_counter() - start) / reads
        start = time.perf_counter()
        for offset in offsets:
            bar.read(offset, 4)
        read_cost = (time.perf_counter() - start) / reads
        start = time.perf_counter()
        for offset in offsets:
            bar.write(offset, b"\x01\x02\x03\x04")
        write_cost = (time.perf_counter() - start) / reads
        assert os.pread(source, 4, offsets[-1]) == b"\x01\x02\x03\x04"
        start = time.perf_counter()
        for page in range(live):
            bar.unmap(0, page * PAGE, PAGE)
        unmap_cost = (time.perf_counter() - start) / live
        assert len(bar) == 0
        assert (fd_count(), bar_vmas(bar)) == (fds, vmas)
        os.close(source)
    print(
        f"\n{live} live mappings: map {map_cost * 1e6:.1f} us, unmap {unmap_cost * 1e6:.1f} us, "
        f"read4 {read_cost * 1e6:.2f} us (first touch {cold_cost * 1e6:.2f} us), "
        f"write4 {write_cost * 1e6:.2f} us"
    )
