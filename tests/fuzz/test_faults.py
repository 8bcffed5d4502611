"""Faults and limits: peers that die, flood, stall or deadlock, caps refused with clear errors."""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from pathlib import Path

import pytest

from emulator.app import Emulator
from emulator.errors import BackendFailure
from emulator.vfio_user import messages as vm
from tests.fuzz.invariants import check_alive
from tests.fuzz.rig import (
    PAGE,
    SHMEM_BAR,
    PeerGone,
    RunningEmulator,
    ScriptedBackend,
    connect_client,
    emulator_config,
    emulator_with_backend,
    make_backing,
    mmap_request,
    read_channel_reply,
)
from wire.unix import send_with_fds


def _map(channel: object, shmid: int, offset: int, kind: str = "memfd-sealable") -> int:
    backing = make_backing(kind, PAGE, offset // PAGE + 1)
    try:
        send_with_fds(channel, mmap_request(9, shmid, 0, offset, PAGE, 1), [backing.fd])  # type: ignore[arg-type]
        return read_channel_reply(channel)[2]  # type: ignore[arg-type]
    finally:
        backing.close()


def test_unsignallable_irq_fd_does_not_kill_the_loop(workdir: Path) -> None:
    """SET_IRQS with a pipe's read end, then a trigger: the write fails, the emulator lives."""
    config = emulator_config(workdir, vhost_user_socket=None, shmem_regions={0: 1 << 16})
    with RunningEmulator(config) as running, connect_client(config.vfio_user_socket) as client:
        read_end, write_end = os.pipe()
        try:
            for msg_id, flags, fds in ((7, 0x24, [read_end]), (8, 0x21, [])):
                body = struct.pack("<IIIII", 20, flags, 4, 0, 1)
                client.send_raw(struct.pack("<HHIII", msg_id, 8, 16 + len(body), 0, 0) + body, fds)
                assert not client.wait_reply(msg_id).is_error
        finally:
            os.close(read_end)
            os.close(write_end)
        check_alive(running, client)


def test_backend_killed_while_client_reads_and_reconnects(workdir: Path) -> None:
    with emulator_with_backend(workdir) as (running, backend):
        client = connect_client(running.emulator.server.path)
        try:
            assert _map(backend.channel, 0, 0) == 0
            assert client.region_read(SHMEM_BAR, 0, 8) != bytes(8)
            first = backend.connections
            backend.kick_off()
            backend.drop_channel()
            deadline = time.monotonic() + 10
            while backend.connections == first or not backend.channel_ready.is_set():
                client.region_read(SHMEM_BAR, 0, 8)  # the guest keeps reading meanwhile
                assert time.monotonic() < deadline, "front-end never reconnected"
            assert running.emulator.shmem is not None and len(running.emulator.shmem) == 0
            assert client.region_read(SHMEM_BAR, 0, 8) == bytes(8)
            assert _map(backend.channel, 0, 0) == 0
            check_alive(running, client)
        finally:
            client.close()


def test_client_killed_then_new_client(workdir: Path) -> None:
    config = emulator_config(workdir, vhost_user_socket=None, shmem_regions={0: 1 << 16})
    with RunningEmulator(config) as running:
        client = connect_client(config.vfio_user_socket)
        client.send_raw(struct.pack("<HHIII", 1, 10, 40, 0, 0)[:20])  # half a REGION_WRITE
        client.sock.close()
        with connect_client(config.vfio_user_socket) as fresh:
            check_alive(running, fresh)
        client.decoder.close()


def test_flooding_backend_does_not_starve_the_client(workdir: Path) -> None:
    """A back-end writing SHMEM_UNMAPs as fast as it can: guest reads still complete."""
    with emulator_with_backend(workdir) as (running, backend):
        client = connect_client(running.emulator.server.path)
        stop = threading.Event()
        channel = backend.channel
        assert channel is not None
        flood = mmap_request(10, 0, 0, 0, PAGE, 0, need_reply=False) * 64

        def flooder() -> None:
            while not stop.is_set():
                try:
                    channel.sendall(flood)
                except OSError:
                    return

        thread = threading.Thread(target=flooder, daemon=True)
        thread.start()
        try:
            worst = 0.0
            for _ in range(200):
                start = time.monotonic()
                client.region_read(SHMEM_BAR, 0, 64)
                worst = max(worst, time.monotonic() - start)
            assert worst < 1.0, f"a guest read waited {worst:.2f} s behind the flood"
        finally:
            stop.set()
            channel.shutdown(2)
            thread.join(10)
            client.close()


def test_backend_maps_before_answering_does_not_deadlock(workdir: Path) -> None:
    """The back-end sends SHMEM_MAP and waits for its reply before answering GET_CONFIG."""
    with emulator_with_backend(workdir) as (running, backend):
        frontend = running.emulator.frontend
        assert frontend is not None
        backend.policy = lambda req, _i: "map-first" if req.name == "GET_CONFIG" else "normal"
        client = connect_client(running.emulator.server.path)
        try:
            start = time.monotonic()
            frontend_reply = client.region_read(2, 0x2000, 4)  # device config window
            assert time.monotonic() - start < 5
            assert len(frontend_reply) == 4
            assert "GET_CONFIG" in [r.name for r in backend.requests]
            assert running.emulator.shmem is not None and len(running.emulator.shmem) == 1
            check_alive(running, client)
        finally:
            client.close()


def test_silent_backend_times_out_with_a_clear_error(workdir: Path) -> None:

    sock = workdir / "silent.sock"
    config = emulator_config(workdir, vhost_user_socket=sock, backend_timeout=0.3)
    with ScriptedBackend(sock, policy=lambda req, _i: "no-reply"):
        start = time.monotonic()
        with pytest.raises(BackendFailure, match=r"did not answer GET_FEATURES within 0.3 s"):
            Emulator(config)
        assert time.monotonic() - start < 3


def test_mapping_caps_refused_through_the_channel(workdir: Path) -> None:
    caps = {"max_mappings_per_region": 4, "max_mappings": 6}
    with emulator_with_backend(workdir, **caps) as (running, backend):
        channel = backend.channel
        statuses = [_map(channel, 0, i * PAGE) for i in range(5)]
        assert statuses == [0, 0, 0, 0, errno.ENOSPC]
        statuses = [_map(channel, 1, i * PAGE) for i in range(3)]
        assert statuses == [0, 0, errno.ENOSPC]
        assert running.emulator.shmem is not None and len(running.emulator.shmem) == 6


def test_oversized_messages_are_refused(workdir: Path) -> None:
    """vfio-user: a header bigger than the max message size drops the client (framing lost);
    a REGION_READ beyond max_data_xfer_size gets an error reply. vhost-user: a payload size
    above 4096 drops the back-end, which the front-end then reconnects."""
    config = emulator_config(workdir, vhost_user_socket=None, shmem_regions={0: 1 << 16})
    with RunningEmulator(config) as running:
        with connect_client(config.vfio_user_socket) as client:
            reply = client.call(vm.Command.REGION_READ, vm.RegionAccess(0, 7, (1 << 20) + 1))
            assert reply.is_error and reply.error == errno.EINVAL
            client.send_raw(struct.pack("<HHIII", 3, 9, vm.DEFAULT_MAX_MSG_SIZE + 1, 0, 0))
            with pytest.raises(PeerGone):
                client.receive()
        with connect_client(config.vfio_user_socket) as client:
            check_alive(running, client)


def test_rss_bounded_under_a_write_flood(workdir: Path) -> None:
    config = emulator_config(workdir, vhost_user_socket=None, shmem_regions={0: 1 << 16})

    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE

    with RunningEmulator(config), connect_client(config.vfio_user_socket) as client:
        payload = vm.RegionAccess(0, SHMEM_BAR, 4096, bytes(4096)).pack()
        message = struct.pack("<HHIII", 1, 10, 16 + len(payload), 0x10, 0) + payload
        for _ in range(500):
            client.send_raw(message)
        client.region_read(SHMEM_BAR, 0, 4)
        before = rss()
        for _ in range(20_000):
            client.send_raw(message)
        client.region_read(SHMEM_BAR, 0, 4)
        assert rss() - before < 32 << 20
