"""The back-end library against a scripted front-end over real sockets, memfds and eventfds."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from testkit import ChannelPeer, LockstepFrontend
from testkit.procfs import fd_count, fd_table, fd_targets, memfd_mappings
from vhost_user.codec import (
    request,
)
from vhost_user.messages import (
    BackendReq,
    FrontendReq,
    VhostUserConfig,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserMMap,
    VhostUserProtocolFeature,
    VhostUserShMemConfig,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringState,
)
from vhost_user_backend.daemon import VhostUserDaemon, VhostUserDevice
from vhost_user_backend.errors import ChannelFailed, DeviceConfigError, FrontendRefused
from vhost_user_backend.vring import Vring
from wire.errors import StateError
from wire.unix import close_fds, recv_with_fds, send_with_fds

PF = VhostUserProtocolFeature
GPA_BASE = 0x4000_0000
UVA_BASE = 0x7F12_0000_0000
MEM_SIZE = 1 << 20
QSIZE = 8
DESC, AVAIL, USED = 0x0000, 0x1000, 0x2000


class EchoDevice(VhostUserDevice):
    """Writes b"echo:" + the readable bytes into the writable buffers of every chain."""

    num_queues = 2

    def __init__(self) -> None:
        self.disconnects = 0
        self.resets = 0
        self.disconnected = threading.Event()

    def shmem_sizes(self) -> list[int]:
        return [0x400000, 0, 0x2000]

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(range(offset, offset + size))

    def handle_queue(self, index: int, vring: Vring) -> None:
        used = 0
        while (chain := vring.pop()) is not None:
            data = b"echo:" + chain.read_all(vring.memory)
            vring.push(chain.head, chain.write(vring.memory, data))
            used += 1
        if used:
            vring.notify()

    def reset(self) -> None:
        self.resets += 1

    def on_disconnect(self) -> None:
        self.disconnects += 1
        self.disconnected.set()


def eventfd_count() -> int:
    """Eventfds this process holds (the test's and the daemon thread's)."""
    return sum(1 for target in fd_table().values() if target == "anon_inode:[eventfd]")


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "vhost.sock")


def start(device: VhostUserDevice, path: str, **kwargs: object) -> Iterator[VhostUserDaemon]:
    backend = VhostUserDaemon(device, path, **kwargs)  # type: ignore[arg-type]
    thread = backend.serve_in_thread()
    try:
        yield backend
    finally:
        backend.stop()
        thread.join(5)
        assert not thread.is_alive()


@pytest.fixture
def device() -> EchoDevice:
    return EchoDevice()


@pytest.fixture
def backend(device: EchoDevice, sock_path: str) -> Iterator[VhostUserDaemon]:
    yield from start(device, sock_path, reply_timeout=1.0)


@pytest.fixture
def fe(backend: VhostUserDaemon, sock_path: str) -> Iterator[LockstepFrontend]:
    frontend = LockstepFrontend(sock_path)
    yield frontend
    frontend.close()


ALL = PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG | PF.SHMEM


@pytest.mark.parametrize("bit", [22, 20, 21])
def test_negotiation_with_shmem_bit(bit: int, sock_path: str) -> None:
    for backend in start(EchoDevice(), sock_path, shmem_feature_bit=bit):
        fe = LockstepFrontend(sock_path)
        features = fe.u64(FrontendReq.GET_FEATURES)
        assert features & (1 << 30) and features & (1 << 32)
        offered = fe.u64(FrontendReq.GET_PROTOCOL_FEATURES)
        assert offered & (1 << bit)
        for other in {20, 21, 22} - {bit}:
            assert not offered & (1 << other)
        proto = int(PF.MQ | PF.REPLY_ACK | PF.CONFIG) | 1 << bit
        assert fe.u64(FrontendReq.SET_PROTOCOL_FEATURES, VhostUserU64(proto)) == 0
        assert fe.u64(FrontendReq.GET_QUEUE_NUM) == 2
        reply = fe.call(FrontendReq.GET_SHMEM_CONFIG)
        assert reply is not None
        assert reply.payload == VhostUserShMemConfig(2, (0x400000, 0, 0x2000))
        cfg = fe.call(FrontendReq.GET_CONFIG, VhostUserConfig(4, 4, 0, bytes(4)))
        assert cfg is not None and cfg.payload == VhostUserConfig(4, 4, 0, bytes([4, 5, 6, 7]))
        assert backend.acked_protocol_features == proto
        fe.close()


def test_unoffered_protocol_feature_is_refused(fe: LockstepFrontend) -> None:
    fe.u64(FrontendReq.GET_FEATURES)
    assert fe.u64(FrontendReq.SET_PROTOCOL_FEATURES, VhostUserU64(int(PF.REPLY_ACK))) == 0
    # LOG_SHMFD was not offered; GET_QUEUE_NUM needs MQ which was not acked.
    assert fe.u64(FrontendReq.SET_PROTOCOL_FEATURES, VhostUserU64(int(PF.LOG_SHMFD))) != 0
    fe.call(FrontendReq.SET_PROTOCOL_FEATURES, VhostUserU64(int(PF.REPLY_ACK)))
    assert fe.u64(FrontendReq.SET_VRING_NUM, VhostUserVringState(0, 256)) == 0
    assert fe.u64(FrontendReq.SET_VRING_NUM, VhostUserVringState(7, 256)) != 0
    assert fe.u64(FrontendReq.SET_VRING_NUM, VhostUserVringState(0, 100)) != 0


def test_get_shmem_config_without_the_feature_drops_the_connection(fe: LockstepFrontend) -> None:
    fe.negotiate(int(PF.REPLY_ACK))
    fe.send(request(FrontendReq.GET_SHMEM_CONFIG))
    with pytest.raises(EOFError):
        fe.recv()


def test_unknown_request_gets_an_error_status_when_a_reply_is_asked_for(
    fe: LockstepFrontend,
) -> None:
    fe.negotiate(int(ALL))
    fe.send_raw(struct.pack("=III", 99, 0x1, 0))  # no NEED_REPLY: skipped, nothing sent
    fe.send_raw(struct.pack("=III", 99, 0x1 | 0x8, 0))
    data, fds = recv_with_fds(fe.sock, 20)
    assert fds == []
    assert struct.unpack("=IIIQ", data) == (99, 0x1 | 0x4, 8, errno.ENOSYS)
    assert fe.u64(FrontendReq.GET_FEATURES)  # in step and still serving


def test_wrong_size_and_extra_fds_are_answered_and_closed(
    fe: LockstepFrontend, backend: VhostUserDaemon
) -> None:
    fe.negotiate(int(ALL))
    before = fd_count()
    efd = os.eventfd(0)
    # SET_OWNER must not carry an fd; the back-end must close its copy and say so.
    header = struct.pack("=III", FrontendReq.SET_OWNER, 0x9, 0)
    fe.send_raw(header, [efd])
    reply = fe.recv()
    assert isinstance(reply.payload, VhostUserU64) and reply.payload.value != 0
    # A vring state of 4 bytes instead of 8.
    fe.send_raw(struct.pack("=III", FrontendReq.SET_VRING_NUM, 0x9, 4) + bytes(4))
    reply = fe.recv()
    assert isinstance(reply.payload, VhostUserU64) and reply.payload.value != 0
    os.close(efd)
    assert fd_count() == before
    assert fe.u64(FrontendReq.GET_FEATURES)  # still serving


class Guest:
    """Guest RAM in a memfd plus a minimal split-ring driver writing into it."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("guest-ram")
        os.ftruncate(self.fd, MEM_SIZE)
        self.mm = mmap.mmap(self.fd, MEM_SIZE)
        self.avail_idx = 0
        self.next_desc = 0
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.err = os.eventfd(0, os.EFD_NONBLOCK)

    def region(self) -> VhostUserMemoryRegion:
        return VhostUserMemoryRegion(GPA_BASE, MEM_SIZE, UVA_BASE, 0)

    def write_desc(self, table: int, i: int, desc: tuple[int, int, int, int]) -> None:
        off, length, flags, nxt = desc
        struct.pack_into("<QIHH", self.mm, table + 16 * i, GPA_BASE + off, length, flags, nxt)

    def add_chain(
        self, bufs: list[tuple[int, int, bool]], *, indirect_at: int | None = None
    ) -> int:
        head = self.next_desc
        if indirect_at is None:
            for n, (off, length, write) in enumerate(bufs):
                more = n + 1 < len(bufs)
                flags = (1 if more else 0) | (2 if write else 0)
                self.write_desc(DESC, head + n, (off, length, flags, head + n + 1))
            self.next_desc += len(bufs)
        else:
            for n, (off, length, write) in enumerate(bufs):
                more = n + 1 < len(bufs)
                flags = (1 if more else 0) | (2 if write else 0)
                self.write_desc(indirect_at, n, (off, length, flags, n + 1))
            self.write_desc(DESC, head, (indirect_at, 16 * len(bufs), 4, 0))
            self.next_desc += 1
        struct.pack_into("<H", self.mm, AVAIL + 4 + 2 * (self.avail_idx % QSIZE), head)
        self.avail_idx += 1
        struct.pack_into("<H", self.mm, AVAIL + 2, self.avail_idx & 0xFFFF)
        return head

    def notify(self) -> None:
        os.eventfd_write(self.kick, 1)

    def wait(self, fd: int, timeout: float = 5.0) -> bool:
        ready, _, _ = select.select([fd], [], [], timeout)
        if ready:
            os.eventfd_read(fd)
        return bool(ready)

    def used(self) -> list[tuple[int, int]]:
        idx = struct.unpack_from("<H", self.mm, USED + 2)[0]
        return [struct.unpack_from("<II", self.mm, USED + 4 + 8 * i) for i in range(idx)]

    def setup(self, fe: LockstepFrontend, index: int = 0) -> None:
        fds = [self.fd]
        assert fe.u64(FrontendReq.SET_MEM_TABLE, VhostUserMemory((self.region(),)), fds) == 0
        assert fe.u64(FrontendReq.SET_VRING_NUM, VhostUserVringState(index, QSIZE)) == 0
        addr = VhostUserVringAddr(index, 0, UVA_BASE + DESC, UVA_BASE + USED, UVA_BASE + AVAIL, 0)
        assert fe.u64(FrontendReq.SET_VRING_ADDR, addr) == 0
        assert fe.u64(FrontendReq.SET_VRING_BASE, VhostUserVringState(index, 0)) == 0
        assert fe.u64(FrontendReq.SET_VRING_CALL, VhostUserU64(index), [self.call]) == 0
        assert fe.u64(FrontendReq.SET_VRING_ERR, VhostUserU64(index), [self.err]) == 0
        assert fe.u64(FrontendReq.SET_VRING_KICK, VhostUserU64(index), [self.kick]) == 0
        assert fe.u64(FrontendReq.SET_VRING_ENABLE, VhostUserVringState(index, 1)) == 0

    def close(self) -> None:
        self.mm.close()
        for fd in (self.fd, self.kick, self.call, self.err):
            os.close(fd)


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


def test_vring_round_trip_direct_and_indirect(
    fe: LockstepFrontend, guest: Guest, backend: VhostUserDaemon
) -> None:
    fe.negotiate(int(ALL))
    guest.setup(fe)
    guest.mm[0x10000:0x10005] = b"hello"
    guest.add_chain([(0x10000, 5, False), (0x11000, 64, True)])
    guest.notify()
    assert guest.wait(guest.call)
    assert guest.used() == [(0, 10)]
    assert guest.mm[0x11000:0x1100A] == b"echo:hello"

    guest.mm[0x12000:0x12003] = b"abc"
    head = guest.add_chain(
        [(0x12000, 3, False), (0x13000, 4, True), (0x14000, 8, True)], indirect_at=0x8000
    )
    guest.notify()
    assert guest.wait(guest.call)
    assert guest.used()[1] == (head, 8)
    assert guest.mm[0x13000:0x13004] == b"echo" and guest.mm[0x14000:0x14004] == b":abc"

    # GET_VRING_BASE stops the ring and reports the next available index.
    reply = fe.call(FrontendReq.GET_VRING_BASE, VhostUserVringState(0, 0))
    assert reply is not None and reply.payload == VhostUserVringState(0, 2)
    status = backend.status()["queues"][0]
    assert status["pushed"] == 2 and not status["started"]


@pytest.mark.parametrize(
    "bad",
    ["outside", "loop", "indirect_outside", "huge_avail"],
)
def test_hostile_rings_do_not_crash_the_backend(
    fe: LockstepFrontend, guest: Guest, backend: VhostUserDaemon, bad: str
) -> None:
    fe.negotiate(int(ALL))
    guest.setup(fe)
    if bad == "outside":
        guest.add_chain([(MEM_SIZE + 0x1000, 64, True)])
    elif bad == "loop":
        guest.write_desc(DESC, 0, (0x10000, 16, 1 | 2, 1))
        guest.write_desc(DESC, 1, (0x10010, 16, 1 | 2, 0))
        struct.pack_into("<HH", guest.mm, AVAIL + 2, 1, 0)
    elif bad == "indirect_outside":
        guest.write_desc(DESC, 0, (MEM_SIZE - 8, 32, 4, 0))
        struct.pack_into("<HH", guest.mm, AVAIL + 2, 1, 0)
    else:
        struct.pack_into("<H", guest.mm, AVAIL + 2, 1000)
    guest.notify()
    assert guest.wait(guest.err)
    assert guest.used() == []
    assert backend.status()["queues"][0]["broken"]
    assert fe.u64(FrontendReq.GET_FEATURES)  # the loop still serves


def test_ring_addresses_outside_memory(fe: LockstepFrontend, guest: Guest) -> None:
    fe.negotiate(int(ALL))
    guest.setup(fe)
    addr = VhostUserVringAddr(1, 0, UVA_BASE + MEM_SIZE - 16, UVA_BASE, UVA_BASE, 0)
    assert fe.u64(FrontendReq.SET_VRING_NUM, VhostUserVringState(1, QSIZE)) == 0
    assert fe.u64(FrontendReq.SET_VRING_ADDR, addr) == 0
    kick = os.eventfd(0)
    assert fe.u64(FrontendReq.SET_VRING_KICK, VhostUserU64(1), [kick]) == 0
    os.eventfd_write(kick, 1)
    os.close(kick)
    assert fe.u64(FrontendReq.GET_FEATURES)


def test_unmappable_memory_fd_is_refused(fe: LockstepFrontend) -> None:
    fe.negotiate(int(ALL))
    a, b = socket.socketpair()
    region = VhostUserMemoryRegion(0, MEM_SIZE, UVA_BASE, 0)
    assert fe.u64(FrontendReq.SET_MEM_TABLE, VhostUserMemory((region,)), [a.fileno()]) != 0
    a.close()
    b.close()


def test_disconnect_resets_state_and_accepts_the_next_front_end(
    sock_path: str, device: EchoDevice, backend: VhostUserDaemon, guest: Guest
) -> None:
    first = LockstepFrontend(sock_path)
    first.negotiate(int(ALL))
    guest.setup(first)
    assert backend.status()["memory_regions"] == 1
    # A second front-end waits in the backlog while the first is served.
    second = LockstepFrontend(sock_path)
    first.close()
    assert second.u64(FrontendReq.GET_FEATURES)
    assert device.disconnects == 1
    assert backend.status()["memory_regions"] == 0
    assert backend.acked_protocol_features == 0
    second.close()


def test_shmem_map_sends_a_real_fd_and_waits_for_the_status(
    fe: LockstepFrontend, backend: VhostUserDaemon
) -> None:
    fe.negotiate(int(ALL))
    peer = ChannelPeer(fe, [0, 1, 0])
    memfd = os.memfd_create("shm")
    os.write(memfd, b"A" * 4096 + b"B" * 4096)
    backend.shmem_map(2, memfd, 4096, 0x1000, 4096, writable=True)
    with pytest.raises(FrontendRefused) as info:
        backend.shmem_map(0, memfd, 0, 0, 8192, writable=False)
    assert info.value.code == 1
    backend.shmem_unmap(2, 0x1000, 4096)
    peer.close()
    (_, m1, c1), (_, m2, _), (_, m3, _) = peer.seen
    assert m1 == VhostUserMMap(2, 4096, 0x1000, 4096, 1) and c1 == b"B" * 4096
    assert not m2.writable
    assert m3.shmid == 2 and m3.shm_offset == 0x1000 and m3.length == 4096
    # Ours stays open: the caller owns it.
    os.fstat(memfd)
    os.close(memfd)


def test_shmem_map_timeout_and_state_errors(sock_path: str) -> None:
    for backend in start(EchoDevice(), sock_path, reply_timeout=0.2):
        fe = LockstepFrontend(sock_path)
        memfd = os.memfd_create("shm")
        os.ftruncate(memfd, 4096)
        with pytest.raises(StateError):
            backend.shmem_map(0, memfd, 0, 0, 4096, writable=False)
        fe.negotiate(int(PF.REPLY_ACK | PF.BACKEND_REQ))  # no SHMEM
        peer = ChannelPeer(fe, [0], delay=1.0)
        with pytest.raises(StateError):
            backend.shmem_map(0, memfd, 0, 0, 4096, writable=False)
        fe.close()
        peer.close()
        fe = LockstepFrontend(sock_path)
        fe.negotiate(int(ALL))
        peer = ChannelPeer(fe, [0], delay=1.0)
        with pytest.raises(ChannelFailed):
            backend.shmem_map(0, memfd, 0, 0, 4096, writable=False)
        peer.close()
        # After a timeout the back-end drops the channel: the late reply has nowhere to go.
        assert peer.reply_failed
        assert not backend.status()["backend_channel"]
        fe.close()
        os.close(memfd)


# -- the library when the front-end goes away ----------------------------------------------------

SHMEM_MAP_HEADER = struct.Struct("=III")


class RawChannel:
    """The front-end's end of the back-end channel, driven by hand: ``take_request`` reads one
    request (and closes the fd it carried), then the test does to the socket what it wants."""

    def __init__(self, fe: LockstepFrontend) -> None:
        self.sock, theirs = socket.socketpair()
        try:
            assert fe.u64(FrontendReq.SET_BACKEND_REQ_FD, fds=[theirs.fileno()]) == 0
        finally:
            theirs.close()
        self.sock.settimeout(5)

    def take_request(self) -> int:
        """The request number of the next message (its body read, its fds closed)."""
        data, fds = recv_with_fds(self.sock, SHMEM_MAP_HEADER.size)
        request_id, _flags, size = SHMEM_MAP_HEADER.unpack(data)
        body, more = recv_with_fds(self.sock, size)
        close_fds([*fds, *more])
        assert len(body) == size
        return int(request_id)


def shmem_map_in_thread(backend: VhostUserDaemon, memfd: int) -> Future[None]:
    """``shmem_map`` called by a device thread, as the reference device's control socket does."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(backend.shmem_map, 0, memfd, 0, 0, 4096, writable=False)
    pool.shutdown(wait=False)
    return future


def u64_reply(request_id: int, flags: int = 0x5, body: bytes = struct.pack("=Q", 0)) -> bytes:
    return SHMEM_MAP_HEADER.pack(request_id, flags, len(body)) + body


@pytest.mark.parametrize(
    "what",
    [
        "channel-closed",
        "half-a-header-then-closed",
        "bad-version",
        "oversized-header",
        "reply-to-another-request",
        "a-request-not-a-reply",
        "status-of-4-bytes",
        "reply-with-an-fd",
        "main-socket-closed",
    ],
)
def test_channel_failure_while_waiting_for_shmem_map_is_channel_failed(
    sock_path: str, what: str
) -> None:
    """Whatever the front-end does to the back-end channel while a device waits for its
    SHMEM_MAP status, the device gets ``ChannelFailed`` at once (long before the timeout), no
    fd leaks, and the daemon keeps serving (the same front-end, or the next one)."""
    memfd = os.memfd_create("shm")
    os.ftruncate(memfd, 4096)
    for backend in start(EchoDevice(), sock_path, reply_timeout=30.0):
        fe = LockstepFrontend(sock_path)
        fe.negotiate(int(ALL))
        before = fd_count()
        channel = RawChannel(fe)
        started = time.monotonic()
        future = shmem_map_in_thread(backend, memfd)
        assert channel.take_request() == BackendReq.SHMEM_MAP
        if what == "channel-closed":
            channel.sock.close()
        elif what == "half-a-header-then-closed":
            channel.sock.sendall(u64_reply(BackendReq.SHMEM_MAP)[:5])
            channel.sock.close()
        elif what == "bad-version":
            channel.sock.sendall(u64_reply(BackendReq.SHMEM_MAP, flags=0x6))
        elif what == "oversized-header":
            channel.sock.sendall(SHMEM_MAP_HEADER.pack(BackendReq.SHMEM_MAP, 0x5, 1 << 20))
        elif what == "reply-to-another-request":
            channel.sock.sendall(u64_reply(BackendReq.SHMEM_UNMAP))
        elif what == "a-request-not-a-reply":
            channel.sock.sendall(u64_reply(BackendReq.SHMEM_MAP, flags=0x1))
        elif what == "status-of-4-bytes":
            channel.sock.sendall(u64_reply(BackendReq.SHMEM_MAP, body=bytes(4)))
        elif what == "reply-with-an-fd":
            stray = os.eventfd(0)
            send_with_fds(channel.sock, u64_reply(BackendReq.SHMEM_MAP), [stray])
            os.close(stray)
        else:
            fe.close()
        with pytest.raises(ChannelFailed):
            future.result(timeout=10)
        assert time.monotonic() - started < 10  # not the 30 s timeout
        assert not backend.status()["backend_channel"]
        with pytest.raises(StateError):  # the channel is gone, not left half-read
            backend.shmem_map(0, memfd, 0, 0, 4096, writable=False)
        channel.sock.close()
        if what == "main-socket-closed":
            fe = LockstepFrontend(sock_path)  # the daemon accepts the next front-end
            fe.negotiate(int(ALL))  # its two sockets replace the first connection's
        assert fe.u64(FrontendReq.GET_FEATURES)  # the main socket is still served
        assert fd_count() == before, fd_targets()
        fe.close()
    os.close(memfd)


@pytest.mark.parametrize("pieces", [(12,), tuple(range(1, 20))], ids=["header-body", "bytewise"])
def test_a_status_sent_in_pieces_is_still_one_status(
    sock_path: str, pieces: tuple[int, ...]
) -> None:
    """The library asks for the whole u64 reply in one read; a front-end that writes it in
    pieces (cut at each offset in ``pieces``, a pause between) still gets through, refusal
    included, and the channel stays up."""
    memfd = os.memfd_create("shm")
    os.ftruncate(memfd, 4096)
    for backend in start(EchoDevice(), sock_path, reply_timeout=10.0):
        fe = LockstepFrontend(sock_path)
        fe.negotiate(int(ALL))
        channel = RawChannel(fe)
        for status in (0, errno.EEXIST):
            future = shmem_map_in_thread(backend, memfd)
            assert channel.take_request() == BackendReq.SHMEM_MAP
            reply = u64_reply(BackendReq.SHMEM_MAP, body=struct.pack("=Q", status))
            for start_at, end_at in zip((0, *pieces), (*pieces, len(reply)), strict=True):
                channel.sock.sendall(reply[start_at:end_at])
                time.sleep(0.01)
            if status:
                with pytest.raises(FrontendRefused) as info:
                    future.result(timeout=10)
                assert info.value.code == status
            else:
                assert future.result(timeout=10) is None
        assert backend.status()["backend_channel"]
        channel.sock.close()
        fe.close()
    os.close(memfd)


def test_front_end_leaving_closes_every_fd_and_unmaps_guest_memory(
    sock_path: str, guest: Guest
) -> None:
    """A front-end that set up memory, a running ring (kick, call, err) and the back-end
    channel closes its main socket: the daemon closes and unmaps all of it, calls the device's
    hooks, and accepts the next front-end."""
    device = EchoDevice()
    ram = "memfd:guest-ram"
    before, maps_before = fd_count(), len(memfd_mappings("self", ram))
    for backend in start(device, sock_path):
        serving = fd_count()  # the daemon's listener, selector and wake-up pipe
        fe = LockstepFrontend(sock_path)
        fe.negotiate(int(ALL))
        guest.setup(fe)
        channel = RawChannel(fe)
        assert len(memfd_mappings("self", ram)) == maps_before + 1
        kick_dups = eventfd_count()
        fe.close()
        assert device.disconnected.wait(5)
        assert device.disconnects == 1 and device.resets == 1
        assert channel.sock.recv(1) == b""  # the daemon closed its end of the channel
        channel.sock.close()
        assert len(memfd_mappings("self", ram)) == maps_before
        assert eventfd_count() == kick_dups - 3  # its dups of kick, call and err
        assert fd_count() == serving, fd_targets()
        status = backend.status()
        assert not status["connected"] and status["memory_regions"] == 0
        assert not status["backend_channel"] and not status["queues"][0]["started"]
        fe = LockstepFrontend(sock_path)
        assert fe.u64(FrontendReq.GET_FEATURES)
        fe.close()
    assert fd_count() == before, fd_targets()


def test_serve_once_returns_from_serve_forever_when_the_front_end_leaves(
    sock_path: str, guest: Guest
) -> None:
    device = EchoDevice()
    before = fd_count()
    backend = VhostUserDaemon(device, sock_path, serve_once=True)
    outcome: list[BaseException | None] = []

    def serve() -> None:
        try:
            backend.serve_forever()
            outcome.append(None)
        except BaseException as exc:  # SystemExit included: the library must never exit
            outcome.append(exc)

    backend.listen()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    fe = LockstepFrontend(sock_path)
    fe.negotiate(int(ALL))
    guest.setup(fe)
    fe.close()
    thread.join(5)
    assert not thread.is_alive()
    assert outcome == [None]
    assert device.disconnects == 1
    assert not os.path.exists(sock_path)
    assert fd_count() == before, fd_targets()


# -- lifecycle hooks and persistent mappings ------------------------------------------------------


class HookRecorder(EchoDevice):
    """Records which hook ran, in order; ``fail_channel_ready`` makes that hook raise."""

    def __init__(self, *, fail_channel_ready: bool = False) -> None:
        super().__init__()
        self.events: list[str] = []
        self.fail_channel_ready = fail_channel_ready

    def on_connect(self, backend: VhostUserDaemon) -> None:
        self.events.append("connect")

    def on_channel_ready(self) -> None:
        self.events.append("channel ready")
        if self.fail_channel_ready:
            raise RuntimeError("device bug")

    def on_queues_started(self) -> None:
        self.events.append("queues started")

    def reset(self) -> None:
        self.events.append("reset")

    def on_disconnect(self) -> None:
        self.events.append("disconnect")
        super().on_disconnect()


def vring_state(index: int, num: int = 0) -> VhostUserVringState:
    return VhostUserVringState(index, num)


def test_each_hook_fires_on_the_message_that_means_it(sock_path: str, guest: Guest) -> None:
    device = HookRecorder()
    for backend in start(device, sock_path, reply_timeout=1.0):
        fe = LockstepFrontend(sock_path)
        assert fe.u64(FrontendReq.GET_FEATURES)
        assert device.events == ["connect"]
        fe.negotiate(int(ALL | PF.RESET_DEVICE))
        assert device.events == ["connect"]  # acked, but no channel yet
        peer = ChannelPeer(fe, then=0)
        assert device.events == ["connect", "channel ready"]
        guest.setup(fe)  # SET_VRING_KICK starts ring 0, SET_VRING_ENABLE lets it run
        assert device.events[2:] == ["queues started"]
        # Our emulator's reset of a running device: GET_VRING_BASE, then RESET_DEVICE. One reset.
        fe.call(FrontendReq.GET_VRING_BASE, vring_state(0))
        assert device.events[3:] == ["reset"]
        assert fe.u64(FrontendReq.RESET_DEVICE) == 0
        assert device.events[3:] == ["reset"]
        # A reset of a device whose rings never ran: RESET_DEVICE alone.
        assert fe.u64(FrontendReq.RESET_DEVICE) == 0
        assert device.events[3:] == ["reset", "reset"]
        # QEMU's reset of a running device: disable, GET_VRING_BASE; then it starts again.
        guest.setup(fe)
        assert device.events[5:] == ["queues started"]
        assert fe.u64(FrontendReq.SET_VRING_ENABLE, vring_state(0, 0)) == 0
        assert device.events[5:] == ["queues started"]  # disabled is not stopped
        fe.call(FrontendReq.GET_VRING_BASE, vring_state(1))  # never started: nothing stops
        assert device.events[5:] == ["queues started"]
        fe.call(FrontendReq.GET_VRING_BASE, vring_state(0))
        assert device.events[5:] == ["queues started", "reset"]
        # A new channel is ready again; leaving resets and says goodbye.
        old, peer = peer, ChannelPeer(fe, then=0)
        old.close()  # the daemon dropped the old channel: its thread has ended
        assert device.events[7:] == ["channel ready"]
        fe.close()
        assert device.disconnected.wait(5)
        assert device.events[8:] == ["reset", "disconnect"]
        peer.close()
        assert backend.status()["connected"] is False


def test_a_hook_that_raises_is_logged_and_the_front_end_still_served(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    device = HookRecorder(fail_channel_ready=True)
    for _ in start(device, sock_path, reply_timeout=1.0):
        fe = LockstepFrontend(sock_path)
        fe.negotiate(int(ALL | PF.RESET_DEVICE))
        peer = ChannelPeer(fe, then=0)
        assert fe.u64(FrontendReq.GET_FEATURES)
        fe.close()
        peer.close()
    assert device.events[:2] == ["connect", "channel ready"]
    assert "device on_channel_ready failed (SET_BACKEND_REQ_FD)" in caplog.text
    assert "RuntimeError: device bug" in caplog.text


def wait_seen(peer: ChannelPeer, count: int, timeout: float = 5.0) -> list[tuple[str, int, int]]:
    """The first ``count`` requests the peer answered, as (name, shmid, shm_offset)."""
    deadline = time.monotonic() + timeout
    while len(peer.seen) < count:
        assert time.monotonic() < deadline, f"{len(peer.seen)} requests, not {count}"
        time.sleep(0.01)
    return [(req.name, m.shmid, m.shm_offset) for req, m, _ in peer.seen[:count]]


def test_persistent_mappings_are_mapped_after_reset_device_and_when_queues_start(
    fe: LockstepFrontend,
    backend: VhostUserDaemon,
    guest: Guest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="vhost_user_backend.daemon")
    page = os.memfd_create("persistent")
    os.write(page, b"P" * 0x2000)
    backend.persistent_map(0, page, 0, 0x1000, 0x1000, writable=False)
    backend.persistent_map(2, page, 0x1000, 0, 0x1000, writable=True)
    os.close(page)  # the daemon keeps its own dup
    fe.negotiate(int(ALL | PF.RESET_DEVICE))
    # Status 1 for the second map: QEMU's answer to an overlap (or anything): replace it.
    peer = ChannelPeer(fe, [0, 1], then=0, keep_maps=True)
    assert fe.u64(FrontendReq.GET_FEATURES)
    assert peer.seen == []  # not at channel ready: QEMU 11.1 crashes on a map before DRIVER_OK
    assert fe.u64(FrontendReq.RESET_DEVICE) == 0
    a, b = ("SHMEM_MAP", 0, 0x1000), ("SHMEM_MAP", 2, 0)
    assert wait_seen(peer, 4) == [a, b, ("SHMEM_UNMAP", 2, 0), b]
    assert peer.seen[0][2] == b"P" * 0x1000 and peer.seen[3][1].writable
    guest.setup(fe)  # queues started: both are live since the reset, nothing is sent again
    deadline = time.monotonic() + 5
    while "shmid 2 [0x0, +0x1000) still mapped (queues started)" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.01)
    assert len(peer.seen) == 4
    # A reset of running rings: the hook runs at GET_VRING_BASE (no map then: QEMU 11.1 would
    # crash), the maps come after the RESET_DEVICE that follows.
    fe.call(FrontendReq.GET_VRING_BASE, vring_state(0))
    assert fe.u64(FrontendReq.GET_FEATURES)
    assert len(peer.seen) == 4
    assert fe.u64(FrontendReq.RESET_DEVICE) == 0
    assert wait_seen(peer, 6)[4:] == [a, b]
    # An unmap of exactly that range ends the first one; the second lives on.
    backend.shmem_unmap(0, 0x1000, 0x1000)
    assert [(m.shmid, m.shm_offset) for m in backend.persistent_mappings] == [(2, 0)]
    assert fe.u64(FrontendReq.RESET_DEVICE) == 0
    assert wait_seen(peer, 8)[6:] == [("SHMEM_UNMAP", 0, 0x1000), b]
    assert fe.u64(FrontendReq.GET_FEATURES)  # nothing more came meanwhile
    assert len(peer.seen) == 8
    fe.close()
    peer.close()


def test_persistent_map_maps_at_once_only_while_queues_run(
    fe: LockstepFrontend, backend: VhostUserDaemon, guest: Guest
) -> None:
    page = os.memfd_create("persistent")
    os.ftruncate(page, 0x2000)
    fe.negotiate(int(ALL | PF.RESET_DEVICE))
    peer = ChannelPeer(fe, then=0)
    backend.persistent_map(0, page, 0, 0, 0x1000, writable=False)  # no queue runs: later
    assert fe.u64(FrontendReq.GET_FEATURES)
    assert peer.seen == []
    guest.setup(fe)
    assert wait_seen(peer, 1) == [("SHMEM_MAP", 0, 0)]
    backend.persistent_map(0, page, 0x1000, 0x1000, 0x1000, writable=False)  # runs: at once
    assert wait_seen(peer, 2)[1:] == [("SHMEM_MAP", 0, 0x1000)]
    os.close(page)
    fe.close()
    peer.close()


def test_persistent_map_refuses_what_no_front_end_would_take(backend: VhostUserDaemon) -> None:
    page = os.memfd_create("persistent")
    os.ftruncate(page, 0x2000)
    cases = {
        (1, 0, 0x1000): "shmid 1: no such shared memory region (the device declares [0, 2])",
        (0, 0x800, 0x1000): "[0x800, +0x1000) from fd offset 0x0: not 4096-byte aligned",
        (2, 0x1000, 0x2000): "outside the 0x2000-byte region",
        (0, 0, 0x3000): "file has only 0x2000 bytes",
        (0, 0, 0): "length must be positive",
    }
    for (shmid, offset, length), message in cases.items():
        with pytest.raises(DeviceConfigError, match=re.escape(message)):
            backend.persistent_map(shmid, page, 0, offset, length, writable=False)
    backend.persistent_map(0, page, 0, 0, 0x2000, writable=False)
    with pytest.raises(DeviceConfigError, match=r"overlaps persistent mapping shmid 0 \[0x0"):
        backend.persistent_map(0, page, 0, 0x1000, 0x1000, writable=False)
    os.close(page)


def test_refusals_say_what_the_status_means(fe: LockstepFrontend, backend: VhostUserDaemon) -> None:
    fe.negotiate(int(ALL | PF.RESET_DEVICE))
    peer = ChannelPeer(fe, [17, 2, 1])
    page = os.memfd_create("refused")
    os.ftruncate(page, 0x1000)
    with pytest.raises(FrontendRefused) as overlap:
        backend.shmem_map(0, page, 0, 0x3000, 0x1000, writable=False)
    with pytest.raises(FrontendRefused) as hole:
        backend.shmem_unmap(0, 0x5000, 0x1000)
    with pytest.raises(FrontendRefused) as qemu:
        backend.shmem_map(0, page, 0, 0, 0x1000, writable=False)
    os.close(page)
    peer.close()
    assert str(overlap.value) == (
        "front-end refused SHMEM_MAP of shmid 0 [0x3000, +0x1000): EEXIST: overlaps a live mapping"
    )
    assert overlap.value.code == 17
    assert str(hole.value).endswith("[0x5000, +0x1000): ENOENT: no mapping exactly there (a hole, "
                                    "part of a mapping, or several)")  # fmt: skip
    assert qemu.value.meaning.startswith("refused (status 1: QEMU's answer to every refusal")
