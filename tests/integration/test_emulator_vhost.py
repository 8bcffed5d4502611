"""Issue 3 end to end: the real emulator in front of the real reference back-end
(``vhost-device-shmem``), both as processes. The QEMU-like client and the virtio driver play
the guest; the back-end's control socket asks for SHMEM_MAP/UNMAP. Checked: negotiation at
either SHMEM bit, BAR 4 from GET_SHMEM_CONFIG, pattern reads at every width, read-only and
writable mappings against the back-end's own memfd, refusals that leave the view unchanged,
reset, the data plane with interrupts from the back-end, back-end loss and reconnection,
leak-free map/unmap cycles and a back-end that never answers."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vguest.pattern import PatternKind, generate

from emulator.vfio_user.client import VfioUserClient
from testkit import ControlClient, Harness, Process, shmem_backend_argv
from testkit.procfs import (
    eventfd_id,
    eventfd_ids,
    fd_count,
    fd_targets,
    memfd_mappings,
    reserved_vmas,
)
from testkit.virtio_driver import (
    DEVICE_NEEDS_RESET,
    DEVICE_STATUS,
    DRIVER_OK,
    GuestRam,
    VirtioDriver,
    eventfd_signalled,
    wait_eventfd,
)
from tests.helpers.processes import procs
from vhost_user.codec import Channel, VhostUserDecoder, VhostUserMessage, encode, reply_to
from vhost_user.messages import (
    BackendReq,
    FrontendReq,
    Payload,
    VhostUserMMap,
    VhostUserProtocolFeature,
    VhostUserShMemConfig,
    VhostUserU64,
    VhostUserVringState,
)
from vhost_user_backend.daemon import VhostUserDaemon
from vhost_user_backend.devices.shmem_reference import ShmemRngDevice, make_pattern
from vhost_user_backend.errors import FrontendRefused
from wire.unix import close_fds, recv_with_fds, send_with_fds

__all__ = ["procs"]

KiB = 1 << 10
MiB = 1 << 20
SHMEM_BAR = 4
CYCLES_ENV = "VIRTIO_EMU_MAP_CYCLES"


def start(
    procs: Harness, backend: tuple[str, ...] = (), emulator: tuple[str, ...] = ()
) -> tuple[Process, Process, ControlClient]:
    """Back-end first (the emulator sizes BAR 4 from it), then the emulator, then control."""
    back = procs.backend("--rng-source", "counter", *backend)
    emu = procs.emulator("--vhost-user-socket", str(back.path), *emulator)
    return back, emu, procs.control()


@contextlib.contextmanager
def guest(emu: Process, ram_size: int = 2 * MiB) -> Iterator[VirtioDriver]:
    """A connected client with RAM mapped and the device probed (not yet initialised)."""
    with GuestRam(ram_size) as ram, VfioUserClient.connect(str(emu.path), timeout=15.0) as client:
        driver = VirtioDriver.probe(client, ram)
        try:
            yield driver
        finally:
            driver.close_msix()


def bar_view(driver: VirtioDriver, shmid: int, offset: int, length: int) -> bytes:
    return driver.shm_read(shmid, offset, length)


def counter(seed: int, length: int) -> bytes:
    return generate(PatternKind.COUNTER, seed, length)


@pytest.mark.parametrize("bit", [22, 20, 21])
def test_negotiation_at_any_shmem_bit(procs: Harness, bit: int) -> None:
    flag = ("--shmem-feature-bit", str(bit))
    back, emu, ctl = start(procs, flag, flag)
    emu.wait_for_log(r"protocol features 0x[0-9a-f]+$", regex=True)
    status = ctl.status()
    assert status["connected"] is True
    assert status["protocol_features"] & (1 << bit)
    for other in {20, 21, 22} - {bit}:  # the other SHMEM bits
        assert not status["protocol_features"] & (1 << other)
    assert emu.lines("WARNING") == []
    with guest(emu) as driver:
        assert driver.startup.regions[SHMEM_BAR].info.size == 4 * MiB
        assert [(r.shmid, r.offset, r.length) for r in driver.shm_regions] == [(0, 0, 4 * MiB)]
        assert ctl.map(0, 0, 4096, pattern="counter", seed=3)["ok"]
        assert driver.shm_read(0, 0, 8) == counter(3, 8)
    emu.stop()
    back.stop()


def test_mismatched_bits_mean_no_shared_memory(procs: Harness) -> None:
    back, emu, ctl = start(procs, ("--shmem-feature-bit", "20"), ("--shmem-feature-bit", "22"))
    (warning,) = emu.lines("WARNING")
    assert "offers protocol feature bit 20 (" in warning
    assert "--shmem-feature-bit 22: no shared memory" in warning
    status = ctl.status()
    assert status["connected"] is True
    assert not status["protocol_features"] & ((1 << 20) | (1 << 22))
    with guest(emu) as driver:
        assert driver.startup.regions[SHMEM_BAR].info.size == 0
        assert driver.shm_regions == ()
        driver.bring_up()  # the device works, just without shared memory
    refused = ctl.map(0, 0, 4096)
    assert refused["ok"] is False and refused["code"] != 0
    emu.stop()
    back.stop()


def test_cli_regions_override_but_nothing_maps_without_the_feature(procs: Harness) -> None:
    back, emu, ctl = start(
        procs, ("--shmem-feature-bit", "20"), ("--shmem-region", "0:1M", "--shmem-region", "3:1M")
    )
    with guest(emu) as driver:
        assert driver.startup.regions[SHMEM_BAR].info.size == 2 * MiB
        assert {(r.shmid, r.offset, r.length) for r in driver.shm_regions} == {
            (0, 0, MiB),
            (3, MiB, MiB),
        }
        assert ctl.map(0, 0, 4096)["ok"] is False
        assert driver.shm_read(0, 0, 8) == bytes(8)
    emu.stop()
    back.stop()


def test_bar_layout_follows_get_shmem_config(procs: Harness) -> None:
    back, emu, ctl = start(procs, ("--shmem-region", "0:2M", "--shmem-region", "1:1M"))
    with guest(emu) as driver:
        assert driver.startup.regions[SHMEM_BAR].info.size == 4 * MiB
        assert {(r.shmid, r.bar, r.offset, r.length) for r in driver.shm_regions} == {
            (0, SHMEM_BAR, 0, 2 * MiB),
            (1, SHMEM_BAR, 2 * MiB, MiB),
        }
        # Region 1 starts at BAR offset 2 MiB: a mapping at its start shows up exactly there.
        assert ctl.map(1, 0, 4096, pattern="counter", seed=11)["ok"]
        assert driver.client.region_read(SHMEM_BAR, 2 * MiB, 8) == counter(11, 8)
        assert driver.client.region_read(SHMEM_BAR, 2 * MiB - 8, 8) == bytes(8)
    emu.stop()
    back.stop()


def test_map_read_write_unmap_remap(procs: Harness) -> None:
    back, emu, ctl = start(procs, ("--shmem-region", "0:2M", "--shmem-region", "1:1M"))
    with guest(emu) as driver:
        driver.bring_up()
        # Read-only pattern: what the guest reads at every width is the pattern.
        assert ctl.map(0, 0x10000, 64 * KiB, pattern="counter", seed=7)["ok"]
        expected = counter(7, 64 * KiB)
        for width in (1, 2, 4, 8):
            for offset in (0, 8, 0x1000, 64 * KiB - 8):
                got = driver.shm_read(0, 0x10000 + offset, width)
                assert got == expected[offset : offset + width], (width, offset)
        assert driver.shm_read(0, 0x10000, 4096) == expected[:4096]
        assert driver.shm_read(0, 0x10000 - 8, 16) == bytes(8) + expected[:8]  # edge of a hole
        # A guest write to the read-only mapping changes nothing, seen from either side.
        for width in (1, 2, 4, 8):
            driver.shm_write(0, 0x10000 + 16, b"\xff" * width)
        assert driver.shm_read(0, 0x10000 + 16, 8) == expected[16:24]
        assert ctl.read(0, 0x10000, 64) == expected[:64]

        # Writable mapping: guest writes land in the back-end's memfd, and the other way round.
        assert ctl.map(1, 0x2000, 8192, pattern="xorshift", seed=5, writable=True)["ok"]
        original = make_pattern("xorshift", 8192, 5)
        assert driver.shm_read(1, 0x2000, 8) == original[:8]
        writes = {1: b"\x11", 2: b"\x22\x23", 4: b"\x44\x45\x46\x47", 8: bytes(range(0x80, 0x88))}
        for width, data in writes.items():
            driver.shm_write(1, 0x2000 + 64 * width, data)
        for width, data in writes.items():
            assert ctl.read(1, 0x2000, width, offset=64 * width) == data
        assert ctl.read(1, 0x2000, 8) == original[:8]
        driver.shm_write(1, 0x2000 + 4096, b"\x5a" * 4096, posted=True)
        assert driver.shm_read(1, 0x2000 + 4096, 8) == b"\x5a" * 8  # orders the posted write
        assert ctl.read(1, 0x2000, 4096, offset=4096) == b"\x5a" * 4096
        ctl.ok("write", shmid=1, shm_offset=0x2000, offset=0, data="cafef00d")
        assert driver.shm_read(1, 0x2000, 4) == bytes.fromhex("cafef00d")
        assert len(memfd_mappings(emu.pid)) == 2

        # Unmap: zeros again, writes dropped; then a new mapping in the same place.
        assert ctl.unmap(0, 0x10000, 64 * KiB)["ok"]
        assert driver.shm_read(0, 0x10000, 8) == bytes(8)
        driver.shm_write(0, 0x10000, b"\x01" * 8)
        assert driver.shm_read(0, 0x10000, 8) == bytes(8)
        assert ctl.map(0, 0x10000, 64 * KiB, pattern="constant", seed=0x0102030405060708)["ok"]
        assert driver.shm_read(0, 0x10000 + 64 * KiB - 8, 8) == bytes(range(8, 0, -1))
        assert len(memfd_mappings(emu.pid)) == 2
    emu.stop()
    back.stop()


def test_refused_requests_leave_the_view_unchanged(procs: Harness) -> None:
    back, emu, ctl = start(procs, ("--shmem-region", "0:2M", "--shmem-region", "1:1M"))
    with guest(emu) as driver:
        assert ctl.map(0, 0x10000, 64 * KiB, pattern="counter", seed=1)["ok"]
        assert ctl.map(1, 0, 8192, pattern="counter", seed=2, writable=True)["ok"]

        def view() -> tuple[bytes, bytes, int, list[tuple[int, int]]]:
            mappings = sorted((m["shmid"], m["shm_offset"]) for m in ctl.status()["mappings"])
            return (
                driver.shm_read(0, 0, 0x30000),
                driver.shm_read(1, 0, 0x4000),
                len(memfd_mappings(emu.pid)),
                mappings,
            )

        before = view()
        refusals = [
            ("overlap", ctl.map(0, 0x18000, 64 * KiB)),
            ("overlap at start", ctl.map(0, 0x0F000, 8192)),
            ("covers an existing one", ctl.map(0, 0, 0x30000)),
            ("past the end", ctl.map(1, MiB - 4096, 8192)),
            ("past the end of the BAR", ctl.map(0, 2 * MiB, 4096)),
            ("unknown shmid", ctl.map(2, 0, 4096)),
            ("shmid beyond the table", ctl.map(200, 0, 4096)),
            ("unaligned offset", ctl.map(0, 0x40800, 4096)),
            ("unaligned length", ctl.map(0, 0x40000, 1000)),
            ("partial unmap", ctl.unmap(0, 0x10000, 4096)),
            ("unmap of the tail", ctl.unmap(0, 0x11000, 60 * KiB)),
            ("unmap of a hole", ctl.unmap(0, 0x40000, 4096)),
            ("unmap spanning a hole", ctl.unmap(0, 0x10000, 128 * KiB)),
            ("unmap in an unknown region", ctl.unmap(2, 0, 4096)),
        ]
        accepted = [what for what, reply in refusals if reply["ok"] or not reply["code"]]
        assert accepted == []
        # The back-end is told what each status means (the errno of our refusal, named).
        said = {what: reply["error"].partition("): ")[2] for what, reply in refusals}
        assert said["overlap"] == "EEXIST: overlaps a live mapping"
        assert said["past the end"].startswith("EINVAL: outside the region or not page-aligned")
        assert said["unaligned offset"] == said["past the end"]
        assert said["unmap of a hole"].startswith("ENOENT: no mapping exactly there")
        assert said["partial unmap"] == said["unmap of a hole"]
        after = view()
        assert after[2:] == before[2:]
        assert after[0] == before[0] and after[1] == before[1]
    emu.stop()
    back.stop()


def test_zero_length_and_unknown_flags_refused_through_the_library(
    procs: Harness, tmp_path: Path
) -> None:
    """The control socket cannot send these; the back-end library in this process can."""
    path = tmp_path / "inproc.sock"
    device = ShmemRngDevice([(0, MiB)])
    backend = VhostUserDaemon(device, str(path))
    thread = backend.serve_in_thread()
    memfd = os.memfd_create("vhost-shmem-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, 8192)
        emu = procs.emulator("--vhost-user-socket", str(path))
        assert backend.wait_connected(10)
        with guest(emu) as driver:
            with pytest.raises(FrontendRefused) as zero:
                backend.shmem_map(0, memfd, 0, 0, 0, writable=False)
            assert zero.value.code != 0
            for flags in (0x2, 0x1 | 0x80, 1 << 63):
                with pytest.raises(FrontendRefused) as unknown:
                    backend._backend_request(
                        BackendReq.SHMEM_MAP,
                        VhostUserMMap(0, 0, 0, 4096, flags),
                        [memfd],
                        backend.shmem_mask,
                    )
                assert unknown.value.code != 0
            with pytest.raises(FrontendRefused):
                backend.shmem_unmap(0, 0, 0)
            with pytest.raises(FrontendRefused):
                backend._backend_request(
                    BackendReq.SHMEM_UNMAP,
                    VhostUserMMap(0, 0, 0, 4096, 0x4),
                    [],
                    backend.shmem_mask,
                )
            assert memfd_mappings(emu.pid, "memfd:vhost-shmem-test") == []
            assert driver.shm_read(0, 0, 8) == bytes(8)
            # The same fd with valid flags maps, so only the flags/length were wrong.
            os.pwrite(memfd, counter(9, 8192), 0)
            backend.shmem_map(0, memfd, 0, 0, 8192, writable=True)
            assert driver.shm_read(0, 4096, 8) == counter(9, 8192)[4096:4104]
            backend.shmem_unmap(0, 0, 8192)
        emu.stop()
    finally:
        os.close(memfd)
        backend.stop()
        thread.join(10)


def test_device_reset_drops_every_mapping(procs: Harness) -> None:
    back, emu, ctl = start(procs, ("--shmem-region", "0:2M", "--shmem-region", "1:1M"))
    with guest(emu) as driver:
        for reset in ("DEVICE_RESET", "status 0", "status 0 before DRIVER_OK"):
            if reset != "status 0 before DRIVER_OK":
                driver.close_msix()
                driver.bring_up()
            assert ctl.map(0, 0, 8192, pattern="counter", seed=1)["ok"]
            assert ctl.map(1, 0x1000, 4096, pattern="counter", seed=2, writable=True)["ok"]
            assert len(memfd_mappings(emu.pid)) == 2, reset
            assert driver.shm_read(1, 0x1000, 8) == counter(2, 8)
            if reset == "DEVICE_RESET":
                driver.client.device_reset()
            else:
                driver.common_write(DEVICE_STATUS, 0, 1)
            assert driver.status == 0
            assert memfd_mappings(emu.pid) == [], reset
            assert ctl.status()["mappings"] == [], reset  # RESET_DEVICE reached the back-end
            assert driver.shm_read(0, 0, 8) == bytes(8), reset
            assert driver.shm_read(1, 0x1000, 8) == bytes(8), reset
    emu.stop()
    back.stop()


def test_data_plane_interrupt_comes_from_the_back_end(procs: Harness) -> None:
    back, emu, ctl = start(procs)
    with guest(emu) as driver:
        (queue,) = driver.bring_up(queues=1, queue_size=8)
        buffers = [driver.ram.alloc(64) for _ in range(3)]
        heads = [queue.add([(gpa, 64, True)]) for gpa in buffers]
        vector_fd = driver.msix_fds[queue.vector]
        assert not eventfd_signalled(vector_fd)
        driver.notify(0)
        # The back-end fills all three, then interrupts once through the MSI-X eventfd.
        wait_eventfd(vector_fd, 10)
        used = [queue.pop_used() for _ in heads]
        assert queue.pop_used() is None
        assert sorted(element[0] for element in used if element) == sorted(heads)
        assert all(element and element[1] == 64 for element in used)
        stream = make_pattern("counter", 3 * 64, 0)
        got = b"".join(driver.ram.read(buffers[heads.index(e[0])], 64) for e in used if e)
        assert got == stream
        assert ctl.status()["queues"][0]["pushed"] == 3
        # That interrupt was the back-end's own write: it holds the very eventfd (same kernel
        # id) that the client gave the emulator with SET_IRQS; no relay through the emulator.
        assert eventfd_id(os.getpid(), vector_fd) in eventfd_ids(back.pid)
        # A chain of a read-only and a writable buffer: only the writable part is filled.
        out, into = driver.ram.alloc(16), driver.ram.alloc(32)
        driver.ram.write(out, b"\x77" * 16)
        head = queue.add([(out, 16, False), (into, 32, True)])
        driver.notify(0)
        assert driver.wait_used(0) == (head, 32)
        assert driver.ram.read(out, 16) == b"\x77" * 16
        assert driver.ram.read(into, 32) == make_pattern("counter", 32, 24)
    emu.stop()
    back.stop()


def test_back_end_loss_needs_reset_and_reconnect_recovers(procs: Harness) -> None:
    back, emu, ctl = start(procs)
    with guest(emu) as driver:
        (queue,) = driver.bring_up(queues=1, queue_size=8)
        config_fd = driver.msix_fds[0]
        assert ctl.map(0, 0, 16 * KiB, pattern="counter", seed=4)["ok"]
        assert driver.shm_read(0, 0, 8) == counter(4, 8)
        fds_before = fd_targets(emu.pid)
        mark = emu.mark()
        back.kill()
        emu.wait_for_log("vhost-user back-end lost", start=mark)
        assert driver.status & DEVICE_NEEDS_RESET
        wait_eventfd(config_fd, 10)  # the config interrupt tells the driver
        assert memfd_mappings(emu.pid) == []
        assert driver.shm_read(0, 0, 8) == bytes(8)

        back = procs.backend("--rng-source", "counter")
        emu.wait_for_log("vhost-user back-end connected", start=mark)
        ctl = procs.control()
        driver.close_msix()
        (queue,) = driver.bring_up(queues=1, queue_size=8)
        assert not driver.status & DEVICE_NEEDS_RESET
        assert ctl.map(0, 0x4000, 4096, pattern="counter", seed=8)["ok"]
        assert driver.shm_read(0, 0x4000, 8) == counter(8, 8)
        assert len(memfd_mappings(emu.pid)) == 1
        buffer = driver.ram.alloc(16)
        head = queue.add([(buffer, 16, True)])
        driver.notify(0)
        assert driver.wait_used(0) == (head, 16)
        assert driver.ram.read(buffer, 16) == make_pattern("counter", 16, 0)
        assert driver.status & DRIVER_OK
        # Same kinds of fds as before the loss: nothing of the dead connection is left.
        kinds = [target.split(" -> ")[1].split(":[")[0] for target in fd_targets(emu.pid)]
        kinds_before = [target.split(" -> ")[1].split(":[")[0] for target in fds_before]
        assert sorted(kinds) == sorted(kinds_before), (fds_before, fd_targets(emu.pid))
    emu.stop()
    back.stop()


def test_map_unmap_cycles_leak_nothing(procs: Harness) -> None:
    cycles = int(os.environ.get(CYCLES_ENV, "10000"))
    back, emu, ctl = start(procs, ("--shmem-region", "0:2M", "--shmem-region", "1:1M"))
    with guest(emu) as driver:
        driver.bring_up()
        # Warm up once so lazily created objects do not count as leaks.
        assert ctl.map(0, 0, 4096)["ok"] and ctl.unmap(0, 0, 4096)["ok"]
        fds, vmas = fd_count(emu.pid), reserved_vmas(emu.pid)
        before = fd_targets(emu.pid)
        back_fds = fd_count(back.pid)
        started = time.monotonic()
        for i in range(cycles):
            shmid = i % 2
            offset = (i * 4096) % (MiB - 8192)
            length = 4096 * (1 + i % 2)
            mapped = ctl.map(shmid, offset, length, pattern="counter", seed=i, writable=bool(i % 3))
            assert mapped["ok"], (i, mapped)
            if i % 500 == 0:
                assert driver.shm_read(shmid, offset, 8) == counter(i, 8)
                assert len(memfd_mappings(emu.pid)) == 1
            unmapped = ctl.unmap(shmid, offset, length)
            assert unmapped["ok"], (i, unmapped)
        elapsed = time.monotonic() - started
        assert fd_count(emu.pid) == fds, (before, fd_targets(emu.pid))
        assert memfd_mappings(emu.pid) == []
        assert reserved_vmas(emu.pid) == vmas
        assert fd_count(back.pid) == back_fds
        assert ctl.status()["mappings"] == []
        print(f"{cycles} map/unmap cycles in {elapsed:.1f} s")
    emu.stop()
    back.stop()


class SilentBackend:
    """A hostile back-end: accepts the connection, reads what it is sent, never answers."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.received = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            self.conns.append(conn)
            while conn.recv(4096):
                self.received.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.conns:
            conn.close()
        self.thread.join(10)


def test_back_end_that_never_answers_times_out_cleanly(procs: Harness, tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    silent = SilentBackend(path)
    try:
        started = time.monotonic()
        emu = procs.emulator(
            "--vhost-user-socket", str(path), "--backend-timeout", "0.5", wait_ready=False
        )
        assert emu.wait_exit(timeout=20) == 1
        elapsed = time.monotonic() - started
        assert silent.received.wait(10)
        emu.wait_for_log("did not answer GET_FEATURES within 0.5 s")
        assert not emu.path.exists()
        assert "Traceback" not in emu.log()
        assert elapsed < 15
    finally:
        silent.close()


class RawBackend:
    """A back-end speaking raw vhost-user from a thread, on every connection: it negotiates
    (VERSION_1, REPLY_ACK, SHMEM at ``shmem_bit``), answers GET_SHMEM_CONFIG with the payload
    bytes ``shmem_payload`` exactly as given (a libvhost-user back-end's short reply, or a
    broken one), and acks or answers the rest as a quiet device would. With ``stall`` it
    answers nothing after negotiation (``stalled_on`` records where), so activation hangs."""

    FEATURES = (1 << 32) | (1 << 30)  # VERSION_1, VHOST_USER_F_PROTOCOL_FEATURES
    NEGOTIATION = frozenset(
        {
            FrontendReq.GET_FEATURES,
            FrontendReq.GET_PROTOCOL_FEATURES,
            FrontendReq.SET_PROTOCOL_FEATURES,
            FrontendReq.SET_OWNER,
            FrontendReq.GET_SHMEM_CONFIG,
        }
    )

    def __init__(
        self,
        path: Path,
        shmem_payload: bytes = VhostUserShMemConfig(1, (MiB,)).pack(),
        *,
        shmem_bit: int = 22,
        stall: bool = False,
    ) -> None:
        self.shmem_payload = shmem_payload
        self.protocol = (1 << 3) | (1 << shmem_bit)  # REPLY_ACK, SHMEM
        self.stall = stall
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.requests: list[FrontendReq] = []
        self.stalled_on: list[FrontendReq] = []
        self.stalled = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                self.conns.append(conn)
                self._converse(conn)

    def _answer(self, msg: VhostUserMessage) -> bytes | None:
        """The reply's bytes, or None for no reply."""
        req = FrontendReq(msg.request)
        payload: Payload | None = None
        if req is FrontendReq.GET_SHMEM_CONFIG:
            header = struct.pack("=III", req, 0x5, len(self.shmem_payload))
            return header + self.shmem_payload
        if req is FrontendReq.GET_FEATURES:
            payload = VhostUserU64(self.FEATURES)
        elif req is FrontendReq.GET_PROTOCOL_FEATURES:
            payload = VhostUserU64(self.protocol)
        elif req is FrontendReq.GET_VRING_BASE:
            assert isinstance(msg.payload, VhostUserVringState)
            payload = VhostUserVringState(msg.payload.index, 0)
        elif msg.need_reply:
            payload = VhostUserU64(0)
        return None if payload is None else encode(reply_to(msg, payload))[0]

    def _converse(self, conn: socket.socket) -> None:
        decoder = VhostUserDecoder(Channel.FRONTEND, expect_replies=False)
        try:
            while True:
                data, fds = recv_with_fds(conn, max(decoder.bytes_needed(), 1))
                if not data:
                    close_fds(fds)
                    return
                decoder.feed(data, fds)
                while (msg := decoder.next_message()) is not None:
                    with msg:
                        req = FrontendReq(msg.request)
                        self.requests.append(req)
                        if self.stall and req not in self.NEGOTIATION:
                            self.stalled_on.append(req)
                            self.stalled.set()
                            return  # stop reading, keep the connection open
                        reply = self._answer(msg)
                    if reply is not None:
                        send_with_fds(conn, reply)
        finally:
            decoder.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.conns:
            conn.close()
        self.thread.join(10)


def test_back_end_stalling_at_activation_needs_reset_not_a_hang(
    procs: Harness, tmp_path: Path
) -> None:
    path = tmp_path / "stalling.sock"
    stalling = RawBackend(path, stall=True)
    try:
        emu = procs.emulator("--vhost-user-socket", str(path), "--backend-timeout", "0.5")
        with guest(emu) as driver:
            assert [(r.shmid, r.length) for r in driver.shm_regions] == [(0, MiB)]
            driver.negotiate()
            driver.enable_msix()
            driver.set_config_vector(0)
            driver.setup_queue(0, 8, vector=1)
            started = time.monotonic()
            driver.add_status(DRIVER_OK)  # answered once the back-end timed out
            assert time.monotonic() - started < 5
            assert driver.status & DEVICE_NEEDS_RESET
            emu.wait_for_log("within 0.5 s")
            assert stalling.stalled.wait(10)
            assert stalling.stalled_on[0] == FrontendReq.SET_FEATURES
            assert driver.shm_read(0, 0, 8) == bytes(8)  # still served
        emu.stop()
    finally:
        stalling.close()


def test_trace_covers_the_vhost_user_channels(procs: Harness, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    back, emu, ctl = start(procs, emulator=("--trace", str(trace)))
    with guest(emu) as driver:
        driver.bring_up()
        assert ctl.map(0, 0, 4096)["ok"] and ctl.unmap(0, 0, 4096)["ok"]
    emu.stop()
    back.stop()
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    frontend = [(r["dir"], r["cmd"]) for r in records if r["channel"] == "vhost-user-frontend"]
    assert frontend[:2] == [("out", "GET_FEATURES"), ("in", "GET_FEATURES")]
    assert ("out", "GET_SHMEM_CONFIG") in frontend and ("in", "GET_SHMEM_CONFIG") in frontend
    assert ("out", "SET_MEM_TABLE") in frontend
    channel = [r for r in records if r["channel"] == "vhost-user-backend"]
    assert [(r["dir"], r["cmd"]) for r in channel] == [
        ("in", "SHMEM_MAP"),
        ("out", "SHMEM_MAP"),
        ("in", "SHMEM_UNMAP"),
        ("out", "SHMEM_UNMAP"),
    ]
    assert channel[0]["nfds"] == 1 and channel[0]["payload"]["length"] == 4096
    assert channel[1]["payload"] == {"value": 0}
    assert any(r["channel"] == "vfio-user" for r in records)


@pytest.mark.parametrize(
    ("option", "second_region_refused"),
    [("--max-mappings", True), ("--max-mappings-per-region", False)],
)
def test_mapping_caps_from_the_command_line(
    procs: Harness, option: str, second_region_refused: bool
) -> None:
    back, emu, ctl = start(
        procs, ("--shmem-region", "0:1M", "--shmem-region", "1:1M"), (option, "2")
    )
    assert ctl.map(0, 0, 4096)["ok"]
    assert ctl.map(0, 0x1000, 4096)["ok"]
    third = ctl.map(0, 0x2000, 4096)
    assert not third["ok"] and third["code"] == errno.ENOSPC
    other_region = ctl.map(1, 0, 4096)
    assert other_region["ok"] is not second_region_refused
    emu.stop()
    back.stop()


class _ConfigDevice(ShmemRngDevice):
    """A device whose config space the test changes underneath the guest."""

    def __init__(self) -> None:
        super().__init__([(0, MiB)])
        self.config = bytearray(b"generation-1".ljust(16, b"\0"))
        self.reads = 0

    def get_config(self, offset: int, size: int) -> bytes:
        self.reads += 1
        return bytes(self.config[offset : offset + size])


def test_config_is_read_once_and_again_after_config_change(procs: Harness, tmp_path: Path) -> None:
    path = tmp_path / "config.sock"
    device = _ConfigDevice()
    backend = VhostUserDaemon(device, str(path))
    thread = backend.serve_in_thread()
    try:
        emu = procs.emulator("--vhost-user-socket", str(path), "--config-size", "16")
        assert backend.wait_connected(10)
        with guest(emu) as driver:
            driver.bring_up(queues=1, queue_size=8)
            config_vector = driver.msix_fds[0]
            before = device.reads
            first = b"".join(driver.device_cfg_read(i, 1) for i in range(12))
            assert first == b"generation-1"
            assert device.reads == before + 1  # twelve guest reads, one GET_CONFIG
            device.config[11:12] = b"2"
            assert driver.device_cfg_read(11, 1) == b"1"  # still the cached copy
            backend.config_changed()
            wait_eventfd(config_vector, 10)
            assert driver.device_cfg_read(0, 12) == b"generation-2"
        emu.stop()
    finally:
        backend.stop()
        thread.join(10)


def shmem_payload(nregions: int, *sizes: int) -> bytes:
    """A GET_SHMEM_CONFIG reply payload as a back-end sends it: nregions, padding, sizes."""
    return struct.pack(f"=II{len(sizes)}Q", nregions, 0, *sizes)


def trace_records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("payload", "regions"),
    [
        # libvhost-user: nregions, padding and the sizes up to the last declared one.
        (shmem_payload(2, 2 * MiB, MiB), {(0, 0, 2 * MiB), (1, 2 * MiB, MiB)}),
        (shmem_payload(1, 0, 0, 0, MiB), {(3, 0, MiB)}),
        # A size past nregions is not a region (QEMU takes the first nregions non-zero ones).
        (shmem_payload(1, MiB, 0, 4 * MiB), {(0, 0, MiB)}),
    ],
    ids=["24-bytes-two-regions", "40-bytes-shmid-3", "extra-size-ignored"],
)
def test_short_get_shmem_config_reply_builds_the_bar(
    procs: Harness, tmp_path: Path, payload: bytes, regions: set[tuple[int, int, int]]
) -> None:
    path = tmp_path / "libvhost-user-like.sock"
    trace = tmp_path / "trace.jsonl"
    backend = RawBackend(path, payload)
    try:
        emu = procs.emulator("--vhost-user-socket", str(path), "--trace", str(trace))
        with guest(emu) as driver:
            assert {(r.shmid, r.offset, r.length) for r in driver.shm_regions} == regions
            assert all(r.bar == SHMEM_BAR for r in driver.shm_regions)
            end = max(offset + length for _, offset, length in regions)
            assert driver.startup.regions[SHMEM_BAR].info.size >= end
            assert driver.shm_read(min(r[0] for r in regions), 0, 8) == bytes(8)
        emu.stop()
    finally:
        backend.close()
    assert "payload is" not in emu.log()
    (reply,) = [
        r
        for r in trace_records(trace)
        if r["channel"] == "vhost-user-frontend" and r["dir"] == "in"
        if r["cmd"] == "GET_SHMEM_CONFIG"
    ]
    assert isinstance(reply["payload"], dict)
    assert reply["payload"]["nregions"] == len(regions)


@pytest.mark.parametrize(
    ("payload", "rule"),
    [
        (shmem_payload(2, MiB)[:-4], "whole-items"),  # 12 bytes: half a size
        (shmem_payload(2, MiB), "nregions-sizes"),  # ends before the second region
        (shmem_payload(300, *([MiB] * 4)), "max-nregions"),
        (b"\x01\x00\x00\x00", "head"),
    ],
    ids=["half-a-size", "ends-before-nregions", "nregions-over-256", "no-head"],
)
def test_inconsistent_get_shmem_config_reply_is_refused_by_its_rule(
    procs: Harness, tmp_path: Path, payload: bytes, rule: str
) -> None:
    path = tmp_path / "inconsistent.sock"
    trace = tmp_path / "trace.jsonl"
    backend = RawBackend(path, payload)
    try:
        emu = procs.emulator(
            "--vhost-user-socket", str(path), "--trace", str(trace), wait_ready=False
        )
        assert emu.wait_exit(timeout=20) == 1
    finally:
        backend.close()
    assert backend.requests[-1] == FrontendReq.GET_SHMEM_CONFIG
    errors = emu.lines(f"ERROR .*GET_SHMEM_CONFIG.*breaks rule {rule}:")
    assert len(errors) == 1, emu.log()
    assert "Traceback" not in emu.log()
    assert not emu.path.exists()
    # The refused reply is in the trace like any other message, with its raw header.
    (refused,) = [r for r in trace_records(trace) if str(r["cmd"]).startswith("invalid:")]
    assert refused["channel"] == "vhost-user-frontend" and refused["dir"] == "in"
    assert refused["cmd"] == "invalid:GET_SHMEM_CONFIG"
    assert refused["header"] == {"request": 44, "flags": 0x5, "size": len(payload)}
    assert refused["size"] == 12 + len(payload)
    assert f"breaks rule {rule}:" in str(refused["reason"])
    assert refused["error"] == errno.EINVAL and refused["fatal"] is False


class _BitsDaemon:
    """A back-end on our library whose protocol features are ``REPLY_ACK | BACKEND_REQ`` plus
    the raw ``bits``, whatever its shared-memory bit (here 22) would offer."""

    def __init__(self, path: Path, bits: set[int]) -> None:
        self.daemon = VhostUserDaemon(ShmemRngDevice([(0, MiB)]), str(path))
        pf = VhostUserProtocolFeature
        self.daemon.offered_protocol_features = int(pf.REPLY_ACK | pf.BACKEND_REQ) | sum(
            1 << bit for bit in bits
        )
        self.thread = self.daemon.serve_in_thread()

    def stop(self) -> None:
        self.daemon.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.mark.parametrize(
    ("bits", "named"),
    [
        ({20}, ["bit 20 (GET_VRING_BASE_INFLIGHT upstream"]),
        ({21}, ["bit 21 (GPA_ADDRESSES upstream, SHMEM in rust-vmm vhost <= 0.16)"]),
        ({20, 21}, ["bits 20 (", ", 21 (", "restart with --shmem-feature-bit 20|21"]),
        ({20, 22}, None),  # an upstream back-end with GET_VRING_BASE_INFLIGHT: ours is offered
    ],
    ids=["20", "21", "20-and-21", "20-and-22"],
)
def test_other_shmem_bits_give_one_warning_across_reconnects(
    procs: Harness, tmp_path: Path, bits: set[int], named: list[str] | None
) -> None:
    path = tmp_path / "bits.sock"
    backend = _BitsDaemon(path, bits)
    try:
        emu = procs.emulator("--vhost-user-socket", str(path))
        with guest(emu) as driver:
            has_shmem = 22 in bits
            assert [r.shmid for r in driver.shm_regions] == ([0] if has_shmem else [])
        # The same back-end again: the connection negotiates again, the warning stays one.
        mark = emu.mark()
        backend.stop()
        emu.wait_for_log("vhost-user back-end lost", start=mark)
        backend = _BitsDaemon(path, bits)
        emu.wait_for_log("vhost-user back-end connected", start=mark)
        emu.stop()
    finally:
        backend.stop()
    warnings = emu.lines("WARNING .*offers protocol feature bit")
    if named is None:
        assert warnings == []
        return
    assert len(warnings) == 1, emu.log()
    assert "but not bit 22, the shared-memory bit of --shmem-feature-bit 22" in warnings[0]
    for text in named:
        assert text in warnings[0]


def test_backend_connect_timeout_gives_up_with_a_clear_message(
    procs: Harness, tmp_path: Path
) -> None:
    missing = tmp_path / "nobody-listens.sock"
    emu = procs.emulator(
        "--vhost-user-socket", str(missing), "--backend-connect-timeout", "0.5", wait_ready=False
    )
    assert emu.wait_exit(timeout=20) == 1
    (error,) = emu.lines("ERROR")
    assert f"no vhost-user back-end at {missing} after 0.5 s (No such file or directory)" in error
    assert "--backend-connect-timeout" in error
    assert emu.lines("ready: listening") == []
    assert "Traceback" not in emu.log()
    assert not emu.path.exists()


def test_backend_connect_timeout_still_waits_for_a_back_end_that_comes(procs: Harness) -> None:
    path = procs.workdir / "late.sock"
    emu = procs.emulator(
        "--vhost-user-socket", str(path), "--backend-connect-timeout", "60", wait_ready=False
    )
    emu.wait_for_log("waiting for the vhost-user back-end", timeout=20)
    back = procs.backend(socket_name="late.sock")
    emu.wait_for_log("ready: listening", timeout=20)
    with guest(emu) as driver:  # the loop runs (SIGTERM is taken from then on)
        assert [r.shmid for r in driver.shm_regions] == [0]
    emu.stop()
    back.stop()


LAYOUT_REFUSAL = (
    "shared memory region 1: size 0x1800 is not a non-negative multiple of 4096 "
    "(rule page-multiple)"
)


def test_a_refused_layout_names_the_region_and_the_rule_on_both_sides(
    procs: Harness, tmp_path: Path
) -> None:
    """The same words from the back-end library at start-up, from the emulator for its own
    ``--shmem-region`` and for a back-end that declares the layout in GET_SHMEM_CONFIG."""
    regions = ("--shmem-region", "0:1M", "--shmem-region", "1:6K")
    argv = shmem_backend_argv(tmp_path / "b.sock", *regions)
    back = procs.start("vhost-device-shmem", argv)
    assert back.wait_exit(timeout=20) == 2
    assert back.lines() == [f"vhost-device-shmem: {LAYOUT_REFUSAL}"]

    own = procs.emulator(*regions, wait_ready=False)
    assert own.wait_exit(timeout=20) == 1
    assert [line.partition(" ERROR ")[2] for line in own.lines("ERROR")] == [LAYOUT_REFUSAL]

    path = tmp_path / "declares.sock"
    backend = RawBackend(path, VhostUserShMemConfig(2, (MiB, 0x1800)).pack())
    try:
        emu = procs.emulator("--vhost-user-socket", str(path), wait_ready=False, socket_name="v2")
        assert emu.wait_exit(timeout=20) == 1
    finally:
        backend.close()
    assert [line.partition(" ERROR ")[2] for line in emu.lines("ERROR")] == [LAYOUT_REFUSAL]
    assert "Traceback" not in emu.log()
