"""A small virtio-pci modern driver over the QEMU-like vfio-user client.

It does what Linux's ``virtio_pci_modern`` does, in the same order, so an integration test
exercises the device the way a guest would without booting one: decode the capabilities from
config space (``vguest.caps``), reset, ACKNOWLEDGE, DRIVER, negotiate features through the
select windows, FEATURES_OK (checked to have latched), set up split virtqueues in guest RAM the
test owns (a memfd passed with DMA_MAP), give MSI-X eventfds with SET_IRQS, DRIVER_OK, notify.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from vguest.caps import VIRTIO_PCI_CAP, CapReport, ShmRegion, VirtioCap, parse

from emulator.vfio_user.client import StartupInfo, VfioUserClient
from emulator.vfio_user.messages import IrqIndex, IrqSetFlags

# Device status bits and common-config field offsets (virtio 1.x, 2.1 and 4.1.4.3).
ACKNOWLEDGE = 0x01
DRIVER = 0x02
DRIVER_OK = 0x04
FEATURES_OK = 0x08
DEVICE_NEEDS_RESET = 0x40
FAILED = 0x80

DEVICE_FEATURE_SELECT = 0x00
DEVICE_FEATURE = 0x04
DRIVER_FEATURE_SELECT = 0x08
DRIVER_FEATURE = 0x0C
CONFIG_MSIX_VECTOR = 0x10
NUM_QUEUES = 0x12
DEVICE_STATUS = 0x14
CONFIG_GENERATION = 0x15
QUEUE_SELECT = 0x16
QUEUE_SIZE = 0x18
QUEUE_MSIX_VECTOR = 0x1A
QUEUE_ENABLE = 0x1C
QUEUE_NOTIFY_OFF = 0x1E
QUEUE_DESC = 0x20
QUEUE_DRIVER = 0x28
QUEUE_DEVICE = 0x30

VIRTIO_F_VERSION_1 = 1 << 32
NO_VECTOR = 0xFFFF
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2

PCI_CAP_ID_MSIX = 0x11
MSIX_FLAGS_ENABLE = 0x8000
SHMEM_BAR = 4

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class DriverError(AssertionError):
    """The device did not behave as a driver requires (a test failure, with context)."""


class GuestRam:
    """Guest RAM: a memfd the test owns and maps, with a bump allocator for rings and buffers."""

    def __init__(self, size: int = 4 << 20) -> None:
        self.size = size
        self.fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mem = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self._next = 0x1000  # keep GPA 0 unused, as a real guest's page zero

    def alloc(self, size: int, align: int = 16) -> int:
        address = (self._next + align - 1) & ~(align - 1)
        if address + size > self.size:
            raise MemoryError(f"guest RAM exhausted allocating {size} bytes")
        self._next = address + size
        return address

    def read(self, gpa: int, size: int) -> bytes:
        return self.mem[gpa : gpa + size]

    def write(self, gpa: int, data: bytes) -> None:
        self.mem[gpa : gpa + len(data)] = data

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Virtqueue:
    """A split virtqueue in ``ram``: descriptor table, available ring, used ring."""

    ram: GuestRam
    index: int
    size: int
    vector: int
    desc: int
    driver: int
    device: int
    notify_off: int = 0
    free: list[int] = field(default_factory=list)
    avail_idx: int = 0
    last_used: int = 0

    @classmethod
    def allocate(cls, ram: GuestRam, index: int, size: int, vector: int) -> Virtqueue:
        desc = ram.alloc(16 * size, 16)
        driver = ram.alloc(6 + 2 * size, 2)
        device = ram.alloc(6 + 8 * size, 4)
        return cls(ram, index, size, vector, desc, driver, device, free=list(range(size)))

    def add(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Put a chain of ``(gpa, length, device_writable)`` buffers on the available ring;
        returns its head (the barrier is the socket round trip that follows)."""
        if not buffers or len(buffers) > len(self.free):
            raise DriverError(f"cannot add a chain of {len(buffers)} to queue {self.index}")
        ids = [self.free.pop(0) for _ in buffers]
        for position, (gpa, length, writable) in enumerate(buffers):
            flags = VIRTQ_DESC_F_WRITE if writable else 0
            following = 0
            if position + 1 < len(buffers):
                flags |= VIRTQ_DESC_F_NEXT
                following = ids[position + 1]
            _DESC.pack_into(
                self.ram.mem, self.desc + 16 * ids[position], gpa, length, flags, following
            )
        slot = self.avail_idx % self.size
        struct.pack_into("<H", self.ram.mem, self.driver + 4 + 2 * slot, ids[0])
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.ram.mem, self.driver + 2, self.avail_idx)
        return ids[0]

    @property
    def used_idx(self) -> int:
        value: int = struct.unpack_from("<H", self.ram.mem, self.device + 2)[0]
        return value

    def pop_used(self) -> tuple[int, int] | None:
        """The next ``(id, len)`` from the used ring, if the device put one there."""
        if self.used_idx == self.last_used:
            return None
        slot = self.last_used % self.size
        head, length = _USED_ELEM.unpack_from(self.ram.mem, self.device + 4 + 8 * slot)
        self.last_used = (self.last_used + 1) & 0xFFFF
        self._release(head)
        return head, length

    def _release(self, head: int) -> None:
        current = head
        while True:
            self.free.append(current)
            _, _, flags, following = _DESC.unpack_from(self.ram.mem, self.desc + 16 * current)
            if not flags & VIRTQ_DESC_F_NEXT:
                return
            current = following


def wait_eventfd(fd: int, timeout: float) -> int:
    """Wait for an eventfd to be signalled and consume it; fails after ``timeout`` seconds."""
    readable, _, _ = select.select([fd], [], [], timeout)
    if not readable:
        raise DriverError(f"eventfd {fd} not signalled within {timeout} s")
    return os.eventfd_read(fd)


def eventfd_signalled(fd: int) -> bool:
    """Whether the eventfd is signalled now (consuming it), without waiting."""
    readable, _, _ = select.select([fd], [], [], 0)
    if readable:
        os.eventfd_read(fd)
    return bool(readable)


class VirtioDriver:
    """Drives one virtio-pci modern function through ``client`` as Linux does."""

    def __init__(self, client: VfioUserClient, startup: StartupInfo, ram: GuestRam) -> None:
        self.client = client
        self.startup = startup
        self.ram = ram
        self.caps: CapReport = parse(startup.config)
        if not self.caps.ok:
            raise DriverError(f"bad capabilities: {[str(f) for f in self.caps.findings]}")
        self.common = self._cap(VIRTIO_PCI_CAP.COMMON_CFG)
        self.notify_cap = self._cap(VIRTIO_PCI_CAP.NOTIFY_CFG)
        self.isr_cap = self._cap(VIRTIO_PCI_CAP.ISR_CFG)
        self.queues: dict[int, Virtqueue] = {}
        self.msix_fds: list[int] = []

    @classmethod
    def probe(cls, client: VfioUserClient, ram: GuestRam) -> VirtioDriver:
        """QEMU's realize sequence (RAM mapped at GPA 0), then the driver's view of the caps."""
        return cls(client, client.startup(ram.fd, ram.size), ram)

    def _cap(self, cfg_type: VIRTIO_PCI_CAP) -> VirtioCap:
        for cap in self.caps.virtio:
            if cap.cfg_type == cfg_type:
                return cap
        raise DriverError(f"no {cfg_type.name} capability")

    # -- register access ---------------------------------------------------------------------

    def bar_read(self, bar: int, offset: int, width: int) -> int:
        return int.from_bytes(self.client.region_read(bar, offset, width), "little")

    def bar_write(
        self, bar: int, offset: int, value: int, width: int, *, posted: bool = False
    ) -> None:
        self.client.region_write(bar, offset, value.to_bytes(width, "little"), posted=posted)

    def common_read(self, field_offset: int, width: int) -> int:
        return self.bar_read(self.common.bar, self.common.offset + field_offset, width)

    def common_write(self, field_offset: int, value: int, width: int) -> None:
        self.bar_write(self.common.bar, self.common.offset + field_offset, value, width)

    def device_cfg_read(self, offset: int, size: int) -> bytes:
        """Bytes of the device-specific config window (VIRTIO_PCI_CAP_DEVICE_CFG)."""
        cap = self._cap(VIRTIO_PCI_CAP.DEVICE_CFG)
        return self.client.region_read(cap.bar, cap.offset + offset, size)

    @property
    def status(self) -> int:
        return self.common_read(DEVICE_STATUS, 1)

    def add_status(self, bits: int) -> None:
        self.common_write(DEVICE_STATUS, self.status | bits, 1)

    def isr(self) -> int:
        return self.bar_read(self.isr_cap.bar, self.isr_cap.offset, 1)

    # -- initialisation (virtio 1.x 3.1.1) -----------------------------------------------------

    def reset(self) -> None:
        """Write 0 and wait for it to read back 0, as vp_reset does."""
        self.common_write(DEVICE_STATUS, 0, 1)
        if self.status != 0:
            raise DriverError(f"status {self.status:#x} after reset")

    def device_features(self) -> int:
        features = 0
        for word in (0, 1):
            self.common_write(DEVICE_FEATURE_SELECT, word, 4)
            features |= self.common_read(DEVICE_FEATURE, 4) << (32 * word)
        return features

    def write_driver_features(self, features: int) -> None:
        for word in (0, 1):
            self.common_write(DRIVER_FEATURE_SELECT, word, 4)
            self.common_write(DRIVER_FEATURE, (features >> (32 * word)) & 0xFFFF_FFFF, 4)

    def negotiate(self, wanted: int = VIRTIO_F_VERSION_1) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, accept ``wanted & offered``, FEATURES_OK (checked)."""
        self.reset()
        self.add_status(ACKNOWLEDGE)
        self.add_status(DRIVER)
        offered = self.device_features()
        if not offered & VIRTIO_F_VERSION_1:
            raise DriverError(f"device features {offered:#x} lack VIRTIO_F_VERSION_1")
        accepted = offered & wanted
        self.write_driver_features(accepted)
        self.add_status(FEATURES_OK)
        if not self.status & FEATURES_OK:
            raise DriverError(f"FEATURES_OK did not latch for {accepted:#x}")
        return accepted

    def enable_msix(self, count: int | None = None) -> list[int]:
        """Enable MSI-X in config space and hand the server one eventfd per vector, as QEMU
        does when the guest enables MSI-X (SET_IRQS index 2, DATA_EVENTFD|ACTION_TRIGGER)."""
        cap = next(c.offset for c in self.caps.caps if c.cap_id == PCI_CAP_ID_MSIX)
        control = self.client.config_read(cap + 2, 2)
        self.client.config_write(cap + 2, control | MSIX_FLAGS_ENABLE, 2)
        vectors = (control & 0x7FF) + 1 if count is None else count
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(vectors)]
        try:
            self.client.set_irqs(
                IrqIndex.MSIX,
                IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER,
                0,
                vectors,
                fds=fds,
            )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.close_msix()
        self.msix_fds = fds
        return fds

    def set_config_vector(self, vector: int) -> None:
        self.common_write(CONFIG_MSIX_VECTOR, vector, 2)
        if self.common_read(CONFIG_MSIX_VECTOR, 2) != vector:
            raise DriverError(f"config vector {vector} refused")

    def setup_queue(
        self, index: int, size: int | None = None, vector: int = NO_VECTOR
    ) -> Virtqueue:
        """Select, size, vector (read back), ring addresses, enable: vp_modern's setup_vq."""
        self.common_write(QUEUE_SELECT, index, 2)
        max_size = self.common_read(QUEUE_SIZE, 2)
        if max_size == 0:
            raise DriverError(f"queue {index} is not available")
        if self.common_read(QUEUE_ENABLE, 2):
            raise DriverError(f"queue {index} already enabled")
        size = max_size if size is None else size
        self.common_write(QUEUE_SIZE, size, 2)
        if self.common_read(QUEUE_SIZE, 2) != size:
            raise DriverError(f"queue {index}: size {size} refused (max {max_size})")
        queue = Virtqueue.allocate(self.ram, index, size, vector)
        self.common_write(QUEUE_MSIX_VECTOR, vector, 2)
        if self.common_read(QUEUE_MSIX_VECTOR, 2) != vector:
            raise DriverError(f"queue {index}: vector {vector} refused")
        self.common_write(QUEUE_DESC, queue.desc, 8)
        self.common_write(QUEUE_DRIVER, queue.driver, 8)
        self.common_write(QUEUE_DEVICE, queue.device, 8)
        queue.notify_off = self.common_read(QUEUE_NOTIFY_OFF, 2)
        self.common_write(QUEUE_ENABLE, 1, 2)
        if self.common_read(QUEUE_ENABLE, 2) != 1:
            raise DriverError(f"queue {index} did not enable")
        self.queues[index] = queue
        return queue

    def driver_ok(self) -> None:
        self.add_status(DRIVER_OK)
        status = self.status
        if not status & DRIVER_OK or status & DEVICE_NEEDS_RESET:
            raise DriverError(f"status {status:#x} after DRIVER_OK")

    def bring_up(self, queues: int = 1, queue_size: int | None = None) -> list[Virtqueue]:
        """The whole probe: negotiate, MSI-X (config vector 0, queue n vector n+1), queues,
        DRIVER_OK."""
        self.negotiate()
        self.enable_msix()
        self.set_config_vector(0)
        rings = [self.setup_queue(i, queue_size, vector=i + 1) for i in range(queues)]
        self.driver_ok()
        return rings

    def notify(self, index: int, *, posted: bool = True) -> None:
        """16-bit write of the queue index at notify offset + queue_notify_off * multiplier."""
        queue = self.queues[index]
        multiplier = self.notify_cap.notify_off_multiplier or 0
        offset = self.notify_cap.offset + queue.notify_off * multiplier
        self.bar_write(self.notify_cap.bar, offset, index, 2, posted=posted)

    def wait_used(self, index: int, timeout: float = 10.0) -> tuple[int, int]:
        """Wait for the queue's MSI-X eventfd, then take the used element it announced."""
        queue = self.queues[index]
        fd = self.msix_fds[queue.vector]
        while (element := queue.pop_used()) is None:
            wait_eventfd(fd, timeout)
        return element

    # -- shared memory -------------------------------------------------------------------------

    @property
    def shm_regions(self) -> tuple[ShmRegion, ...]:
        return self.caps.shm_regions

    def shm_region(self, shmid: int) -> ShmRegion:
        region = self.caps.shm_region(shmid)
        if region is None:
            raise DriverError(f"no shared memory region {shmid}")
        return region

    def shm_read(self, shmid: int, offset: int, width: int) -> bytes:
        """One exact-width guest read at ``offset`` inside region ``shmid``."""
        region = self.shm_region(shmid)
        return self.client.region_read(region.bar, region.offset + offset, width)

    def shm_wait_for(self, shmid: int, offset: int, want: bytes, timeout: float = 5.0) -> bytes:
        """What ``len(want)`` bytes at ``offset`` read once they read ``want``, or after
        ``timeout``: a back-end may map in answer to a reset from a thread of its own (the
        library's persistent mappings), so that map can land just after the reset's last
        reply, as it can in a guest."""
        deadline = time.monotonic() + timeout
        while (data := self.shm_read(shmid, offset, len(want))) != want:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        return data

    def shm_write(self, shmid: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        region = self.shm_region(shmid)
        self.client.region_write(region.bar, region.offset + offset, data, posted=posted)

    def close_msix(self) -> None:
        for fd in self.msix_fds:
            os.close(fd)
        self.msix_fds = []


@contextlib.contextmanager
def probed_guest(
    vfio_user_socket: str | os.PathLike[str], ram_size: int = 2 << 20, timeout: float = 15.0
) -> Iterator[VirtioDriver]:
    """A connected client with RAM mapped and the device probed (not yet initialised); its
    MSI-X eventfds are closed on the way out."""
    with (
        GuestRam(ram_size) as ram,
        VfioUserClient.connect(os.fspath(vfio_user_socket), timeout=timeout) as client,
    ):
        driver = VirtioDriver.probe(client, ram)
        try:
            yield driver
        finally:
            driver.close_msix()
