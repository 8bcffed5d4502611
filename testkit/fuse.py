"""A FUSE filesystem of one file, served from a thread: for tests that need a real FUSE fd.

It speaks the kernel's protocol on ``/dev/fuse`` itself (no libfuse): INIT, LOOKUP, GETATTR,
OPEN, READ, STATFS, FLUSH and RELEASE are answered, anything else gets ENOSYS. ``requests``
records every opcode the kernel sent, so a test can tell which calls reached the daemon.
Mounting needs CAP_SYS_ADMIN and ``/dev/fuse``; where either is missing ``FuseFile`` raises
``FuseUnavailable``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import threading
from enum import IntEnum
from pathlib import Path
from types import TracebackType

FILE_NAME = "file"
_ROOT_ID = 1
_FILE_ID = 2
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MNT_DETACH = 0x2

_IN_HEADER = struct.Struct("=IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, ...
_OUT_HEADER = struct.Struct("=IiQ")  # len, error, unique
_ATTR = struct.Struct("=QQQQQQIIIIIIIIII")  # ino, size, blocks, times, modes, ids, blksize
_ENTRY_OUT = struct.Struct("=QQQQII")  # nodeid, generation, entry/attr valid (+ nsec)
_ATTR_OUT = struct.Struct("=QII")  # attr valid, nsec, dummy
_OPEN_OUT = struct.Struct("=QII")  # fh, open flags, padding
_INIT_OUT = struct.Struct("=IIIIHHIIHHII24x")  # 7.x, readahead, flags, limits; 64 bytes
_STATFS_OUT = struct.Struct("=QQQQQIIII24x")  # blocks, free, avail, files, ffree, sizes
_READ_IN = struct.Struct("=QQI")  # fh, offset, size

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class FuseOpcode(IntEnum):
    """The requests this filesystem answers, numbered as in ``include/uapi/linux/fuse.h``."""

    FUSE_LOOKUP = 1
    FUSE_FORGET = 2
    FUSE_GETATTR = 3
    FUSE_OPEN = 14
    FUSE_READ = 15
    FUSE_STATFS = 17
    FUSE_RELEASE = 18
    FUSE_FLUSH = 25
    FUSE_INIT = 26
    FUSE_BATCH_FORGET = 42


class FuseUnavailable(Exception):
    """No FUSE mount can be made here (no /dev/fuse, or not allowed to mount)."""


class FuseFile:
    """``mountpoint/file`` with ``content``, on a FUSE mount served by this object's thread."""

    def __init__(self, mountpoint: Path, content: bytes) -> None:
        self.mountpoint = mountpoint
        self.path = mountpoint / FILE_NAME
        self.content = content
        self.requests: list[int] = []
        self._dev = -1
        self._thread = threading.Thread(target=self._serve, name="fuse", daemon=True)

    def __enter__(self) -> FuseFile:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        try:
            self._dev = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise FuseUnavailable(f"/dev/fuse: {exc.strerror}") from exc
        options = f"fd={self._dev},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()}"
        target, flags = bytes(self.mountpoint), _MS_NOSUID | _MS_NODEV
        if _libc.mount(b"testkit", target, b"fuse.testkit", flags, options.encode()):
            code = ctypes.get_errno()
            os.close(self._dev)
            raise FuseUnavailable(f"mount: {os.strerror(code)}")
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        _libc.umount2(bytes(self.mountpoint), _MNT_DETACH)  # the kernel then ends the connection
        self._thread.join(10)
        os.close(self._dev)

    def open(self, flags: int = os.O_RDONLY) -> int:
        return os.open(self.path, flags)

    def _attr(self, node: int) -> bytes:
        if node == _ROOT_ID:
            return _ATTR.pack(node, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 0, 0)
        size = len(self.content)
        mode = stat.S_IFREG | 0o644
        return _ATTR.pack(node, size, -(-size // 512), 0, 0, 0, 0, 0, 0, mode, 1, 0, 0, 0, 0, 0)

    def _answer(self, opcode: int, node: int, body: bytes) -> bytes | int:
        """The reply payload for one request, or an errno."""
        if opcode == FuseOpcode.FUSE_INIT:
            return _INIT_OUT.pack(7, 31, 0, 0, 0, 0, 1 << 16, 1, 0, 0, 0, 0)
        if opcode == FuseOpcode.FUSE_LOOKUP:
            if body.rstrip(b"\0") != FILE_NAME.encode():
                return errno.ENOENT
            return _ENTRY_OUT.pack(_FILE_ID, 0, 0, 0, 0, 0) + self._attr(_FILE_ID)
        if opcode == FuseOpcode.FUSE_GETATTR:
            return _ATTR_OUT.pack(0, 0, 0) + self._attr(node)
        if opcode == FuseOpcode.FUSE_OPEN:
            return _OPEN_OUT.pack(0, 0, 0)
        if opcode == FuseOpcode.FUSE_READ:
            _, offset, size = _READ_IN.unpack_from(body)
            return self.content[offset : offset + size]
        if opcode == FuseOpcode.FUSE_STATFS:
            return _STATFS_OUT.pack(0, 0, 0, 0, 0, 4096, 255, 4096, 0)
        if opcode in (FuseOpcode.FUSE_FLUSH, FuseOpcode.FUSE_RELEASE):
            return b""
        return errno.ENOSYS

    def _serve(self) -> None:
        while True:
            try:
                request = os.read(self._dev, 1 << 17)
            except OSError:
                return  # ENODEV: unmounted
            _, opcode, unique, node, *_ = _IN_HEADER.unpack_from(request)
            self.requests.append(opcode)
            if opcode in (FuseOpcode.FUSE_FORGET, FuseOpcode.FUSE_BATCH_FORGET):
                continue  # the kernel expects no answer
            answer = self._answer(opcode, node, request[_IN_HEADER.size :])
            payload, error = (b"", -answer) if isinstance(answer, int) else (answer, 0)
            header = _OUT_HEADER.pack(_OUT_HEADER.size + len(payload), error, unique)
            try:
                os.write(self._dev, header + payload)
            except OSError:
                return
