"""What a back-end's fd is: its kind, its size, and whether its filesystem can stall us.

A back-end may hand SHMEM_MAP any fd that ``mmap`` accepts: a memfd, a file on disk or tmpfs, a
character device, a dma-buf. We never change that file (no seals, no size change, its file
position restored), we only look at it.

A page fault on a network or userspace filesystem waits for a server or a daemon, and the
emulator's one thread would wait with it, on every guest access to an uncached page. So
SHMEM_MAP refuses fds on the filesystems in ``BLOCKING_FILESYSTEMS``, found by the superblock
magic that ``fstatfs`` reports (``include/uapi/linux/magic.h`` and the filesystems' own headers).
``fstatfs`` is itself answered by FUSE daemons and NFS/SMB/9p/Ceph servers: the check costs one
round trip to a healthy one, and a back-end that is its own stalled FUSE daemon can still hold
up the SHMEM_MAP it sends. No other system call here reaches such a filesystem: the check comes
before ``fstat`` and ``mmap``.
"""

from __future__ import annotations

import ctypes
import os
import stat
from enum import StrEnum

_libc = ctypes.CDLL(None, use_errno=True)
_fstatfs = _libc.fstatfs
_fstatfs.restype = ctypes.c_int
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
#: ``struct statfs`` is 120 bytes on 64-bit Linux; its first field is ``f_type`` (a long).
_STATFS_SIZE = 256

TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6
DMA_BUF_MAGIC = 0x444D4142
ANON_INODE_FS_MAGIC = 0x09041934
SECRETMEM_MAGIC = 0x5345434D

#: Filesystems where a page fault can wait on a network server, a userspace daemon or a
#: cluster lock manager, with the name a refusal gives.
BLOCKING_FILESYSTEMS: dict[int, str] = {
    0x65735546: "FUSE (a userspace daemon: sshfs, virtiofs, ...)",
    0x6969: "NFS",
    0x517B: "SMB (smbfs)",
    0xFF534D42: "CIFS",
    0xFE534D42: "SMB2/SMB3",
    0x01021997: "9P (v9fs)",
    0x00C36400: "Ceph",
    0x5346414F: "AFS",
    0x6B414653: "AFS (kAFS)",
    0x73757245: "Coda",
    0x01161970: "GFS2",
    0x7461636F: "OCFS2",
    0x20030528: "OrangeFS",
    0x564C: "NCP",
    0x786F4256: "vboxsf (VirtualBox shared folder)",
    0x0BD00BD0: "Lustre",
    0x47504653: "GPFS",
    0x19830326: "BeeGFS",
}


class FdKind(StrEnum):
    """What kind of fd a mapping came from (for the mapping table and the log)."""

    MEMFD = "memfd"
    REGULAR = "regular"
    TMPFS = "tmpfs"
    CHAR_DEVICE = "char-device"
    DMA_BUF = "dma-buf"
    OTHER = "other"

    @property
    def page_cache(self) -> bool:
        """Files whose pages the kernel can always copy (no probe needed, see ``vmcopy``)."""
        return self in (FdKind.MEMFD, FdKind.REGULAR, FdKind.TMPFS)


def filesystem_magic(fd: int) -> int:
    """``f_type`` from ``fstatfs(fd)``: the superblock magic of the fd's filesystem."""
    if not 0 <= fd < 1 << 31:
        raise OSError(9, f"fd {fd} is not a file descriptor")
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _fstatfs(fd, buf) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"fstatfs: {os.strerror(code)}")
    return ctypes.c_long.from_buffer(buf).value & 0xFFFF_FFFF


def classify(fd: int, mode: int, magic: int) -> FdKind:
    """The kind of ``fd``, from its ``st_mode`` and filesystem magic."""
    if magic == DMA_BUF_MAGIC:
        return FdKind.DMA_BUF
    if stat.S_ISCHR(mode):
        return FdKind.CHAR_DEVICE
    if not stat.S_ISREG(mode) or magic in (ANON_INODE_FS_MAGIC, SECRETMEM_MAGIC):
        return FdKind.OTHER
    if magic in (TMPFS_MAGIC, HUGETLBFS_MAGIC) and describe(fd).startswith("/memfd:"):
        return FdKind.MEMFD
    return FdKind.TMPFS if magic == TMPFS_MAGIC else FdKind.REGULAR


def fd_size(fd: int, mode: int, st_size: int, magic: int) -> int | None:
    """The size the kernel reports for ``fd``, None where it reports none (0 or an error).

    Regular files: ``st_size``. Anything else: ``lseek(fd, 0, SEEK_END)``, which is how
    dma-bufs tell their size. A dma-buf's ``lseek`` never moves the file position; for other
    fds the position, shared with the back-end through the open file description, is put back.
    """
    if stat.S_ISREG(mode):
        return st_size
    try:
        if magic == DMA_BUF_MAGIC:
            end = os.lseek(fd, 0, os.SEEK_END)
        else:
            here = os.lseek(fd, 0, os.SEEK_CUR)
            try:
                end = os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.lseek(fd, here, os.SEEK_SET)
    except OSError:
        return None
    return end or None


def describe(fd: int) -> str:
    """What ``/proc/self/fd`` says ``fd`` is (a path, ``/memfd:name``, ``pipe:[..]``, ...)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"
