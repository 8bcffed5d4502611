"""The seam between the vfio-user server and the device model.

The server speaks vfio-user and knows nothing about virtio; the device knows nothing about
sockets. Everything the server asks a device goes through ``PciDevice``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from emulator.pci.interrupts import IrqEventfds


class RegionIndex(enum.IntEnum):
    """VFIO PCI region indices (linux/vfio.h VFIO_PCI_*_REGION_INDEX)."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


NUM_REGIONS = 9


class IrqIndex(enum.IntEnum):
    """VFIO PCI interrupt indices (linux/vfio.h VFIO_PCI_*_IRQ_INDEX)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


NUM_IRQS = 5


class RegionPermission(enum.IntFlag):
    """What the client may do with a region (VFIO_REGION_INFO_FLAG_READ/WRITE)."""

    NONE = 0
    READ = 1
    WRITE = 2


@dataclass(frozen=True, slots=True)
class DeviceRegion:
    """Size and permitted access of one region; size 0 means the region does not exist."""

    index: int
    size: int
    access: RegionPermission


class PciDevice(Protocol):
    """A PCI function as the vfio-user server sees it."""

    msix: IrqEventfds
    intx: IrqEventfds

    def region_info(self, index: int) -> DeviceRegion:
        """Describe region ``index`` (0 <= index < NUM_REGIONS)."""
        ...

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        """Serve a read the client has already checked against ``region_info``."""
        ...

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Serve a write the client has already checked against ``region_info``."""
        ...

    def irq_count(self, index: int) -> int:
        """Number of interrupts of VFIO IRQ index ``index``."""
        ...

    def reset(self) -> None:
        """Function-level reset (vfio-user DEVICE_RESET)."""
        ...

    def direct_access(self) -> DirectAccess:
        """The regions whose hot accesses the server may serve without asking the device."""
        ...

    def set_kick_sink(self, sink: KickSink | None) -> None:
        """Where the device arms and disarms queue kick eventfds (the server's hot path)."""
        ...


@dataclass(frozen=True, slots=True)
class SharedMemoryWindow:
    """A BAR that is plain memory: BAR offset X is host address ``host_address + X`` in this
    process, mapped pages hold the data, everything else faults (reads zero, drops writes).

    ``dropped_write(bar_offset, length)`` is told about writes that hit faulting pages, so the
    owner of the mappings can say so once per mapping, as its own ``write`` does;
    ``on_unusable(callback)`` registers what to call once that stops being true (the BAR is
    closed, or a reservation could not be restored): from then on its accesses are the
    device's again.
    """

    index: int
    host_address: int
    size: int
    max_access: int
    dropped_write: Callable[[int, int], None]
    on_unusable: Callable[[Callable[[], None]], None]


@dataclass(frozen=True, slots=True)
class NotifyArea:
    """Queue notifications: a 2- or 4-byte write at ``offset + queue * multiplier``."""

    index: int
    offset: int
    multiplier: int
    num_queues: int


@dataclass(frozen=True, slots=True)
class DirectAccess:
    shmem: SharedMemoryWindow | None
    notify: NotifyArea | None


class KickSink(Protocol):
    """Takes a queue's kick eventfd on loan while the queue may be kicked."""

    def arm(self, queue: int, eventfd: int) -> None: ...

    def disarm_all(self) -> None: ...
