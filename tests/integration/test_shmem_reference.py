"""vhost-device-shmem end to end: the real CLI process, a scripted front-end on its vhost-user
socket answering SHMEM_MAP/UNMAP by really mmap-ing the fds, and the JSON control socket."""

from __future__ import annotations

import mmap
import os
import select
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from vguest.pattern import crc32c

from testkit import ChannelPeer, ControlClient, LockstepFrontend, ProcessGroup, start_shmem_backend
from vhost_user.messages import (
    BackendReq,
    FrontendReq,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserMMap,
    VhostUserProtocolFeature,
    VhostUserShMemConfig,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringState,
)
from vhost_user_backend.devices.shmem_reference import make_pattern, parse_region

PF = VhostUserProtocolFeature


class Frontend(LockstepFrontend):
    """Lockstep front-end plus a ``ChannelPeer`` serving the back-end channel like our emulator
    would: it maps each SHMEM_MAP fd (keeping the mapping) and answers with the next status
    code (0 when none is queued)."""

    def __init__(self, path: str, bit: int) -> None:
        super().__init__(path)
        features = self.u64(FrontendReq.GET_FEATURES)
        self.call(FrontendReq.SET_FEATURES, VhostUserU64(features))
        proto = int(PF.REPLY_ACK | PF.BACKEND_REQ | PF.MQ) | 1 << bit
        assert self.u64(FrontendReq.GET_PROTOCOL_FEATURES) & proto == proto
        assert self.u64(FrontendReq.SET_PROTOCOL_FEATURES, VhostUserU64(proto)) == 0
        self.peer = ChannelPeer(self, then=0, keep_maps=True)

    def close(self) -> None:
        super().close()
        self.peer.close()


@pytest.fixture(params=[22, 20, 21])
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, int]]:
    bit: int = request.param
    sock, ctl = tmp_path / "vhost.sock", tmp_path / "ctl.sock"
    group = ProcessGroup(tmp_path)
    with group.running():
        start_shmem_backend(
            group,
            sock,
            "--shmem-region",
            "0:4MiB",
            "--shmem-region",
            "2:64K",
            "--shmem-feature-bit",
            str(bit),
            "--rng-source",
            "counter",
            control_socket=ctl,
        )
        yield str(sock), str(ctl), bit


def test_pattern_and_region_parsing() -> None:
    assert make_pattern("counter", 20, 1) == struct.pack("<QQQ", 1, 2, 3)[:20]
    assert make_pattern("counter", 8, 2**64 - 1) == b"\xff" * 8
    assert parse_region("3:4MiB") == (3, 4 << 20)
    assert parse_region("0:0x2000") == (0, 0x2000)


def test_map_read_write_unmap_end_to_end(daemon: tuple[str, str, int]) -> None:
    sock, ctl_path, bit = daemon
    fe = Frontend(sock, bit)
    ctl = ControlClient(ctl_path)
    try:
        reply = fe.call(FrontendReq.GET_SHMEM_CONFIG)
        assert reply is not None
        cfg = reply.payload
        assert cfg == VhostUserShMemConfig(2, (4 << 20, 0, 64 << 10))

        reply = ctl(cmd="map", shmid=0, shm_offset=0x1000, length=8192, pattern="counter", seed=7)
        assert reply["ok"], reply
        expected = make_pattern("counter", 8192, 7)
        assert fe.peer.maps[(0, 0x1000)][:] == expected  # the front-end's real mmap of our memfd
        assert fe.peer.seen[-1][:2] == (BackendReq.SHMEM_MAP, VhostUserMMap(0, 0, 0x1000, 8192, 0))

        got = ctl(cmd="read", shmid=0, shm_offset=0x1000, length=16)
        assert got["data"] == expected[:16].hex()
        full = ctl(cmd="read", shmid=0, shm_offset=0x1000)
        assert full["crc32c"] == crc32c(expected)

        assert ctl(cmd="write", shmid=0, shm_offset=0x1000, offset=8, data="deadbeef")["ok"]
        assert fe.peer.maps[(0, 0x1000)][8:12] == bytes.fromhex("deadbeef")

        fe.peer.codes.append(17)  # the front-end refuses the next request
        refused = ctl(cmd="map", shmid=2, shm_offset=0, length=4096, writable=True)
        assert refused == {"ok": False, "error": refused["error"], "code": 17}
        status = ctl(cmd="status")
        assert status["connected"] is True
        assert status["protocol_features"] & (1 << bit)
        assert [m["shmid"] for m in status["mappings"]] == [0]

        assert ctl(cmd="unmap", shmid=0, shm_offset=0x1000, length=8192)["ok"]
        assert (0, 0x1000) not in fe.peer.maps
        missing = ctl(cmd="read", shmid=0, shm_offset=0x1000, length=16)
        assert missing["ok"] is False
        assert ctl(cmd="bogus")["ok"] is False
    finally:
        ctl.close()
        fe.close()


def test_control_without_front_end_and_rng_data_plane(daemon: tuple[str, str, int]) -> None:
    sock, ctl_path, bit = daemon
    ctl = ControlClient(ctl_path)
    assert ctl(cmd="map", shmid=0, shm_offset=0, length=4096)["ok"] is False
    fe = Frontend(sock, bit)
    ram = os.memfd_create("guest-ram")
    os.ftruncate(ram, 1 << 20)
    kick, call = os.eventfd(0), os.eventfd(0)
    try:
        region = VhostUserMemoryRegion(0, 1 << 20, 0x7F00_0000_0000, 0)
        assert fe.u64(FrontendReq.SET_MEM_TABLE, VhostUserMemory((region,)), [ram]) == 0
        with mmap.mmap(ram, 1 << 20) as mm:
            # One device-writable 32-byte buffer at 0x10000, ring of size 4.
            struct.pack_into("<QIHH", mm, 0, 0x10000, 32, 2, 0)
            struct.pack_into("<HHH", mm, 0x1000, 0, 1, 0)
            uva = 0x7F00_0000_0000
            assert fe.u64(FrontendReq.SET_VRING_NUM, VhostUserVringState(0, 4)) == 0
            addr = VhostUserVringAddr(0, 0, uva, uva + 0x2000, uva + 0x1000, 0)
            assert fe.u64(FrontendReq.SET_VRING_ADDR, addr) == 0
            assert fe.u64(FrontendReq.SET_VRING_CALL, VhostUserU64(0), [call]) == 0
            assert fe.u64(FrontendReq.SET_VRING_KICK, VhostUserU64(0), [kick]) == 0
            assert fe.u64(FrontendReq.SET_VRING_ENABLE, VhostUserVringState(0, 1)) == 0
            os.eventfd_write(kick, 1)
            assert select.select([call], [], [], 5)[0]
            assert struct.unpack_from("<HII", mm, 0x2002) == (1, 0, 32)
            assert mm[0x10000:0x10020] == make_pattern("counter", 32, 0)
        status = ctl(cmd="status")
        assert status["queues"][0]["pushed"] == 1
    finally:
        ctl.close()
        fe.close()
        for fd in (ram, kick, call):
            os.close(fd)


def test_serve_once_exits_with_0_when_the_front_end_leaves(tmp_path: Path) -> None:
    """``--serve-once``: the process ends by itself, cleanly, once its front-end has gone (a
    mapping and the back-end channel still up); the library returned, nothing called exit."""
    sock, ctl_path = tmp_path / "vhost.sock", tmp_path / "ctl.sock"
    group = ProcessGroup(tmp_path)
    with group.running():
        proc = start_shmem_backend(
            group, sock, "--serve-once", "--rng-source", "counter", control_socket=ctl_path
        )
        fe = Frontend(str(sock), 22)
        with ControlClient(ctl_path) as ctl:
            assert ctl(cmd="map", shmid=0, shm_offset=0, length=4096)["ok"]
        fe.close()
        assert proc.wait_exit(10) == 0
        assert "Traceback" not in proc.log()
        assert not sock.exists() and not ctl_path.exists()
        assert proc.lines("front-end disconnected: end of stream")
