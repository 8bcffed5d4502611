"""Which fds SHMEM_MAP takes and what it says about them (``emulator.shmem.fdkind``).

Real fds wherever this host can make them. Filesystems it cannot mount (NFS, CIFS, 9p, Ceph,
...) and hugetlbfs (no huge pages here) are stood in for by a mocked ``fstatfs`` magic on a
memfd; a real FUSE file is refused in ``tests/integration``. There is no ``/dev/udmabuf`` here,
so the dma-buf kind is checked by its magic only.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import emulator.shmem.region as region_module
from emulator.shmem import FdKind, MappingRefused, RefusalReason, SharedMemoryBar, ShmemLayout
from emulator.shmem.fdkind import (
    ANON_INODE_FS_MAGIC,
    BLOCKING_FILESYSTEMS,
    DMA_BUF_MAGIC,
    HUGETLBFS_MAGIC,
    SECRETMEM_MAGIC,
    TMPFS_MAGIC,
    classify,
    fd_size,
    filesystem_magic,
)
from tests.helpers.fdkinds import file_fd, secret_memfd

PAGE = 4096


@pytest.fixture
def bar() -> Iterator[SharedMemoryBar]:
    with SharedMemoryBar(ShmemLayout.from_sizes({0: 64 * PAGE})) as shm:
        yield shm


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("fdkind-test")
    os.ftruncate(fd, 2 * PAGE)
    yield fd
    os.close(fd)


def kind_of(fd: int) -> FdKind:
    return classify(fd, os.fstat(fd).st_mode, filesystem_magic(fd))


def test_filesystem_magic_of_real_fds() -> None:
    shm = os.open("/dev/shm", os.O_RDONLY | os.O_DIRECTORY)
    event = os.eventfd(0)
    try:
        assert filesystem_magic(shm) == TMPFS_MAGIC
        assert filesystem_magic(event) == ANON_INODE_FS_MAGIC
    finally:
        os.close(shm)
        os.close(event)
    closed = os.eventfd(0)
    os.close(closed)
    for bad in (closed, -1, 1 << 40):
        with pytest.raises(OSError) as refused:
            filesystem_magic(bad)
        assert refused.value.errno == errno.EBADF


def test_real_fds_are_classified_by_kind(tmp_path: Path) -> None:
    fds = {
        FdKind.MEMFD: file_fd("memfd", b"x", tmp_path),
        FdKind.REGULAR: file_fd("regular", b"x", tmp_path),
        FdKind.TMPFS: file_fd("tmpfs", b"x", tmp_path),
        FdKind.CHAR_DEVICE: os.open("/dev/zero", os.O_RDONLY),
    }
    others = [os.eventfd(0), *os.pipe(), socket.socket().detach(), os.open("/", os.O_RDONLY)]
    try:
        assert {kind: kind_of(fd) for kind, fd in fds.items()} == {kind: kind for kind in fds}
        assert [kind_of(fd) for fd in others] == [FdKind.OTHER] * len(others)
        readonly = os.open(f"/proc/self/fd/{fds[FdKind.MEMFD]}", os.O_RDONLY)
        assert kind_of(readonly) == FdKind.MEMFD
        os.close(readonly)
    finally:
        for fd in [*fds.values(), *others]:
            os.close(fd)


def test_secret_memory_and_dma_bufs_are_told_apart_by_their_filesystem(memfd: int) -> None:
    secret = secret_memfd(PAGE)
    try:
        assert filesystem_magic(secret) == SECRETMEM_MAGIC
        assert stat.S_ISREG(os.fstat(secret).st_mode)
        assert kind_of(secret) == FdKind.OTHER
        assert not kind_of(secret).page_cache
    finally:
        os.close(secret)
    assert classify(memfd, 0o600, DMA_BUF_MAGIC) == FdKind.DMA_BUF
    assert classify(memfd, stat.S_IFREG | 0o600, HUGETLBFS_MAGIC) == FdKind.MEMFD


def test_size_is_st_size_for_files_and_unknown_for_dev_zero_and_pipes(tmp_path: Path) -> None:
    file = file_fd("regular", b"12345", tmp_path)
    zero = os.open("/dev/zero", os.O_RDONLY)
    read_end, write_end = os.pipe()
    try:
        for fd in (file, zero, read_end):
            info = os.fstat(fd)
            sizes = fd_size(fd, info.st_mode, info.st_size, filesystem_magic(fd))
            assert sizes == {file: 5, zero: None, read_end: None}[fd]
    finally:
        for fd in (file, zero, read_end, write_end):
            os.close(fd)


def test_size_by_lseek_puts_the_shared_file_position_back(tmp_path: Path) -> None:
    """What a character device with a size goes through: SEEK_END, then back to where it was."""
    fd = file_fd("regular", bytes(300), tmp_path)
    try:
        os.lseek(fd, 123, os.SEEK_SET)
        assert fd_size(fd, stat.S_IFCHR | 0o600, 0, TMPFS_MAGIC) == 300
        assert os.lseek(fd, 0, os.SEEK_CUR) == 123
    finally:
        os.close(fd)


@pytest.mark.parametrize("magic", sorted(BLOCKING_FILESYSTEMS), ids=hex)
def test_blocking_filesystems_are_refused_before_fstat_or_mmap(
    bar: SharedMemoryBar, memfd: int, magic: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*_args: object, **_kwargs: object) -> object:
        raise AssertionError("the refused fd's filesystem was asked for more than statfs")

    monkeypatch.setattr(region_module, "filesystem_magic", lambda _fd: magic)
    monkeypatch.setattr(region_module, "map_memory", forbidden)
    monkeypatch.setattr(os, "fstat", forbidden)
    with pytest.raises(MappingRefused) as refused:
        bar.map(0, memfd, 0, 0, PAGE, writable=False)
    monkeypatch.undo()
    assert refused.value.reason == RefusalReason.BLOCKING_FS
    assert refused.value.errno == errno.EOPNOTSUPP
    assert BLOCKING_FILESYSTEMS[magic] in str(refused.value)
    assert len(bar) == 0


def test_local_filesystems_are_not_on_the_blocking_list() -> None:
    local = {TMPFS_MAGIC, HUGETLBFS_MAGIC, DMA_BUF_MAGIC, ANON_INODE_FS_MAGIC, SECRETMEM_MAGIC}
    local |= {0xEF53, 0x58465342, 0x9123683E, 0x794C7630}  # ext4, xfs, btrfs, overlayfs
    assert not local & BLOCKING_FILESYSTEMS.keys()


def test_a_writable_hugetlbfs_mapping_may_not_grow_the_file(
    bar: SharedMemoryBar, memfd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mmap of hugetlbfs with PROT_WRITE sets i_size to the mapping's end: never do that."""
    monkeypatch.setattr(region_module, "filesystem_magic", lambda _fd: HUGETLBFS_MAGIC)
    with pytest.raises(MappingRefused) as refused:
        bar.map(0, memfd, 0, 0, 4 * PAGE, writable=True)
    assert refused.value.reason == RefusalReason.FD_SIZE
    assert len(bar) == 0
    bar.map(0, memfd, 0, 0, 4 * PAGE, writable=False)
    bar.map(0, memfd, 0, 8 * PAGE, 2 * PAGE, writable=True)
    assert len(bar) == 2
    assert os.fstat(memfd).st_size == 2 * PAGE
