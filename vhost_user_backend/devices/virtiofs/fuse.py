"""FUSE messages as virtio-fs carries them: opcodes, flags and the payloads we read or write.

Names and numbers are the kernel's (``include/uapi/linux/fuse.h``, protocol 7.41 as spoken by
Linux 6.12) without the ``FUSE_`` prefix, as ``vhost_user.messages`` drops ``VHOST_USER_``.
Every integer is little-endian: virtio-fs passes the guest's native structs and this project's
guests are x86. A request is ``InHeader`` followed by the opcode's arguments packed back to back
(virtio-fs puts no padding between them); a reply is ``OutHeader`` followed by the reply's
struct(s). Payloads check syntax only (sizes), as everywhere in this project.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar, Self

from wire.payload import Payload, check_size

KERNEL_VERSION = 7
#: The newest minor version we speak; INIT answers with min(this, the kernel's).
KERNEL_MINOR_VERSION = 41
ROOT_ID = 1
#: fuse_setupmapping_in.fh as Linux sends it: the mapping names the inode, not an open file.
NO_FH = (1 << 64) - 1
#: log2 of the byte alignment we ask for with MAP_ALIGNMENT (a page); Linux refuses > 21.
MAP_ALIGNMENT_LOG2 = 12


class FuseOpcode(IntEnum):
    """``enum fuse_opcode``."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    CUSE_INIT = 4096


#: Requests the kernel sends without waiting for a reply.
NO_REPLY = frozenset({FuseOpcode.FORGET, FuseOpcode.BATCH_FORGET, FuseOpcode.INTERRUPT})


class InitFlag(IntFlag):
    """INIT flags; bits 32..63 travel in ``flags2`` when ``INIT_EXT`` is set."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40


class SetattrValid(IntFlag):
    """``fuse_setattr_in.valid`` (``FATTR_*``)."""

    MODE = 1 << 0
    UID = 1 << 1
    GID = 1 << 2
    SIZE = 1 << 3
    ATIME = 1 << 4
    MTIME = 1 << 5
    FH = 1 << 6
    ATIME_NOW = 1 << 7
    MTIME_NOW = 1 << 8
    LOCKOWNER = 1 << 9
    CTIME = 1 << 10
    KILL_SUIDGID = 1 << 11


class OpenOutFlag(IntFlag):
    """``fuse_open_out.open_flags`` (``FOPEN_*``)."""

    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5
    PARALLEL_DIRECT_WRITES = 1 << 6
    PASSTHROUGH = 1 << 7


class FsyncFlag(IntFlag):
    FDATASYNC = 1 << 0


class SetupMappingFlag(IntFlag):
    """``fuse_setupmapping_in.flags`` (``FUSE_SETUPMAPPING_FLAG_*``)."""

    WRITE = 1 << 0
    READ = 1 << 1


def _fixed(fmt: str) -> struct.Struct:
    return struct.Struct("<" + fmt)


@dataclass(frozen=True, slots=True)
class InHeader(Payload):
    """``fuse_in_header``: ``total_extlen`` counts 8-byte units of extensions at the end."""

    STRUCT: ClassVar[struct.Struct] = _fixed("IIQQIIIHH")
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int
    padding: int


@dataclass(frozen=True, slots=True)
class OutHeader(Payload):
    """``fuse_out_header``: ``error`` is 0 or a negative errno."""

    STRUCT: ClassVar[struct.Struct] = _fixed("IiQ")
    length: int
    error: int
    unique: int


@dataclass(frozen=True, slots=True)
class Attr(Payload):
    """``fuse_attr``."""

    STRUCT: ClassVar[struct.Struct] = _fixed("QQQQQQIIIIIIIIII")
    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int


@dataclass(frozen=True, slots=True)
class EntryOut(Payload):
    """``fuse_entry_out``: a node id with its attributes and how long both may be cached."""

    STRUCT: ClassVar[struct.Struct] = _fixed("QQQQII")
    nodeid: int
    generation: int
    entry_valid: int
    attr_valid: int
    entry_valid_nsec: int
    attr_valid_nsec: int
    attr: Attr

    SIZE: ClassVar[int] = 40 + 88

    def pack(self) -> bytes:
        head = self.STRUCT.pack(
            self.nodeid,
            self.generation,
            self.entry_valid,
            self.attr_valid,
            self.entry_valid_nsec,
            self.attr_valid_nsec,
        )
        return head + self.attr.pack()

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        check_size(cls, data, cls.SIZE)
        nodeid, generation, entry_valid, attr_valid, entry_nsec, attr_nsec = cls.STRUCT.unpack(
            data[: cls.STRUCT.size]
        )
        attr = Attr.unpack(data[cls.STRUCT.size :])
        return cls(nodeid, generation, entry_valid, attr_valid, entry_nsec, attr_nsec, attr)


@dataclass(frozen=True, slots=True)
class AttrOut(Payload):
    """``fuse_attr_out``."""

    STRUCT: ClassVar[struct.Struct] = _fixed("QII")
    attr_valid: int
    attr_valid_nsec: int
    dummy: int
    attr: Attr

    SIZE: ClassVar[int] = 16 + 88

    def pack(self) -> bytes:
        head = self.STRUCT.pack(self.attr_valid, self.attr_valid_nsec, self.dummy)
        return head + self.attr.pack()

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        check_size(cls, data, cls.SIZE)
        attr_valid, attr_valid_nsec, dummy = cls.STRUCT.unpack(data[: cls.STRUCT.size])
        return cls(attr_valid, attr_valid_nsec, dummy, Attr.unpack(data[cls.STRUCT.size :]))


@dataclass(frozen=True, slots=True)
class InitIn(Payload):
    """``fuse_init_in``. Kernels before 7.36 send only the first four fields; ``flags2`` is
    meaningful only when ``flags`` has ``INIT_EXT``."""

    STRUCT: ClassVar[struct.Struct] = _fixed("IIIII44x")
    major: int
    minor: int
    max_readahead: int
    flags: int
    flags2: int = 0

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        check_size(cls, data, 16, at_least=True)
        major, minor, readahead, flags = struct.unpack_from("<IIII", data)
        flags2 = struct.unpack_from("<I", data, 16)[0] if len(data) >= 20 else 0
        return cls(major, minor, readahead, flags, flags2)

    @property
    def all_flags(self) -> InitFlag:
        """``flags`` and, with ``INIT_EXT``, ``flags2`` as bits 32..63."""
        value = self.flags
        if value & InitFlag.INIT_EXT:
            value |= self.flags2 << 32
        return InitFlag(value)


@dataclass(frozen=True, slots=True)
class InitOut(Payload):
    """``fuse_init_out`` (64 bytes since 7.23)."""

    STRUCT: ClassVar[struct.Struct] = _fixed("IIIIHHIIHHII24x")
    major: int
    minor: int
    max_readahead: int
    flags: int
    max_background: int
    congestion_threshold: int
    max_write: int
    time_gran: int
    max_pages: int
    map_alignment: int
    flags2: int
    max_stack_depth: int


@dataclass(frozen=True, slots=True)
class ForgetIn(Payload):
    STRUCT: ClassVar[struct.Struct] = _fixed("Q")
    nlookup: int


@dataclass(frozen=True, slots=True)
class ForgetOne(Payload):
    STRUCT: ClassVar[struct.Struct] = _fixed("QQ")
    nodeid: int
    nlookup: int


@dataclass(frozen=True, slots=True)
class BatchForgetIn(Payload):
    """``fuse_batch_forget_in``; ``count`` ``ForgetOne`` follow."""

    STRUCT: ClassVar[struct.Struct] = _fixed("II")
    count: int
    dummy: int


@dataclass(frozen=True, slots=True)
class GetattrIn(Payload):
    STRUCT: ClassVar[struct.Struct] = _fixed("IIQ")
    getattr_flags: int
    dummy: int
    fh: int


@dataclass(frozen=True, slots=True)
class SetattrIn(Payload):
    """``fuse_setattr_in``; ``valid`` says which fields count (``SetattrValid``)."""

    STRUCT: ClassVar[struct.Struct] = _fixed("IIQQQQQQIIIIIIII")
    valid: int
    padding: int
    fh: int
    size: int
    lock_owner: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    unused4: int
    uid: int
    gid: int
    unused5: int


@dataclass(frozen=True, slots=True)
class OpenIn(Payload):
    """``fuse_open_in``: ``flags`` are open(2) flags."""

    STRUCT: ClassVar[struct.Struct] = _fixed("II")
    flags: int
    open_flags: int


@dataclass(frozen=True, slots=True)
class CreateIn(Payload):
    """``fuse_create_in``; the name follows. ``mode`` already has the guest's umask applied
    unless ``DONT_MASK`` was negotiated (we do not negotiate it)."""

    STRUCT: ClassVar[struct.Struct] = _fixed("IIII")
    flags: int
    mode: int
    umask: int
    open_flags: int


@dataclass(frozen=True, slots=True)
class OpenOut(Payload):
    STRUCT: ClassVar[struct.Struct] = _fixed("QIi")
    fh: int
    open_flags: int
    backing_id: int


@dataclass(frozen=True, slots=True)
class ReleaseIn(Payload):
    STRUCT: ClassVar[struct.Struct] = _fixed("QIIQ")
    fh: int
    flags: int
    release_flags: int
    lock_owner: int


@dataclass(frozen=True, slots=True)
class FlushIn(Payload):
    STRUCT: ClassVar[struct.Struct] = _fixed("QIIQ")
    fh: int
    unused: int
    padding: int
    lock_owner: int


@dataclass(frozen=True, slots=True)
class ReadIn(Payload):
    """``fuse_read_in``; ``fuse_write_in`` has the same layout (``WriteIn``)."""

    STRUCT: ClassVar[struct.Struct] = _fixed("QQIIQII")
    fh: int
    offset: int
    size: int
    read_flags: int
    lock_owner: int
    flags: int
    padding: int


@dataclass(frozen=True, slots=True)
class WriteIn(Payload):
    """``fuse_write_in``; ``size`` bytes of data follow."""

    STRUCT: ClassVar[struct.Struct] = _fixed("QQIIQII")
    fh: int
    offset: int
    size: int
    write_flags: int
    lock_owner: int
    flags: int
    padding: int


@dataclass(frozen=True, slots=True)
class WriteOut(Payload):
    STRUCT: ClassVar[struct.Struct] = _fixed("II")
    size: int
    padding: int


@dataclass(frozen=True, slots=True)
class StatfsOut(Payload):
    """``fuse_statfs_out`` (a ``fuse_kstatfs``)."""

    STRUCT: ClassVar[struct.Struct] = _fixed("QQQQQIIII24x")
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int
    padding: int


@dataclass(frozen=True, slots=True)
class FsyncIn(Payload):
    STRUCT: ClassVar[struct.Struct] = _fixed("QII")
    fh: int
    fsync_flags: int
    padding: int


@dataclass(frozen=True, slots=True)
class AccessIn(Payload):
    STRUCT: ClassVar[struct.Struct] = _fixed("II")
    mask: int
    padding: int


@dataclass(frozen=True, slots=True)
class MkdirIn(Payload):
    """``fuse_mkdir_in``; the name follows."""

    STRUCT: ClassVar[struct.Struct] = _fixed("II")
    mode: int
    umask: int


@dataclass(frozen=True, slots=True)
class RenameIn(Payload):
    """``fuse_rename_in``; old and new names follow, each NUL-terminated."""

    STRUCT: ClassVar[struct.Struct] = _fixed("Q")
    newdir: int


@dataclass(frozen=True, slots=True)
class Rename2In(Payload):
    STRUCT: ClassVar[struct.Struct] = _fixed("QII")
    newdir: int
    flags: int
    padding: int


@dataclass(frozen=True, slots=True)
class InterruptIn(Payload):
    STRUCT: ClassVar[struct.Struct] = _fixed("Q")
    unique: int


@dataclass(frozen=True, slots=True)
class Dirent(Payload):
    """``fuse_dirent``: the name follows, the whole entry padded to 8 bytes."""

    STRUCT: ClassVar[struct.Struct] = _fixed("QQII")
    ino: int
    off: int
    namelen: int
    type: int


@dataclass(frozen=True, slots=True)
class SetupMappingIn(Payload):
    """``fuse_setupmapping_in``: map ``len`` bytes of the file at ``foffset`` into the DAX
    window at ``moffset``. Linux sends ``fh`` = ``NO_FH``; the header's nodeid names the file."""

    STRUCT: ClassVar[struct.Struct] = _fixed("QQQQQ")
    fh: int
    foffset: int
    len: int
    flags: int
    moffset: int


@dataclass(frozen=True, slots=True)
class RemoveMappingIn(Payload):
    """``fuse_removemapping_in``: ``count`` ``RemoveMappingOne`` follow (no padding)."""

    STRUCT: ClassVar[struct.Struct] = _fixed("I")
    count: int


@dataclass(frozen=True, slots=True)
class RemoveMappingOne(Payload):
    STRUCT: ClassVar[struct.Struct] = _fixed("QQ")
    moffset: int
    len: int
