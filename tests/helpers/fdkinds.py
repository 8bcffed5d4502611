"""Real fds of every kind a back-end may send with SHMEM_MAP, for the shared-memory tests.

Kinds this host cannot make are skipped with the reason: a dma-buf (no ``/dev/udmabuf``), a FUSE
file where mounting is not allowed, ``memfd_secret`` where the kernel has it disabled.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulator.shmem.fdkind import TMPFS_MAGIC, filesystem_magic
from testkit.fuse import FuseFile, FuseUnavailable

#: File kinds with a size: a memfd, a file on a disk filesystem, a file on tmpfs.
FILE_KINDS = ("memfd", "regular", "tmpfs")
SYS_MEMFD_SECRET = 447  # x86_64 and arm64


def on_disk_directory(tmp_path: Path) -> Path:
    """A directory on a disk filesystem: ``tmp_path`` if it is one, else ``/var/tmp``."""
    for candidate in (tmp_path, Path("/var/tmp")):
        fd = os.open(candidate, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if filesystem_magic(fd) != TMPFS_MAGIC:
                return candidate
        finally:
            os.close(fd)
    pytest.skip("no disk filesystem to put a regular file on")


def file_fd(kind: str, content: bytes, tmp_path: Path, flags: int = os.O_RDWR) -> int:
    """An fd of ``kind`` (one of ``FILE_KINDS``) holding ``content``; the name is already gone."""
    if kind == "memfd":
        fd = os.memfd_create("fd-kinds", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        os.write(fd, content)
        if flags == os.O_RDWR:
            return fd
        try:
            return os.open(f"/proc/self/fd/{fd}", flags)
        finally:
            os.close(fd)
    directory = {"regular": on_disk_directory(tmp_path), "tmpfs": Path("/dev/shm")}[kind]
    path = directory / f"fd-kinds-{os.getpid()}-{kind}-{len(content)}"
    with open(path, "wb") as handle:
        handle.write(content)
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    finally:
        path.unlink()


def secret_memfd(size: int) -> int:
    """A ``memfd_secret`` fd: mappable, but the kernel will not copy its pages for anyone."""
    fd = int(ctypes.CDLL(None, use_errno=True).syscall(SYS_MEMFD_SECRET, 0))
    if fd < 0:
        pytest.skip(f"no memfd_secret here: {os.strerror(ctypes.get_errno())}")
    os.ftruncate(fd, size)
    return fd


@contextlib.contextmanager
def fuse_file(directory: Path, content: bytes) -> Iterator[FuseFile]:
    """A file on a real FUSE mount served by this process (skipped where none can be made)."""
    try:
        mount = FuseFile(directory, content).__enter__()
    except FuseUnavailable as exc:
        pytest.skip(f"no FUSE mount here: {exc}")
    try:
        yield mount
    finally:
        mount.__exit__(None, None, None)
