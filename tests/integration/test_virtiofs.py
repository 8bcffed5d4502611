"""vhost-device-fs without a guest: the device on the back-end library, a scripted vhost-user
front-end over a real socket, rings in a memfd, FUSE requests as Linux's virtio-fs driver sends
them, and a channel peer that really mmaps what SHMEM_MAP sends (accepting maps past EOF, or
refusing them as QEMU 11.1 does)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testkit import ChannelPeer, LockstepFrontend
from testkit.frontend import qemu_map_policy
from testkit.procfs import fd_count
from tests.helpers.fuse_client import DAX_CHUNK, FuseClient, FuseFailed, VhostRings
from vhost_user.messages import (
    BackendReq,
    FrontendReq,
    VhostUserConfig,
    VhostUserMMap,
    VhostUserProtocolFeature,
    VhostUserShMemConfig,
)
from vhost_user_backend.daemon import VhostUserDaemon
from vhost_user_backend.devices.virtiofs.device import VirtioFsDevice, check_cache_size
from vhost_user_backend.devices.virtiofs.fuse import (
    KERNEL_MINOR_VERSION,
    ROOT_ID,
    FsyncIn,
    FuseOpcode,
    InitFlag,
    SetattrValid,
)
from vhost_user_backend.errors import DeviceConfigError

PF = VhostUserProtocolFeature
PROTOCOL = PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG | PF.RESET_DEVICE | PF.SHMEM
KiB, MiB = 1 << 10, 1 << 20
CACHE = 8 * MiB
Policy = Callable[[BackendReq, VhostUserMMap, int | None], int]


def accept_all(req: BackendReq, p: VhostUserMMap, fd: int | None) -> int:
    return 0


@dataclass
class Rig:
    share: Path
    device: VirtioFsDevice
    daemon: VhostUserDaemon
    fe: LockstepFrontend
    peer: ChannelPeer
    rings: VhostRings
    fuse: FuseClient

    def maps(self) -> list[tuple[int, int, int, int]]:
        """(shm_offset, length, fd_offset, writable) of every SHMEM_MAP seen so far."""
        return [
            (p.shm_offset, p.length, p.fd_offset, p.flags)
            for req, p, _ in self.peer.seen
            if req is BackendReq.SHMEM_MAP
        ]

    def unmaps(self) -> list[tuple[int, int]]:
        return [
            (p.shm_offset, p.length)
            for req, p, _ in self.peer.seen
            if req is BackendReq.SHMEM_UNMAP
        ]

    def window(self) -> dict[str, Any]:
        status = self.device.status()["window"]
        assert isinstance(status, dict)
        return status

    def file(self, name: str, data: bytes) -> int:
        """A host file in the share, looked up: its node id."""
        (self.share / name).write_bytes(data)
        return self.fuse.lookup(ROOT_ID, name.encode()).nodeid


def make_rig(tmp_path: Path, policy: Policy) -> Iterator[Rig]:
    share = tmp_path / "share"
    share.mkdir()
    device = VirtioFsDevice(str(share), "testfs", cache_size=CACHE)
    daemon = VhostUserDaemon(device, str(tmp_path / "fs.sock"), reply_timeout=5.0)
    thread = daemon.serve_in_thread()
    fe = LockstepFrontend(str(tmp_path / "fs.sock"))
    fe.negotiate(int(PROTOCOL))
    peer = ChannelPeer(fe, policy=policy, keep_maps=True)
    rings = VhostRings(fe)
    try:
        yield Rig(share, device, daemon, fe, peer, rings, FuseClient(rings))
    finally:
        fe.close()
        peer.close()
        daemon.stop()
        thread.join(5)
        device.close()
        rings.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """A front-end that maps anything (as our emulator would if it accepted past-EOF maps)."""
    yield from make_rig(tmp_path, accept_all)


@pytest.fixture
def qemu_rig(tmp_path: Path) -> Iterator[Rig]:
    """A front-end that refuses maps past EOF with status 1, as QEMU 11.1's native one."""
    yield from make_rig(tmp_path, qemu_map_policy)


# -- device and session ------------------------------------------------------------------------
def test_config_queues_and_window(rig: Rig) -> None:
    assert rig.fe.u64(FrontendReq.GET_QUEUE_NUM) == 2
    reply = rig.fe.call(FrontendReq.GET_SHMEM_CONFIG)
    assert reply is not None and reply.payload == VhostUserShMemConfig(1, (CACHE,))
    cfg = rig.fe.call(FrontendReq.GET_CONFIG, VhostUserConfig(0, 40, 0, bytes(40)))
    assert cfg is not None and isinstance(cfg.payload, VhostUserConfig)
    assert cfg.payload.payload == b"testfs".ljust(36, b"\0") + (1).to_bytes(4, "little")


def test_init_negotiates_map_alignment(rig: Rig) -> None:
    assert rig.fuse.error(FuseOpcode.LOOKUP, ROOT_ID, b"x\0") == errno.EIO  # before INIT
    init = rig.fuse.init()
    assert (init.major, init.minor) == (7, KERNEL_MINOR_VERSION)
    flags = InitFlag(init.flags | init.flags2 << 32)
    assert flags & InitFlag.MAP_ALIGNMENT and init.map_alignment == 12
    assert flags & InitFlag.INIT_EXT and init.flags2 == 0
    assert not flags & (InitFlag.POSIX_LOCKS | InitFlag.WRITEBACK_CACHE)  # offered, not taken
    assert init.max_write >= 128 * KiB and init.max_pages > 0
    # An older kernel: its minor; no MAP_ALIGNMENT offered, none claimed; no flags2.
    old = rig.fuse.init(int(InitFlag.BIG_WRITES | InitFlag.ASYNC_READ), minor=31)
    assert old.minor == 31 and old.map_alignment == 0 and old.flags2 == 0
    assert not old.flags & (InitFlag.MAP_ALIGNMENT | InitFlag.INIT_EXT)
    assert rig.device.status()["fuse"]["protocol"] == "7.31"


def test_unknown_and_unimplemented_opcodes_are_enosys(rig: Rig) -> None:
    rig.fuse.init()
    assert rig.fuse.error(99, ROOT_ID) == errno.ENOSYS  # type: ignore[arg-type]
    assert rig.fuse.error(FuseOpcode.GETXATTR, ROOT_ID, bytes(8) + b"user.x\0") == errno.ENOSYS
    assert rig.fuse.error(FuseOpcode.SYMLINK, ROOT_ID, b"a\0b\0") == errno.ENOSYS
    assert rig.fuse.statfs().namelen > 0  # still serving


# -- file system round trips -------------------------------------------------------------------
def test_files_and_directories_round_trip(rig: Rig) -> None:
    fuse = rig.fuse
    fuse.init()
    (rig.share / "hello.txt").write_bytes(b"hello, world\n")
    entry = fuse.lookup(ROOT_ID, b"hello.txt")
    host = os.stat(rig.share / "hello.txt")
    assert entry.nodeid > ROOT_ID and entry.attr.ino == host.st_ino and entry.attr.size == 13
    assert entry.entry_valid == 1 and entry.attr_valid == 1
    assert fuse.lookup(ROOT_ID, b"hello.txt").nodeid == entry.nodeid  # one node per inode
    assert fuse.getattr(entry.nodeid).attr.mode == host.st_mode
    assert fuse.error(FuseOpcode.LOOKUP, ROOT_ID, b"missing\0") == errno.ENOENT

    fh = fuse.open(entry.nodeid, os.O_RDONLY)
    assert fuse.read(fh, 7, 100) == b"world\n"
    fuse.release(entry.nodeid, fh)
    assert fuse.error(FuseOpcode.READ, 0, bytes(40)) == errno.EBADF  # released

    created, cfh = fuse.create(ROOT_ID, b"new.bin")
    assert fuse.write(created.nodeid, cfh, 0, b"A" * 5000) == 5000
    assert fuse.write(created.nodeid, cfh, 10_000, b"tail") == 4
    assert fuse.read(cfh, 4990, 20) == b"A" * 10 + bytes(10)
    fuse.flush(created.nodeid, cfh)
    fuse.fsync(created.nodeid, cfh)
    fuse.release(created.nodeid, cfh)
    assert (rig.share / "new.bin").stat().st_size == 10_004
    assert stat.S_IMODE((rig.share / "new.bin").stat().st_mode) == 0o644

    attr = fuse.setattr(created.nodeid, SetattrValid.SIZE | SetattrValid.MODE, size=100, mode=0o600)
    assert attr.attr.size == 100 and stat.S_IMODE(attr.attr.mode) == 0o600
    assert (rig.share / "new.bin").stat().st_size == 100

    # CREATE without O_EXCL opens an existing file; with it, EEXIST.
    again, afh = fuse.create(ROOT_ID, b"new.bin", flags=0)
    assert again.nodeid == created.nodeid and again.attr.size == 100
    fuse.release(created.nodeid, afh)
    with pytest.raises(FuseFailed) as exists:
        fuse.create(ROOT_ID, b"new.bin")
    assert exists.value.errno == errno.EEXIST

    sub = fuse.mkdir(ROOT_ID, b"sub")
    assert stat.S_ISDIR(sub.attr.mode) and (rig.share / "sub").is_dir()
    assert fuse.rename(ROOT_ID, b"new.bin", sub.nodeid, b"moved.bin") == 0
    assert (rig.share / "sub" / "moved.bin").exists()
    assert fuse.rename(sub.nodeid, b"moved.bin", ROOT_ID, b"back.bin", flags=0) == 0
    assert fuse.rename(ROOT_ID, b"back.bin", ROOT_ID, b"x", flags=1) == errno.EINVAL
    assert fuse.error(FuseOpcode.RMDIR, ROOT_ID, b"missing\0") == errno.ENOENT

    dfh = fuse.opendir(ROOT_ID)
    names = {e.name for e in fuse.readdir(ROOT_ID, dfh, size=200)}  # several small replies
    assert names == {b".", b"..", b"hello.txt", b"back.bin", b"sub"}
    plus = {e.name: e for e in fuse.readdir(ROOT_ID, dfh, plus=True)}
    assert plus[b"sub"].entry is not None and plus[b"sub"].entry.nodeid == sub.nodeid
    assert plus[b"hello.txt"].entry is not None
    assert plus[b"hello.txt"].entry.attr.size == 13
    assert plus[b"."].entry is not None and plus[b"."].entry.nodeid == 0
    fuse.ok(FuseOpcode.FSYNCDIR, ROOT_ID, FsyncIn(dfh, 0, 0).pack())
    fuse.release(ROOT_ID, dfh, FuseOpcode.RELEASEDIR)

    fuse.unlink(ROOT_ID, b"back.bin")
    fuse.rmdir(ROOT_ID, b"sub")
    assert sorted(os.listdir(rig.share)) == ["hello.txt"]
    vfs = os.statvfs(rig.share)
    st = fuse.statfs()
    assert (st.blocks, st.bsize, st.namelen) == (vfs.f_blocks, vfs.f_bsize, vfs.f_namemax)
    assert fuse.error(FuseOpcode.ACCESS, entry.nodeid, (4).to_bytes(8, "little")) == 0
    # FORGET gets no reply; the node is gone once its lookups (two LOOKUPs and one
    # READDIRPLUS entry) are all forgotten.
    nodes = rig.device.status()["fuse"]["nodes"]
    fuse.forget(entry.nodeid, 2)
    assert rig.device.status()["fuse"]["nodes"] == nodes
    fuse.forget(entry.nodeid, 1)
    assert rig.device.status()["fuse"]["nodes"] == nodes - 1
    assert fuse.error(FuseOpcode.GETATTR, entry.nodeid, bytes(16)) == errno.ENOENT


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files away")
def test_new_files_belong_to_the_guest_caller(rig: Rig) -> None:
    rig.fuse.init()
    rig.fuse.uid, rig.fuse.gid = 1234, 5678
    entry, fh = rig.fuse.create(ROOT_ID, b"mine")
    rig.fuse.release(entry.nodeid, fh)
    rig.fuse.mkdir(ROOT_ID, b"mydir")
    for name in ("mine", "mydir"):
        st = (rig.share / name).stat()
        assert (st.st_uid, st.st_gid) == (1234, 5678), name
    assert (entry.attr.uid, entry.attr.gid) == (1234, 5678)


def test_escapes_are_refused(rig: Rig, tmp_path: Path) -> None:
    fuse = rig.fuse
    fuse.init()
    (tmp_path / "outside").write_text("secret")
    os.symlink("/etc", rig.share / "etc-link")
    os.symlink("../outside", rig.share / "up-link")
    assert fuse.error(FuseOpcode.LOOKUP, ROOT_ID, b"..\0") == errno.EACCES
    assert fuse.error(FuseOpcode.LOOKUP, ROOT_ID, b"/etc\0") == errno.EINVAL
    assert fuse.error(FuseOpcode.LOOKUP, ROOT_ID, b"../outside\0") == errno.EINVAL
    assert fuse.error(FuseOpcode.LOOKUP, ROOT_ID, b"a\0b\0") == errno.EINVAL
    assert fuse.error(FuseOpcode.LOOKUP, ROOT_ID, b".\0") == errno.EINVAL
    assert fuse.error(FuseOpcode.MKDIR, ROOT_ID, bytes(8) + b"x/y\0") == errno.EINVAL
    # A symlink is a node of its own, never followed on the host.
    link = fuse.lookup(ROOT_ID, b"etc-link")
    assert stat.S_ISLNK(link.attr.mode)
    assert fuse.ok(FuseOpcode.READLINK, link.nodeid) == b"/etc"
    assert fuse.error(FuseOpcode.LOOKUP, link.nodeid, b"passwd\0") == errno.ENOTDIR
    assert fuse.error(FuseOpcode.OPEN, link.nodeid, bytes(8)) == errno.ELOOP
    assert fuse.error(FuseOpcode.OPENDIR, link.nodeid, bytes(8)) == errno.ENOTDIR
    up = fuse.lookup(ROOT_ID, b"up-link")
    assert fuse.error(FuseOpcode.OPEN, up.nodeid, bytes(8)) == errno.ELOOP
    assert fuse.setupmapping(up.nodeid, 0, 0) == errno.ELOOP
    # CREATE over a symlink does not follow it either.
    assert fuse.error(FuseOpcode.CREATE, ROOT_ID, bytes(16) + b"up-link\0") == errno.ELOOP
    assert (tmp_path / "outside").read_text() == "secret"


# -- DAX ---------------------------------------------------------------------------------------
def test_setupmapping_maps_up_to_the_page_rounded_end(rig: Rig) -> None:
    rig.fuse.init()
    one = rig.file("one", b"x")
    empty = rig.file("empty", b"")
    big = rig.file("big", bytes(range(256)) * 1024 + b"!")  # 256 KiB + 1
    assert rig.fuse.setupmapping(one, 0, 0) == 0
    assert rig.maps() == [(0, 4 * KiB, 0, 0)]
    assert rig.peer.seen[-1][2] == b"x" + bytes(4095)  # the front-end's mmap of our fd
    assert rig.fuse.setupmapping(empty, 0, DAX_CHUNK) == 0  # nothing to map, still success
    assert rig.fuse.setupmapping(big, 0, 2 * DAX_CHUNK, write=True) == 0
    assert rig.maps()[1:] == [(2 * DAX_CHUNK, 260 * KiB, 0, 1)]
    assert rig.peer.seen[-1][2][: 256 * KiB + 1] == (rig.share / "big").read_bytes()
    # A chunk starting past EOF maps nothing; one starting inside maps only its part.
    assert rig.fuse.setupmapping(big, DAX_CHUNK, 3 * DAX_CHUNK) == 0
    assert len(rig.maps()) == 2
    window = rig.window()
    assert window["live_chunks"] == 4 and window["live_mappings"] == 2
    assert window["counters"]["setups"] == 4
    # Guest writes through a writable chunk reach the host file.
    rig.peer.maps[(0, 2 * DAX_CHUNK)][0:4] = b"DAX!"
    assert (rig.share / "big").read_bytes()[:4] == b"DAX!"
    # Misaligned or out-of-window requests are refused.
    assert rig.fuse.setupmapping(one, 0, 100) == errno.EINVAL
    assert rig.fuse.setupmapping(one, 0, CACHE - DAX_CHUNK // 2) == errno.EINVAL


def test_growth_upgrade_truncate_and_removemapping(rig: Rig) -> None:
    fuse = rig.fuse
    fuse.init()
    node = rig.file("grow", b"g" * 4096)
    assert fuse.setupmapping(node, 0, 0) == 0
    assert rig.maps() == [(0, 4 * KiB, 0, 0)]
    # Linux upgrades a read-only chunk with a second SETUPMAPPING: replaced, not overlapped.
    assert fuse.setupmapping(node, 0, 0, write=True) == 0
    assert rig.unmaps() == [(0, 4 * KiB)] and rig.maps()[-1] == (0, 4 * KiB, 0, 1)
    # The file grows through FUSE_WRITE: the newly covered pages are mapped at once.
    fh = fuse.open(node)
    assert fuse.write(node, fh, 4096, b"h" * 8192) == 8192
    assert rig.maps()[-1] == (4 * KiB, 8 * KiB, 4 * KiB, 1)
    assert rig.peer.seen[-1][2] == b"h" * 8192
    # ... and when the host grows it, on the next GETATTR (or LOOKUP, SETATTR, WRITE).
    with open(rig.share / "grow", "ab") as f:
        f.write(b"i" * 100)
    assert fuse.getattr(node).attr.size == 12388
    assert rig.maps()[-1] == (12 * KiB, 4 * KiB, 12 * KiB, 1)
    # Truncate: pieces past the new end go, the part still covered is mapped again.
    assert fuse.setattr(node, SetattrValid.SIZE, size=5000).attr.size == 5000
    assert rig.unmaps()[-2:] == [(4 * KiB, 8 * KiB), (12 * KiB, 4 * KiB)]
    assert rig.maps()[-1] == (4 * KiB, 4 * KiB, 4 * KiB, 1)
    window = rig.window()
    (chunk,) = window["chunks"]
    assert [(p["offset"], p["length"]) for p in chunk["pieces"]] == [
        (0, 4 * KiB),
        (4 * KiB, 4 * KiB),
    ]
    assert window["counters"]["shrinks"] == 1
    # REMOVEMAPPING: each piece is unmapped as mapped; an unknown range is EINVAL, the
    # rest of the list is still done.
    other = rig.file("other", b"o" * 10)
    assert fuse.setupmapping(other, 0, 3 * DAX_CHUNK) == 0
    before = len(rig.unmaps())
    assert (
        fuse.removemapping(node, (0, DAX_CHUNK), (DAX_CHUNK, DAX_CHUNK), (3 * DAX_CHUNK, DAX_CHUNK))
        == errno.EINVAL
    )
    assert sorted(rig.unmaps()[before:]) == [
        (0, 4 * KiB),
        (4 * KiB, 4 * KiB),
        (3 * DAX_CHUNK, 4 * KiB),
    ]
    assert rig.window()["live_chunks"] == 0 and not rig.peer.maps
    assert fuse.removemapping(node, (0, DAX_CHUNK)) == errno.EINVAL
    fuse.release(node, fh)


def test_bounce_page_behind_a_front_end_that_refuses_past_eof(qemu_rig: Rig) -> None:
    rig = qemu_rig
    fuse = rig.fuse
    fuse.init()
    node = rig.file("tail", b"abc")
    assert fuse.setupmapping(node, 0, 0, write=True) == 0
    refused, bounce = rig.peer.seen
    assert refused[1] == VhostUserMMap(0, 0, 0, 4 * KiB, 1)  # refused: status 1
    assert bounce[1].length == 4 * KiB and bounce[2] == b"abc" + bytes(4093)
    window = rig.window()
    assert window["refuses_past_eof"] and window["chunks"][0]["pieces"][0]["bounce"]
    # The guest writes through the bounce page: within EOF reaches the file on FLUSH (or
    # FSYNC, RELEASE, REMOVEMAPPING, READ, GETATTR); past EOF stays in the page.
    page = rig.peer.maps[(0, 0)]
    page[0:5] = b"XY\0ZZ"
    fh = fuse.open(node)
    assert (rig.share / "tail").read_bytes() == b"abc"
    fuse.flush(node, fh)
    assert (rig.share / "tail").read_bytes() == b"XY\0"
    page[1:2] = b"Q"
    assert fuse.read(fh, 0, 10) == b"XQ\0"
    # A FUSE_WRITE growing the file past the page: the bounce gives way to the file's page,
    # and the new tail gets a bounce page of its own (the front-end refuses again).
    assert fuse.write(node, fh, 3, b"w" * 5000) == 5000
    assert (rig.share / "tail").read_bytes() == b"XQ\0" + b"w" * 5000
    pieces = [(p["offset"], p["length"], p["bounce"]) for p in rig.window()["chunks"][0]["pieces"]]
    assert pieces == [(0, 4 * KiB, False), (4 * KiB, 4 * KiB, True)]
    assert (0, 4 * KiB) in rig.unmaps()
    tail_page = rig.peer.maps[(0, 4 * KiB)]
    assert tail_page[: 5003 - 4096] == b"w" * (5003 - 4096)
    # A host-side write within the tail is seen in the bounce page after a re-check.
    with open(rig.share / "tail", "r+b") as f:
        f.seek(4096)
        f.write(b"H")
    fuse.getattr(node)
    assert tail_page[0:1] == b"H"
    tail_page[1:3] = b"gh"
    fuse.release(node, fh)
    assert (rig.share / "tail").read_bytes()[4096:4100] == b"Hghw"
    # Unmapping writes back too, then every piece goes.
    tail_page[3:4] = b"!"
    assert fuse.removemapping(node, (0, DAX_CHUNK)) == 0
    assert (rig.share / "tail").read_bytes()[4096:4100] == b"Hgh!"
    assert rig.window()["live_mappings"] == 0 and not rig.peer.maps


def test_bounce_for_a_partial_tail_after_whole_pages(qemu_rig: Rig) -> None:
    rig = qemu_rig
    rig.fuse.init()
    node = rig.file("big", b"b" * (256 * KiB + 1))
    assert rig.fuse.setupmapping(node, 0, DAX_CHUNK) == 0
    assert rig.maps()[0][:2] == (DAX_CHUNK, 260 * KiB)  # refused
    assert rig.maps()[1:] == [(DAX_CHUNK, 256 * KiB, 0, 0), (DAX_CHUNK + 256 * KiB, 4 * KiB, 0, 0)]
    assert rig.peer.seen[-1][2] == b"b" + bytes(4095)
    # Whole pages only: no bounce, one map.
    node2 = rig.file("pages", b"p" * 8192)
    assert rig.fuse.setupmapping(node2, 0, 2 * DAX_CHUNK) == 0
    assert rig.maps()[-1] == (2 * DAX_CHUNK, 8 * KiB, 0, 0)


def test_reset_forgets_the_window_without_unmapping(rig: Rig) -> None:
    rig.fuse.init()
    node = rig.file("f", b"z" * 10)
    fh = rig.fuse.open(node)
    assert rig.fuse.setupmapping(node, 0, 0) == 0
    assert rig.window()["live_mappings"] == 1
    seen = len(rig.peer.seen)
    assert rig.fe.u64(FrontendReq.RESET_DEVICE) == 0
    status = rig.device.status()
    assert status["window"]["live_chunks"] == 0 and status["window"]["counters"]["forgotten"] == 1
    assert status["fuse"]["handles"] == 0 and status["fuse"]["nodes"] == 1
    assert not status["fuse"]["initialised"]
    assert len(rig.peer.seen) == seen  # no SHMEM_UNMAP: the front-end dropped them itself
    del fh


def test_destroy_and_a_new_init_unmap_what_is_left(rig: Rig) -> None:
    rig.fuse.init()
    node = rig.file("f", b"z" * 10)
    assert rig.fuse.setupmapping(node, 0, 0) == 0
    rig.fuse.init()  # a new session
    assert rig.unmaps() == [(0, 4 * KiB)]
    node = rig.file("f", b"z" * 10)
    assert rig.fuse.setupmapping(node, 0, DAX_CHUNK) == 0
    rig.fuse.ok(FuseOpcode.DESTROY, 0)
    assert rig.unmaps()[-1] == (DAX_CHUNK, 4 * KiB)
    assert rig.device.status()["window"]["live_chunks"] == 0


# -- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [3 * MiB, 6 * MiB, MiB, 4096, -2 * MiB])
def test_cache_size_must_be_a_power_of_two_multiple_of_2m(size: int) -> None:
    with pytest.raises(DeviceConfigError, match="power of two"):
        check_cache_size(size)


@pytest.mark.parametrize("size", [0, 2 * MiB, 64 * MiB, 1 << 30])
def test_good_cache_sizes(size: int) -> None:
    assert check_cache_size(size) == size


def test_map_cycles_leak_no_fd(qemu_rig: Rig) -> None:
    rig = qemu_rig
    rig.fuse.init()
    tail = rig.file("tail", b"t" * 5000)
    pages = rig.file("pages", b"p" * 8192)
    rig.fuse.setupmapping(tail, 0, 0)  # warm up: the refusal is learnt once
    assert rig.fuse.removemapping(tail, (0, DAX_CHUNK)) == 0
    before = fd_count()
    for i in range(30):
        node = tail if i % 2 else pages
        moffset = (i % 4) * DAX_CHUNK
        assert rig.fuse.setupmapping(node, 0, moffset, write=bool(i % 3)) == 0
        assert rig.fuse.removemapping(node, (moffset, DAX_CHUNK)) == 0
    assert fd_count() == before
    assert rig.window()["live_mappings"] == 0 and not rig.peer.maps
    assert rig.window()["counters"]["refusals"] == 1
