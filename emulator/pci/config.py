"""PCI type-0 configuration space: 256 bytes, a per-byte writable mask, BARs and capabilities.

QEMU treats a 256-byte config region as conventional PCI, so there is no extended space and
every capability must fit between 0x40 and 0xff. Register semantics live entirely in the masks:
a write changes only writable bits and clears write-1-to-clear bits, so BAR sizing (write
all-ones, read back the size mask) falls out of the BAR's writable mask without special code.
Every access is from the untrusted client: any offset and any length are served, bytes outside
the space read as zero and writes to them are dropped.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from emulator.errors import ConfigError

logger = logging.getLogger(__name__)

CONFIG_SPACE_SIZE = 256
CAPABILITIES_START = 0x40
NUM_BARS = 6


class PciReg(enum.IntEnum):
    """Type-0 header register offsets (linux/pci_regs.h PCI_*)."""

    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    CLASS_REVISION = 0x08
    REVISION_ID = 0x08
    CLASS_PROG = 0x09
    CLASS_DEVICE = 0x0A
    CACHE_LINE_SIZE = 0x0C
    LATENCY_TIMER = 0x0D
    HEADER_TYPE = 0x0E
    BIST = 0x0F
    BASE_ADDRESS_0 = 0x10
    CARDBUS_CIS = 0x28
    SUBSYSTEM_VENDOR_ID = 0x2C
    SUBSYSTEM_ID = 0x2E
    ROM_ADDRESS = 0x30
    CAPABILITY_LIST = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D
    MIN_GNT = 0x3E
    MAX_LAT = 0x3F


class PciCommand(enum.IntFlag):
    """Command register bits (PCI_COMMAND_*)."""

    IO = 0x1
    MEMORY = 0x2
    MASTER = 0x4
    SPECIAL = 0x8
    INVALIDATE = 0x10
    VGA_PALETTE = 0x20
    PARITY = 0x40
    WAIT = 0x80
    SERR = 0x100
    FAST_BACK = 0x200
    INTX_DISABLE = 0x400


class PciStatus(enum.IntFlag):
    """Status register bits (PCI_STATUS_*)."""

    IMM_READY = 0x01
    INTERRUPT = 0x08
    CAP_LIST = 0x10
    MHZ_66 = 0x20
    UDF = 0x40
    FAST_BACK = 0x80
    PARITY = 0x100
    DEVSEL_MASK = 0x600
    SIG_TARGET_ABORT = 0x800
    REC_TARGET_ABORT = 0x1000
    REC_MASTER_ABORT = 0x2000
    SIG_SYSTEM_ERROR = 0x4000
    DETECTED_PARITY = 0x8000


# The error bits a device latches and software clears by writing 1 (PCI 3.0 section 6.2.3).
STATUS_W1C = (
    PciStatus.PARITY
    | PciStatus.SIG_TARGET_ABORT
    | PciStatus.REC_TARGET_ABORT
    | PciStatus.REC_MASTER_ABORT
    | PciStatus.SIG_SYSTEM_ERROR
    | PciStatus.DETECTED_PARITY
)


class PciBaseAddress(enum.IntFlag):
    """Low bits of a memory BAR (PCI_BASE_ADDRESS_*)."""

    SPACE_IO = 0x1
    MEM_TYPE_32 = 0x0
    MEM_TYPE_64 = 0x4
    MEM_PREFETCH = 0x8


class PciCapId(enum.IntEnum):
    """Capability IDs (PCI_CAP_ID_*)."""

    PM = 0x01
    MSI = 0x05
    VNDR = 0x09
    EXP = 0x10
    MSIX = 0x11


@dataclass(frozen=True, slots=True)
class Bar:
    """A memory BAR as declared by the device; ``index`` is the low register for 64-bit BARs."""

    index: int
    size: int
    is_64bit: bool
    prefetchable: bool

    @property
    def flags(self) -> int:
        flags = PciBaseAddress.MEM_TYPE_64 if self.is_64bit else PciBaseAddress.MEM_TYPE_32
        if self.prefetchable:
            flags |= PciBaseAddress.MEM_PREFETCH
        return int(flags)


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class PciConfigSpace:
    """A 256-byte type-0 header with writable and write-1-to-clear masks.

    Build it (identity, BARs, capabilities), then call ``seal()``: the image at that moment is
    what ``reset()`` restores, as a function-level reset would.
    """

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        revision: int,
        class_code: int,
        subsystem_vendor_id: int,
        subsystem_id: int,
        interrupt_pin: int = 1,
    ) -> None:
        self._data = bytearray(CONFIG_SPACE_SIZE)
        self._wmask = bytearray(CONFIG_SPACE_SIZE)
        self._w1cmask = bytearray(CONFIG_SPACE_SIZE)
        self._bars: dict[int, Bar] = {}
        self._last_cap = 0
        self._next_free = CAPABILITIES_START
        self._initial = bytes(self._data)

        self.set_u16(PciReg.VENDOR_ID, vendor_id)
        self.set_u16(PciReg.DEVICE_ID, device_id)
        self.set_u8(PciReg.REVISION_ID, revision)
        self.set_u8(PciReg.CLASS_PROG, class_code & 0xFF)
        self.set_u16(PciReg.CLASS_DEVICE, (class_code >> 8) & 0xFFFF)
        self.set_u16(PciReg.SUBSYSTEM_VENDOR_ID, subsystem_vendor_id)
        self.set_u16(PciReg.SUBSYSTEM_ID, subsystem_id)
        self.set_u8(PciReg.INTERRUPT_PIN, interrupt_pin)

        command = PciCommand.MEMORY | PciCommand.MASTER | PciCommand.INTX_DISABLE
        self.set_wmask(PciReg.COMMAND, int(command).to_bytes(2, "little"))
        self.set_w1cmask(PciReg.STATUS, int(STATUS_W1C).to_bytes(2, "little"))
        self.set_wmask(PciReg.CACHE_LINE_SIZE, b"\xff")
        self.set_wmask(PciReg.INTERRUPT_LINE, b"\xff")

    # Raw access for the device model (ignores the masks).

    def get_u8(self, offset: int) -> int:
        return self._data[offset]

    def get_u16(self, offset: int) -> int:
        return int.from_bytes(self._data[offset : offset + 2], "little")

    def get_u32(self, offset: int) -> int:
        return int.from_bytes(self._data[offset : offset + 4], "little")

    def set_u8(self, offset: int, value: int) -> None:
        self._data[offset] = value & 0xFF

    def set_u16(self, offset: int, value: int) -> None:
        self._data[offset : offset + 2] = (value & 0xFFFF).to_bytes(2, "little")

    def set_u32(self, offset: int, value: int) -> None:
        self._data[offset : offset + 4] = (value & 0xFFFF_FFFF).to_bytes(4, "little")

    def set_bytes(self, offset: int, data: bytes) -> None:
        self._data[offset : offset + len(data)] = data

    def set_wmask(self, offset: int, mask: bytes) -> None:
        self._wmask[offset : offset + len(mask)] = mask

    def set_w1cmask(self, offset: int, mask: bytes) -> None:
        self._w1cmask[offset : offset + len(mask)] = mask

    # BARs

    def add_bar(self, index: int, size: int, *, is_64bit: bool, prefetchable: bool) -> Bar:
        """Declare a memory BAR of ``size`` bytes (a power of two, at least 16)."""
        last = index + 1 if is_64bit else index
        if index < 0 or last >= NUM_BARS:
            raise ConfigError(f"BAR {index} does not exist")
        if not _is_power_of_two(size) or size < 16:
            raise ConfigError(f"BAR {index} size {size:#x} is not a power of two >= 16")
        if not is_64bit and size > 1 << 32:
            raise ConfigError(f"32-bit BAR {index} cannot hold {size:#x} bytes")
        if any(i in self._bars or self._bar_upper(i) for i in range(index, last + 1)):
            raise ConfigError(f"BAR {index} overlaps a BAR already declared")
        bar = Bar(index=index, size=size, is_64bit=is_64bit, prefetchable=prefetchable)
        self._bars[index] = bar
        reg = PciReg.BASE_ADDRESS_0 + 4 * index
        address_mask = ~(size - 1) & ((1 << 64) - 1 if is_64bit else 0xFFFF_FFFF)
        address_mask &= ~0xF
        self.set_u32(reg, bar.flags)
        self.set_wmask(reg, (address_mask & 0xFFFF_FFFF).to_bytes(4, "little"))
        if is_64bit:
            self.set_wmask(reg + 4, (address_mask >> 32).to_bytes(4, "little"))
        return bar

    def _bar_upper(self, index: int) -> bool:
        low = self._bars.get(index - 1)
        return low is not None and low.is_64bit

    def bar(self, index: int) -> Bar | None:
        return self._bars.get(index)

    def bar_address(self, index: int) -> int:
        """The address the guest programmed into BAR ``index`` (0 if it is not implemented)."""
        bar = self._bars.get(index)
        if bar is None:
            return 0
        reg = PciReg.BASE_ADDRESS_0 + 4 * index
        address = self.get_u32(reg) & ~0xF
        if bar.is_64bit:
            address |= self.get_u32(reg + 4) << 32
        return address

    # Capabilities

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None) -> int:
        """Append a capability; ``body`` follows the ID and next-pointer bytes.

        Returns the capability's offset. ``wmask`` (same length as ``body``) marks the bits of
        the body the guest may write.
        """
        length = 2 + len(body)
        offset = self._next_free
        if offset + length > CONFIG_SPACE_SIZE:
            raise ConfigError(
                f"capability {cap_id:#x} ({length} bytes) does not fit in the "
                f"{CONFIG_SPACE_SIZE}-byte config space"
            )
        if wmask is not None and len(wmask) != len(body):
            raise ConfigError("capability writable mask must match the body length")
        self._data[offset] = cap_id
        self._data[offset + 1] = 0
        self._data[offset + 2 : offset + length] = body
        if wmask is not None:
            self._wmask[offset + 2 : offset + length] = wmask
        if self._last_cap:
            self._data[self._last_cap + 1] = offset
        else:
            self._data[PciReg.CAPABILITY_LIST] = offset
            self.set_u16(PciReg.STATUS, self.get_u16(PciReg.STATUS) | PciStatus.CAP_LIST)
        self._last_cap = offset
        self._next_free = (offset + length + 3) & ~3
        return offset

    # Lifetime

    def seal(self) -> None:
        """Remember the current image as the reset state."""
        self._initial = bytes(self._data)

    def reset(self) -> None:
        """Function-level reset: back to the sealed image (BARs, command, capability state)."""
        self._data[:] = self._initial

    # Client access

    def read(self, offset: int, size: int) -> bytes:
        """Any offset and length; bytes outside the space read as zero."""
        if size <= 0:
            return b""
        out = bytearray(size)
        start = max(offset, 0)
        end = min(offset + size, CONFIG_SPACE_SIZE)
        if start < end:
            out[start - offset : end - offset] = self._data[start:end]
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Apply the masks byte by byte; bytes outside the space are dropped."""
        for i, value in enumerate(data):
            pos = offset + i
            if not 0 <= pos < CONFIG_SPACE_SIZE:
                continue
            wmask = self._wmask[pos]
            old = self._data[pos]
            new = (old & ~wmask) | (value & wmask)
            new &= ~(value & self._w1cmask[pos])
            self._data[pos] = new & 0xFF
