"""A FUSE file system over one host directory, sans I/O towards the guest.

``FuseServer.handle(request) -> reply`` takes the bytes of one request (what the driver put
in the device-readable buffers: ``fuse_in_header`` and the arguments) and returns the reply's
bytes (``fuse_out_header`` and the reply) or ``None`` for requests that get none (FORGET,
BATCH_FORGET, INTERRUPT). The virtqueues are the device's business (``device.py``); the DAX
window is ``window.DaxWindow``'s, reached through its ``WindowMapper``.

Safety: the guest names files only by node id plus one path component. Every node holds an
``O_PATH | O_NOFOLLOW`` fd and every lookup is ``openat(parent_fd, name, O_NOFOLLOW)``, so a
name is never resolved as a path: names with ``/`` are refused with EINVAL (this covers
absolute names), ``..`` with EACCES (we do not offer EXPORT_SUPPORT, so a Linux guest never
sends it), ``.`` and empty names with EINVAL. A symlink is a node of its own (the guest walks
it itself, inside its own mount); it is never followed on the host: opening, truncating or
mapping one fails, and a lookup under it fails with ENOTDIR. Files are reopened through
``/proc/self/fd/N`` of the node's fd, which reaches the very inode, not a path.

Run as root, files and directories the guest creates are given the calling guest user's uid
and gid (the request header's), as virtiofsd does; other requests run with our credentials.

Node ids stand for host inodes (st_dev, st_ino), one node per inode, counted by lookups as
FUSE requires. Attributes and entries may be cached by the guest for ``timeout`` seconds
(1 s by default), so changes made on the host side are seen soon.

Not thread-safe: one thread (the device's worker) calls everything here.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from vhost_user_backend.devices.virtiofs.fuse import (
    KERNEL_MINOR_VERSION,
    KERNEL_VERSION,
    MAP_ALIGNMENT_LOG2,
    NO_FH,
    NO_REPLY,
    ROOT_ID,
    AccessIn,
    Attr,
    AttrOut,
    BatchForgetIn,
    CreateIn,
    Dirent,
    EntryOut,
    FlushIn,
    ForgetIn,
    ForgetOne,
    FsyncFlag,
    FsyncIn,
    FuseOpcode,
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
    SetattrValid,
    SetupMappingFlag,
    SetupMappingIn,
    StatfsOut,
    WriteIn,
    WriteOut,
)
from vhost_user_backend.devices.virtiofs.window import DaxWindow, MapRefused, WindowError
from wire.errors import WireError
from wire.payload import Payload

log = logging.getLogger(__name__)

P = TypeVar("P", bound=Payload)

#: INIT flags we accept when the kernel offers them: nothing that needs state we do not keep
#: (locks, writeback cache, export support, security contexts).
WANTED_FLAGS = (
    InitFlag.ASYNC_READ
    | InitFlag.BIG_WRITES
    | InitFlag.AUTO_INVAL_DATA
    | InitFlag.DO_READDIRPLUS
    | InitFlag.READDIRPLUS_AUTO
    | InitFlag.PARALLEL_DIROPS
    | InitFlag.MAX_PAGES
    | InitFlag.MAP_ALIGNMENT
)
MAX_WRITE = 1 << 20
MAX_PAGES = 256
_U64 = (1 << 64) - 1
_NS = 1_000_000_000
#: open(2) flags passed through to the host; O_APPEND is not (pwrite must honour the offset
#: the guest computed), O_CREAT/O_EXCL/O_TRUNC are decided per request.
_PASS_FLAGS = os.O_SYNC | os.O_DSYNC
_DT_UNKNOWN, _DT_DIR, _DT_REG, _DT_LNK = 0, 4, 8, 10


class FuseError(Exception):
    """A request that fails with ``errno``."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or os.strerror(code))
        self.errno = code


@dataclass
class Node:
    """A host inode the guest knows by ``nodeid``; ``fd`` is ``O_PATH | O_NOFOLLOW``."""

    nodeid: int
    fd: int
    key: tuple[int, int]
    nlookup: int


@dataclass
class Handle:
    """An open file or directory (``fh``); ``entries`` is a directory's listing snapshot."""

    fh: int
    node: Node
    fd: int
    directory: bool
    entries: list[tuple[bytes, int, int]] | None = None


def _take(cls: type[P], body: bytes) -> tuple[P, bytes]:
    size = cls.STRUCT.size
    if len(body) < size:
        raise FuseError(errno.EINVAL, f"{cls.__name__}: {len(body)} bytes, need {size}")
    return cls.unpack(body[:size]), body[size:]


def _check_name(name: bytes) -> bytes:
    if name == b"..":
        raise FuseError(errno.EACCES, "'..' is not followed")
    if not name or name == b"." or b"/" in name:
        raise FuseError(errno.EINVAL, f"bad name {name!r}")
    return name


def _name(data: bytes) -> bytes:
    """Exactly one NUL-terminated name."""
    name, nul, rest = data.partition(b"\0")
    if not nul or rest:
        raise FuseError(errno.EINVAL, "name not NUL-terminated or followed by more bytes")
    return _check_name(name)


def _two_names(data: bytes) -> tuple[bytes, bytes]:
    parts = data.split(b"\0")
    if len(parts) != 3 or parts[2]:
        raise FuseError(errno.EINVAL, "expected two NUL-terminated names")
    return _check_name(parts[0]), _check_name(parts[1])


def _split_time(ns: int) -> tuple[int, int]:
    return (ns // _NS) & _U64, ns % _NS


def attr_of(st: os.stat_result) -> Attr:
    atime, atimensec = _split_time(st.st_atime_ns)
    mtime, mtimensec = _split_time(st.st_mtime_ns)
    ctime, ctimensec = _split_time(st.st_ctime_ns)
    return Attr(
        st.st_ino,
        st.st_size,
        st.st_blocks,
        atime,
        mtime,
        ctime,
        atimensec,
        mtimensec,
        ctimensec,
        st.st_mode,
        min(st.st_nlink, 0xFFFF_FFFF),
        st.st_uid,
        st.st_gid,
        st.st_rdev & 0xFFFF_FFFF,
        st.st_blksize,
        0,
    )


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _dirent_type(entry: os.DirEntry[str]) -> int:
    try:
        if entry.is_symlink():
            return _DT_LNK
        if entry.is_dir(follow_symlinks=False):
            return _DT_DIR
        if entry.is_file(follow_symlinks=False):
            return _DT_REG
    except OSError:
        pass
    return _DT_UNKNOWN


def _pad8(data: bytes) -> bytes:
    return data + bytes(-len(data) % 8)


class FuseServer:
    """Serves FUSE requests for the directory ``root``; DAX through ``window`` (optional)."""

    def __init__(
        self, root: str | os.PathLike[str], window: DaxWindow | None = None, *, timeout: float = 1.0
    ) -> None:
        self.root = os.fspath(root)
        self.window = window
        self.timeout_s = int(timeout)
        self.timeout_ns = int((timeout - int(timeout)) * _NS)
        root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(root_fd)
        self._root = Node(ROOT_ID, root_fd, (st.st_dev, st.st_ino), 1)
        self.nodes: dict[int, Node] = {ROOT_ID: self._root}
        self._by_key: dict[tuple[int, int], Node] = {self._root.key: self._root}
        self.handles: dict[int, Handle] = {}
        self._next_node = ROOT_ID + 1
        self._next_fh = 1
        self.initialised = False
        self.minor = 0
        #: run as root: what the guest creates belongs to the guest's caller, not to us
        self._as_root = os.geteuid() == 0
        self.ops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        H = Callable[[InHeader, bytes], bytes | None]
        self._handlers: dict[FuseOpcode, H] = {
            FuseOpcode.INIT: self._init,
            FuseOpcode.DESTROY: self._destroy,
            FuseOpcode.LOOKUP: self._lookup_op,
            FuseOpcode.FORGET: self._forget_op,
            FuseOpcode.BATCH_FORGET: self._batch_forget,
            FuseOpcode.GETATTR: self._getattr,
            FuseOpcode.SETATTR: self._setattr,
            FuseOpcode.READLINK: self._readlink,
            FuseOpcode.OPEN: self._open,
            FuseOpcode.CREATE: self._create,
            FuseOpcode.READ: self._read,
            FuseOpcode.WRITE: self._write,
            FuseOpcode.FLUSH: self._flush,
            FuseOpcode.FSYNC: self._fsync,
            FuseOpcode.RELEASE: self._release,
            FuseOpcode.OPENDIR: self._opendir,
            FuseOpcode.READDIR: self._readdir,
            FuseOpcode.READDIRPLUS: self._readdirplus,
            FuseOpcode.RELEASEDIR: self._releasedir,
            FuseOpcode.FSYNCDIR: self._fsyncdir,
            FuseOpcode.MKDIR: self._mkdir,
            FuseOpcode.UNLINK: self._unlink,
            FuseOpcode.RMDIR: self._rmdir,
            FuseOpcode.RENAME: self._rename,
            FuseOpcode.RENAME2: self._rename2,
            FuseOpcode.STATFS: self._statfs,
            FuseOpcode.ACCESS: self._access,
            FuseOpcode.INTERRUPT: self._interrupt,
            FuseOpcode.SETUPMAPPING: self._setupmapping,
            FuseOpcode.REMOVEMAPPING: self._removemapping,
        }

    # -- the one entry point ------------------------------------------------------------------
    def handle(self, request: bytes) -> bytes | None:
        """One request's bytes to its reply's bytes (``None``: no reply is due)."""
        if len(request) < InHeader.STRUCT.size:
            log.warning("request of %d bytes has no header: dropped", len(request))
            return None
        header = InHeader.unpack(request[: InHeader.STRUCT.size])
        end = min(header.length, len(request))
        body = request[InHeader.STRUCT.size : end]
        if header.total_extlen:
            body = body[: max(len(body) - 8 * header.total_extlen, 0)]
        try:
            opcode: FuseOpcode | None = FuseOpcode(header.opcode)
        except ValueError:
            opcode = None
        name = opcode.name if opcode is not None else str(header.opcode)
        self.ops[name] += 1
        handler = self._handlers.get(opcode) if opcode is not None else None
        reply: bytes | None = b""
        code = 0
        try:
            if handler is None:
                raise FuseError(errno.ENOSYS, f"opcode {name} not implemented")
            if header.length > len(request):
                raise FuseError(
                    errno.EINVAL, f"header says {header.length} bytes, got {len(request)}"
                )
            if not self.initialised and opcode is not FuseOpcode.INIT:
                raise FuseError(errno.EIO, "no INIT yet")
            reply = handler(header, body)
        except FuseError as exc:
            code = exc.errno
        except WindowError as exc:
            code = exc.errno
        except MapRefused as exc:
            log.warning("%s: %s", name, exc)
            code = errno.EIO
        except OSError as exc:
            code = exc.errno or errno.EIO
        except WireError as exc:
            log.warning("%s: %s", name, exc)
            code = errno.EINVAL
        except Exception:
            log.exception("%s failed", name)
            code = errno.EIO
        if code:
            self.errors[name] += 1
            log.debug(
                "%s unique=%d nodeid=%d: %s", name, header.unique, header.nodeid, os.strerror(code)
            )
            reply = b""
        if opcode in NO_REPLY or reply is None:
            return None
        return OutHeader(OutHeader.STRUCT.size + len(reply), -code, header.unique).pack() + reply

    # -- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Device reset: every handle and node but the root goes; the window is forgotten
        (the front-end dropped its mappings); the next session starts with INIT."""
        self._release_all()
        if self.window is not None:
            self.window.forget()
        self.initialised = False

    def close(self) -> None:
        self.reset()
        os.close(self._root.fd)

    def _release_all(self) -> None:
        for handle in self.handles.values():
            os.close(handle.fd)
        self.handles.clear()
        for node in self.nodes.values():
            if node is not self._root:
                os.close(node.fd)
        self.nodes = {ROOT_ID: self._root}
        self._by_key = {self._root.key: self._root}

    def status(self) -> dict[str, Any]:
        return {
            "initialised": self.initialised,
            "protocol": f"{KERNEL_VERSION}.{self.minor}" if self.initialised else None,
            "nodes": len(self.nodes),
            "handles": len(self.handles),
            "ops": dict(self.ops),
            "errors": dict(self.errors),
        }

    def _node(self, nodeid: int) -> Node:
        node = self.nodes.get(nodeid)
        if node is None:
            raise FuseError(errno.ENOENT, f"unknown node {nodeid}")
        return node

    def _handle(self, fh: int, *, directory: bool = False) -> Handle:
        handle = self.handles.get(fh)
        if handle is None or handle.directory != directory:
            raise FuseError(errno.EBADF, f"unknown handle {fh}")
        return handle

    def _add_handle(self, node: Node, fd: int, *, directory: bool) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(fh, node, fd, directory)
        return fh

    def _entry(self, node: Node, st: os.stat_result) -> EntryOut:
        t, ns = self.timeout_s, self.timeout_ns
        return EntryOut(node.nodeid, 0, t, t, ns, ns, attr_of(st))

    def _attr_out(self, st: os.stat_result) -> bytes:
        return AttrOut(self.timeout_s, self.timeout_ns, 0, attr_of(st)).pack()

    def _lookup(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        """openat(parent, name, O_PATH | O_NOFOLLOW): the node, with one more lookup."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        key = (st.st_dev, st.st_ino)
        node = self._by_key.get(key)
        if node is not None:
            os.close(fd)
            node.nlookup += 1
        else:
            node = Node(self._next_node, fd, key, 1)
            self._next_node += 1
            self.nodes[node.nodeid] = node
            self._by_key[key] = node
        self._resync(node, st)
        return node, st

    def _forget(self, nodeid: int, nlookup: int) -> None:
        node = self.nodes.get(nodeid)
        if node is None or node is self._root:
            return
        node.nlookup -= nlookup
        if node.nlookup <= 0:
            del self.nodes[nodeid]
            del self._by_key[node.key]
            os.close(node.fd)

    def _resync(self, node: Node, st: os.stat_result) -> None:
        """Keep the node's DAX chunks in step with its size. A failure here leaves the chunk
        as it was and must not fail the request that noticed the change (a GETATTR, say)."""
        if self.window is None or not stat.S_ISREG(st.st_mode):
            return
        try:
            self.window.resync(node.key, st.st_size)
        except Exception as exc:
            log.warning(
                "node %d: DAX window not brought to size %d: %s", node.nodeid, st.st_size, exc
            )

    def _write_back(self, node: Node) -> None:
        if self.window is None:
            return
        try:
            self.window.write_back(node.key)
        except OSError as exc:
            log.warning("node %d: DAX tail write-back failed: %s", node.nodeid, exc)

    def _reopen(self, node: Node, flags: int) -> int:
        """A new fd on a node's regular file (never a symlink, device or FIFO)."""
        mode = os.fstat(node.fd).st_mode
        if stat.S_ISDIR(mode):
            raise FuseError(errno.EISDIR)
        if stat.S_ISLNK(mode):
            raise FuseError(errno.ELOOP, "symlinks are not opened on the host")
        if not stat.S_ISREG(mode):
            raise FuseError(errno.EACCES, "only regular files are opened")
        return os.open(_proc(node.fd), flags | os.O_CLOEXEC)

    def _open_for_guest(self, node: Node, guest_flags: int) -> int:
        """Open as the guest asked, but write-only as read-write: a DAX mapping (and mmap in
        general) needs read access."""
        access = guest_flags & os.O_ACCMODE
        flags = (guest_flags & _PASS_FLAGS) | (os.O_RDWR if access == os.O_WRONLY else access)
        try:
            return self._reopen(node, flags)
        except PermissionError:
            if access != os.O_WRONLY:
                raise
            return self._reopen(node, (guest_flags & _PASS_FLAGS) | os.O_WRONLY)

    # -- session ------------------------------------------------------------------------------
    def _init(self, header: InHeader, body: bytes) -> bytes:
        init = InitIn.unpack(body)
        if init.major != KERNEL_VERSION:
            # The kernel retries with our major if it can; nothing else is negotiated.
            log.warning("FUSE %d.%d offered; we speak %d.x", init.major, init.minor, KERNEL_VERSION)
            return InitOut(
                KERNEL_VERSION, KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            ).pack()[:8]
        offered = init.all_flags
        accepted = offered & WANTED_FLAGS
        ext = bool(init.flags & InitFlag.INIT_EXT)
        if ext:
            accepted |= InitFlag.INIT_EXT
        self.minor = min(init.minor, KERNEL_MINOR_VERSION)
        if self.window is not None:
            self.window.clear()  # a new session: whatever an old one left mapped goes
        self._release_all()
        self.initialised = True
        log.info("FUSE session 7.%d, flags %#x (kernel offered %#x)", self.minor, accepted, offered)
        reply = InitOut(
            KERNEL_VERSION,
            self.minor,
            init.max_readahead,
            int(accepted) & 0xFFFF_FFFF,
            64,
            48,
            MAX_WRITE,
            1,
            MAX_PAGES,
            MAP_ALIGNMENT_LOG2 if accepted & InitFlag.MAP_ALIGNMENT else 0,
            (int(accepted) >> 32) if ext else 0,
            0,
        ).pack()
        if self.minor < 23:
            return reply[:24]
        return reply

    def _destroy(self, header: InHeader, body: bytes) -> bytes:
        if self.window is not None:
            self.window.clear()
        self._release_all()
        self.initialised = False
        return b""

    def _interrupt(self, header: InHeader, body: bytes) -> None:
        """Requests run to completion before the next is read: nothing to interrupt."""
        return None

    # -- names --------------------------------------------------------------------------------
    def _lookup_op(self, header: InHeader, body: bytes) -> bytes:
        node, st = self._lookup(self._node(header.nodeid), _name(body))
        return self._entry(node, st).pack()

    def _forget_op(self, header: InHeader, body: bytes) -> None:
        forget, _ = _take(ForgetIn, body)
        self._forget(header.nodeid, forget.nlookup)

    def _batch_forget(self, header: InHeader, body: bytes) -> None:
        batch, rest = _take(BatchForgetIn, body)
        size = ForgetOne.STRUCT.size
        for i in range(min(batch.count, len(rest) // size)):
            one = ForgetOne.unpack(rest[i * size : (i + 1) * size])
            self._forget(one.nodeid, one.nlookup)

    def _mkdir(self, header: InHeader, body: bytes) -> bytes:
        args, rest = _take(MkdirIn, body)
        parent, name = self._node(header.nodeid), _name(rest)
        os.mkdir(name, args.mode & 0o7777, dir_fd=parent.fd)
        if self._as_root:
            with contextlib.suppress(OSError):
                os.chown(name, header.uid, header.gid, dir_fd=parent.fd, follow_symlinks=False)
        node, st = self._lookup(parent, name)
        return self._entry(node, st).pack()

    def _unlink(self, header: InHeader, body: bytes) -> bytes:
        os.unlink(_name(body), dir_fd=self._node(header.nodeid).fd)
        return b""

    def _rmdir(self, header: InHeader, body: bytes) -> bytes:
        os.rmdir(_name(body), dir_fd=self._node(header.nodeid).fd)
        return b""

    def _rename(self, header: InHeader, body: bytes) -> bytes:
        args, rest = _take(RenameIn, body)
        return self._do_rename(header.nodeid, args.newdir, rest)

    def _rename2(self, header: InHeader, body: bytes) -> bytes:
        args, rest = _take(Rename2In, body)
        if args.flags:
            raise FuseError(errno.EINVAL, f"RENAME2 flags {args.flags:#x} not supported")
        return self._do_rename(header.nodeid, args.newdir, rest)

    def _do_rename(self, olddir: int, newdir: int, names: bytes) -> bytes:
        old, new = _two_names(names)
        src, dst = self._node(olddir), self._node(newdir)
        os.rename(old, new, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        return b""

    def _readlink(self, header: InHeader, body: bytes) -> bytes:
        node = self._node(header.nodeid)
        if not stat.S_ISLNK(os.fstat(node.fd).st_mode):
            raise FuseError(errno.EINVAL)
        return os.readlink(b"", dir_fd=node.fd)

    # -- attributes ---------------------------------------------------------------------------
    def _getattr(self, header: InHeader, body: bytes) -> bytes:
        node = self._node(header.nodeid)
        self._write_back(node)
        st = os.fstat(node.fd)
        self._resync(node, st)
        return self._attr_out(st)

    def _setattr(self, header: InHeader, body: bytes) -> bytes:
        args, _ = _take(SetattrIn, body)
        valid = SetattrValid(args.valid)
        node = self._node(header.nodeid)
        st = os.fstat(node.fd)
        link = stat.S_ISLNK(st.st_mode)
        if link and valid & (SetattrValid.MODE | SetattrValid.UID | SetattrValid.GID):
            raise FuseError(errno.EPERM, "symlink attributes are not changed on the host")
        if valid & SetattrValid.MODE:
            os.chmod(_proc(node.fd), args.mode & 0o7777)
        if valid & (SetattrValid.UID | SetattrValid.GID):
            uid = args.uid if valid & SetattrValid.UID else -1
            gid = args.gid if valid & SetattrValid.GID else -1
            os.chown(_proc(node.fd), uid, gid)
        if valid & SetattrValid.SIZE:
            self._truncate(node, args, valid)
        times = SetattrValid.ATIME | SetattrValid.MTIME
        times |= SetattrValid.ATIME_NOW | SetattrValid.MTIME_NOW
        if valid & times and not link:
            now = time.time_ns()

            def pick(
                given: int, nsec: int, set_: SetattrValid, now_: SetattrValid, old: int
            ) -> int:
                if valid & now_:
                    return now
                if valid & set_:
                    secs = given - (1 << 64) if given >= 1 << 63 else given
                    return secs * _NS + nsec
                return old

            atime = pick(
                args.atime,
                args.atimensec,
                SetattrValid.ATIME,
                SetattrValid.ATIME_NOW,
                st.st_atime_ns,
            )
            mtime = pick(
                args.mtime,
                args.mtimensec,
                SetattrValid.MTIME,
                SetattrValid.MTIME_NOW,
                st.st_mtime_ns,
            )
            os.utime(_proc(node.fd), ns=(atime, mtime))
        st = os.fstat(node.fd)
        self._resync(node, st)
        return self._attr_out(st)

    def _truncate(self, node: Node, args: SetattrIn, valid: SetattrValid) -> None:
        self._write_back(node)
        handle = self.handles.get(args.fh) if valid & SetattrValid.FH else None
        if handle is not None and not handle.directory and handle.node is node:
            try:
                os.ftruncate(handle.fd, args.size)
                return
            except OSError as exc:
                if exc.errno not in (errno.EBADF, errno.EINVAL):
                    raise
        fd = self._reopen(node, os.O_WRONLY)
        try:
            os.ftruncate(fd, args.size)
        finally:
            os.close(fd)

    def _access(self, header: InHeader, body: bytes) -> bytes:
        args, _ = _take(AccessIn, body)
        node = self._node(header.nodeid)
        if stat.S_ISLNK(os.fstat(node.fd).st_mode):
            return b""
        if not os.access(_proc(node.fd), args.mask):
            raise FuseError(errno.EACCES)
        return b""

    def _statfs(self, header: InHeader, body: bytes) -> bytes:
        vfs = os.statvfs(_proc(self._root.fd))
        return StatfsOut(
            vfs.f_blocks,
            vfs.f_bfree,
            vfs.f_bavail,
            vfs.f_files,
            vfs.f_ffree,
            vfs.f_bsize,
            vfs.f_namemax,
            vfs.f_frsize,
            0,
        ).pack()

    # -- files --------------------------------------------------------------------------------
    def _open(self, header: InHeader, body: bytes) -> bytes:
        args, _ = _take(OpenIn, body)
        node = self._node(header.nodeid)
        fd = self._open_for_guest(node, args.flags)
        if args.flags & os.O_TRUNC:
            os.ftruncate(fd, 0)
        return OpenOut(self._add_handle(node, fd, directory=False), 0, 0).pack()

    def _create(self, header: InHeader, body: bytes) -> bytes:
        args, rest = _take(CreateIn, body)
        parent, name = self._node(header.nodeid), _name(rest)
        access = args.flags & os.O_ACCMODE
        flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (args.flags & (os.O_EXCL | os.O_TRUNC))
        flags |= (args.flags & _PASS_FLAGS) | (os.O_RDWR if access == os.O_WRONLY else access)
        try:  # O_EXCL first, to know whether the file is new
            fd = os.open(name, flags | os.O_EXCL, args.mode & 0o7777, dir_fd=parent.fd)
            new = True
        except FileExistsError:
            if args.flags & os.O_EXCL:
                raise
            fd = os.open(name, flags & ~os.O_CREAT, dir_fd=parent.fd)
            new = False
        try:
            if new and self._as_root:
                with contextlib.suppress(OSError):
                    os.fchown(fd, header.uid, header.gid)
            created = os.fstat(fd)
            if not stat.S_ISREG(created.st_mode):
                raise FuseError(errno.EACCES, "only regular files are created")
            node, st = self._lookup(parent, name)
        except BaseException:
            os.close(fd)
            raise
        if node.key != (created.st_dev, created.st_ino):
            os.close(fd)
            self._forget(node.nodeid, 1)
            raise FuseError(errno.EIO, "the new file was replaced while being created")
        fh = self._add_handle(node, fd, directory=False)
        return self._entry(node, st).pack() + OpenOut(fh, 0, 0).pack()

    def _read(self, header: InHeader, body: bytes) -> bytes:
        args, _ = _take(ReadIn, body)
        handle = self._handle(args.fh)
        self._write_back(handle.node)
        return os.pread(handle.fd, args.size, args.offset)

    def _write(self, header: InHeader, body: bytes) -> bytes:
        args, data = _take(WriteIn, body)
        if len(data) < args.size:
            raise FuseError(errno.EINVAL, f"WRITE of {args.size} bytes carries {len(data)}")
        handle = self._handle(args.fh)
        self._write_back(handle.node)
        written = os.pwrite(handle.fd, data[: args.size], args.offset)
        self._resync(handle.node, os.fstat(handle.fd))
        return WriteOut(written, 0).pack()

    def _flush(self, header: InHeader, body: bytes) -> bytes:
        args, _ = _take(FlushIn, body)
        self._write_back(self._handle(args.fh).node)
        return b""

    def _fsync(self, header: InHeader, body: bytes) -> bytes:
        args, _ = _take(FsyncIn, body)
        handle = self._handle(args.fh)
        self._write_back(handle.node)
        if args.fsync_flags & FsyncFlag.FDATASYNC:
            os.fdatasync(handle.fd)
        else:
            os.fsync(handle.fd)
        return b""

    def _release(self, header: InHeader, body: bytes) -> bytes:
        args, _ = _take(ReleaseIn, body)
        handle = self._handle(args.fh)
        del self.handles[args.fh]
        try:
            self._write_back(handle.node)
        finally:
            os.close(handle.fd)
        return b""

    # -- directories --------------------------------------------------------------------------
    def _opendir(self, header: InHeader, body: bytes) -> bytes:
        node = self._node(header.nodeid)
        if not stat.S_ISDIR(os.fstat(node.fd).st_mode):
            raise FuseError(errno.ENOTDIR)
        fd = os.open(_proc(node.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return OpenOut(self._add_handle(node, fd, directory=True), 0, 0).pack()

    def _listing(self, handle: Handle, offset: int) -> list[tuple[bytes, int, int]]:
        """The directory as of the last read from offset 0 (a rewind takes a new snapshot)."""
        if handle.entries is None or offset == 0:
            own = os.fstat(handle.fd).st_ino
            entries = [(b".", own, _DT_DIR), (b"..", own, _DT_DIR)]
            with os.scandir(handle.fd) as it:
                for entry in it:
                    name = os.fsencode(entry.name)
                    entries.append((name, entry.inode(), _dirent_type(entry)))
            handle.entries = entries
        return handle.entries

    def _readdir(self, header: InHeader, body: bytes) -> bytes:
        args, _ = _take(ReadIn, body)
        handle = self._handle(args.fh, directory=True)
        out = bytearray()
        for index, (name, ino, kind) in enumerate(self._listing(handle, args.offset)):
            if index < args.offset:
                continue
            record = _pad8(Dirent(ino, index + 1, len(name), kind).pack() + name)
            if len(out) + len(record) > args.size:
                break
            out += record
        return bytes(out)

    def _readdirplus(self, header: InHeader, body: bytes) -> bytes:
        args, _ = _take(ReadIn, body)
        handle = self._handle(args.fh, directory=True)
        out = bytearray()
        for index, (name, ino, kind) in enumerate(self._listing(handle, args.offset)):
            if index < args.offset:
                continue
            size = EntryOut.SIZE + len(_pad8(Dirent.STRUCT.pack(0, 0, 0, 0) + name))
            if len(out) + size > args.size:
                break
            # Checked for room first: each entry with a node id counts as a lookup.
            entry = EntryOut(0, 0, 0, 0, 0, 0, Attr(*([0] * 16)))
            if name not in (b".", b".."):
                try:
                    node, st = self._lookup(handle.node, name)
                    entry = self._entry(node, st)
                    ino = st.st_ino  # noqa: PLW2901 - the inode as looked up now
                except OSError:
                    pass  # gone since the snapshot: a bare name, no node
            dirent = Dirent(ino, index + 1, len(name), kind).pack() + name
            out += entry.pack() + _pad8(dirent)
        return bytes(out)

    def _releasedir(self, header: InHeader, body: bytes) -> bytes:
        args, _ = _take(ReleaseIn, body)
        handle = self._handle(args.fh, directory=True)
        del self.handles[args.fh]
        os.close(handle.fd)
        return b""

    def _fsyncdir(self, header: InHeader, body: bytes) -> bytes:
        args, _ = _take(FsyncIn, body)
        os.fsync(self._handle(args.fh, directory=True).fd)
        return b""

    # -- DAX ----------------------------------------------------------------------------------
    def _setupmapping(self, header: InHeader, body: bytes) -> bytes:
        args, _ = _take(SetupMappingIn, body)
        if self.window is None:
            raise FuseError(errno.ENOSYS, "no DAX window")
        handle = self.handles.get(args.fh) if args.fh != NO_FH else None
        node = handle.node if handle is not None and not handle.directory else None
        node = node or self._node(header.nodeid)
        writable = bool(args.flags & SetupMappingFlag.WRITE)
        fd = self._mapping_fd(node, writable)
        try:
            self.window.setup(fd, node.key, args.foffset, args.len, args.moffset, writable=writable)
        finally:
            os.close(fd)
        return b""

    def _mapping_fd(self, node: Node, writable: bool) -> int:
        """The fd a SHMEM_MAP sends: read-write whenever the file allows it, even for a read map.

        QEMU 11.1 maps every SHMEM_MAP read-write (a known defect), so an ``O_RDONLY`` fd makes
        its mmap fail with EACCES, after which it drops the back-end. The requested protection
        still travels in the map's flags, and our emulator maps a read map read-only.
        """
        try:
            return self._reopen(node, os.O_RDWR)
        except PermissionError:
            if writable:
                raise
            return self._reopen(node, os.O_RDONLY)

    def _removemapping(self, header: InHeader, body: bytes) -> bytes:
        args, rest = _take(RemoveMappingIn, body)
        if self.window is None:
            raise FuseError(errno.ENOSYS, "no DAX window")
        size = RemoveMappingOne.STRUCT.size
        if len(rest) < args.count * size:
            raise FuseError(errno.EINVAL, f"{args.count} ranges announced, {len(rest)} bytes sent")
        first_error = 0
        for i in range(args.count):
            one = RemoveMappingOne.unpack(rest[i * size : (i + 1) * size])
            try:
                self.window.remove(one.moffset, one.len)
            except WindowError as exc:
                log.info("REMOVEMAPPING %#x+%#x: %s", one.moffset, one.len, exc)
                first_error = first_error or exc.errno
            except Exception as exc:
                log.warning("REMOVEMAPPING %#x+%#x failed: %s", one.moffset, one.len, exc)
                first_error = first_error or errno.EIO
        if first_error:
            raise FuseError(first_error)
        return b""
