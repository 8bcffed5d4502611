"""The virtio 1.x modern PCI transport: what the guest's virtio_pci driver talks to.

BARs follow QEMU's virtio-pci so guests and tools see a familiar device:

* BAR 1 (32-bit memory): MSI-X table at 0 and PBA after it. QEMU emulates the table itself;
  the PBA is served from ``IrqEventfds.pending_bits()``.
* BAR 2 (64-bit prefetchable, 16 KiB): common config at 0x0000, ISR at 0x1000, device config
  at 0x2000, notifications at 0x3000 (``notify_off_multiplier`` 4, queue N at N * 4).
* BAR 4 (64-bit prefetchable): the VIRTIO Shared Memory Regions, forwarded unchanged to a
  ``ShmemAccess``; absent when there are no regions.

Every region is one entry of a table (region index -> ``RegionHandler``: size, read, write).
``region_read``/``region_write`` check the range once and call the entry, so a guest read of
BAR 4 goes from the server to ``ShmemAccess.read`` with nothing in between; the rare access
that is out of range is clipped to the region and padded with zeros.

Register accesses of any width are accepted: a write is merged byte-wise into each register
it touches and applied as a full-width write, so the driver's natural-width accesses and a
hostile client's odd ones go through the same path. Nothing the guest does raises.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from emulator.errors import ConfigError
from emulator.pci.config import PciCapId, PciCommand, PciConfigSpace, PciReg
from emulator.pci.device import (
    NUM_REGIONS,
    DeviceRegion,
    DirectAccess,
    IrqIndex,
    KickSink,
    NotifyArea,
    RegionIndex,
    RegionPermission,
    SharedMemoryWindow,
)
from emulator.pci.interrupts import IrqEventfds
from emulator.virtio.device import KickFdSource, VirtioDevice
from emulator.virtio.state import NO_VECTOR, UNSUPPORTED_FEATURES, VirtioDeviceId, VirtioState

logger = logging.getLogger(__name__)

PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1AF4
PCI_DEVICE_ID_VIRTIO_1_BASE = 0x1040
PCI_SUBDEVICE_ID_QEMU = 0x1100
VIRTIO_PCI_REVISION = 1
PCI_CLASS_OTHERS = 0xFF0000

CONFIG_REGION_SIZE = 256

MSIX_BAR = 1
VIRTIO_BAR = 2
SHMEM_BAR = 4

MSIX_ENTRY_SIZE = 16
MSIX_CONTROL_ENABLE = 0x8000
MSIX_CONTROL_MASKALL = 0x4000
MSIX_MAX_VECTORS = 2048

VIRTIO_BAR_SIZE = 0x4000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
SUBREGION_SIZE = 0x1000
NOTIFY_OFF_MULTIPLIER = 4
MAX_QUEUES = SUBREGION_SIZE // NOTIFY_OFF_MULTIPLIER


class VirtioPciCapType(enum.IntEnum):
    """``cfg_type`` of a virtio vendor capability (VIRTIO_PCI_CAP_*_CFG)."""

    COMMON_CFG = 1
    NOTIFY_CFG = 2
    ISR_CFG = 3
    DEVICE_CFG = 4
    PCI_CFG = 5
    SHARED_MEMORY_CFG = 8
    VENDOR_CFG = 9


class CommonCfg(enum.IntEnum):
    """Field offsets of struct virtio_pci_common_cfg (virtio 1.x section 4.1.4.3)."""

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
    QUEUE_NOTIFY_DATA = 0x38
    QUEUE_RESET = 0x3A


COMMON_CFG_WIDTH: dict[CommonCfg, int] = {
    CommonCfg.DEVICE_FEATURE_SELECT: 4,
    CommonCfg.DEVICE_FEATURE: 4,
    CommonCfg.DRIVER_FEATURE_SELECT: 4,
    CommonCfg.DRIVER_FEATURE: 4,
    CommonCfg.CONFIG_MSIX_VECTOR: 2,
    CommonCfg.NUM_QUEUES: 2,
    CommonCfg.DEVICE_STATUS: 1,
    CommonCfg.CONFIG_GENERATION: 1,
    CommonCfg.QUEUE_SELECT: 2,
    CommonCfg.QUEUE_SIZE: 2,
    CommonCfg.QUEUE_MSIX_VECTOR: 2,
    CommonCfg.QUEUE_ENABLE: 2,
    CommonCfg.QUEUE_NOTIFY_OFF: 2,
    CommonCfg.QUEUE_DESC: 8,
    CommonCfg.QUEUE_DRIVER: 8,
    CommonCfg.QUEUE_DEVICE: 8,
    CommonCfg.QUEUE_NOTIFY_DATA: 2,
    CommonCfg.QUEUE_RESET: 2,
}
COMMON_CFG_SIZE = 0x3C


class Isr(enum.IntFlag):
    """ISR status bits (section 4.1.4.5)."""

    QUEUE = 1
    DEVICE_CONFIG = 2


# Class codes QEMU gives its virtio-pci devices (base class, subclass, prog-if).
CLASS_CODES: dict[int, int] = {
    VirtioDeviceId.NET: 0x020000,
    VirtioDeviceId.BLOCK: 0x010000,
    VirtioDeviceId.CONSOLE: 0x078000,
    VirtioDeviceId.SCSI: 0x010000,
    VirtioDeviceId.GPU: 0x038000,
    VirtioDeviceId.INPUT: 0x098000,
    VirtioDeviceId.VSOCK: 0x078000,
    VirtioDeviceId.SOUND: 0x040100,
    VirtioDeviceId.FS: 0x018000,
}

_VIRTIO_CAP = struct.Struct("<BBBBxxII")  # cap_len, cfg_type, bar, id, padding, offset, length
_U32 = struct.Struct("<I")


class ShmemRegionInfo(Protocol):
    """One VIRTIO Shared Memory Region's place in BAR 4 (``emulator.shmem.layout``)."""

    @property
    def shmid(self) -> int: ...

    @property
    def bar_offset(self) -> int: ...

    @property
    def size(self) -> int: ...


class ShmemLayoutInfo(Protocol):
    """The shared-memory BAR: power-of-two size and the regions in it."""

    @property
    def bar_size(self) -> int: ...

    @property
    def regions(self) -> Sequence[ShmemRegionInfo]: ...


class ShmemAccess(Protocol):
    """Trapped guest accesses to BAR 4, forwarded unchanged (offsets are BAR offsets), and the
    mappings behind them, which a device reset drops."""

    def read(self, bar_offset: int, size: int) -> bytes: ...

    def write(self, bar_offset: int, data: bytes) -> None: ...

    def reset(self) -> None:
        """Drop every mapping."""
        ...

    def __len__(self) -> int:
        """Live mappings."""
        ...


@runtime_checkable
class DirectShmem(Protocol):
    """A ``ShmemAccess`` that is one reservation of our address space (``SharedMemoryBar``):
    the server's hot path copies guest accesses at ``host_address + offset`` itself."""

    @property
    def host_address(self) -> int: ...

    @property
    def max_access(self) -> int: ...

    def dropped_write(self, bar_offset: int, length: int) -> None:
        """A guest write to ``[bar_offset, +length)`` hit pages that fault and was dropped."""
        ...

    def on_unusable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the BAR is no longer plain memory (closed or damaged)."""
        ...


@dataclass(frozen=True, slots=True)
class RegionHandler:
    """One region of the device: its size and what serves accesses inside it.

    ``read(offset, size)`` and ``write(offset, data)`` only ever see ``0 <= offset`` and
    ``offset + size <= self.size`` with ``size > 0``: ``VirtioPciDevice`` checks first.
    """

    size: int
    read: Callable[[int, int], bytes]
    write: Callable[[int, bytes], None]


def _read_nothing(offset: int, size: int) -> bytes:
    return bytes(size)


def _write_nothing(offset: int, data: bytes) -> None:
    logger.debug("write %d@%#x to a region with nothing behind it dropped", len(data), offset)


ABSENT_REGION = RegionHandler(0, _read_nothing, _write_nothing)
"""A region the device does not have (size 0): every access is out of range."""


def _clipped_read(region: RegionHandler, offset: int, size: int) -> bytes:
    """A read that is empty or not inside ``region``: the inside part, zeros elsewhere."""
    if size <= 0:
        return b""
    low, high = max(offset, 0), min(offset + size, region.size)
    if low >= high:
        return bytes(size)
    out = bytearray(size)
    out[low - offset : high - offset] = region.read(low, high - low)
    return bytes(out)


def _clipped_write(region: RegionHandler, index: int, offset: int, data: bytes) -> None:
    """A write that is empty or not inside ``region``: the inside part lands, the rest drops."""
    low, high = max(offset, 0), min(offset + len(data), region.size)
    if low < high:
        region.write(low, data[low - offset : high - offset])
    elif data:
        logger.debug("write %d@%#x outside region %d dropped", len(data), offset, index)


def class_code_for(virtio_id: int) -> int:
    """The PCI class code QEMU uses for this device type, else 0xff0000 (unclassified)."""
    return CLASS_CODES.get(virtio_id, PCI_CLASS_OTHERS)


def msix_bar_layout(vectors: int) -> tuple[int, int]:
    """``(bar_size, pba_offset)``: table at 0, PBA at half a 4 KiB BAR unless the table is
    larger, BAR rounded up to a power of two (the layout QEMU's exclusive MSI-X BAR uses)."""
    pba_size = (vectors + 63) // 64 * 8
    pba_offset = max(0x800, vectors * MSIX_ENTRY_SIZE)
    size = max(0x1000, pba_offset + pba_size)
    return 1 << (size - 1).bit_length(), pba_offset


def _merge(old: int, width: int, rel: int, data: bytes) -> int:
    """Replace bytes ``rel .. rel+len(data)`` of a little-endian ``width``-byte value."""
    raw = bytearray(old.to_bytes(width, "little"))
    raw[rel : rel + len(data)] = data
    return int.from_bytes(raw, "little")


class VirtioPciDevice:
    """A virtio 1.x modern PCI function in front of a ``VirtioDevice``; a ``PciDevice``.

    ``msix`` carries one vector per queue plus one for config changes; ``intx`` holds the
    INTx eventfd (vector 0) the server installs from SET_IRQS on the INTx index.
    """

    def __init__(
        self,
        backend: VirtioDevice,
        *,
        shmem_layout: ShmemLayoutInfo | None = None,
        shmem: ShmemAccess | None = None,
    ) -> None:
        num_queues = backend.num_queues
        if not 0 < num_queues <= MAX_QUEUES:
            raise ConfigError(f"{num_queues} queues; this transport supports 1..{MAX_QUEUES}")
        if not 0 < backend.max_queue_size <= 0x8000:
            raise ConfigError(f"max queue size {backend.max_queue_size} outside 1..32768")
        if not 0 <= backend.config_size <= SUBREGION_SIZE:
            raise ConfigError(f"device config size {backend.config_size} outside 0..4096")
        self.backend = backend
        self.num_vectors = num_queues + 1
        if self.num_vectors > MSIX_MAX_VECTORS:
            raise ConfigError(f"{self.num_vectors} MSI-X vectors; at most {MSIX_MAX_VECTORS}")
        self.msix = IrqEventfds(self.num_vectors)
        self.intx = IrqEventfds(1)
        self.state = VirtioState(
            backend,
            device_features=backend.device_features & ~UNSUPPORTED_FEATURES,
            num_vectors=self.num_vectors,
            on_needs_reset=self._raise_config_interrupt,
        )
        regions = tuple(shmem_layout.regions) if shmem_layout is not None else ()
        self._shmem_bar_size = shmem_layout.bar_size if shmem_layout and regions else 0
        self._msix_bar_size, self._pba_offset = msix_bar_layout(self.num_vectors)
        self._msix_table = bytearray(self.num_vectors * MSIX_ENTRY_SIZE)
        self._reset_msix_table()

        self.config = PciConfigSpace(
            vendor_id=PCI_VENDOR_ID_REDHAT_QUMRANET,
            device_id=PCI_DEVICE_ID_VIRTIO_1_BASE + backend.virtio_id,
            revision=VIRTIO_PCI_REVISION,
            class_code=class_code_for(backend.virtio_id),
            subsystem_vendor_id=PCI_VENDOR_ID_REDHAT_QUMRANET,
            subsystem_id=PCI_SUBDEVICE_ID_QEMU,
            interrupt_pin=1,
        )
        self.config.add_bar(MSIX_BAR, self._msix_bar_size, is_64bit=False, prefetchable=False)
        self.config.add_bar(VIRTIO_BAR, VIRTIO_BAR_SIZE, is_64bit=True, prefetchable=True)
        if self._shmem_bar_size:
            self.config.add_bar(SHMEM_BAR, self._shmem_bar_size, is_64bit=True, prefetchable=True)
        self.msix_cap = self._add_msix_cap()
        self.cap_offsets: dict[VirtioPciCapType, int] = {}
        self._add_virtio_caps(regions)
        self.config.seal()
        self._regions = self._region_table(shmem)
        self._shmem = shmem
        self._kick_fds = backend if isinstance(backend, KickFdSource) else None
        self._kick_sink: KickSink | None = None

        # Transport registers that are not part of VirtioState.
        self._device_feature_select = 0
        self._driver_feature_select = 0
        self._msix_config = NO_VECTOR
        self._queue_select = 0
        self._isr = Isr(0)
        self._pending_kicks: set[int] = set()

    # Construction

    def _region_table(self, shmem: ShmemAccess | None) -> tuple[RegionHandler, ...]:
        """Region index -> handler, for every VFIO region index; absent ones have size 0."""
        table = [ABSENT_REGION] * NUM_REGIONS
        table[MSIX_BAR] = RegionHandler(self._msix_bar_size, self._msix_read, self._msix_write)
        table[VIRTIO_BAR] = RegionHandler(VIRTIO_BAR_SIZE, self._split_read, self._split_write)
        if self._shmem_bar_size:
            # The shared-memory BAR's own read and write: nothing of ours on that path.
            # (``is None``: a SharedMemoryBar with no live mapping is falsy, it has __len__.)
            if shmem is not None:
                handler = RegionHandler(self._shmem_bar_size, shmem.read, shmem.write)
            else:
                handler = RegionHandler(self._shmem_bar_size, _read_nothing, _write_nothing)
            table[SHMEM_BAR] = handler
        table[RegionIndex.CONFIG] = RegionHandler(
            CONFIG_REGION_SIZE, self._config_read, self._config_write
        )
        return tuple(table)

    def _reset_msix_table(self) -> None:
        """Every entry starts masked (Vector Control bit 0), as after a PCI reset."""
        self._msix_table[:] = bytes(len(self._msix_table))
        for vector in range(self.num_vectors):
            self._msix_table[vector * MSIX_ENTRY_SIZE + 12] = 1

    def _add_msix_cap(self) -> int:
        control = (self.num_vectors - 1) & 0x7FF
        body = struct.pack("<HII", control, MSIX_BAR, self._pba_offset | MSIX_BAR)
        wmask = struct.pack("<HII", MSIX_CONTROL_ENABLE | MSIX_CONTROL_MASKALL, 0, 0)
        return self.config.add_capability(PciCapId.MSIX, body, wmask)

    def _add_vendor_cap(
        self,
        cfg_type: VirtioPciCapType,
        *,
        bar: int,
        offset: int,
        length: int,
        cap_id: int = 0,
        extra: bytes = b"",
        wmask: bytes | None = None,
    ) -> int:
        cap_len = 2 + _VIRTIO_CAP.size + len(extra)
        body = (
            _VIRTIO_CAP.pack(
                cap_len, cfg_type, bar, cap_id, offset & 0xFFFF_FFFF, length & 0xFFFF_FFFF
            )
            + extra
        )
        return self.config.add_capability(PciCapId.VNDR, body, wmask)

    def _add_virtio_caps(self, regions: Sequence[ShmemRegionInfo]) -> None:
        caps = self.cap_offsets
        caps[VirtioPciCapType.COMMON_CFG] = self._add_vendor_cap(
            VirtioPciCapType.COMMON_CFG, bar=VIRTIO_BAR, offset=COMMON_OFFSET, length=SUBREGION_SIZE
        )
        caps[VirtioPciCapType.NOTIFY_CFG] = self._add_vendor_cap(
            VirtioPciCapType.NOTIFY_CFG,
            bar=VIRTIO_BAR,
            offset=NOTIFY_OFFSET,
            length=SUBREGION_SIZE,
            extra=_U32.pack(NOTIFY_OFF_MULTIPLIER),
        )
        caps[VirtioPciCapType.ISR_CFG] = self._add_vendor_cap(
            VirtioPciCapType.ISR_CFG, bar=VIRTIO_BAR, offset=ISR_OFFSET, length=SUBREGION_SIZE
        )
        if self.backend.config_size > 0:
            caps[VirtioPciCapType.DEVICE_CFG] = self._add_vendor_cap(
                VirtioPciCapType.DEVICE_CFG,
                bar=VIRTIO_BAR,
                offset=DEVICE_OFFSET,
                length=SUBREGION_SIZE,
            )
        # virtio_pci_cfg_cap: bar, offset, length and pci_cfg_data are driver-writable.
        cfg_wmask = b"\x00\x00\xff\x00\x00\x00" + b"\xff" * 8 + b"\xff" * 4
        caps[VirtioPciCapType.PCI_CFG] = self._add_vendor_cap(
            VirtioPciCapType.PCI_CFG,
            bar=0,
            offset=0,
            length=0,
            extra=bytes(4),
            wmask=cfg_wmask,
        )
        self.shm_caps: list[int] = []
        for region in regions:
            try:
                offset = self._add_vendor_cap(
                    VirtioPciCapType.SHARED_MEMORY_CFG,
                    bar=SHMEM_BAR,
                    offset=region.bar_offset,
                    length=region.size,
                    cap_id=region.shmid,
                    extra=struct.pack("<II", region.bar_offset >> 32, region.size >> 32),
                )
            except ConfigError as exc:
                raise ConfigError(
                    f"{len(regions)} shared memory regions do not fit in a "
                    f"{CONFIG_REGION_SIZE}-byte config space ({len(self.shm_caps)} did)"
                ) from exc
            self.shm_caps.append(offset)

    # PciDevice

    def region_info(self, index: int) -> DeviceRegion:
        size = self._regions[index].size if 0 <= index < NUM_REGIONS else 0
        access = RegionPermission.READ | RegionPermission.WRITE if size else RegionPermission.NONE
        return DeviceRegion(index=index, size=size, access=access)

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        region = self._regions[index] if 0 <= index < NUM_REGIONS else ABSENT_REGION
        if size > 0 and 0 <= offset <= region.size - size:
            return region.read(offset, size)
        return _clipped_read(region, offset, size)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        region = self._regions[index] if 0 <= index < NUM_REGIONS else ABSENT_REGION
        if data and 0 <= offset <= region.size - len(data):
            region.write(offset, data)
        else:
            _clipped_write(region, index, offset, data)

    def direct_access(self) -> DirectAccess:
        """BAR 4 when it is a ``SharedMemoryBar`` (a fake stays on the Python path), and the
        notify area of BAR 2, whose armed kicks the server writes itself."""
        shmem = self._shmem
        window = None
        if self._shmem_bar_size and isinstance(shmem, DirectShmem):
            window = SharedMemoryWindow(
                SHMEM_BAR,
                shmem.host_address,
                self._shmem_bar_size,
                shmem.max_access,
                shmem.dropped_write,
                shmem.on_unusable,
            )
        notify = NotifyArea(
            VIRTIO_BAR, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER, len(self.state.queues)
        )
        return DirectAccess(window, notify)

    def set_kick_sink(self, sink: KickSink | None) -> None:
        """The server's hot path: armed with each running queue's kick eventfd (see
        ``_arm_kicks``), disarmed before the ``VirtioDevice`` may close them."""
        if self._kick_sink is not None:
            self._kick_sink.disarm_all()
        self._kick_sink = sink
        self._arm_kicks()

    def disarm_kicks(self) -> None:
        """Stop lending kick eventfds: the device is stopping or its owner closes them."""
        if self._kick_sink is not None:
            self._kick_sink.disarm_all()

    def _arm_kicks(self) -> None:
        """Arm what ``_notify_write`` would kick at once: enabled queues of an active device
        whose ``VirtioDevice`` has a kick eventfd (a standalone device has none)."""
        sink, source = self._kick_sink, self._kick_fds
        if sink is None:
            return
        sink.disarm_all()
        if source is None or not self.state.active:
            return
        for queue in self.state.queues:
            fd = source.kick_fd(queue.index) if queue.enabled else None
            if fd is not None:
                sink.arm(queue.index, fd)

    def irq_count(self, index: int) -> int:
        if index == IrqIndex.MSIX:
            return self.num_vectors
        if index in (IrqIndex.INTX, IrqIndex.ERR, IrqIndex.REQ):
            return 1
        return 0

    def reset(self) -> None:
        """Function-level reset: virtio state, config space and the MSI-X table."""
        logger.info("function reset")
        self._reset_virtio()
        self.config.reset()
        self._reset_msix_table()

    def driver_reset(self) -> None:
        """What the driver's write of 0 to device_status does (the monitor's ``device-reset``):
        the ``VirtioDevice`` is deactivated and reset (the vhost-user front-end resets its
        back-end and drops the shared-memory mappings); config space and MSI-X table stay."""
        self._reset_virtio()

    def close(self) -> None:
        """Close the interrupt eventfds this device holds (``msix``, ``intx``). Idempotent.

        The shared-memory BAR and the ``VirtioDevice`` were handed in; their owner closes them.
        """
        self.msix.close()
        self.intx.close()

    # Events from the back-end side

    def config_changed(self) -> None:
        """The device config changed (vhost-user CONFIG_CHANGE_MSG)."""
        self.state.bump_config_generation()
        self._raise_config_interrupt()

    def set_needs_reset(self) -> None:
        """Set DEVICE_NEEDS_RESET and tell the driver through a config interrupt."""
        self.state.set_needs_reset()

    def queue_interrupt(self, queue: int) -> None:
        """Interrupt the driver for ``queue`` from Python (when no back-end call fd does it)."""
        state = self.state.queue(queue)
        if state is not None:
            self._interrupt(Isr.QUEUE, state.msix_vector)

    @property
    def msix_enabled(self) -> bool:
        """MSI-X in use: the enable bit reached our config space or the client set eventfds."""
        control = self.config.get_u16(self.msix_cap + 2)
        if control & MSIX_CONTROL_ENABLE:
            return True
        return any(self.msix.eventfd(vector) is not None for vector in range(self.num_vectors))

    def _drop_mappings(self) -> None:
        """A device reset drops every shared-memory mapping (the virtio spec). First, before
        the device stops its back-end's rings and resets it: a back-end that maps again in
        answer to GET_VRING_BASE or RESET_DEVICE keeps what it mapped."""
        shmem = self._shmem
        if shmem is not None and len(shmem):
            logger.info(
                "device reset: dropping %d shared-memory mapping(s); the back-end is told next "
                "(GET_VRING_BASE if its rings ran, RESET_DEVICE) and must map again",
                len(shmem),
            )
            shmem.reset()

    def _raise_config_interrupt(self) -> None:
        self._interrupt(Isr.DEVICE_CONFIG, self._msix_config)

    def _interrupt(self, cause: Isr, vector: int) -> None:
        self._isr |= cause
        if self.msix_enabled:
            if vector != NO_VECTOR:
                self.msix.trigger(vector)
        elif not self.config.get_u16(PciReg.COMMAND) & PciCommand.INTX_DISABLE:
            self.intx.trigger(0)

    def _reset_virtio(self) -> None:
        self.disarm_kicks()
        self._drop_mappings()
        self.state.reset()
        self._device_feature_select = 0
        self._driver_feature_select = 0
        self._msix_config = NO_VECTOR
        self._queue_select = 0
        self._isr = Isr(0)
        self._pending_kicks.clear()

    # Config space and the virtio_pci_cfg_cap window

    def _command_written(self) -> None:
        """Bus mastering off means no more DMA: stop the back-end, as QEMU's virtio-pci does."""
        if self.config.get_u16(PciReg.COMMAND) & PciCommand.MASTER or not self.state.active:
            return
        self.disarm_kicks()
        logger.info("bus mastering disabled: stopping the device")
        self.state.stop()

    def _cfg_window(self) -> tuple[int, int, int, int]:
        """``(data_offset, bar, bar_offset, length)`` of the PCI configuration access window."""
        cap = self.cap_offsets[VirtioPciCapType.PCI_CFG]
        return (
            cap + 16,
            self.config.get_u8(cap + 4),
            self.config.get_u32(cap + 8),
            self.config.get_u32(cap + 12),
        )

    def _window_usable(self, bar: int, bar_offset: int, length: int) -> bool:
        """The window reaches BARs only (never this config space), with an aligned 1, 2 or 4."""
        if bar > RegionIndex.BAR5 or length not in (1, 2, 4) or bar_offset % length:
            logger.debug("PCI cfg window %d@%#x in BAR %d ignored", length, bar_offset, bar)
            return False
        return True

    def _config_read(self, offset: int, size: int) -> bytes:
        data_off, bar, bar_offset, length = self._cfg_window()
        if offset < data_off + 4 and data_off < offset + size:
            value = b""
            if self._window_usable(bar, bar_offset, length):
                value = self.region_read(bar, bar_offset, length)
            self.config.set_bytes(data_off, value.ljust(4, b"\0"))
        return self.config.read(offset, size)

    def _config_write(self, offset: int, data: bytes) -> None:
        self.config.write(offset, data)
        if offset <= PciReg.COMMAND < offset + len(data):
            self._command_written()
        data_off, bar, bar_offset, length = self._cfg_window()
        touched = offset < data_off + 4 and data_off < offset + len(data)
        if touched and self._window_usable(bar, bar_offset, length):
            self.region_write(bar, bar_offset, self.config.read(data_off, length))

    # Virtio structures (BAR 2)

    def _split_read(self, offset: int, size: int) -> bytes:
        """Serve a BAR 2 read piece by piece, one 4 KiB structure at a time."""
        out = bytearray(size)
        pos = max(offset, 0)
        end = min(offset + size, VIRTIO_BAR_SIZE)
        while pos < end:
            base = pos - pos % SUBREGION_SIZE
            stop = min(end, base + SUBREGION_SIZE)
            rel, length = pos - base, stop - pos
            if base == COMMON_OFFSET:
                chunk = self._common_read(rel, length)
            elif base == ISR_OFFSET:
                chunk = self._isr_read(rel, length)
            elif base == DEVICE_OFFSET:
                chunk = self._device_cfg_read(rel, length)
            else:
                chunk = bytes(length)
            out[pos - offset : stop - offset] = chunk
            pos = stop
        return bytes(out)

    def _split_write(self, offset: int, data: bytes) -> None:
        base = offset - offset % SUBREGION_SIZE
        if offset + len(data) > base + SUBREGION_SIZE:
            logger.debug("BAR 2 write %d@%#x crosses structures; dropped", len(data), offset)
            return
        rel = offset - base
        if base == COMMON_OFFSET:
            self._common_write(rel, data)
        elif base == DEVICE_OFFSET:
            self._device_cfg_write(rel, data)
        elif base == NOTIFY_OFFSET:
            self._notify_write(rel, data)
        else:
            logger.debug("write to read-only ISR dropped")

    # Common configuration

    def _common_value(self, field: CommonCfg) -> int:
        state = self.state
        queue = state.queue(self._queue_select)
        match field:
            case CommonCfg.DEVICE_FEATURE_SELECT:
                return self._device_feature_select
            case CommonCfg.DEVICE_FEATURE:
                return state.device_features_word(self._device_feature_select)
            case CommonCfg.DRIVER_FEATURE_SELECT:
                return self._driver_feature_select
            case CommonCfg.DRIVER_FEATURE:
                return state.driver_features_word(self._driver_feature_select)
            case CommonCfg.CONFIG_MSIX_VECTOR:
                return self._msix_config
            case CommonCfg.NUM_QUEUES:
                return len(state.queues)
            case CommonCfg.DEVICE_STATUS:
                return int(state.status)
            case CommonCfg.CONFIG_GENERATION:
                return state.config_generation
            case CommonCfg.QUEUE_SELECT:
                return self._queue_select
            case CommonCfg.QUEUE_MSIX_VECTOR:
                return queue.msix_vector if queue else NO_VECTOR
            case CommonCfg.QUEUE_RESET:
                return 0
        if queue is None:
            return 0
        match field:
            case CommonCfg.QUEUE_SIZE:
                return queue.size
            case CommonCfg.QUEUE_ENABLE:
                return int(queue.enabled)
            case CommonCfg.QUEUE_NOTIFY_OFF | CommonCfg.QUEUE_NOTIFY_DATA:
                return queue.index
            case CommonCfg.QUEUE_DESC:
                return queue.desc
            case CommonCfg.QUEUE_DRIVER:
                return queue.driver
            case CommonCfg.QUEUE_DEVICE:
                return queue.device
        return 0

    def _common_read(self, rel: int, size: int) -> bytes:
        image = bytearray(COMMON_CFG_SIZE)
        for field, width in COMMON_CFG_WIDTH.items():
            if field < rel + size and rel < field + width:
                image[field : field + width] = self._common_value(field).to_bytes(width, "little")
        out = bytearray(size)
        end = min(rel + size, COMMON_CFG_SIZE)
        if rel < end:
            out[: end - rel] = image[rel:end]
        return bytes(out)

    def _common_write(self, rel: int, data: bytes) -> None:
        end = rel + len(data)
        for field, width in COMMON_CFG_WIDTH.items():
            lo, hi = max(rel, field), min(end, field + width)
            if lo >= hi:
                continue
            value = _merge(self._common_value(field), width, lo - field, data[lo - rel : hi - rel])
            self._common_set(field, value)

    def _common_set(self, field: CommonCfg, value: int) -> None:
        state = self.state
        select = self._queue_select
        match field:
            case CommonCfg.DEVICE_FEATURE_SELECT:
                self._device_feature_select = value
            case CommonCfg.DRIVER_FEATURE_SELECT:
                self._driver_feature_select = value
            case CommonCfg.DRIVER_FEATURE:
                state.write_driver_features(self._driver_feature_select, value)
            case CommonCfg.CONFIG_MSIX_VECTOR:
                self._msix_config = state.checked_vector(value)
            case CommonCfg.DEVICE_STATUS:
                self._write_status(value)
            case CommonCfg.QUEUE_SELECT:
                self._queue_select = value
            case CommonCfg.QUEUE_SIZE:
                state.set_queue_size(select, value)
            case CommonCfg.QUEUE_MSIX_VECTOR:
                state.set_queue_vector(select, value)
            case CommonCfg.QUEUE_ENABLE:
                state.enable_queue(select, value)
            case CommonCfg.QUEUE_DESC:
                state.set_queue_address(select, "desc", value)
            case CommonCfg.QUEUE_DRIVER:
                state.set_queue_address(select, "driver", value)
            case CommonCfg.QUEUE_DEVICE:
                state.set_queue_address(select, "device", value)
            case _:
                logger.debug("write to read-only common config field %s ignored", field.name)

    def _write_status(self, value: int) -> None:
        if value == 0:
            logger.info("driver reset the device")
            self.driver_reset()
            return
        was_active = self.state.active
        self.state.write_status(value)
        if self.state.active and not was_active:
            for queue in sorted(self._pending_kicks):
                self._kick(queue)
            self._pending_kicks.clear()
            self._arm_kicks()

    # ISR, device config, notifications

    def _isr_read(self, rel: int, size: int) -> bytes:
        """Reading the ISR byte returns and clears it (and so deasserts INTx)."""
        out = bytearray(size)
        if rel == 0:
            out[0] = int(self._isr)
            self._isr = Isr(0)
        return bytes(out)

    def _device_cfg_read(self, rel: int, size: int) -> bytes:
        out = bytearray(size)
        end = min(rel + size, self.backend.config_size)
        if rel < end:
            try:
                data = self.backend.read_config(rel, end - rel)
            except Exception:
                logger.exception("back-end failed to read config %d@%#x", end - rel, rel)
                self.set_needs_reset()
                return bytes(out)
            out[: end - rel] = data[: end - rel].ljust(end - rel, b"\0")
        return bytes(out)

    def _device_cfg_write(self, rel: int, data: bytes) -> None:
        end = min(rel + len(data), self.backend.config_size)
        if rel >= end:
            logger.debug("device config write %d@%#x past the config dropped", len(data), rel)
            return
        try:
            self.backend.write_config(rel, data[: end - rel])
        except Exception:
            logger.exception("back-end failed to write config %d@%#x", end - rel, rel)
            self.set_needs_reset()

    def _notify_write(self, rel: int, data: bytes) -> None:
        """16-bit (queue index) or 32-bit (notification data) write at queue * 4."""
        queue = rel // NOTIFY_OFF_MULTIPLIER
        if rel % NOTIFY_OFF_MULTIPLIER or len(data) not in (2, 4):
            logger.debug("notify write %d@%#x ignored", len(data), rel)
            return
        state = self.state.queue(queue)
        if state is None or not state.enabled:
            logger.debug("notify for absent or disabled queue %d ignored", queue)
            return
        if not self.state.active:
            self._pending_kicks.add(queue)
            return
        self._kick(queue)

    def _kick(self, queue: int) -> None:
        try:
            self.backend.kick(queue)
        except Exception:
            logger.exception("back-end failed to take a kick for queue %d", queue)
            self.set_needs_reset()

    # MSI-X table / PBA (BAR 1)

    def _msix_read(self, offset: int, size: int) -> bytes:
        pba = self.msix.pending_bits().to_bytes(self._msix_bar_size - self._pba_offset, "little")
        image = bytes(self._msix_table).ljust(self._pba_offset, b"\0") + pba
        out = bytearray(size)
        start, end = max(offset, 0), min(offset + size, len(image))
        if start < end:
            out[start - offset : end - offset] = image[start:end]
        return bytes(out)

    def _msix_write(self, offset: int, data: bytes) -> None:
        table_end = len(self._msix_table)
        for i, value in enumerate(data):
            pos = offset + i
            if 0 <= pos < table_end:
                self._msix_table[pos] = value
