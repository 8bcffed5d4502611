"""Every kind of fd a back-end can send, end to end: the real emulator process, a real back-end
(``VhostUserDaemon`` in this process) sending SHMEM_MAP with the fd over its channel, and a
QEMU-like client playing the guest on the emulator's vfio-user socket.

Checked per kind: what the guest reads and writes, what the back-end's file then holds, the
status the back-end gets for a refusal, and that the emulator keeps no fd of the back-end's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from emulator.pci.device import RegionIndex
from emulator.vfio_user.client import VfioUserClient
from testkit import Harness, Process
from testkit.procfs import fd_count, fd_targets
from testkit.virtio_driver import GuestRam, VirtioDriver
from tests.helpers.fdkinds import FILE_KINDS, file_fd, fuse_file, secret_memfd
from tests.helpers.processes import procs
from vhost_user_backend.daemon import VhostUserDaemon
from vhost_user_backend.devices.shmem_reference import ShmemRngDevice
from vhost_user_backend.errors import FrontendRefused

__all__ = ["procs"]

PAGE = 4096
MiB = 1 << 20
REGION = 8 * MiB
CHUNK = 64 << 10


@dataclass
class Rig:
    backend: VhostUserDaemon
    emulator: Process
    guest: VirtioDriver

    def read(self, offset: int, size: int) -> bytes:
        """A guest read of region 0, in accesses of at most 64 KiB."""
        parts = range(offset, offset + size, CHUNK)
        return b"".join(self.guest.shm_read(0, at, min(CHUNK, offset + size - at)) for at in parts)

    def write(self, offset: int, data: bytes) -> None:
        self.guest.shm_write(0, offset, data)

    def map(self, fd: int, fd_offset: int, shm_offset: int, length: int, writable: bool) -> None:
        self.backend.shmem_map(0, fd, fd_offset, shm_offset, length, writable=writable)

    def fd_count(self) -> int:
        """The emulator's fds once it has served every request before this one (a refused
        unmap is a round trip on the channel: each message's fd is closed after its reply)."""
        with pytest.raises(FrontendRefused):
            self.backend.shmem_unmap(0, REGION - PAGE, PAGE)
        return fd_count(self.emulator.pid)

    def alive(self) -> bool:
        """The emulator still answers the guest (a config-space read of the vendor id)."""
        return self.guest.client.region_read(RegionIndex.CONFIG, 0, 2) == b"\xf4\x1a"


@pytest.fixture
def rig(procs: Harness, tmp_path: Path) -> Iterator[Rig]:
    backend = VhostUserDaemon(ShmemRngDevice([(0, REGION)]), str(tmp_path / "backend.sock"))
    thread = backend.serve_in_thread()
    try:
        emulator = procs.emulator("--vhost-user-socket", str(tmp_path / "backend.sock"))
        assert backend.wait_connected(10)
        with (
            GuestRam(2 * MiB) as ram,
            VfioUserClient.connect(str(emulator.path), timeout=15.0) as client,
        ):
            guest = VirtioDriver.probe(client, ram)
            try:
                yield Rig(backend, emulator, guest)
            finally:
                guest.close_msix()
        emulator.stop()
    finally:
        backend.stop()
        thread.join(10)


def pattern(size: int, seed: int = 1) -> bytes:
    return bytes((seed + i * 7) % 251 for i in range(size))


def test_each_file_kind_and_dev_zero_map_read_and_write(rig: Rig, tmp_path: Path) -> None:
    fds = {
        kind: file_fd(kind, pattern(4 * PAGE, seed), tmp_path)
        for seed, kind in enumerate(FILE_KINDS)
    }
    fds["dev-zero"] = os.open("/dev/zero", os.O_RDWR)
    try:
        emulator_fds = rig.fd_count()
        for slot, fd in enumerate(fds.values()):
            rig.map(fd, PAGE, slot * MiB, 2 * PAGE, writable=True)
        assert rig.fd_count() == emulator_fds, fd_targets(rig.emulator.pid)
        for slot, (kind, fd) in enumerate(fds.items()):
            base = slot * MiB
            expected = (
                bytes(2 * PAGE) if kind == "dev-zero" else pattern(4 * PAGE, slot)[PAGE : 3 * PAGE]
            )
            assert rig.read(base, 2 * PAGE) == expected, kind
            rig.write(base + 8, b"guest!")
            assert rig.read(base + 8, 6) == b"guest!", kind
            if kind != "dev-zero":
                assert os.pread(fd, 6, PAGE + 8) == b"guest!", kind
                os.pwrite(fd, b"backend", 2 * PAGE + 16)
                assert rig.read(base + PAGE + 16, 7) == b"backend", kind
    finally:
        for fd in fds.values():
            os.close(fd)


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_a_dax_window_over_a_one_byte_file(rig: Rig, kind: str, tmp_path: Path) -> None:
    """2 MiB of a 1-byte file: the byte, then zeros; guest writes past EOF never grow it."""
    fd = file_fd(kind, b"\x5a", tmp_path)
    try:
        rig.map(fd, 0, 2 * MiB, 2 * MiB, writable=True)
        assert rig.read(2 * MiB, 8) == b"\x5a" + bytes(7)
        assert rig.read(2 * MiB, 256 << 10) == b"\x5a" + bytes((256 << 10) - 1)
        assert rig.read(4 * MiB - CHUNK, CHUNK) == bytes(CHUNK)
        rig.write(2 * MiB + 3 * PAGE, b"\xff" * 8)
        rig.write(4 * MiB - 8, b"\xff" * 8)
        assert rig.read(2 * MiB + 3 * PAGE, 8) == bytes(8)
        assert rig.read(4 * MiB - 8, 8) == bytes(8)
        assert os.fstat(fd).st_size == 1
        assert os.pread(fd, 64, 0) == b"\x5a"
        assert rig.alive()
    finally:
        os.close(fd)


def test_backend_shrinks_and_regrows_its_memfd_under_a_live_mapping(
    rig: Rig, tmp_path: Path
) -> None:
    fd = file_fd("memfd", pattern(4 * PAGE), tmp_path)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        rig.map(fd, 0, 0, 4 * PAGE, writable=True)
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == seals, "the emulator sealed our memfd"
        os.ftruncate(fd, PAGE)
        assert rig.read(0, 4 * PAGE) == pattern(PAGE) + bytes(3 * PAGE)
        rig.write(2 * PAGE, b"lost")
        assert os.fstat(fd).st_size == PAGE
        assert rig.alive()
        os.ftruncate(fd, 4 * PAGE)
        os.pwrite(fd, b"regrown", 3 * PAGE)
        assert rig.read(3 * PAGE, 7) == b"regrown"
        assert rig.read(2 * PAGE, 4) == bytes(4)
        rig.write(3 * PAGE + 8, b"guest")
        assert os.pread(fd, 5, 3 * PAGE + 8) == b"guest"
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == seals
    finally:
        os.close(fd)


def _refusals(tmp_path: Path, stack: contextlib.ExitStack) -> dict[str, tuple[int, bool, int]]:
    """name -> (fd, writable, the errno the back-end must get)."""

    def keep(fd: int) -> int:
        stack.callback(os.close, fd)
        return fd

    one, two = socket.socketpair()
    stack.callback(two.close)
    read_end, write_end = os.pipe()
    keep(write_end)
    readonly = file_fd("memfd", pattern(PAGE), tmp_path, os.O_RDONLY)
    cases = {
        "pipe": (keep(read_end), False, errno.ENODEV),
        "socket": (keep(one.detach()), False, errno.ENODEV),
        "eventfd": (keep(os.eventfd(0)), True, errno.ENODEV),
        "directory": (keep(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)), False, errno.ENODEV),
        "read-only fd mapped writable": (keep(readonly), True, errno.EACCES),
    }
    with contextlib.suppress(pytest.skip.Exception):
        cases["memfd_secret"] = (keep(secret_memfd(PAGE)), True, errno.EOPNOTSUPP)
    with contextlib.suppress(pytest.skip.Exception):
        fuse = stack.enter_context(fuse_file(tmp_path / "fuse", pattern(PAGE)))
        cases["FUSE file"] = (keep(fuse.open()), False, errno.EOPNOTSUPP)
    return cases


def test_fds_that_cannot_be_served_are_refused_with_their_errno(rig: Rig, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        cases = _refusals(tmp_path, stack)
        emulator_fds = rig.fd_count()
        codes = {}
        for name, (fd, writable, _) in cases.items():
            with pytest.raises(FrontendRefused) as refused:
                rig.map(fd, 0, 0, PAGE, writable)
            codes[name] = refused.value.code
        assert codes == {name: code for name, (_, _, code) in cases.items()}
        assert rig.fd_count() == emulator_fds, fd_targets(rig.emulator.pid)
        assert rig.read(0, PAGE) == bytes(PAGE)
        assert rig.alive()
        good = file_fd("memfd", pattern(PAGE), tmp_path)
        stack.callback(os.close, good)
        rig.map(good, 0, 0, PAGE, writable=False)
        assert rig.read(0, PAGE) == pattern(PAGE)
