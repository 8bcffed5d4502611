"""The broken fixture (``python -m testkit.broken_backend``) misbehaves exactly as it is told.

Each break is seen on the wire by a scripted front-end (``LockstepFrontend`` over the real
socket, ``ChannelPeer`` on a real back-end channel taking real fds), against the fixture run
as a process the way ``check-backend -- CMD`` runs it; without breaks the same script sees a
correct back-end. check-backend's own verdicts on it are tests/integration/
test_check_backend_real.py's.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from testkit import LISTENING_LINE, ChannelPeer, Harness, LockstepFrontend, Process
from testkit.broken_backend import BREAKS, CONFIG, MAP_LENGTH, REGION_SIZE
from tests.helpers.processes import procs
from vhost_user.codec import request
from vhost_user.messages import (
    SHMEM_FEATURE_BIT_DRAFT,
    BackendReq,
    FrontendReq,
    VhostUserConfig,
    VhostUserHeaderFlag,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserMMap,
    VhostUserProtocolFeature,
    VhostUserShMemConfig,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringState,
    shmem_feature,
)

__all__ = ["procs"]

PF = VhostUserProtocolFeature
NEEDED = PF.REPLY_ACK | PF.BACKEND_REQ | PF.BACKEND_SEND_FD | PF.CONFIG | PF.RESET_DEVICE
UPSTREAM = int(PF.SHMEM)
DRAFT = shmem_feature(SHMEM_FEATURE_BIT_DRAFT)

RAM_SIZE = 1 << 20
UVA = 0x7F00_0000_0000
QSIZE = 16
DESC, AVAIL, USED, BUF = 0x0, 0x1000, 0x2000, 0x10000


def start_broken(procs: Harness, *breaks: str) -> Process:
    path = procs.workdir / "broken.sock"
    argv = [sys.executable, "-m", "testkit.broken_backend", "--socket", str(path)]
    if breaks:
        argv += ["--break", ",".join(breaks)]
    proc = procs.start("broken", argv, socket_path=path)
    proc.wait_for_log(LISTENING_LINE + str(path))
    return proc


class Ram:
    """Guest RAM in a memfd with one split ring at its start, and the ring's eventfds."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("guest-ram")
        os.ftruncate(self.fd, RAM_SIZE)
        self.mm = mmap.mmap(self.fd, RAM_SIZE)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.avail_idx = 0

    def activate(self, fe: LockstepFrontend) -> None:
        """QEMU's and crosvm's order: memory table, then NUM, ADDR, BASE, CALL, KICK, ENABLE."""
        region = VhostUserMemoryRegion(0, RAM_SIZE, UVA, 0)
        assert fe.u64(FrontendReq.SET_MEM_TABLE, VhostUserMemory((region,)), [self.fd]) == 0
        assert fe.u64(FrontendReq.SET_VRING_NUM, VhostUserVringState(0, QSIZE)) == 0
        addr = VhostUserVringAddr(0, 0, UVA + DESC, UVA + USED, UVA + AVAIL, 0)
        assert fe.u64(FrontendReq.SET_VRING_ADDR, addr) == 0
        assert fe.u64(FrontendReq.SET_VRING_BASE, VhostUserVringState(0, self.avail_idx)) == 0
        assert fe.u64(FrontendReq.SET_VRING_CALL, VhostUserU64(0), [self.call]) == 0
        assert fe.u64(FrontendReq.SET_VRING_KICK, VhostUserU64(0), [self.kick]) == 0
        assert fe.u64(FrontendReq.SET_VRING_ENABLE, VhostUserVringState(0, 1)) == 0

    def request(self, length: int = 16) -> bytes:
        """One writable buffer made available and kicked; what the device wrote into it."""
        head = self.avail_idx % QSIZE
        struct.pack_into("<QIHH", self.mm, DESC + 16 * head, BUF, length, 2, 0)
        struct.pack_into("<H", self.mm, AVAIL + 4 + 2 * head, head)
        self.avail_idx += 1
        struct.pack_into("<H", self.mm, AVAIL + 2, self.avail_idx)
        os.eventfd_write(self.kick, 1)
        ready, _, _ = select.select([self.call], [], [], 5.0)
        assert ready, "no call within 5 s"
        os.eventfd_read(self.call)
        used_idx, (_, written) = (
            struct.unpack_from("<H", self.mm, USED + 2)[0],
            struct.unpack_from("<II", self.mm, USED + 4 + 8 * head),
        )
        assert used_idx == self.avail_idx
        return bytes(self.mm[BUF : BUF + written])

    def close(self) -> None:
        self.mm.close()
        for fd in (self.fd, self.kick, self.call):
            os.close(fd)


@pytest.fixture
def ram() -> Iterator[Ram]:
    r = Ram()
    yield r
    r.close()


def connect(proc: Process, shmem: int = UPSTREAM) -> LockstepFrontend:
    assert proc.path is not None
    fe = LockstepFrontend(proc.path)
    fe.negotiate(int(NEEDED) | shmem)
    return fe


def maps_seen(peer: ChannelPeer, count: int, timeout: float = 5.0) -> list[VhostUserMMap]:
    """The first ``count`` SHMEM_MAPs the back-end sent, each checked: one fd, NEED_REPLY."""
    deadline = time.monotonic() + timeout
    while len(peer.seen) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(peer.seen) >= count, peer.seen
    for req, _, content in peer.seen:  # ChannelPeer asserted NEED_REPLY and mapped the fd
        assert req is BackendReq.SHMEM_MAP
        assert len(content) == MAP_LENGTH
    return [p for _, p, _ in peer.seen[:count]]


def no_message_within(fe: LockstepFrontend, seconds: float) -> bool:
    ready, _, _ = select.select([fe.sock], [], [], seconds)
    return not ready


def spans(maps: list[VhostUserMMap]) -> list[tuple[int, int, int]]:
    return [(m.shmid, m.shm_offset, m.length) for m in maps]


def overlaps(maps: list[VhostUserMMap]) -> bool:
    a, b = maps
    return a.shmid == b.shmid and (
        a.shm_offset < b.shm_offset + b.length and b.shm_offset < a.shm_offset + a.length
    )


CORRECT_MAPS = [(0, 0, MAP_LENGTH), (0, MAP_LENGTH, MAP_LENGTH)]


def test_without_breaks_it_is_a_correct_backend(procs: Harness, ram: Ram) -> None:
    proc = start_broken(procs)
    assert proc.path is not None
    fe = LockstepFrontend(proc.path)
    offered = fe.u64(FrontendReq.GET_PROTOCOL_FEATURES)
    assert offered & UPSTREAM and not offered & DRAFT
    assert offered & NEEDED == NEEDED
    fe.close()

    fe = connect(proc)
    # A SET_* without NEED_REPLY is not answered: the next message is GET_FEATURES' reply.
    assert fe.call(FrontendReq.SET_OWNER) is None
    assert fe.u64(FrontendReq.GET_FEATURES) & (1 << 32)
    assert no_message_within(fe, 0.2)

    reply = fe.call(FrontendReq.GET_SHMEM_CONFIG)
    assert reply is not None and isinstance(reply.payload, VhostUserShMemConfig)
    assert reply.payload.regions() == {0: REGION_SIZE, 1: REGION_SIZE}
    reply = fe.call(FrontendReq.GET_CONFIG, VhostUserConfig(4, 8, 0, bytes(8)))
    assert reply is not None and isinstance(reply.payload, VhostUserConfig)
    assert reply.payload.payload == CONFIG[4:12]

    peer = ChannelPeer(fe, then=0)
    ram.activate(fe)
    first = maps_seen(peer, 2)
    assert spans(first) == CORRECT_MAPS and not overlaps(first)
    assert all(not m.writable for m in first)
    assert ram.request() == bytes(range(16))

    # A reset drops the front-end's mappings; the back-end maps again once its queue restarts.
    stopped = fe.call(FrontendReq.GET_VRING_BASE, VhostUserVringState(0, 0))
    assert stopped is not None and stopped.payload == VhostUserVringState(0, 1)
    assert fe.u64(FrontendReq.RESET_DEVICE) == 0
    ram.activate(fe)
    assert spans(maps_seen(peer, 4)[2:]) == CORRECT_MAPS
    assert ram.request() == bytes(range(16))
    fe.close()
    peer.close()
    assert proc.stop() == 0


def test_wrong_bit_offers_the_draft_bit_and_uses_it(procs: Harness, ram: Ram) -> None:
    proc = start_broken(procs, "wrong-bit")
    assert proc.path is not None
    fe = LockstepFrontend(proc.path)
    offered = fe.u64(FrontendReq.GET_PROTOCOL_FEATURES)
    assert offered & DRAFT and not offered & UPSTREAM
    fe.close()

    fe = connect(proc, DRAFT)  # consistent: GET_SHMEM_CONFIG and maps under bit 20
    reply = fe.call(FrontendReq.GET_SHMEM_CONFIG)
    assert reply is not None and isinstance(reply.payload, VhostUserShMemConfig)
    peer = ChannelPeer(fe, then=0)
    ram.activate(fe)
    assert spans(maps_seen(peer, 2)) == CORRECT_MAPS
    fe.close()
    peer.close()


def test_reply_without_need_reply_acks_every_set_request(procs: Harness) -> None:
    proc = start_broken(procs, "reply-without-need-reply")
    assert proc.path is not None
    fe = LockstepFrontend(proc.path)
    # Until REPLY_ACK is acked nothing stray comes: call() pairs every reply it reads.
    fe.call(FrontendReq.SET_FEATURES, VhostUserU64(fe.u64(FrontendReq.GET_FEATURES)))
    fe.u64(FrontendReq.GET_PROTOCOL_FEATURES)
    fe.call(FrontendReq.SET_PROTOCOL_FEATURES, VhostUserU64(int(NEEDED) | UPSTREAM))
    assert fe.u64(FrontendReq.GET_FEATURES) & (1 << 32)
    fe.send(request(FrontendReq.SET_OWNER))
    stray = fe.recv()
    assert stray.request is FrontendReq.SET_OWNER
    assert stray.flags & VhostUserHeaderFlag.REPLY and stray.flags & 0x3 == 1
    assert stray.payload == VhostUserU64(0)
    # With NEED_REPLY set there is one reply, not two.
    assert fe.u64(FrontendReq.SET_FEATURES, VhostUserU64(fe.u64(FrontendReq.GET_FEATURES))) == 0
    assert no_message_within(fe, 0.2)
    fe.close()


def test_overlapping_maps_sends_a_second_map_over_the_first(procs: Harness, ram: Ram) -> None:
    proc = start_broken(procs, "overlapping-maps")
    fe = connect(proc)
    peer = ChannelPeer(fe, [0, 17], then=0)  # a front-end refuses the overlap with EEXIST
    ram.activate(fe)
    maps = maps_seen(peer, 2)
    assert spans(maps) == [(0, 0, MAP_LENGTH), (0, MAP_LENGTH // 2, MAP_LENGTH)]
    assert overlaps(maps)
    assert ram.request() == bytes(range(16))  # the refusal left it working
    fe.close()
    peer.close()


def test_no_shmem_config_reply_leaves_it_unanswered_and_in_step(procs: Harness) -> None:
    proc = start_broken(procs, "no-shmem-config-reply")
    fe = connect(proc)
    fe.send(request(FrontendReq.GET_SHMEM_CONFIG))
    assert no_message_within(fe, 1.0)
    assert fe.u64(FrontendReq.GET_FEATURES) & (1 << 32)  # the next reply is the next request's
    fe.close()
    assert proc.running


def test_all_breaks_at_once_and_unknown_names(procs: Harness) -> None:
    proc = start_broken(procs, *BREAKS)
    assert proc.path is not None
    fe = LockstepFrontend(proc.path)
    assert fe.u64(FrontendReq.GET_PROTOCOL_FEATURES) & DRAFT
    fe.close()
    bad = subprocess.run(
        [sys.executable, "-m", "testkit.broken_backend", "--socket", "x", "--break", "nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "unknown break nope" in bad.stderr


def test_each_break_names_its_own_check() -> None:
    assert len(set(BREAKS.values())) == len(BREAKS) == 4
