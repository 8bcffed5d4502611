"""Issue 2 end to end: the real ``python -m emulator`` process (no back-end) driven over its
real vfio-user socket by the QEMU-like client and a small virtio driver, and by a raw peer
sending malformed messages. Proves the transport up to DRIVER_OK, the shared-memory BAR's
layout and trapped accesses, reset, reconnection, hostile input, clean exit and the trace."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulator.vfio_user.client import QEMU_CAPABILITIES, VfioUserClient, VfioUserError, bar_size
from emulator.vfio_user.codec import Message, encode
from emulator.vfio_user.messages import (
    DEFAULT_MAX_MSG_SIZE,
    HEADER,
    HEADER_SIZE,
    Command,
    DeviceFlags,
    DeviceInfo,
    DmaMap,
    DmaMapFlags,
    HeaderFlags,
    IrqIndex,
    IrqSetFlags,
    RegionAccess,
    SetIrqs,
    Version,
)
from testkit import Harness
from testkit.procfs import fd_count, fd_targets
from testkit.virtio_driver import (
    ACKNOWLEDGE,
    DEVICE_STATUS,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    QUEUE_ENABLE,
    QUEUE_SELECT,
    VIRTIO_F_VERSION_1,
    GuestRam,
    VirtioDriver,
)
from tests.helpers.processes import procs

__all__ = ["procs"]

MiB = 1 << 20
TWO_REGIONS = ("--shmem-region", "0:2M", "--shmem-region", "1:1M")
SHMEM_BAR = 4
VIRTIO_BAR = 2
CONFIG_REGION = 7


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    with GuestRam(2 * MiB) as guest_ram:
        yield guest_ram


def connect(path: Path) -> VfioUserClient:
    return VfioUserClient.connect(str(path), timeout=10.0)


def test_bring_up_to_driver_ok_and_shared_memory_bar(procs: Harness, ram: GuestRam) -> None:
    emu = procs.emulator(*TWO_REGIONS, virtio_id=4)
    with connect(emu.path) as client:
        driver = VirtioDriver.probe(client, ram)
        config = driver.startup.config
        vendor, device = struct.unpack_from("<HH", config, 0)
        assert (vendor, device, config[8]) == (0x1AF4, 0x1040 + 4, 1)
        assert driver.startup.device.flags & DeviceFlags.PCI
        assert driver.startup.regions[SHMEM_BAR].info.size == 4 * MiB
        # BAR 4 is 64-bit prefetchable memory: sizing reads back ~(4 MiB - 1) | 0b1100.
        assert driver.startup.bar_sizing[SHMEM_BAR] & 0xF == 0xC
        assert bar_size(driver.startup.bar_sizing[SHMEM_BAR]) == 4 * MiB
        assert driver.startup.bar_sizing[SHMEM_BAR + 1] == 0xFFFF_FFFF
        shm = {(r.shmid, r.bar, r.offset, r.length) for r in driver.shm_regions}
        assert shm == {(0, SHMEM_BAR, 0, 2 * MiB), (1, SHMEM_BAR, 2 * MiB, 1 * MiB)}

        driver.bring_up(queues=1)
        assert driver.status == ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        common = driver.common
        assert common.bar == VIRTIO_BAR
        driver.notify(0)

        # Nothing is mapped: every width reads zeros and writes are dropped.
        for shmid, offset in ((0, 0), (0, 2 * MiB - 8), (1, 0), (1, MiB - 8)):
            for width in (1, 2, 4, 8):
                driver.shm_write(shmid, offset, b"\xa5" * width)
                assert driver.shm_read(shmid, offset, width) == bytes(width)
        # The padding after the last region up to the power-of-two BAR size reads zeros too.
        assert client.region_read(SHMEM_BAR, 4 * MiB - 8, 8) == bytes(8)
        assert client.region_read(SHMEM_BAR, 3 * MiB, 4096) == bytes(4096)
        # A queue set up and enabled cannot be reconfigured after DRIVER_OK.
        driver.common_write(QUEUE_SELECT, 0, 2)
        assert driver.common_read(QUEUE_ENABLE, 2) == 1
        driver.close_msix()
    emu.stop()


def test_no_shared_memory_means_no_bar_4(procs: Harness, ram: GuestRam) -> None:
    emu = procs.emulator(virtio_id=4)
    with connect(emu.path) as client:
        driver = VirtioDriver.probe(client, ram)
        assert driver.startup.regions[SHMEM_BAR].info.size == 0
        assert driver.startup.bar_sizing[SHMEM_BAR] == 0
        assert driver.shm_regions == ()
        with pytest.raises(VfioUserError) as refused:
            client.region_read(SHMEM_BAR, 0, 8)
        assert refused.value.errno == errno.EINVAL
    emu.stop()


def test_device_reset_and_status_zero(procs: Harness, ram: GuestRam) -> None:
    emu = procs.emulator(*TWO_REGIONS)
    with connect(emu.path) as client:
        driver = VirtioDriver.probe(client, ram)
        driver.bring_up()
        client.device_reset()
        assert driver.status == 0
        driver.common_write(QUEUE_SELECT, 0, 2)
        assert driver.common_read(QUEUE_ENABLE, 2) == 0
        assert driver.device_features() & VIRTIO_F_VERSION_1
        # The device comes up again after DEVICE_RESET, and after a status-0 reset.
        driver.close_msix()
        driver.bring_up()
        driver.common_write(DEVICE_STATUS, 0, 1)
        assert driver.status == 0
        driver.close_msix()
        driver.bring_up()
        driver.close_msix()
    emu.stop()


def test_second_client_after_the_first_disconnects(procs: Harness, ram: GuestRam) -> None:
    emu = procs.emulator(*TWO_REGIONS)
    path = str(emu.path)
    first = connect(emu.path)
    try:
        driver = VirtioDriver.probe(first, ram)
        driver.bring_up()
        driver.close_msix()
        # A second client while one is connected is turned away (closed) ...
        mark = emu.mark()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as intruder:
            intruder.settimeout(10)
            intruder.connect(path)
            assert intruder.recv(1) == b""
        emu.wait_for_log("refusing a second vfio-user client", start=mark)
        # ... and the first is still served.
        assert driver.status & DRIVER_OK
    finally:
        first.close()
    emu.wait_for_log("vfio-user client gone")
    with connect(emu.path) as second:
        driver = VirtioDriver.probe(second, ram)
        assert driver.status == 0, "the next client must find a reset device"
        driver.bring_up()
        assert driver.status & DRIVER_OK
        driver.close_msix()
    emu.stop()


class RawPeer:
    """A vfio-user client that writes bytes by hand, to send what no well-behaved client would."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.next_id = 1

    def send(
        self,
        command: int,
        payload: bytes = b"",
        *,
        size: int | None = None,
        fds: tuple[int, ...] = (),
    ) -> int:
        msg_id = self.next_id
        self.next_id += 1
        header = HEADER.pack(
            msg_id, command, HEADER_SIZE + len(payload) if size is None else size, 0, 0
        )
        data = header + payload
        if fds:
            self.sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
            )
        else:
            self.sock.sendall(data)
        return msg_id

    def recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"server closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def reply(self, msg_id: int) -> tuple[int, int, bytes]:
        """``(command, error, payload)`` of the reply to ``msg_id``."""
        rid, command, size, flags, err = HEADER.unpack(self.recv_exact(HEADER_SIZE))
        payload = self.recv_exact(size - HEADER_SIZE)
        assert rid == msg_id, (rid, msg_id)
        assert flags & 0xF == 1, f"not a reply: flags {flags:#x}"
        assert bool(flags & HeaderFlags.ERROR) == bool(err)
        return command, err, payload

    def error_of(self, msg_id: int) -> int:
        command, err, payload = self.reply(msg_id)
        assert err, f"command {command} succeeded"
        assert payload == b""
        return err

    def version(self) -> None:
        data, _ = encode(Message(Command.VERSION, 0, Version(0, 0, QEMU_CAPABILITIES)))
        self.sock.sendall(data)
        _, err, _ = self.reply(0)
        assert err == 0

    def round_trip(self) -> None:
        """DEVICE_GET_INFO: proves the server still answers on this connection."""
        info = DeviceInfo(DeviceInfo.STRUCT.size, DeviceFlags(0), 0, 0).pack()
        msg_id = self.send(Command.DEVICE_GET_INFO, info)
        _, err, payload = self.reply(msg_id)
        assert err == 0 and len(payload) == DeviceInfo.STRUCT.size

    def expect_closed(self) -> None:
        assert self.sock.recv(1) == b"", "server should have dropped the connection"

    def close(self) -> None:
        self.sock.close()


def region_access(region: int, offset: int, count: int, data: bytes = b"") -> bytes:
    return RegionAccess(offset, region, count, data).pack()


def test_bad_requests_get_fitting_error_replies(procs: Harness) -> None:
    emu = procs.emulator(*TWO_REGIONS)
    peer = RawPeer(emu.path)
    ram = os.memfd_create("ram")
    event = os.eventfd(0)
    try:
        os.ftruncate(ram, 2 * MiB)
        early = peer.send(Command.DEVICE_GET_INFO, DeviceInfo(32, DeviceFlags(0), 0, 0).pack())
        assert peer.error_of(early) == errno.EINVAL  # nothing before VERSION
        peer.version()
        peer.round_trip()
        baseline = fd_count(emu.pid)
        before = fd_targets(emu.pid)

        assert peer.error_of(peer.send(99)) == errno.ENOSYS  # unknown command
        # Payloads shorter than their struct.
        assert peer.error_of(peer.send(Command.DMA_MAP, b"\0" * 8)) == errno.EINVAL
        assert peer.error_of(peer.send(Command.REGION_READ, b"\0" * 8)) == errno.EINVAL
        assert peer.error_of(peer.send(Command.DEVICE_SET_IRQS, b"\0" * 4)) == errno.EINVAL
        # A write whose data is shorter than its count.
        short_write = region_access(VIRTIO_BAR, 0, 8, b"\0" * 4)
        assert peer.error_of(peer.send(Command.REGION_WRITE, short_write)) == errno.EINVAL
        # Regions that do not exist, offsets and counts outside a region.
        for region, offset, count in (
            (9, 0, 4),
            (3, 0, 4),  # an unimplemented BAR has size 0
            (VIRTIO_BAR, 0x4000, 4),
            (VIRTIO_BAR, 0x3FF8, 16),
            (SHMEM_BAR, 4 * MiB - 4, 8),
            (CONFIG_REGION, 0xFC, 8),
            (SHMEM_BAR, 2**64 - 4, 8),
        ):
            read = peer.send(Command.REGION_READ, region_access(region, offset, count))
            assert peer.error_of(read) == errno.EINVAL, (region, offset, count)
            payload = region_access(region, offset, count, b"\xee" * count)
            assert peer.error_of(peer.send(Command.REGION_WRITE, payload)) == errno.EINVAL
        # SET_IRQS whose start names no vector, even with count 0 (found by the fuzzer: it
        # used to surface as EIO from an unexpected exception).
        flags = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
        for index, start in ((IrqIndex.MSIX, 0xFFFF_FFFF), (IrqIndex.INTX, 1)):
            irqs = SetIrqs(20, flags, index, start, 0).pack()
            assert peer.error_of(peer.send(Command.DEVICE_SET_IRQS, irqs)) == errno.EINVAL
        huge = peer.send(Command.REGION_READ, region_access(SHMEM_BAR, 0, 2 * MiB))
        assert peer.error_of(huge) == errno.EINVAL  # beyond max_data_xfer_size
        # fds on messages that take none: refused, and the server keeps none of them.
        for command, payload in (
            (Command.DEVICE_GET_INFO, DeviceInfo(32, DeviceFlags(0), 0, 0).pack()),
            (Command.REGION_READ, region_access(VIRTIO_BAR, 0, 4)),
            (Command.DEVICE_RESET, b""),
        ):
            msg_id = peer.send(command, payload, fds=(event, ram))
            assert peer.error_of(msg_id) == errno.EINVAL, command
        # DMA_MAP takes one fd, not two.
        dma = DmaMap(32, DmaMapFlags.READ | DmaMapFlags.WRITE, 0, 0, 2 * MiB).pack()
        assert peer.error_of(peer.send(Command.DMA_MAP, dma, fds=(ram, event))) == errno.EINVAL
        # Overlapping DMA ranges.
        _, err, _ = peer.reply(peer.send(Command.DMA_MAP, dma, fds=(ram,)))
        assert err == 0
        overlap = DmaMap(32, DmaMapFlags.READ | DmaMapFlags.WRITE, 0, MiB, 2 * MiB).pack()
        assert peer.error_of(peer.send(Command.DMA_MAP, overlap, fds=(ram,))) == errno.EEXIST
        peer.round_trip()
        # The one accepted DMA_MAP holds one fd (the memfd) and one mapping; nothing else grew.
        assert fd_count(emu.pid) == baseline + 1, (before, fd_targets(emu.pid))
        _, err, _ = peer.reply(
            peer.send(Command.DMA_UNMAP, struct.pack("<IIQQ", 24, 0, 0, 2 * MiB))
        )
        assert err == 0
        assert fd_count(emu.pid) == baseline, (before, fd_targets(emu.pid))
    finally:
        peer.close()
        os.close(ram)
        os.close(event)
    emu.wait_for_log("vfio-user client gone")
    with connect(emu.path) as client:
        client.version()
        assert client.device_get_info().num_regions >= 8
    emu.stop()


@pytest.mark.parametrize(
    ("what", "size"),
    [("size below the header", 8), ("size above the maximum", DEFAULT_MAX_MSG_SIZE + 1)],
)
def test_framing_errors_drop_the_client_and_the_server_serves_the_next(
    procs: Harness, what: str, size: int
) -> None:
    emu = procs.emulator()
    peer = RawPeer(emu.path)
    try:
        peer.version()
        peer.send(Command.REGION_READ, region_access(VIRTIO_BAR, 0, 4), size=size)
        peer.expect_closed()
    finally:
        peer.close()
    emu.wait_for_log("vfio-user client gone")
    with connect(emu.path) as client:
        client.version()
        assert client.device_get_info().num_regions >= 8, what
    emu.stop()


def test_sigint_with_a_client_connected_exits_cleanly(procs: Harness) -> None:
    emu = procs.emulator(*TWO_REGIONS)
    with connect(emu.path) as client:
        client.version()
        emu.send_signal(signal.SIGINT)
        assert emu.wait_exit() == 0
        assert not emu.path.exists()
    emu.stop()


def test_trace_has_one_json_line_per_message_in_both_directions(
    procs: Harness, tmp_path: Path
) -> None:
    trace = tmp_path / "trace.jsonl"
    emu = procs.emulator("--trace", str(trace))
    with connect(emu.path) as client:
        client.version()
        client.device_get_info()
        for offset in (0, 4, 8):
            client.config_read(offset, 4)
        client.region_write(VIRTIO_BAR, 0x14, b"\x01", posted=True)  # no reply to a posted write
        with pytest.raises(VfioUserError):
            client.region_read(9, 0, 4)
        client.device_get_info()
    emu.wait_for_log("vfio-user client gone")
    emu.stop()
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert all(r["channel"] == "vfio-user" for r in records)
    inbound = [(r["id"], r["cmd"]) for r in records if r["dir"] == "in"]
    outbound = [(r["id"], r["cmd"]) for r in records if r["dir"] == "out"]
    assert inbound == [
        (0, "VERSION"),
        (1, "DEVICE_GET_INFO"),
        (2, "REGION_READ"),
        (3, "REGION_READ"),
        (4, "REGION_READ"),
        (5, "REGION_WRITE"),
        (6, "REGION_READ"),
        (7, "DEVICE_GET_INFO"),
    ]
    assert outbound == [item for item in inbound if item[0] != 5]
    error = next(r for r in records if r["dir"] == "out" and r["id"] == 6)
    assert error["error"] == errno.EINVAL
    write = next(r for r in records if r["id"] == 5)
    assert write["payload"]["offset"] == 0x14 and write["payload"]["data"] == {"len": 1}


def test_trace_records_refused_messages_and_framing_errors(procs: Harness, tmp_path: Path) -> None:
    """What the codec refuses is traced with its raw header, fd count and reason; a framing
    error too, though it ends the connection."""
    trace = tmp_path / "trace.jsonl"
    emu = procs.emulator("--trace", str(trace))
    peer = RawPeer(emu.path)
    event = os.eventfd(0)
    try:
        peer.version()
        unknown = peer.send(0x7777, b"\0" * 8)
        assert peer.error_of(unknown) == errno.ENOSYS
        extra_fd = peer.send(Command.DEVICE_GET_INFO, bytes(32), fds=(event,))
        assert peer.error_of(extra_fd)
        peer.send(Command.DEVICE_GET_INFO, size=HEADER_SIZE - 1)  # framing lost
        peer.expect_closed()
    finally:
        os.close(event)
        peer.close()
    emu.wait_for_log("vfio-user client gone")
    emu.stop()
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    refused = [r for r in records if r["dir"] == "in" and r["cmd"].startswith("invalid:")]
    assert [r["cmd"] for r in refused] == [
        "invalid:30583",
        "invalid:DEVICE_GET_INFO",
        "invalid:DEVICE_GET_INFO",
    ]
    first, second, framing = refused
    assert first["id"] == unknown and first["header"] == {"request": 0x7777, "flags": 0, "size": 24}
    assert first["error"] == errno.ENOSYS and "unknown command" in first["reason"]
    assert first["fatal"] is False and "nfds" not in first
    assert second["id"] == extra_fd and second["nfds"] == 1 and "fds" in second["reason"]
    assert framing["fatal"] is True and framing["size"] == HEADER_SIZE - 1
    assert "message size" in framing["reason"]
    # Each refused command got its error reply traced too; the framing error got none.
    replies = [(r["id"], r["cmd"]) for r in records if r["dir"] == "out" and "id" in r]
    assert (unknown, "invalid:30583") in replies and (
        extra_fd,
        "invalid:DEVICE_GET_INFO",
    ) in replies
