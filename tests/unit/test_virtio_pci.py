"""VirtioPciDevice driven the way Linux's virtio_pci_modern driver drives it.

The driver side only uses what a guest has: config space bytes (walked from the capability
pointer) and BAR accesses at the offsets the capabilities give. The back-end is a recording
fake; interrupts go through real eventfds.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.errors import BackendFailure
from emulator.pci.config import PciCapId, PciCommand, PciReg, PciStatus
from emulator.pci.device import IrqIndex, PciDevice, RegionIndex, RegionPermission
from emulator.pci.virtio_pci import (
    CommonCfg,
    VirtioPciCapType,
    VirtioPciDevice,
    class_code_for,
    msix_bar_layout,
)
from emulator.shmem.layout import ShmemLayout
from emulator.virtio.device import QueueConfig
from emulator.virtio.state import NO_VECTOR, DeviceStatus, VirtioDeviceId, VirtioFeature

MiB = 1 << 20
F_VERSION_1 = 1 << VirtioFeature.VERSION_1
F_EVENT_IDX = 1 << VirtioFeature.EVENT_IDX
F_RING_PACKED = 1 << VirtioFeature.RING_PACKED
F_RING_RESET = 1 << VirtioFeature.RING_RESET
F_DEVICE_BIT0 = 1 << 0


@dataclass
class FakeDevice:
    """Records every call; ``fail_activate`` simulates a back-end that went away."""

    virtio_id: int = VirtioDeviceId.FS
    num_queues: int = 2
    max_queue_size: int = 256
    device_features: int = F_DEVICE_BIT0 | F_EVENT_IDX | F_RING_PACKED | F_RING_RESET
    config_size: int = 40
    config: bytearray = field(default_factory=lambda: bytearray(range(40)))
    activations: list[tuple[int, tuple[QueueConfig, ...]]] = field(default_factory=list)
    deactivations: int = 0
    resets: int = 0
    kicks: list[int] = field(default_factory=list)
    fail_activate: bool = False

    def read_config(self, offset: int, size: int) -> bytes:
        assert offset >= 0 and offset + size <= self.config_size
        return bytes(self.config[offset : offset + size])

    def write_config(self, offset: int, data: bytes) -> None:
        assert offset >= 0 and offset + len(data) <= self.config_size
        self.config[offset : offset + len(data)] = data

    def activate(self, driver_features: int, queues: Sequence[QueueConfig]) -> None:
        if self.fail_activate:
            raise BackendFailure("back-end disconnected")
        self.activations.append((driver_features, tuple(queues)))

    def deactivate(self) -> None:
        self.deactivations += 1

    def reset(self) -> None:
        self.resets += 1

    def kick(self, queue: int) -> None:
        self.kicks.append(queue)


@dataclass
class FakeShmem:
    data: bytearray
    writes: list[tuple[int, bytes]] = field(default_factory=list)

    def read(self, bar_offset: int, size: int) -> bytes:
        return bytes(self.data[bar_offset : bar_offset + size])

    def write(self, bar_offset: int, data: bytes) -> None:
        self.writes.append((bar_offset, data))
        self.data[bar_offset : bar_offset + len(data)] = data

    def reset(self) -> None:
        self.data[:] = bytes(len(self.data))

    def __len__(self) -> int:
        return 1 if any(self.data) else 0


@dataclass(frozen=True)
class Region:
    shmid: int
    bar_offset: int
    size: int


@dataclass(frozen=True)
class Layout:
    bar_size: int
    regions: tuple[Region, ...]


@dataclass(frozen=True)
class Cap:
    pos: int
    cfg_type: int
    bar: int
    cap_id: int
    offset: int
    length: int
    cap_len: int


class Driver:
    """The accesses Linux's virtio_pci_modern_dev.c makes, at the widths it makes them."""

    def __init__(self, dev: VirtioPciDevice) -> None:
        self.dev = dev
        self.caps = self.find_vendor_caps()
        self.common = self.cap(VirtioPciCapType.COMMON_CFG)
        self.isr = self.cap(VirtioPciCapType.ISR_CFG)
        self.notify = self.cap(VirtioPciCapType.NOTIFY_CFG)
        self.notify_multiplier = self.cfg32(self.notify.pos + 16)

    # config space
    def cfg(self, offset: int, size: int) -> int:
        return int.from_bytes(self.dev.region_read(RegionIndex.CONFIG, offset, size), "little")

    def cfg8(self, offset: int) -> int:
        return self.cfg(offset, 1)

    def cfg32(self, offset: int) -> int:
        return self.cfg(offset, 4)

    def cfg_write(self, offset: int, value: int, size: int) -> None:
        self.dev.region_write(RegionIndex.CONFIG, offset, value.to_bytes(size, "little"))

    def walk(self) -> Iterator[tuple[int, int]]:
        assert self.cfg(PciReg.STATUS, 2) & PciStatus.CAP_LIST
        pos = self.cfg8(PciReg.CAPABILITY_LIST)
        seen = set()
        while pos:
            assert pos not in seen and 0x40 <= pos < 0x100
            seen.add(pos)
            yield pos, self.cfg8(pos)
            pos = self.cfg8(pos + 1)

    def find_vendor_caps(self) -> list[Cap]:
        caps = []
        for pos, cap_id in self.walk():
            if cap_id != PciCapId.VNDR:
                continue
            caps.append(
                Cap(
                    pos=pos,
                    cap_len=self.cfg8(pos + 2),
                    cfg_type=self.cfg8(pos + 3),
                    bar=self.cfg8(pos + 4),
                    cap_id=self.cfg8(pos + 5),
                    offset=self.cfg32(pos + 8),
                    length=self.cfg32(pos + 12),
                )
            )
        return caps

    def cap(self, cfg_type: int) -> Cap:
        """virtio_pci_find_capability: first cap of the type whose BAR exists."""
        if cfg_type == VirtioPciCapType.PCI_CFG:  # its BAR field is the driver's to set
            return next(cap for cap in self.caps if cap.cfg_type == cfg_type)
        for cap in self.caps:
            usable = cap.bar <= 5 and self.dev.region_info(cap.bar).size > 0
            if cap.cfg_type == cfg_type and usable:
                return cap
        raise AssertionError(f"no capability of type {cfg_type}")

    # BAR access through a capability
    def read(self, cap: Cap, offset: int, size: int) -> int:
        data = self.dev.region_read(cap.bar, cap.offset + offset, size)
        assert len(data) == size
        return int.from_bytes(data, "little")

    def write(self, cap: Cap, offset: int, value: int, size: int) -> None:
        self.dev.region_write(cap.bar, cap.offset + offset, value.to_bytes(size, "little"))

    def common_read(self, reg: int, size: int) -> int:
        return self.read(self.common, reg, size)

    def common_write(self, reg: int, value: int, size: int) -> None:
        self.write(self.common, reg, value, size)

    # vp_modern_* helpers
    def get_status(self) -> int:
        return self.common_read(CommonCfg.DEVICE_STATUS, 1)

    def add_status(self, bit: int) -> None:
        self.common_write(CommonCfg.DEVICE_STATUS, self.get_status() | bit, 1)

    def reset(self) -> None:
        self.common_write(CommonCfg.DEVICE_STATUS, 0, 1)
        for _ in range(3):
            if self.get_status() == 0:
                return
        raise AssertionError("device did not reset")

    def get_features(self) -> int:
        self.common_write(CommonCfg.DEVICE_FEATURE_SELECT, 0, 4)
        low = self.common_read(CommonCfg.DEVICE_FEATURE, 4)
        self.common_write(CommonCfg.DEVICE_FEATURE_SELECT, 1, 4)
        return low | self.common_read(CommonCfg.DEVICE_FEATURE, 4) << 32

    def set_features(self, features: int) -> None:
        self.common_write(CommonCfg.DRIVER_FEATURE_SELECT, 0, 4)
        self.common_write(CommonCfg.DRIVER_FEATURE, features & 0xFFFF_FFFF, 4)
        self.common_write(CommonCfg.DRIVER_FEATURE_SELECT, 1, 4)
        self.common_write(CommonCfg.DRIVER_FEATURE, features >> 32, 4)

    def negotiate(self, features: int) -> bool:
        self.reset()
        self.add_status(DeviceStatus.ACKNOWLEDGE)
        self.add_status(DeviceStatus.DRIVER)
        self.set_features(features)
        self.add_status(DeviceStatus.FEATURES_OK)
        return bool(self.get_status() & DeviceStatus.FEATURES_OK)

    def config_vector(self, vector: int) -> int:
        self.common_write(CommonCfg.CONFIG_MSIX_VECTOR, vector, 2)
        return self.common_read(CommonCfg.CONFIG_MSIX_VECTOR, 2)

    def setup_queue(self, index: int, size: int, vector: int, base: int) -> int:
        """vp_modern setup_vq + vp_active_vq; returns the notify offset in the BAR."""
        self.common_write(CommonCfg.QUEUE_SELECT, index, 2)
        assert self.common_read(CommonCfg.QUEUE_SIZE, 2) >= size
        assert self.common_read(CommonCfg.QUEUE_ENABLE, 2) == 0
        self.common_write(CommonCfg.QUEUE_SIZE, size, 2)
        self.common_write(CommonCfg.QUEUE_MSIX_VECTOR, vector, 2)
        assert self.common_read(CommonCfg.QUEUE_MSIX_VECTOR, 2) == vector
        for reg, addr in (
            (CommonCfg.QUEUE_DESC, base),
            (CommonCfg.QUEUE_DRIVER, base + 0x1000),
            (CommonCfg.QUEUE_DEVICE, base + 0x2000),
        ):
            self.common_write(reg, addr & 0xFFFF_FFFF, 4)  # vp_iowrite64_twopart
            self.common_write(reg + 4, addr >> 32, 4)
        notify_off = self.common_read(CommonCfg.QUEUE_NOTIFY_OFF, 2)
        self.common_write(CommonCfg.QUEUE_ENABLE, 1, 2)
        return notify_off * self.notify_multiplier

    def kick(self, notify_offset: int, index: int) -> None:
        self.write(self.notify, notify_offset, index, 2)  # iowrite16(vq->index)

    def read_isr(self) -> int:
        return self.read(self.isr, 0, 1)


def make(
    backend: FakeDevice | None = None,
    layout: Layout | ShmemLayout | None = None,
    shmem: FakeShmem | None = None,
) -> tuple[VirtioPciDevice, FakeDevice]:
    backend = backend or FakeDevice()
    return VirtioPciDevice(backend, shmem_layout=layout, shmem=shmem), backend


def eventfds(count: int) -> list[int]:
    return [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(count)]


def fired(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def bring_up(drv: Driver, features: int = F_VERSION_1 | F_DEVICE_BIT0) -> int:
    assert drv.negotiate(features)
    assert drv.config_vector(0) == 0
    notify = drv.setup_queue(0, 128, 1, 0x1_2345_6000)
    drv.add_status(DeviceStatus.DRIVER_OK)
    return notify


# Identity, regions, interrupts


def test_is_a_pci_device() -> None:
    dev, _ = make()
    device: PciDevice = dev
    assert device.msix.count == 3


def test_identity_as_linux_and_qemu_expect() -> None:
    dev, backend = make()
    drv = Driver(dev)
    assert drv.cfg(PciReg.VENDOR_ID, 2) == 0x1AF4
    assert drv.cfg(PciReg.DEVICE_ID, 2) == 0x1040 + VirtioDeviceId.FS
    assert drv.cfg8(PciReg.REVISION_ID) == 1
    assert drv.cfg(PciReg.CLASS_PROG, 3) == 0x018000
    assert drv.cfg(PciReg.SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4
    assert drv.cfg(PciReg.SUBSYSTEM_ID, 2) == 0x1100
    assert drv.cfg8(PciReg.INTERRUPT_PIN) == 1
    assert drv.cfg8(PciReg.HEADER_TYPE) == 0
    del backend


@pytest.mark.parametrize(
    ("virtio_id", "class_code"),
    [(1, 0x020000), (2, 0x010000), (4, 0xFF0000), (26, 0x018000), (99, 0xFF0000)],
)
def test_class_codes(virtio_id: int, class_code: int) -> None:
    assert class_code_for(virtio_id) == class_code


def test_region_info_and_irq_count() -> None:
    dev, _ = make()
    info = {i: dev.region_info(i) for i in range(9)}
    assert info[RegionIndex.CONFIG].size == 256
    assert info[RegionIndex.CONFIG].access == RegionPermission.READ | RegionPermission.WRITE
    assert info[1].size == 0x1000
    assert info[2].size == 0x4000
    for absent in (0, 3, 4, 5, RegionIndex.ROM, RegionIndex.VGA):
        assert info[absent].size == 0
        assert info[absent].access == RegionPermission.NONE
    assert dev.irq_count(IrqIndex.INTX) == 1
    assert dev.irq_count(IrqIndex.MSI) == 0
    assert dev.irq_count(IrqIndex.MSIX) == 3
    assert dev.irq_count(IrqIndex.ERR) == 1
    assert dev.irq_count(IrqIndex.REQ) == 1
    assert dev.irq_count(7) == 0


def bar_size(drv: Driver, index: int) -> tuple[int, int]:
    """Linux's __pci_read_base: save, write ~0 (both halves for 64-bit), read, restore."""
    reg = PciReg.BASE_ADDRESS_0 + 4 * index
    low = drv.cfg32(reg)
    is_64 = low & 0x6 == 0x4
    drv.cfg_write(reg, 0xFFFF_FFFF, 4)
    mask = drv.cfg32(reg) & ~0xF
    if is_64:
        drv.cfg_write(reg + 4, 0xFFFF_FFFF, 4)
        mask |= drv.cfg32(reg + 4) << 32
        width = 64
    else:
        width = 32
    drv.cfg_write(reg, low, 4)
    size = (~mask + 1) & ((1 << width) - 1) if mask else 0
    return size, low & 0xF


def test_bars_size_like_qemu_virtio_pci() -> None:
    dev, _ = make(layout=ShmemLayout.from_sizes({0: 2 * MiB, 1: MiB}), shmem=FakeShmem(bytearray()))
    drv = Driver(dev)
    assert bar_size(drv, 0) == (0, 0)
    assert bar_size(drv, 1) == (0x1000, 0x0)
    assert bar_size(drv, 2) == (0x4000, 0xC)
    assert bar_size(drv, 4) == (4 * MiB, 0xC)
    assert dev.region_info(4).size == 4 * MiB


def test_msix_capability_and_bar_layout() -> None:
    dev, _ = make()
    drv = Driver(dev)
    msix = [pos for pos, cap_id in drv.walk() if cap_id == PciCapId.MSIX]
    assert len(msix) == 1
    control, table, pba = struct.unpack(
        "<HII", dev.region_read(RegionIndex.CONFIG, msix[0] + 2, 10)
    )
    assert control & 0x7FF == 2  # table size N-1 for 3 vectors
    assert table == 0x000 | 1
    assert pba == 0x800 | 1
    assert msix_bar_layout(3) == (0x1000, 0x800)
    assert msix_bar_layout(200) == (0x1000, 200 * 16)
    assert msix_bar_layout(300) == (0x2000, 300 * 16)


def test_pba_reads_pending_bits() -> None:
    dev, _ = make()
    fds = eventfds(3)
    dev.msix.set_eventfds(0, fds)
    assert dev.region_read(1, 0x800, 8) == bytes(8)
    dev.msix.set_masked(2, 1, True)
    assert not dev.msix.trigger(2)
    assert dev.region_read(1, 0x800, 8) == (0b100).to_bytes(8, "little")
    dev.close()


def test_close_closes_every_interrupt_eventfd_once() -> None:
    dev, _ = make()
    before = len(os.listdir("/proc/self/fd"))
    msix, [intx] = eventfds(3), eventfds(1)
    dev.msix.set_eventfds(0, msix)
    dev.intx.set_eventfds(0, [intx])
    for fd in [*msix, intx]:
        os.close(fd)  # lent: the device keeps its own dups
    assert len(os.listdir("/proc/self/fd")) == before + 4
    dev.close()
    assert len(os.listdir("/proc/self/fd")) == before
    dev.close()
    assert dev.msix.eventfd(0) is None and dev.intx.eventfd(0) is None


# The Linux bring-up sequence


def test_linux_probe_finds_every_structure() -> None:
    dev, _ = make()
    drv = Driver(dev)
    device = drv.cap(VirtioPciCapType.DEVICE_CFG)
    pci_cfg = drv.cap(VirtioPciCapType.PCI_CFG)
    assert (drv.common.bar, drv.common.offset) == (2, 0x0000)
    assert (drv.isr.bar, drv.isr.offset) == (2, 0x1000)
    assert (device.bar, device.offset) == (2, 0x2000)
    assert (drv.notify.bar, drv.notify.offset) == (2, 0x3000)
    assert drv.notify_multiplier == 4
    assert drv.notify.cap_len == 20
    assert pci_cfg.cap_len == 20
    for cap in (drv.common, drv.isr, device, drv.notify):
        assert cap.cap_len == 16 or cap is drv.notify
        assert cap.offset + cap.length <= dev.region_info(cap.bar).size
        assert cap.offset % 4 == 0
    assert drv.common.length >= 0x38  # sizeof(struct virtio_pci_common_cfg)


def test_no_device_cfg_cap_without_device_config() -> None:
    dev, _ = make(FakeDevice(config_size=0, config=bytearray()))
    drv = Driver(dev)
    assert VirtioPciCapType.DEVICE_CFG not in {cap.cfg_type for cap in drv.caps}


def test_full_bring_up_activates_backend_with_queue_config() -> None:
    dev, backend = make()
    drv = Driver(dev)
    drv.reset()
    drv.add_status(DeviceStatus.ACKNOWLEDGE)
    drv.add_status(DeviceStatus.DRIVER)
    offered = drv.get_features()
    assert offered & F_VERSION_1
    assert offered & F_DEVICE_BIT0 and offered & F_EVENT_IDX
    assert not offered & F_RING_RESET  # transport does not implement queue_reset
    wanted = F_VERSION_1 | F_EVENT_IDX
    drv.set_features(wanted)
    drv.add_status(DeviceStatus.FEATURES_OK)
    assert drv.get_status() & DeviceStatus.FEATURES_OK
    assert drv.common_read(CommonCfg.NUM_QUEUES, 2) == 2
    assert drv.config_vector(0) == 0
    notify = drv.setup_queue(0, 128, 1, 0x1_2345_6000)
    assert notify == 0
    assert backend.activations == []
    drv.add_status(DeviceStatus.DRIVER_OK)
    assert drv.get_status() == (
        DeviceStatus.ACKNOWLEDGE
        | DeviceStatus.DRIVER
        | DeviceStatus.FEATURES_OK
        | DeviceStatus.DRIVER_OK
    )
    assert backend.activations == [
        (
            wanted,
            (
                QueueConfig(
                    index=0,
                    size=128,
                    msix_vector=1,
                    desc=0x1_2345_6000,
                    driver=0x1_2345_7000,
                    device=0x1_2345_8000,
                ),
            ),
        )
    ]
    drv.kick(notify, 0)
    assert backend.kicks == [0]


def test_second_queue_notify_address() -> None:
    dev, backend = make()
    drv = Driver(dev)
    assert drv.negotiate(F_VERSION_1)
    drv.setup_queue(0, 256, 1, 0x10000)
    notify1 = drv.setup_queue(1, 64, 2, 0x20000)
    drv.add_status(DeviceStatus.DRIVER_OK)
    assert notify1 == 4
    assert [q.index for q in backend.activations[0][1]] == [0, 1]
    drv.kick(notify1, 1)
    drv.write(drv.notify, notify1, 1 | 5 << 16, 4)  # 32-bit notification data
    assert backend.kicks == [1, 1]


def test_kick_before_driver_ok_is_delivered_on_activation() -> None:
    dev, backend = make()
    drv = Driver(dev)
    assert drv.negotiate(F_VERSION_1)
    drv.setup_queue(0, 256, 1, 0x10000)
    drv.kick(0, 0)
    assert backend.kicks == []
    drv.add_status(DeviceStatus.DRIVER_OK)
    assert backend.kicks == [0]


def test_isr_is_read_to_clear_and_config_change_raises_msix_config_vector() -> None:
    dev, _ = make()
    drv = Driver(dev)
    fds = eventfds(3)
    dev.msix.set_eventfds(0, fds)
    bring_up(drv)
    generation = drv.common_read(CommonCfg.CONFIG_GENERATION, 1)
    dev.config_changed()
    assert fired(fds[0]) == 1
    assert fired(fds[1]) == 0
    assert drv.common_read(CommonCfg.CONFIG_GENERATION, 1) == (generation + 1) & 0xFF
    assert drv.read_isr() == 2
    assert drv.read_isr() == 0
    dev.queue_interrupt(0)
    assert fired(fds[1]) == 1
    assert drv.read_isr() == 1
    dev.close()


def test_config_change_without_msix_uses_intx() -> None:
    dev, _ = make()
    drv = Driver(dev)
    [intx] = eventfds(1)
    dev.intx.set_eventfds(0, [intx])
    assert drv.negotiate(F_VERSION_1)
    dev.config_changed()
    assert fired(intx) == 1
    assert drv.read_isr() == 2
    # INTx disabled in the command register: no interrupt, ISR still set.
    drv.cfg_write(PciReg.COMMAND, PciCommand.MEMORY | PciCommand.INTX_DISABLE, 2)
    dev.config_changed()
    assert fired(intx) == 0
    assert drv.read_isr() == 2
    dev.close()


def test_msix_enable_bit_in_config_space_selects_msix() -> None:
    dev, _ = make()
    drv = Driver(dev)
    [intx] = eventfds(1)
    dev.intx.set_eventfds(0, [intx])
    assert not dev.msix_enabled
    drv.cfg_write(dev.msix_cap + 2, 0x8000, 2)
    assert dev.msix_enabled
    assert drv.cfg(dev.msix_cap + 2, 2) == 0x8002
    dev.config_changed()  # msix_config is NO_VECTOR: no interrupt at all
    assert fired(intx) == 0
    dev.close()


def test_driver_reset_deactivates_and_clears_state() -> None:
    dev, backend = make()
    drv = Driver(dev)
    bring_up(drv)
    drv.reset()
    assert backend.deactivations == 1
    assert drv.common_read(CommonCfg.CONFIG_MSIX_VECTOR, 2) == NO_VECTOR
    drv.common_write(CommonCfg.QUEUE_SELECT, 0, 2)
    assert drv.common_read(CommonCfg.QUEUE_ENABLE, 2) == 0
    assert drv.common_read(CommonCfg.QUEUE_SIZE, 2) == 256
    assert drv.common_read(CommonCfg.QUEUE_DESC, 8) == 0
    drv.kick(0, 0)
    assert backend.kicks == []
    drv.reset()  # a second reset does not deactivate again
    assert backend.deactivations == 1


def test_function_reset_restores_config_space_and_deactivates() -> None:
    dev, backend = make()
    drv = Driver(dev)
    sealed = dev.region_read(RegionIndex.CONFIG, 0, 256)
    drv.cfg_write(PciReg.BASE_ADDRESS_0 + 8, 0xFE00_0000, 4)
    drv.cfg_write(PciReg.COMMAND, PciCommand.MEMORY | PciCommand.MASTER, 2)
    bring_up(drv)
    dev.reset()
    assert backend.deactivations == 1
    assert drv.get_status() == 0
    assert dev.region_read(RegionIndex.CONFIG, 0, 256) == sealed


def test_activate_failure_sets_needs_reset_and_interrupts() -> None:
    dev, backend = make(FakeDevice(fail_activate=True))
    drv = Driver(dev)
    fds = eventfds(3)
    dev.msix.set_eventfds(0, fds)
    bring_up(drv)
    assert drv.get_status() & DeviceStatus.DEVICE_NEEDS_RESET
    assert fired(fds[0]) == 1
    assert drv.read_isr() == 2
    drv.reset()
    assert backend.deactivations == 0  # never became active
    assert drv.get_status() == 0
    dev.close()


def test_set_needs_reset_from_back_end() -> None:
    dev, _ = make()
    drv = Driver(dev)
    bring_up(drv)
    dev.set_needs_reset()
    assert drv.get_status() & DeviceStatus.DEVICE_NEEDS_RESET
    drv.add_status(DeviceStatus.DRIVER_OK)  # read-modify-write keeps it set
    assert drv.get_status() & DeviceStatus.DEVICE_NEEDS_RESET


def test_device_config_forwarded_with_bounds() -> None:
    dev, backend = make()
    drv = Driver(dev)
    device = drv.cap(VirtioPciCapType.DEVICE_CFG)
    assert drv.read(device, 0, 4) == int.from_bytes(bytes(range(4)), "little")
    assert drv.read(device, 36, 8) == int.from_bytes(bytes([36, 37, 38, 39]) + bytes(4), "little")
    assert drv.read(device, 0x800, 4) == 0
    drv.write(device, 8, 0xAABBCCDD, 4)
    assert backend.config[8:12] == bytes.fromhex("ddccbbaa")
    drv.write(device, 38, 0x11223344, 4)  # only the 2 bytes inside the config
    assert backend.config[38:40] == bytes.fromhex("4433")
    drv.write(device, 0x100, 1, 4)
    assert len(backend.config) == 40


# Hostile accesses


def test_feature_windows_beyond_64_bits_read_zero_and_ignore_writes() -> None:
    dev, _ = make()
    drv = Driver(dev)
    drv.common_write(CommonCfg.DEVICE_FEATURE_SELECT, 2, 4)
    assert drv.common_read(CommonCfg.DEVICE_FEATURE, 4) == 0
    drv.common_write(CommonCfg.DRIVER_FEATURE_SELECT, 7, 4)
    drv.common_write(CommonCfg.DRIVER_FEATURE, 0xFFFF_FFFF, 4)
    assert dev.state.driver_features == 0


def test_features_ok_refused_for_unknown_features() -> None:
    dev, _ = make()
    drv = Driver(dev)
    assert not drv.negotiate(F_VERSION_1 | 1 << 50)
    assert not drv.negotiate(F_VERSION_1 | F_RING_RESET)  # masked by the transport
    assert not drv.negotiate(F_DEVICE_BIT0)  # no VERSION_1
    assert drv.negotiate(F_VERSION_1 | F_DEVICE_BIT0)


def test_driver_ok_without_features_ok_not_latched() -> None:
    dev, backend = make()
    drv = Driver(dev)
    drv.reset()
    drv.add_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
    drv.add_status(DeviceStatus.DRIVER_OK)
    assert not drv.get_status() & DeviceStatus.DRIVER_OK
    assert backend.activations == []


def test_driver_features_frozen_after_features_ok() -> None:
    dev, _ = make()
    drv = Driver(dev)
    assert drv.negotiate(F_VERSION_1)
    drv.set_features(F_VERSION_1 | F_DEVICE_BIT0)
    assert dev.state.driver_features == F_VERSION_1


def test_driver_cannot_set_needs_reset_or_clear_bits() -> None:
    dev, _ = make()
    drv = Driver(dev)
    drv.common_write(CommonCfg.DEVICE_STATUS, DeviceStatus.ACKNOWLEDGE | 0x40, 1)
    assert drv.get_status() == DeviceStatus.ACKNOWLEDGE
    drv.common_write(CommonCfg.DEVICE_STATUS, DeviceStatus.DRIVER, 1)
    assert drv.get_status() == DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER


def test_read_only_common_registers_ignore_writes() -> None:
    dev, _ = make()
    drv = Driver(dev)
    drv.common_write(CommonCfg.DEVICE_FEATURE_SELECT, 0, 4)
    features = drv.common_read(CommonCfg.DEVICE_FEATURE, 4)
    drv.common_write(CommonCfg.DEVICE_FEATURE, 0, 4)
    drv.common_write(CommonCfg.NUM_QUEUES, 99, 2)
    drv.common_write(CommonCfg.CONFIG_GENERATION, 7, 1)
    drv.common_write(CommonCfg.QUEUE_NOTIFY_OFF, 9, 2)
    assert drv.common_read(CommonCfg.DEVICE_FEATURE, 4) == features
    assert drv.common_read(CommonCfg.NUM_QUEUES, 2) == 2
    assert drv.common_read(CommonCfg.CONFIG_GENERATION, 1) == 0
    assert drv.common_read(CommonCfg.QUEUE_NOTIFY_OFF, 2) == 0


@pytest.mark.parametrize("size", [0, 3, 100, 255, 512, 0xFFFF])
def test_queue_size_not_power_of_two_or_too_big_is_refused(size: int) -> None:
    dev, _ = make()
    drv = Driver(dev)
    assert drv.negotiate(F_VERSION_1)
    drv.common_write(CommonCfg.QUEUE_SELECT, 0, 2)
    drv.common_write(CommonCfg.QUEUE_SIZE, size, 2)
    assert drv.common_read(CommonCfg.QUEUE_SIZE, 2) == 256


def test_packed_ring_allows_any_queue_size() -> None:
    dev, _ = make()
    drv = Driver(dev)
    assert drv.negotiate(F_VERSION_1 | F_RING_PACKED)
    drv.common_write(CommonCfg.QUEUE_SELECT, 0, 2)
    drv.common_write(CommonCfg.QUEUE_SIZE, 100, 2)
    assert drv.common_read(CommonCfg.QUEUE_SIZE, 2) == 100


def test_vectors_outside_the_table_read_back_no_vector() -> None:
    dev, _ = make()
    drv = Driver(dev)
    assert drv.config_vector(3) == NO_VECTOR
    drv.common_write(CommonCfg.QUEUE_SELECT, 1, 2)
    drv.common_write(CommonCfg.QUEUE_MSIX_VECTOR, 17, 2)
    assert drv.common_read(CommonCfg.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    drv.common_write(CommonCfg.QUEUE_MSIX_VECTOR, 2, 2)
    assert drv.common_read(CommonCfg.QUEUE_MSIX_VECTOR, 2) == 2


def test_selecting_a_missing_queue() -> None:
    dev, backend = make()
    drv = Driver(dev)
    assert drv.negotiate(F_VERSION_1)
    drv.common_write(CommonCfg.QUEUE_SELECT, 2, 2)
    assert drv.common_read(CommonCfg.QUEUE_SIZE, 2) == 0  # Linux: -ENOENT
    assert drv.common_read(CommonCfg.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    drv.common_write(CommonCfg.QUEUE_SIZE, 16, 2)
    drv.common_write(CommonCfg.QUEUE_ENABLE, 1, 2)
    drv.add_status(DeviceStatus.DRIVER_OK)
    assert backend.activations == [(F_VERSION_1, ())]
    drv.kick(8, 2)
    drv.kick(4 * 1000, 1000)
    assert backend.kicks == []


def test_queue_setup_frozen_after_enable() -> None:
    dev, _ = make()
    drv = Driver(dev)
    assert drv.negotiate(F_VERSION_1)
    drv.setup_queue(0, 64, 1, 0x10000)
    drv.common_write(CommonCfg.QUEUE_SIZE, 32, 2)
    drv.common_write(CommonCfg.QUEUE_DESC, 0x999000, 4)
    drv.common_write(CommonCfg.QUEUE_ENABLE, 0, 2)
    assert drv.common_read(CommonCfg.QUEUE_SIZE, 2) == 64
    assert drv.common_read(CommonCfg.QUEUE_DESC, 8) == 0x10000
    assert drv.common_read(CommonCfg.QUEUE_ENABLE, 2) == 1


def test_odd_width_and_unaligned_common_accesses() -> None:
    dev, _ = make()
    drv = Driver(dev)
    drv.common_write(CommonCfg.DEVICE_FEATURE_SELECT, 1, 4)
    assert drv.common_read(CommonCfg.DEVICE_FEATURE, 1) == (F_VERSION_1 | F_RING_PACKED) >> 32
    assert drv.common_read(CommonCfg.DEVICE_FEATURE + 1, 1) == 0
    # num_queues, status, generation, queue_select, queue_size in one read
    assert drv.common_read(CommonCfg.NUM_QUEUES, 8) == 2 | 256 << 48
    whole = dev.region_read(2, 0, 0x40)
    assert whole[CommonCfg.NUM_QUEUES] == 2
    drv.common_write(CommonCfg.QUEUE_SELECT, 0, 2)
    drv.common_write(CommonCfg.QUEUE_DESC, 0x1122334455667788, 8)
    drv.common_write(CommonCfg.QUEUE_DESC + 1, 0xAA, 1)
    assert drv.common_read(CommonCfg.QUEUE_DESC, 8) == 0x112233445566AA88
    assert dev.region_read(2, 0x3C, 8) == bytes(8)  # past the structure
    assert dev.region_read(2, 0x3FFE, 8) == bytes(8)  # past the BAR
    dev.region_write(2, 0x3FFE, b"\xff" * 8)
    dev.region_write(2, -4, b"\xff" * 8)
    assert dev.region_read(3, 0, 4) == bytes(4)
    dev.region_write(5, 0, b"\x01")


def test_isr_writes_and_other_offsets() -> None:
    dev, _ = make()
    drv = Driver(dev)
    dev.config_changed()
    drv.write(drv.isr, 0, 0, 1)
    assert drv.read(drv.isr, 1, 1) == 0  # not the ISR byte: does not clear
    assert drv.read(drv.isr, 0, 4) == 2
    assert drv.read_isr() == 0


def test_notify_odd_widths_ignored() -> None:
    dev, backend = make()
    drv = Driver(dev)
    notify = bring_up(drv)
    drv.write(drv.notify, notify, 0, 1)
    drv.write(drv.notify, notify + 1, 0, 2)
    drv.write(drv.notify, notify, 0, 8)
    assert backend.kicks == []
    drv.kick(notify, 0)
    assert backend.kicks == [0]


def test_pci_cfg_cap_window_reaches_bar_registers() -> None:
    dev, backend = make()
    drv = Driver(dev)
    cap = drv.cap(VirtioPciCapType.PCI_CFG)
    data = cap.pos + 16
    drv.cfg_write(cap.pos + 4, 2, 1)  # bar
    drv.cfg_write(cap.pos + 8, CommonCfg.NUM_QUEUES, 4)  # offset
    drv.cfg_write(cap.pos + 12, 2, 4)  # length
    assert drv.cfg(data, 2) == 2
    drv.cfg_write(cap.pos + 8, CommonCfg.DEVICE_STATUS, 4)
    drv.cfg_write(cap.pos + 12, 1, 4)
    drv.cfg_write(data, DeviceStatus.ACKNOWLEDGE, 1)
    assert drv.get_status() == DeviceStatus.ACKNOWLEDGE
    # Misaligned or bad lengths do nothing.
    drv.cfg_write(cap.pos + 8, CommonCfg.QUEUE_SELECT + 1, 4)
    drv.cfg_write(cap.pos + 12, 2, 4)
    drv.cfg_write(data, 5, 2)
    assert drv.common_read(CommonCfg.QUEUE_SELECT, 2) == 0
    drv.cfg_write(cap.pos + 12, 3, 4)
    assert drv.cfg(data, 4) == 0
    # Reading the whole config space while the window points at nothing is harmless.
    assert len(dev.region_read(RegionIndex.CONFIG, 0, 256)) == 256
    del backend


def test_pci_cfg_window_reads_shared_memory() -> None:
    shmem = FakeShmem(bytearray(b"\x5a" * 16))
    dev, _ = make(layout=Layout(0x1000, (Region(0, 0, 0x1000),)), shmem=shmem)
    drv = Driver(dev)
    cap = drv.cap(VirtioPciCapType.PCI_CFG)
    drv.cfg_write(cap.pos + 4, 4, 1)
    drv.cfg_write(cap.pos + 8, 4, 4)
    drv.cfg_write(cap.pos + 12, 4, 4)
    assert drv.cfg32(cap.pos + 16) == 0x5A5A5A5A


def test_pci_cfg_window_never_reaches_config_space() -> None:
    dev, _ = make()
    drv = Driver(dev)
    cap = drv.cap(VirtioPciCapType.PCI_CFG)
    drv.cfg_write(cap.pos + 4, RegionIndex.CONFIG, 1)
    drv.cfg_write(cap.pos + 8, PciReg.COMMAND, 4)
    drv.cfg_write(cap.pos + 12, 2, 4)
    command = drv.cfg(PciReg.COMMAND, 2)
    assert drv.cfg(cap.pos + 16, 2) == 0
    drv.cfg_write(cap.pos + 16, command ^ PciCommand.MEMORY, 2)
    assert drv.cfg(PciReg.COMMAND, 2) == command


@settings(max_examples=150, deadline=None)
@given(
    index=st.integers(0, 8),
    offset=st.integers(-16, 0x4010),
    data=st.binary(min_size=1, max_size=16),
    read=st.booleans(),
)
def test_random_accesses_never_raise(index: int, offset: int, data: bytes, read: bool) -> None:
    dev, _ = make()
    if read:
        assert len(dev.region_read(index, offset, len(data))) == len(data)
    else:
        dev.region_write(index, offset, data)


# Shared memory


def test_shared_memory_caps_for_2mib_plus_1mib() -> None:
    layout = ShmemLayout.from_sizes({0: 2 * MiB, 1: MiB})
    shmem = FakeShmem(bytearray(4 * MiB))
    dev, _ = make(layout=layout, shmem=shmem)
    drv = Driver(dev)
    caps = [c for c in drv.caps if c.cfg_type == VirtioPciCapType.SHARED_MEMORY_CFG]
    assert len(caps) == 2
    got = []
    for cap in caps:
        assert cap.cap_len == 24 and cap.bar == 4
        offset_hi, length_hi = struct.unpack(
            "<II", dev.region_read(RegionIndex.CONFIG, cap.pos + 16, 8)
        )
        got.append((cap.cap_id, offset_hi << 32 | cap.offset, length_hi << 32 | cap.length))
    assert got == [(0, 0, 2 * MiB), (1, 2 * MiB, MiB)]
    assert dev.region_info(4).size == 4 * MiB


def test_shared_memory_caps_carry_high_halves() -> None:
    layout = Layout(1 << 34, (Region(3, 0, 1 << 33), Region(7, 1 << 33, 0x1_0000_2000)))
    dev, _ = make(layout=layout, shmem=FakeShmem(bytearray()))
    drv = Driver(dev)
    caps = [c for c in drv.caps if c.cfg_type == VirtioPciCapType.SHARED_MEMORY_CFG]
    values = []
    for cap in caps:
        hi = struct.unpack("<II", dev.region_read(RegionIndex.CONFIG, cap.pos + 16, 8))
        values.append((cap.cap_id, hi[0] << 32 | cap.offset, hi[1] << 32 | cap.length))
    assert values == [(3, 0, 1 << 33), (7, 1 << 33, 0x1_0000_2000)]
    assert bar_size(drv, 4) == (1 << 34, 0xC)


def test_shared_memory_bar_forwards_unchanged_and_clips() -> None:
    shmem = FakeShmem(bytearray(4 * MiB))
    shmem.data[2 * MiB : 2 * MiB + 4] = b"abcd"
    dev, _ = make(layout=ShmemLayout.from_sizes({0: 2 * MiB, 1: MiB}), shmem=shmem)
    assert dev.region_read(4, 2 * MiB, 4) == b"abcd"
    dev.region_write(4, 0x1234, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert shmem.writes == [(0x1234, b"\x01\x02\x03\x04\x05\x06\x07\x08")]
    dev.region_write(4, 4 * MiB - 2, b"wxyz")
    assert shmem.writes[-1] == (4 * MiB - 2, b"wx")
    assert dev.region_read(4, 4 * MiB - 2, 4) == b"wx\0\0"
    assert dev.region_read(4, 4 * MiB, 4) == bytes(4)


def test_shared_memory_bar_is_used_even_when_it_is_falsy() -> None:
    """SharedMemoryBar has ``__len__`` (live mappings): with none it is falsy, not absent."""

    class EmptyShmem(FakeShmem):
        def __len__(self) -> int:
            return 0

    shmem = EmptyShmem(bytearray(b"mapped!!" * 8))
    dev, _ = make(layout=Layout(0x1000, (Region(0, 0, 0x1000),)), shmem=shmem)
    assert dev.region_read(4, 0, 8) == b"mapped!!"
    dev.region_write(4, 8, b"written!")
    assert shmem.writes == [(8, b"written!")]


def test_no_shared_memory_bar_without_regions() -> None:
    dev, _ = make(layout=ShmemLayout.from_sizes({}), shmem=FakeShmem(bytearray()))
    drv = Driver(dev)
    assert dev.region_info(4).size == 0
    assert bar_size(drv, 4) == (0, 0)
    assert not any(c.cfg_type == VirtioPciCapType.SHARED_MEMORY_CFG for c in drv.caps)


def test_bus_master_off_stops_the_back_end_and_driver_ok_restarts_it() -> None:
    dev, backend = make()
    drv = Driver(dev)
    drv.cfg_write(PciReg.COMMAND, PciCommand.MEMORY | PciCommand.MASTER, 2)
    bring_up(drv)
    drv.cfg_write(PciReg.COMMAND, PciCommand.MEMORY | PciCommand.MASTER, 2)
    assert backend.deactivations == 0
    drv.cfg_write(PciReg.COMMAND, PciCommand.MEMORY, 2)
    assert backend.deactivations == 1
    assert not drv.get_status() & DeviceStatus.DRIVER_OK
    drv.kick(0, 0)
    assert backend.kicks == []
    drv.cfg_write(PciReg.COMMAND, PciCommand.MEMORY | PciCommand.MASTER, 2)
    drv.add_status(DeviceStatus.DRIVER_OK)
    assert len(backend.activations) == 2
    assert backend.activations[0] == backend.activations[1]
    assert backend.kicks == [0]  # the kick made while stopped is delivered on restart


# Kick eventfds lent to the server's hot path


@dataclass
class FakeKickDevice(FakeDevice):
    """A back-end whose kicks are eventfd writes (as the vhost-user front-end's)."""

    def kick_fd(self, queue: int) -> int | None:
        return 100 + queue if self.activations and not self.deactivations else None


@dataclass
class RecordingSink:
    armed: dict[int, int] = field(default_factory=dict)
    disarms: int = 0

    def arm(self, queue: int, eventfd: int) -> None:
        self.armed[queue] = eventfd

    def disarm_all(self) -> None:
        self.armed.clear()
        self.disarms += 1


def test_kick_fds_are_lent_while_the_queue_may_be_kicked() -> None:
    dev, backend = make(FakeKickDevice())
    sink = RecordingSink()
    dev.set_kick_sink(sink)
    drv = Driver(dev)
    drv.cfg_write(PciReg.COMMAND, PciCommand.MEMORY | PciCommand.MASTER, 2)
    assert drv.negotiate(F_VERSION_1)
    drv.setup_queue(0, 128, 1, 0x10000)  # queue 1 stays disabled
    assert sink.armed == {}
    drv.add_status(DeviceStatus.DRIVER_OK)
    assert sink.armed == {0: 100}
    drv.cfg_write(PciReg.COMMAND, PciCommand.MEMORY, 2)  # bus mastering off: stopped
    assert sink.armed == {}
    drv.cfg_write(PciReg.COMMAND, PciCommand.MEMORY | PciCommand.MASTER, 2)
    backend.deactivations = 0
    drv.add_status(DeviceStatus.DRIVER_OK)
    assert sink.armed == {0: 100}
    drv.reset()
    assert sink.armed == {}
    dev.disarm_kicks()  # what the front-end calls before it closes them
    assert sink.armed == {}


def test_a_device_without_kick_fds_lends_nothing() -> None:
    dev, _ = make()
    sink = RecordingSink()
    dev.set_kick_sink(sink)
    bring_up(Driver(dev))
    assert sink.armed == {}
