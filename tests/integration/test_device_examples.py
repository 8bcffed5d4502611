"""The device kit's examples (``vhost_user_backend/devices/examples/``) as processes behind the
real emulator, with the QEMU-like vfio-user client and the virtio driver playing the guest: the
framebuffer's header and a frame counter that moves, the doorbell's round trip (a buffer on the
queue, a record in the ring, the new head in the buffer), and both surviving a device reset.
"""

from __future__ import annotations

import struct
import sys
import time

from testkit import LISTENING_LINE, Harness, Process
from testkit.virtio_driver import DEVICE_STATUS, VirtioDriver, probed_guest
from tests.helpers.processes import procs
from vhost_user_backend.devices.examples import doorbell, framebuffer

__all__ = ["procs"]

MiB = 1 << 20


def start_example(procs: Harness, module: str, *args: str) -> Process:
    """``python -m vhost_user_backend.devices.examples.MODULE`` on a socket in the workdir."""
    path = procs.workdir / f"{module}.sock"
    argv = [sys.executable, "-m", f"vhost_user_backend.devices.examples.{module}"]
    proc = procs.start(module, [*argv, "--socket-path", str(path), *args], socket_path=path)
    proc.wait_for_log(LISTENING_LINE + str(path))
    return proc


def u64(data: bytes) -> int:
    return int.from_bytes(data, "little")


def frame_counter(driver: VirtioDriver) -> int:
    return u64(driver.shm_read(0, framebuffer.FRAME_OFFSET, 8))


def test_framebuffer_header_and_a_moving_frame_counter_across_a_reset(procs: Harness) -> None:
    back = start_example(procs, "framebuffer", "--width", "320", "--height", "200", "--fps", "50")
    emu = procs.emulator("--vhost-user-socket", str(back.path))
    with probed_guest(emu.path) as driver:
        assert [r.length for r in driver.shm_regions] == [framebuffer.REGION_SIZE]
        driver.bring_up()
        header = b"".join(driver.shm_read(0, off, 4) for off in range(0, 24, 4))
        magic, width, height, stride, fmt, _ = framebuffer.HEADER.unpack(header + bytes(8))
        assert (magic, width, height, stride) == (b"VFB0", 320, 200, 1280)
        assert fmt.to_bytes(4, "little") == b"XR24"
        first = frame_counter(driver)
        time.sleep(0.3)
        second = frame_counter(driver)
        assert second > first > 0
        # The bar's newest row is drawn before the counter moves past it.
        row = framebuffer.PIXELS_OFFSET + (second % 200) * 1280
        assert u64(driver.shm_read(0, row, 4)) & 0xFFFFFF00 == 0x00FF8000
        # A reset drops every mapping; the persistent one is back without the device asking.
        driver.common_write(DEVICE_STATUS, 0, 1)
        assert driver.status == 0
        assert driver.shm_wait_for(0, 0, b"VFB0") == b"VFB0"
        assert frame_counter(driver) >= second
    back.stop()


def test_doorbell_round_trip_writes_a_record_and_returns_the_head(procs: Harness) -> None:
    back = start_example(procs, "doorbell")
    emu = procs.emulator("--vhost-user-socket", str(back.path))
    with probed_guest(emu.path) as driver:
        (queue,) = driver.bring_up()
        assert driver.shm_read(0, 0, 4) == b"VDB0"
        assert u64(driver.shm_read(0, doorbell.HEAD_OFFSET, 8)) == 0
        buffers = [driver.ram.alloc(64) for _ in range(3)]
        for n, gpa in enumerate(buffers, start=1):
            head = queue.add([(gpa, 64, True)])
            driver.notify(0)
            assert driver.wait_used(0) == (head, 16)
            assert driver.ram.read(gpa, 16) == b"DOORBELL" + n.to_bytes(8, "little")
            assert u64(driver.shm_read(0, doorbell.HEAD_OFFSET, 8)) == n
            record = b"".join(
                driver.shm_read(0, doorbell.record_offset(n) + off, 8) for off in range(0, 32, 8)
            )
            seq, ns, offered = doorbell.RECORD.unpack(record)
            assert (seq, offered) == (n, 64) and ns > 0
        # A short buffer gets as much of the answer as fits, and is a ring all the same.
        short = driver.ram.alloc(8)
        head = queue.add([(short, 8, True)])
        driver.notify(0)
        assert driver.wait_used(0) == (head, 8)
        assert driver.ram.read(short, 8) == b"DOORBELL"
        assert u64(driver.shm_read(0, doorbell.HEAD_OFFSET, 8)) == 4
        # After a device reset the ring is mapped again and keeps its records.
        driver.common_write(DEVICE_STATUS, 0, 1)
        assert driver.status == 0
        assert u64(driver.shm_wait_for(0, doorbell.HEAD_OFFSET, (4).to_bytes(8, "little"))) == 4
    back.stop()


def test_doorbell_ring_wraps() -> None:
    """Record n lands in slot (n - 1) % capacity: the first slot again after a full ring."""
    device = doorbell.DoorbellDevice()
    try:
        for _ in range(doorbell.CAPACITY + 1):
            device.append(64)
        assert struct.unpack_from("<Q", device.ring, doorbell.HEAD_OFFSET)[0] == device.head
        seq, _, _ = doorbell.RECORD.unpack_from(device.ring, doorbell.RECORDS_OFFSET)
        assert seq == doorbell.CAPACITY + 1
        assert doorbell.record_offset(doorbell.CAPACITY + 1) == doorbell.RECORDS_OFFSET
    finally:
        device.close()
