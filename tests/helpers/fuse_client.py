"""A small FUSE client for tests: what Linux's virtio-fs driver puts on a request queue.

``FuseClient`` builds requests (``fuse_in_header`` + arguments, as fs/fuse/virtio_fs.c packs
them) and parses replies; a ``Transport`` carries one request to the device and brings its
reply back. Two transports: ``VhostRings`` drives a back-end directly over vhost-user with rings
in a memfd the test owns; ``DriverQueue`` goes through our emulator with the testkit's virtio
driver.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
from dataclasses import dataclass
from typing import Protocol

from testkit import LockstepFrontend
from testkit.virtio_driver import VirtioDriver
from vhost_user.messages import (
    FrontendReq,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringState,
)
from vhost_user_backend.devices.virtiofs.fuse import (
    KERNEL_MINOR_VERSION,
    NO_FH,
    ROOT_ID,
    AttrOut,
    CreateIn,
    Dirent,
    EntryOut,
    FlushIn,
    ForgetIn,
    FsyncIn,
    FuseOpcode,
    GetattrIn,
    InHeader,
    InitFlag,
    InitIn,
    InitOut,
    MkdirIn,
    OpenIn,
    OpenOut,
    OutHeader,
    ReadIn,
    ReleaseIn,
    RemoveMappingIn,
    RemoveMappingOne,
    Rename2In,
    RenameIn,
    SetattrIn,
    SetupMappingFlag,
    SetupMappingIn,
    StatfsOut,
    WriteIn,
    WriteOut,
)

DAX_CHUNK = 2 << 20
#: what a 6.12 kernel offers in INIT (the part that matters here)
KERNEL_FLAGS = (
    InitFlag.ASYNC_READ
    | InitFlag.BIG_WRITES
    | InitFlag.DO_READDIRPLUS
    | InitFlag.READDIRPLUS_AUTO
    | InitFlag.MAX_PAGES
    | InitFlag.MAP_ALIGNMENT
    | InitFlag.POSIX_LOCKS
    | InitFlag.WRITEBACK_CACHE
    | InitFlag.INIT_EXT
)


class Transport(Protocol):
    def call(self, request: bytes, reply_size: int) -> bytes | None:
        """Put one request on the request queue; its reply's bytes (None: no reply)."""
        raise NotImplementedError


class FuseFailed(AssertionError):
    def __init__(self, opcode: FuseOpcode, errno_: int) -> None:
        super().__init__(f"{opcode.name} failed: {os.strerror(errno_)}")
        self.errno = errno_


@dataclass
class Entry:
    name: bytes
    ino: int
    off: int
    type: int
    entry: EntryOut | None = None


class FuseClient:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.unique = 0
        #: the caller's credentials in every request header
        self.uid = 0
        self.gid = 0

    def raw(
        self, opcode: int, nodeid: int, body: bytes = b"", reply_size: int = 4096
    ) -> tuple[int, bytes]:
        """(errno, reply body) of one request."""
        self.unique += 1
        header = InHeader(40 + len(body), opcode, self.unique, nodeid, self.uid, self.gid, 1, 0, 0)
        reply = self.transport.call(header.pack() + body, reply_size + 16)
        assert reply is not None, "no reply"
        out = OutHeader.unpack(reply[:16])
        assert out.unique == self.unique and out.length == len(reply), (out, len(reply))
        return -out.error, reply[16:]

    def ok(
        self, opcode: FuseOpcode, nodeid: int, body: bytes = b"", reply_size: int = 4096
    ) -> bytes:
        err, data = self.raw(opcode, nodeid, body, reply_size)
        if err:
            raise FuseFailed(opcode, err)
        return data

    def error(self, opcode: FuseOpcode, nodeid: int, body: bytes = b"") -> int:
        return self.raw(opcode, nodeid, body)[0]

    # -- operations -------------------------------------------------------------------------
    def init(self, flags: int = KERNEL_FLAGS, minor: int = KERNEL_MINOR_VERSION) -> InitOut:
        body = InitIn(7, minor, 128 << 10, flags & 0xFFFF_FFFF, flags >> 32).pack()
        return InitOut.unpack(self.ok(FuseOpcode.INIT, 0, body))

    def lookup(self, parent: int, name: bytes) -> EntryOut:
        return EntryOut.unpack(self.ok(FuseOpcode.LOOKUP, parent, name + b"\0"))

    def forget(self, nodeid: int, nlookup: int) -> None:
        self.unique += 1
        header = InHeader(48, FuseOpcode.FORGET, self.unique, nodeid, 0, 0, 1, 0, 0)
        assert self.transport.call(header.pack() + ForgetIn(nlookup).pack(), 16) is None

    def getattr(self, nodeid: int) -> AttrOut:
        return AttrOut.unpack(self.ok(FuseOpcode.GETATTR, nodeid, GetattrIn(0, 0, 0).pack()))

    def setattr(self, nodeid: int, valid: int, *, size: int = 0, mode: int = 0) -> AttrOut:
        args = SetattrIn(valid, 0, 0, size, 0, 0, 0, 0, 0, 0, 0, mode, 0, 0, 0, 0)
        return AttrOut.unpack(self.ok(FuseOpcode.SETATTR, nodeid, args.pack()))

    def open(self, nodeid: int, flags: int = os.O_RDWR) -> int:
        return OpenOut.unpack(self.ok(FuseOpcode.OPEN, nodeid, OpenIn(flags, 0).pack())).fh

    def create(
        self, parent: int, name: bytes, mode: int = 0o644, flags: int = os.O_EXCL
    ) -> tuple[EntryOut, int]:
        args = CreateIn(os.O_RDWR | os.O_CREAT | flags, mode, 0o022, 0).pack() + name + b"\0"
        data = self.ok(FuseOpcode.CREATE, parent, args)
        return EntryOut.unpack(data[: EntryOut.SIZE]), OpenOut.unpack(data[EntryOut.SIZE :]).fh

    def read(self, fh: int, offset: int, size: int) -> bytes:
        args = ReadIn(fh, offset, size, 0, 0, 0, 0).pack()
        return self.ok(FuseOpcode.READ, 0, args, reply_size=size)

    def write(self, nodeid: int, fh: int, offset: int, data: bytes) -> int:
        args = WriteIn(fh, offset, len(data), 0, 0, 0, 0).pack() + data
        return WriteOut.unpack(self.ok(FuseOpcode.WRITE, nodeid, args)).size

    def flush(self, nodeid: int, fh: int) -> None:
        self.ok(FuseOpcode.FLUSH, nodeid, FlushIn(fh, 0, 0, 0).pack())

    def fsync(self, nodeid: int, fh: int) -> None:
        self.ok(FuseOpcode.FSYNC, nodeid, FsyncIn(fh, 0, 0).pack())

    def release(self, nodeid: int, fh: int, opcode: FuseOpcode = FuseOpcode.RELEASE) -> None:
        self.ok(opcode, nodeid, ReleaseIn(fh, 0, 0, 0).pack())

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755) -> EntryOut:
        args = MkdirIn(mode, 0o022).pack() + name + b"\0"
        return EntryOut.unpack(self.ok(FuseOpcode.MKDIR, parent, args))

    def unlink(self, parent: int, name: bytes) -> None:
        self.ok(FuseOpcode.UNLINK, parent, name + b"\0")

    def rmdir(self, parent: int, name: bytes) -> None:
        self.ok(FuseOpcode.RMDIR, parent, name + b"\0")

    def rename(
        self, parent: int, old: bytes, newdir: int, new: bytes, flags: int | None = None
    ) -> int:
        names = old + b"\0" + new + b"\0"
        if flags is None:
            return self.error(FuseOpcode.RENAME, parent, RenameIn(newdir).pack() + names)
        return self.error(FuseOpcode.RENAME2, parent, Rename2In(newdir, flags, 0).pack() + names)

    def opendir(self, nodeid: int) -> int:
        data = self.ok(FuseOpcode.OPENDIR, nodeid, OpenIn(os.O_RDONLY, 0).pack())
        return OpenOut.unpack(data).fh

    def readdir(self, nodeid: int, fh: int, *, plus: bool = False, size: int = 4096) -> list[Entry]:
        """Every entry, reading on from the last offset until an empty reply."""
        entries: list[Entry] = []
        offset = 0
        opcode = FuseOpcode.READDIRPLUS if plus else FuseOpcode.READDIR
        while True:
            args = ReadIn(fh, offset, size, 0, 0, 0, 0).pack()
            data = self.ok(opcode, nodeid, args, reply_size=size)
            if not data:
                return entries
            pos = 0
            while pos < len(data):
                entry = None
                if plus:
                    entry = EntryOut.unpack(data[pos : pos + EntryOut.SIZE])
                    pos += EntryOut.SIZE
                d = Dirent.unpack(data[pos : pos + 24])
                name = data[pos + 24 : pos + 24 + d.namelen]
                pos += (24 + d.namelen + 7) // 8 * 8
                entries.append(Entry(name, d.ino, d.off, d.type, entry))
                offset = d.off

    def statfs(self) -> StatfsOut:
        return StatfsOut.unpack(self.ok(FuseOpcode.STATFS, ROOT_ID))

    def setupmapping(
        self,
        nodeid: int,
        foffset: int,
        moffset: int,
        *,
        write: bool = False,
        length: int = DAX_CHUNK,
    ) -> int:
        flags = SetupMappingFlag.READ | (SetupMappingFlag.WRITE if write else 0)
        args = SetupMappingIn(NO_FH, foffset, length, int(flags), moffset).pack()
        return self.error(FuseOpcode.SETUPMAPPING, nodeid, args)

    def removemapping(self, nodeid: int, *ranges: tuple[int, int]) -> int:
        body = RemoveMappingIn(len(ranges)).pack()
        body += b"".join(RemoveMappingOne(m, n).pack() for m, n in ranges)
        return self.error(FuseOpcode.REMOVEMAPPING, nodeid, body)


# -- transports ---------------------------------------------------------------------------------
GPA_BASE = 0x4000_0000
UVA_BASE = 0x7F20_0000_0000
MEM_SIZE = 8 << 20
QSIZE = 16
REQUEST_AT = 0x10_0000
REPLY_AT = 0x40_0000


class VhostRings:
    """Guest RAM (a memfd), ``queues`` split rings in it, handed to a back-end over vhost-user.

    One request at a time on queue ``queue``: a chain of one readable and one writable buffer,
    a kick, then the call eventfd and the used ring."""

    def __init__(self, fe: LockstepFrontend, queues: int = 2, queue: int = 1) -> None:
        self.fe = fe
        self.queue = queue
        self.fd = os.memfd_create("guest-ram")
        os.ftruncate(self.fd, MEM_SIZE)
        self.mm = mmap.mmap(self.fd, MEM_SIZE)
        self.kicks = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(queues)]
        self.calls = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(queues)]
        self.avail = [0] * queues
        self.used = [0] * queues
        region = VhostUserMemoryRegion(GPA_BASE, MEM_SIZE, UVA_BASE, 0)
        assert fe.u64(FrontendReq.SET_MEM_TABLE, VhostUserMemory((region,)), [self.fd]) == 0
        for q in range(queues):
            base = q * 0x4000
            assert fe.u64(FrontendReq.SET_VRING_NUM, VhostUserVringState(q, QSIZE)) == 0
            addr = VhostUserVringAddr(
                q, 0, UVA_BASE + base, UVA_BASE + base + 0x2000, UVA_BASE + base + 0x1000, 0
            )
            assert fe.u64(FrontendReq.SET_VRING_ADDR, addr) == 0
            assert fe.u64(FrontendReq.SET_VRING_BASE, VhostUserVringState(q, 0)) == 0
            assert fe.u64(FrontendReq.SET_VRING_CALL, VhostUserU64(q), [self.calls[q]]) == 0
            assert fe.u64(FrontendReq.SET_VRING_KICK, VhostUserU64(q), [self.kicks[q]]) == 0
            assert fe.u64(FrontendReq.SET_VRING_ENABLE, VhostUserVringState(q, 1)) == 0

    def call(self, request: bytes, reply_size: int, queue: int | None = None) -> bytes | None:
        q = self.queue if queue is None else queue
        base = q * 0x4000
        self.mm[REQUEST_AT : REQUEST_AT + len(request)] = request
        desc = struct.Struct("<QIHH")
        desc.pack_into(self.mm, base, GPA_BASE + REQUEST_AT, len(request), 1, 1)
        desc.pack_into(self.mm, base + 16, GPA_BASE + REPLY_AT, reply_size, 2, 0)
        slot = self.avail[q] % QSIZE
        struct.pack_into("<H", self.mm, base + 0x1000 + 4 + 2 * slot, 0)
        self.avail[q] = (self.avail[q] + 1) & 0xFFFF
        struct.pack_into("<H", self.mm, base + 0x1000 + 2, self.avail[q])
        os.eventfd_write(self.kicks[q], 1)
        while struct.unpack_from("<H", self.mm, base + 0x2000 + 2)[0] == self.used[q]:
            ready, _, _ = select.select([self.calls[q]], [], [], 10)
            assert ready, "no interrupt from the device within 10 s"
            os.eventfd_read(self.calls[q])
        slot = self.used[q] % QSIZE
        head, length = struct.unpack_from("<II", self.mm, base + 0x2000 + 4 + 8 * slot)
        self.used[q] = (self.used[q] + 1) & 0xFFFF
        assert head == 0
        return self.mm[REPLY_AT : REPLY_AT + length] if length else None

    def close(self) -> None:
        self.mm.close()
        for fd in (self.fd, *self.kicks, *self.calls):
            os.close(fd)


class DriverQueue:
    """Requests through our emulator: the testkit's virtio driver and its guest RAM."""

    def __init__(self, driver: VirtioDriver, queue: int = 1, buffer_size: int = 256 << 10) -> None:
        self.driver = driver
        self.queue = queue
        self.request_gpa = driver.ram.alloc(buffer_size, 4096)
        self.reply_gpa = driver.ram.alloc(buffer_size, 4096)
        self.buffer_size = buffer_size

    def call(self, request: bytes, reply_size: int) -> bytes | None:
        assert len(request) <= self.buffer_size and reply_size <= self.buffer_size
        self.driver.ram.write(self.request_gpa, request)
        vq = self.driver.queues[self.queue]
        head = vq.add([(self.request_gpa, len(request), False), (self.reply_gpa, reply_size, True)])
        self.driver.notify(self.queue)
        got, length = self.driver.wait_used(self.queue)
        assert got == head
        return self.driver.ram.read(self.reply_gpa, length) if length else None
