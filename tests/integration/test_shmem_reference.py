"""vhost-device-shmem end to end: the real CLI process, a scripted front-end on its vhost-user
socket answering SHMEM_MAP/UNMAP by really mmap-ing the fds, and the JSON control socket."""

from __future__ import annotations

import json
import mmap
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vguest.pattern import crc32c

from vhost_user.codec import Channel, Decoder, VhostUserMessage, encode, reply_to, request
from vhost_user.messages import (
    EMPTY,
    BackendReq,
    FrontendReq,
    Payload,
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
from wire.unix import recv_with_fds, send_with_fds

PF = VhostUserProtocolFeature


class Frontend:
    """Lockstep front-end plus a thread serving the back-end channel like our emulator would:
    it maps each SHMEM_MAP fd (keeping the mapping) and answers with the next status code."""

    def __init__(self, path: str, bit: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.decoder = Decoder(Channel.FRONTEND, expect_replies=True)
        self.codes: list[int] = []
        self.maps: dict[tuple[int, int], mmap.mmap] = {}
        self.log: list[tuple[BackendReq, VhostUserMMap]] = []
        features = self.call(FrontendReq.GET_FEATURES)
        self.call(FrontendReq.SET_FEATURES, VhostUserU64(features), reply=False)
        proto = int(PF.REPLY_ACK | PF.BACKEND_REQ | PF.MQ) | 1 << bit
        assert self.call(FrontendReq.GET_PROTOCOL_FEATURES) & proto == proto
        assert self.call(FrontendReq.SET_PROTOCOL_FEATURES, VhostUserU64(proto)) == 0
        self.channel, theirs = socket.socketpair()
        assert self.call(FrontendReq.SET_BACKEND_REQ_FD, EMPTY, [theirs.fileno()]) == 0
        theirs.close()
        self.thread = threading.Thread(target=self._serve_channel, daemon=True)
        self.thread.start()

    def call(
        self,
        req: FrontendReq,
        payload: Payload = EMPTY,
        fds: list[int] | None = None,
        *,
        reply: bool = True,
    ) -> int:
        data, out = encode(request(req, payload, fds=fds or [], need_reply=reply))
        send_with_fds(self.sock, data, out)
        if not reply:
            return 0
        msg = self.recv()
        assert isinstance(msg.payload, VhostUserU64)
        return msg.payload.value

    def recv(self) -> VhostUserMessage:
        while (msg := self.decoder.next_message()) is None:
            data, fds = recv_with_fds(self.sock, self.decoder.bytes_needed())
            assert data, "back-end closed the connection"
            self.decoder.feed(data, fds)
        return msg

    def _serve_channel(self) -> None:
        decoder = Decoder(Channel.BACKEND, expect_replies=False)
        while True:
            data, fds = recv_with_fds(self.channel, decoder.bytes_needed())
            if not data:
                return
            decoder.feed(data, fds)
            msg = decoder.next_message()
            if msg is None:
                continue
            with msg:
                assert isinstance(msg.payload, VhostUserMMap)
                p = msg.payload
                self.log.append((BackendReq(msg.request), p))
                code = self.codes.pop(0) if self.codes else 0
                if code == 0 and msg.request is BackendReq.SHMEM_MAP:
                    prot = mmap.PROT_READ | (mmap.PROT_WRITE if p.writable else 0)
                    self.maps[(p.shmid, p.shm_offset)] = mmap.mmap(
                        msg.fds[0], p.length, prot=prot, offset=p.fd_offset
                    )
                elif code == 0:
                    self.maps.pop((p.shmid, p.shm_offset)).close()
                out, _ = encode(reply_to(msg, VhostUserU64(code)))
            send_with_fds(self.channel, out)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)
        self.channel.close()
        for mm in self.maps.values():
            mm.close()
        self.decoder.close()


class Control:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")

    def __call__(self, **req: object) -> dict[str, object]:
        self.file.write(json.dumps(req).encode() + b"\n")
        self.file.flush()
        reply: dict[str, object] = json.loads(self.file.readline())
        return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def wait_for(path: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        assert proc.poll() is None, "back-end exited early"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture(params=[22, 20])
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, int]]:
    bit: int = request.param
    sock, ctl = str(tmp_path / "vhost.sock"), str(tmp_path / "ctl.sock")
    cmd = [
        sys.executable,
        "-m",
        "vhost_user_backend.devices.shmem_reference",
        "--socket-path",
        sock,
        "--control-socket",
        ctl,
        "--shmem-region",
        "0:4MiB",
        "--shmem-region",
        "2:64K",
        "--shmem-feature-bit",
        str(bit),
        "--rng-source",
        "counter",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        wait_for(sock, proc)
        wait_for(ctl, proc)
        yield sock, ctl, bit
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err.decode()
        assert b"listening on " + sock.encode() in err


def test_pattern_and_region_parsing() -> None:
    assert make_pattern("counter", 20, 1) == struct.pack("<QQQ", 1, 2, 3)[:20]
    assert make_pattern("counter", 8, 2**64 - 1) == b"\xff" * 8
    assert parse_region("3:4MiB") == (3, 4 << 20)
    assert parse_region("0:0x2000") == (0, 0x2000)


def test_map_read_write_unmap_end_to_end(daemon: tuple[str, str, int]) -> None:
    sock, ctl_path, bit = daemon
    fe = Frontend(sock, bit)
    ctl = Control(ctl_path)
    try:
        data, out = encode(request(FrontendReq.GET_SHMEM_CONFIG))
        send_with_fds(fe.sock, data, out)
        cfg = fe.recv().payload
        assert cfg == VhostUserShMemConfig(3, (4 << 20, 0, 64 << 10))

        reply = ctl(cmd="map", shmid=0, shm_offset=0x1000, length=8192, pattern="counter", seed=7)
        assert reply["ok"], reply
        expected = make_pattern("counter", 8192, 7)
        assert fe.maps[(0, 0x1000)][:] == expected  # the front-end's real mmap of our memfd
        assert fe.log[-1] == (BackendReq.SHMEM_MAP, VhostUserMMap(0, 0, 0x1000, 8192, 0))

        got = ctl(cmd="read", shmid=0, shm_offset=0x1000, length=16)
        assert got["data"] == expected[:16].hex()
        full = ctl(cmd="read", shmid=0, shm_offset=0x1000)
        assert full["crc32c"] == crc32c(expected)

        assert ctl(cmd="write", shmid=0, shm_offset=0x1000, offset=8, data="deadbeef")["ok"]
        assert fe.maps[(0, 0x1000)][8:12] == bytes.fromhex("deadbeef")

        fe.codes.append(17)  # the front-end refuses the next request
        refused = ctl(cmd="map", shmid=2, shm_offset=0, length=4096, writable=True)
        assert refused == {"ok": False, "error": refused["error"], "code": 17}
        status = ctl(cmd="status")
        assert status["connected"] is True
        assert status["protocol_features"] & (1 << bit)  # type: ignore[operator]
        assert [m["shmid"] for m in status["mappings"]] == [0]  # type: ignore[attr-defined]

        assert ctl(cmd="unmap", shmid=0, shm_offset=0x1000, length=8192)["ok"]
        assert (0, 0x1000) not in fe.maps
        missing = ctl(cmd="read", shmid=0, shm_offset=0x1000, length=16)
        assert missing["ok"] is False
        assert ctl(cmd="bogus")["ok"] is False
    finally:
        ctl.close()
        fe.close()


def test_control_without_front_end_and_rng_data_plane(daemon: tuple[str, str, int]) -> None:
    sock, ctl_path, bit = daemon
    ctl = Control(ctl_path)
    assert ctl(cmd="map", shmid=0, shm_offset=0, length=4096)["ok"] is False
    fe = Frontend(sock, bit)
    ram = os.memfd_create("guest-ram")
    os.ftruncate(ram, 1 << 20)
    kick, call = os.eventfd(0), os.eventfd(0)
    try:
        region = VhostUserMemoryRegion(0, 1 << 20, 0x7F00_0000_0000, 0)
        assert fe.call(FrontendReq.SET_MEM_TABLE, VhostUserMemory((region,)), [ram]) == 0
        with mmap.mmap(ram, 1 << 20) as mm:
            # One device-writable 32-byte buffer at 0x10000, ring of size 4.
            struct.pack_into("<QIHH", mm, 0, 0x10000, 32, 2, 0)
            struct.pack_into("<HHH", mm, 0x1000, 0, 1, 0)
            uva = 0x7F00_0000_0000
            assert fe.call(FrontendReq.SET_VRING_NUM, VhostUserVringState(0, 4)) == 0
            addr = VhostUserVringAddr(0, 0, uva, uva + 0x2000, uva + 0x1000, 0)
            assert fe.call(FrontendReq.SET_VRING_ADDR, addr) == 0
            assert fe.call(FrontendReq.SET_VRING_CALL, VhostUserU64(0), [call]) == 0
            assert fe.call(FrontendReq.SET_VRING_KICK, VhostUserU64(0), [kick]) == 0
            assert fe.call(FrontendReq.SET_VRING_ENABLE, VhostUserVringState(0, 1)) == 0
            os.eventfd_write(kick, 1)
            assert select.select([call], [], [], 5)[0]
            assert struct.unpack_from("<HII", mm, 0x2002) == (1, 0, 32)
            assert mm[0x10000:0x10020] == make_pattern("counter", 32, 0)
        status = ctl(cmd="status")
        assert status["queues"][0]["pushed"] == 1  # type: ignore[index]
    finally:
        ctl.close()
        fe.close()
        for fd in (ram, kick, call):
            os.close(fd)
