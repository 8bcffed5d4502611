"""PCI capability list walker and virtio vendor-capability decoder.

Input is the raw bytes of ``/sys/bus/pci/devices/<BDF>/config``, which come from a
device we do not trust: every problem (loops, truncation, bad pointers, regions
outside their BAR) becomes a ``Finding`` in the report instead of an exception.
"""

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from vguest.sysfs import NUM_BARS, VIRTIO_VENDOR, Resource

PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_STD_HEADER_SIZEOF = 0x40
PCI_CFG_SPACE_SIZE = 0x100

VIRTIO_PCI_CAP_LEN = 16
VIRTIO_PCI_NOTIFY_CAP_LEN = 20
VIRTIO_PCI_CAP64_LEN = 24
VIRTIO_PCI_CFG_CAP_LEN = 20

_CAP = struct.Struct("<BBBBBB2xII")  # vndr, next, len, cfg_type, bar, id, offset, length


class PCI_CAP_ID(IntEnum):
    """Capability IDs (include/uapi/linux/pci_regs.h) we name in output."""

    PM = 0x01
    AGP = 0x02
    VPD = 0x03
    SLOTID = 0x04
    MSI = 0x05
    CHSWP = 0x06
    PCIX = 0x07
    HT = 0x08
    VNDR = 0x09
    DBG = 0x0A
    CCRC = 0x0B
    SHPC = 0x0C
    SSVID = 0x0D
    AGP3 = 0x0E
    SECDEV = 0x0F
    EXP = 0x10
    MSIX = 0x11
    SATA = 0x12
    AF = 0x13
    EA = 0x14


class VIRTIO_PCI_CAP(IntEnum):
    """virtio ``cfg_type`` values (virtio 1.x, 4.1.4)."""

    COMMON_CFG = 1
    NOTIFY_CFG = 2
    ISR_CFG = 3
    DEVICE_CFG = 4
    PCI_CFG = 5
    SHARED_MEMORY_CFG = 8
    VENDOR_CFG = 9


class Severity(IntEnum):
    WARNING = 1
    ERROR = 2


@dataclass(frozen=True, slots=True)
class Finding:
    """A problem in the config space; ``offset`` is the capability's, when there is one."""

    severity: Severity
    offset: int | None
    message: str

    def __str__(self) -> str:
        where = f"cap@{self.offset:#04x}: " if self.offset is not None else ""
        return f"{self.severity.name.lower()}: {where}{self.message}"


@dataclass(frozen=True, slots=True)
class PciCap:
    offset: int
    cap_id: int

    @property
    def name(self) -> str:
        try:
            return PCI_CAP_ID(self.cap_id).name
        except ValueError:
            return f"ID_{self.cap_id:#04x}"


@dataclass(frozen=True, slots=True)
class VirtioCap:
    """One decoded ``virtio_pci_cap`` (``offset``/``length`` are 64-bit for cap64 types)."""

    cap_offset: int
    cap_len: int
    cfg_type: int
    bar: int
    id: int
    offset: int
    length: int
    notify_off_multiplier: int | None = None

    @property
    def name(self) -> str:
        try:
            return VIRTIO_PCI_CAP(self.cfg_type).name
        except ValueError:
            return f"CFG_TYPE_{self.cfg_type}"


@dataclass(frozen=True, slots=True)
class ShmRegion:
    """A VIRTIO Shared Memory Region: ``length`` bytes at ``offset`` in BAR ``bar``."""

    shmid: int
    bar: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class CapReport:
    caps: tuple[PciCap, ...]
    virtio: tuple[VirtioCap, ...]
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return not any(f.severity is Severity.ERROR for f in self.findings)

    @property
    def shm_regions(self) -> tuple[ShmRegion, ...]:
        return tuple(
            ShmRegion(c.id, c.bar, c.offset, c.length)
            for c in self.virtio
            if c.cfg_type == VIRTIO_PCI_CAP.SHARED_MEMORY_CFG
        )

    def shm_region(self, shmid: int) -> ShmRegion | None:
        """The first region with this id (as a driver would pick it)."""
        return next((r for r in self.shm_regions if r.shmid == shmid), None)


class _Walker:
    def __init__(self, config: bytes, resources: Sequence[Resource] | None) -> None:
        self.config = config
        self.end = min(len(config), PCI_CFG_SPACE_SIZE)
        self.resources = resources
        self.findings: list[Finding] = []

    def error(self, offset: int | None, message: str) -> None:
        self.findings.append(Finding(Severity.ERROR, offset, message))

    def warning(self, offset: int | None, message: str) -> None:
        self.findings.append(Finding(Severity.WARNING, offset, message))

    def walk(self) -> list[PciCap]:
        caps: list[PciCap] = []
        if len(self.config) < PCI_STD_HEADER_SIZEOF:
            self.error(None, f"config space is {len(self.config)} bytes, the header needs 64")
            return caps
        (status,) = struct.unpack_from("<H", self.config, PCI_STATUS)
        if not status & PCI_STATUS_CAP_LIST:
            return caps
        visited: set[int] = set()
        raw = self.config[PCI_CAPABILITY_LIST]
        origin: int | None = None
        while raw:
            if raw & 3:
                self.warning(origin, f"capability pointer {raw:#04x} has reserved bits set")
            ptr = raw & 0xFC
            if ptr < PCI_STD_HEADER_SIZEOF:
                self.error(origin, f"capability pointer {ptr:#04x} points into the header")
                break
            if ptr + 2 > self.end:
                hint = (
                    " (unprivileged reads of sysfs config stop at 64 bytes; run as root)"
                    if len(self.config) <= PCI_STD_HEADER_SIZEOF
                    else ""
                )
                self.error(
                    origin,
                    f"capability pointer {ptr:#04x} is past the {self.end} bytes of "
                    f"config space{hint}",
                )
                break
            if ptr in visited:
                self.error(origin, f"capability list loops back to {ptr:#04x}")
                break
            visited.add(ptr)
            caps.append(PciCap(ptr, self.config[ptr]))
            origin = ptr
            raw = self.config[ptr + 1]
        return caps

    def virtio_cap(self, ptr: int) -> VirtioCap | None:
        avail = self.end - ptr
        if avail < 3:
            self.error(ptr, "virtio capability truncated by the end of config space")
            return None
        cap_len = self.config[ptr + 2]
        if cap_len < VIRTIO_PCI_CAP_LEN:
            self.error(ptr, f"virtio cap_len {cap_len} is shorter than {VIRTIO_PCI_CAP_LEN}")
            return None
        if cap_len > avail:
            self.error(ptr, f"virtio cap_len {cap_len} runs past the end of config space")
            return None
        _, _, _, cfg_type, bar, cap_id, offset, length = _CAP.unpack_from(self.config, ptr)
        multiplier = None
        if cfg_type == VIRTIO_PCI_CAP.NOTIFY_CFG:
            if cap_len < VIRTIO_PCI_NOTIFY_CAP_LEN:
                self.error(ptr, f"notify cap_len {cap_len} is shorter than 20")
                return None
            (multiplier,) = struct.unpack_from("<I", self.config, ptr + 16)
            if multiplier & (multiplier - 1):
                self.error(ptr, f"notify_off_multiplier {multiplier} is not 0 or a power of 2")
        elif cfg_type == VIRTIO_PCI_CAP.SHARED_MEMORY_CFG:
            if cap_len < VIRTIO_PCI_CAP64_LEN:
                self.error(ptr, f"shared memory cap_len {cap_len} is shorter than 24")
                return None
            offset_hi, length_hi = struct.unpack_from("<II", self.config, ptr + 16)
            offset |= offset_hi << 32
            length |= length_hi << 32
        elif cfg_type == VIRTIO_PCI_CAP.PCI_CFG and cap_len < VIRTIO_PCI_CFG_CAP_LEN:
            self.error(ptr, f"PCI cfg cap_len {cap_len} is shorter than 20")
            return None
        cap = VirtioCap(ptr, cap_len, cfg_type, bar, cap_id, offset, length, multiplier)
        self.check_in_bar(cap)
        return cap

    def check_in_bar(self, cap: VirtioCap) -> None:
        """Structures a driver maps must lie inside an implemented BAR."""
        located = (
            VIRTIO_PCI_CAP.COMMON_CFG,
            VIRTIO_PCI_CAP.NOTIFY_CFG,
            VIRTIO_PCI_CAP.ISR_CFG,
            VIRTIO_PCI_CAP.DEVICE_CFG,
            VIRTIO_PCI_CAP.SHARED_MEMORY_CFG,
        )
        if cap.cfg_type not in located:
            return
        what = f"{cap.name} [{cap.offset:#x}, +{cap.length:#x})"
        if cap.bar >= NUM_BARS:
            self.error(cap.cap_offset, f"{what} names BAR {cap.bar} (valid: 0-5)")
            return
        if cap.length == 0:
            self.warning(cap.cap_offset, f"{what} has length 0")
        if self.resources is None:
            return
        res = self.resources[cap.bar] if cap.bar < len(self.resources) else None
        if res is None or res.size == 0:
            self.error(cap.cap_offset, f"{what} is in BAR {cap.bar}, which is not implemented")
        elif cap.offset + cap.length > res.size:
            self.error(cap.cap_offset, f"{what} lies outside BAR {cap.bar} (size {res.size:#x})")
        elif cap.cfg_type == VIRTIO_PCI_CAP.SHARED_MEMORY_CFG and not res.is_memory:
            self.error(cap.cap_offset, f"{what} is in BAR {cap.bar}, which is not memory")

    def check_device(self, virtio: list[VirtioCap]) -> None:
        types = {c.cfg_type for c in virtio}
        for needed in (
            VIRTIO_PCI_CAP.COMMON_CFG,
            VIRTIO_PCI_CAP.NOTIFY_CFG,
            VIRTIO_PCI_CAP.ISR_CFG,
        ):
            if needed not in types:
                self.error(None, f"no {needed.name} capability")
        shm = [c for c in virtio if c.cfg_type == VIRTIO_PCI_CAP.SHARED_MEMORY_CFG]
        seen: dict[int, VirtioCap] = {}
        for c in shm:
            if c.id in seen:
                self.error(
                    c.cap_offset, f"shmid {c.id} already used by cap@{seen[c.id].cap_offset:#04x}"
                )
            else:
                seen[c.id] = c
        for i, a in enumerate(shm):
            for b in shm[i + 1 :]:
                if (
                    a.bar == b.bar
                    and a.offset < b.offset + b.length
                    and b.offset < a.offset + a.length
                ):
                    self.warning(
                        b.cap_offset,
                        f"shmid {b.id} overlaps shmid {a.id} in BAR {a.bar}",
                    )


def parse(
    config: bytes, resources: Sequence[Resource] | None = None, *, virtio: bool | None = None
) -> CapReport:
    """Walk the capability list; decode virtio caps when the device is virtio.

    ``virtio`` defaults to "the vendor ID in ``config`` is 0x1af4": other vendors'
    vendor-specific capabilities have other layouts. ``resources`` (the parsed sysfs
    ``resource`` file) enables the checks that structures lie inside their BAR.
    """
    walker = _Walker(bytes(config), resources)
    caps = walker.walk()
    if virtio is None:
        virtio = len(config) >= 2 and struct.unpack_from("<H", config, 0)[0] == VIRTIO_VENDOR
    decoded: list[VirtioCap] = []
    if virtio:
        for cap in caps:
            if cap.cap_id == PCI_CAP_ID.VNDR:
                v = walker.virtio_cap(cap.offset)
                if v is not None:
                    decoded.append(v)
        if len(config) > PCI_STD_HEADER_SIZEOF:
            walker.check_device(decoded)
    return CapReport(tuple(caps), tuple(decoded), tuple(walker.findings))
