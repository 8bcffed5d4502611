"""Every vfio-user command, flag and payload, with the spec's names and numbers.

Layouts follow docs/interop/vfio-user.rst as QEMU 11.1's client (hw/vfio-user/protocol.h)
really puts them on the wire; where the two disagree the client wins, and the docstring of the
payload says so. All integers are little-endian (every ``STRUCT`` says ``<``). Each payload
subclasses ``wire.payload.Payload``, the base the vhost-user payloads share: a fixed-size one
is its ``STRUCT`` and its fields and nothing else; only the variable-size ones (data after a
head, counted tables, JSON) override ``pack``/``unpack``. Flag fields hold the wire's integer;
handlers wrap them in the ``IntFlag`` below. Each payload checks only its own syntax (sizes,
counts, flag combinations) and raises ``RemoteProtocolError(EINVAL)``; what a value means for
the device is the handler's business.
"""

from __future__ import annotations

import enum
import errno
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from emulator.pci.device import NUM_IRQS, NUM_REGIONS, IrqIndex, RegionIndex
from wire.errors import RemoteProtocolError
from wire.payload import Payload as Payload  # noqa: PLC0414 - re-exported for importers
from wire.payload import check_size

__all__ = [
    "CAPABILITIES",
    "CAP_MAX_BITMAP_SIZE",
    "CAP_MAX_DATA_XFER_SIZE",
    "CAP_MAX_DMA_MAPS",
    "CAP_MAX_MSG_FDS",
    "CAP_MIGRATION",
    "CAP_PGSIZE",
    "CAP_PGSIZES",
    "CAP_TWIN_SOCKET",
    "CAP_WRITE_MULTIPLE",
    "DEFAULT_MAX_DATA_XFER_SIZE",
    "DEFAULT_MAX_MSG_SIZE",
    "HEADER",
    "HEADER_SIZE",
    "MAX_MAX_DATA_XFER_SIZE",
    "MAX_MAX_MSG_FDS",
    "MULTI_DATA_SIZE",
    "MULTI_MAX_WRITES",
    "NUM_IRQS",
    "NUM_REGIONS",
    "TYPE_MASK",
    "Command",
    "DeviceFlags",
    "DeviceInfo",
    "DmaAccess",
    "DmaMap",
    "DmaMapFlags",
    "DmaUnmap",
    "DmaUnmapFlags",
    "HeaderFlags",
    "IoFdSubRegion",
    "IoFdType",
    "IrqIndex",
    "IrqInfo",
    "IrqInfoFlags",
    "IrqSetFlags",
    "MsgType",
    "Payload",
    "RegionAccess",
    "RegionCap",
    "RegionCapId",
    "RegionFlags",
    "RegionIndex",
    "RegionInfo",
    "RegionIoFdsReply",
    "RegionIoFdsRequest",
    "RegionWriteMulti",
    "RegionWriteMultiReply",
    "SetIrqs",
    "SparseMmapArea",
    "Version",
    "pack_region_caps",
    "parse_region_caps",
    "parse_sparse_mmap",
    "sparse_mmap_cap",
]


class Command(enum.IntEnum):
    """VFIO_USER_* command numbers (spec table "Commands")."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15


class MsgType(enum.IntEnum):
    """Header flag bits 0-3 (VFIO_USER_REQUEST / VFIO_USER_REPLY)."""

    COMMAND = 0
    REPLY = 1


TYPE_MASK = 0xF


class HeaderFlags(enum.IntFlag):
    """Header flag bits above the type (VFIO_USER_NO_REPLY, VFIO_USER_ERROR)."""

    NO_REPLY = 0x10
    ERROR = 0x20


class DmaMapFlags(enum.IntFlag):
    """VFIO_DMA_MAP_FLAG_*."""

    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlags(enum.IntFlag):
    """VFIO_DMA_UNMAP_FLAG_* (QEMU 11.1 sends 0 or ALL; it never asks for a bitmap)."""

    GET_DIRTY_BITMAP = 1 << 0
    ALL = 1 << 1


class DeviceFlags(enum.IntFlag):
    """VFIO_DEVICE_FLAGS_*."""

    RESET = 1 << 0
    PCI = 1 << 1


class RegionFlags(enum.IntFlag):
    """VFIO_REGION_INFO_FLAG_*."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class RegionCapId(enum.IntEnum):
    """VFIO_REGION_INFO_CAP_* capability ids (linux/vfio.h)."""

    SPARSE_MMAP = 1
    TYPE = 2
    MSIX_MAPPABLE = 3


class IrqInfoFlags(enum.IntFlag):
    """VFIO_IRQ_INFO_*."""

    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlags(enum.IntFlag):
    """VFIO_IRQ_SET_*: exactly one DATA_* and one ACTION_* bit per request."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


_IRQ_SET_DATA_MASK = 0x7
_IRQ_SET_ACTION_MASK = 0x38


class IoFdType(enum.IntEnum):
    """VFIO_USER_IO_FD_TYPE_* of a GET_REGION_IO_FDS sub-region."""

    IOEVENTFD = 0
    IOREGIONFD = 1


HEADER = struct.Struct("<HHIII")
HEADER_SIZE = HEADER.size

# Capability JSON keys (protocol.h VFIO_USER_CAP_*).
CAPABILITIES = "capabilities"
CAP_MAX_MSG_FDS = "max_msg_fds"
CAP_MAX_DATA_XFER_SIZE = "max_data_xfer_size"
CAP_PGSIZES = "pgsizes"
CAP_MAX_DMA_MAPS = "max_dma_maps"
CAP_MIGRATION = "migration"
CAP_WRITE_MULTIPLE = "write_multiple"
CAP_TWIN_SOCKET = "twin_socket"
CAP_PGSIZE = "pgsize"
CAP_MAX_BITMAP_SIZE = "max_bitmap_size"

DEFAULT_MAX_DATA_XFER_SIZE = 1024 * 1024
MAX_MAX_DATA_XFER_SIZE = 64 * 1024 * 1024
MAX_MAX_MSG_FDS = 16
MULTI_DATA_SIZE = 8
MULTI_MAX_WRITES = 200


def _fail(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(what, errno.EINVAL)


def _check_capabilities(caps: object) -> None:
    """Type-check the keys we know; unknown keys are allowed (QEMU only warns about them)."""
    if not isinstance(caps, dict):
        raise _fail("version data is not a JSON object")
    inner = caps.get(CAPABILITIES, {})
    if not isinstance(inner, dict):
        raise _fail(f"{CAPABILITIES!r} is not an object")
    for key in (CAP_MAX_MSG_FDS, CAP_MAX_DATA_XFER_SIZE, CAP_PGSIZES, CAP_MAX_DMA_MAPS):
        if key in inner and (type(inner[key]) is not int or inner[key] < 0):
            raise _fail(f"capability {key!r} is not a non-negative integer")
    if CAP_WRITE_MULTIPLE in inner and type(inner[CAP_WRITE_MULTIPLE]) is not bool:
        raise _fail(f"capability {CAP_WRITE_MULTIPLE!r} is not a boolean")
    for key in (CAP_MIGRATION, CAP_TWIN_SOCKET):
        if key in inner and not isinstance(inner[key], dict):
            raise _fail(f"capability {key!r} is not an object")
    migration = inner.get(CAP_MIGRATION, {})
    for key in (CAP_PGSIZE, CAP_MAX_BITMAP_SIZE):
        if key in migration and (type(migration[key]) is not int or migration[key] < 0):
            raise _fail(f"migration capability {key!r} is not a non-negative integer")


@dataclass(frozen=True, slots=True)
class Version(Payload):
    """VERSION command and reply: major, minor, optional NUL-terminated JSON capabilities.

    ``capabilities`` is the whole JSON document (``{"capabilities": {...}}``); it is packed
    with Python's default separators, which reproduce QEMU's own text byte for byte.
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<HH")

    major: int
    minor: int
    capabilities: Mapping[str, Any] | None = None

    def pack(self) -> bytes:
        head = self.STRUCT.pack(self.major, self.minor)
        if self.capabilities is None:
            return head
        return head + json.dumps(self.capabilities).encode() + b"\0"

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        check_size(cls, data, cls.STRUCT.size, at_least=True)
        major, minor = cls.STRUCT.unpack_from(data)
        text = bytes(data[cls.STRUCT.size :])
        if not text:
            return cls(major, minor)
        if text[-1] != 0 or 0 in text[:-1]:
            raise _fail("version data is not one NUL-terminated string")
        try:
            caps = json.loads(text[:-1].decode())
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _fail(f"version data is not JSON: {exc}") from exc
        _check_capabilities(caps)
        return cls(major, minor, caps)

    @property
    def caps(self) -> Mapping[str, Any]:
        """The inner ``capabilities`` object (empty when absent)."""
        if self.capabilities is None:
            return {}
        inner: Mapping[str, Any] = self.capabilities.get(CAPABILITIES, {})
        return inner


@dataclass(frozen=True, slots=True)
class DmaMap(Payload):
    """DMA_MAP command (32 bytes); the optional fd travels in the message. Empty reply."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIQQQ")

    argsz: int
    flags: int  # DmaMapFlags
    offset: int
    address: int
    size: int


@dataclass(frozen=True, slots=True)
class DmaUnmap(Payload):
    """DMA_UNMAP command (24 bytes); the reply echoes it (QEMU ignores the echo)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIQQ")

    argsz: int
    flags: int  # DmaUnmapFlags
    address: int
    size: int


@dataclass(frozen=True, slots=True)
class DeviceInfo(Payload):
    """DEVICE_GET_INFO command and reply (16 bytes; QEMU sends argsz 16)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIII")

    argsz: int
    flags: int  # DeviceFlags
    num_regions: int
    num_irqs: int


@dataclass(frozen=True, slots=True)
class RegionInfo(Payload):
    """DEVICE_GET_REGION_INFO command (32 bytes) and reply (32 bytes + capability bytes).

    ``caps`` is everything after the fixed struct; ``cap_offset`` counts from the start of
    the struct, as in ``struct vfio_region_info``. Its reply may carry one fd (MMAP).
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIIIQQ")

    argsz: int
    flags: int  # RegionFlags
    index: int
    cap_offset: int
    size: int
    offset: int
    caps: bytes = b""

    def pack(self) -> bytes:
        head = self.STRUCT.pack(
            self.argsz, self.flags, self.index, self.cap_offset, self.size, self.offset
        )
        return head + self.caps if self.caps else head

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        check_size(cls, data, cls.STRUCT.size, at_least=True)
        argsz, flags, index, cap_offset, size, offset = cls.STRUCT.unpack_from(data)
        return cls(argsz, flags, index, cap_offset, size, offset, bytes(data[cls.STRUCT.size :]))


@dataclass(frozen=True, slots=True)
class RegionCap:
    """One entry of a region's capability chain (``struct vfio_info_cap_header`` + body)."""

    HEADER: ClassVar[struct.Struct] = struct.Struct("<HHI")

    id: int
    version: int
    data: bytes


@dataclass(frozen=True, slots=True)
class SparseMmapArea(Payload):
    """One mmap-able window of a region (``struct vfio_region_sparse_mmap_area``)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQ")

    offset: int
    size: int


def pack_region_caps(caps: tuple[RegionCap, ...] | list[RegionCap]) -> tuple[int, bytes]:
    """Chain ``caps`` for a region info reply: returns ``(cap_offset, caps bytes)``."""
    if not caps:
        return 0, b""
    base = RegionInfo.STRUCT.size
    parts: list[bytes] = []
    offset = base
    for i, cap in enumerate(caps):
        size = RegionCap.HEADER.size + len(cap.data)
        nxt = offset + size if i + 1 < len(caps) else 0
        parts.append(RegionCap.HEADER.pack(cap.id, cap.version, nxt) + cap.data)
        offset += size
    return base, b"".join(parts)


def sparse_mmap_cap(areas: tuple[SparseMmapArea, ...] | list[SparseMmapArea]) -> RegionCap:
    """Build a SPARSE_MMAP capability (version 1) listing ``areas``."""
    body = struct.pack("<II", len(areas), 0) + b"".join(area.pack() for area in areas)
    return RegionCap(RegionCapId.SPARSE_MMAP, 1, body)


def parse_region_caps(info: RegionInfo) -> tuple[RegionCap, ...]:
    """Walk the capability chain of a region info reply, bounds- and loop-checked.

    Each entry's data runs to the next entry (or the end of the caps), so a chain that is
    not in ascending order is rejected.
    """
    if not info.flags & RegionFlags.CAPS:
        return ()
    base = RegionInfo.STRUCT.size
    blob = info.caps
    caps: list[RegionCap] = []
    offset = info.cap_offset
    while offset:
        start = offset - base
        if start < 0 or start + RegionCap.HEADER.size > len(blob):
            raise _fail(f"region capability at {offset} is outside the reply")
        cap_id, version, nxt = RegionCap.HEADER.unpack_from(blob, start)
        if nxt and nxt <= offset:
            raise _fail("region capability chain does not move forward")
        end = nxt - base if nxt else len(blob)
        if end > len(blob):
            raise _fail(f"region capability at {nxt} is outside the reply")
        caps.append(RegionCap(cap_id, version, blob[start + RegionCap.HEADER.size : end]))
        offset = nxt
    return tuple(caps)


def parse_sparse_mmap(cap: RegionCap) -> tuple[SparseMmapArea, ...]:
    """Decode a SPARSE_MMAP capability body: nr_areas u32, reserved u32, then the areas."""
    if len(cap.data) < 8:
        raise _fail("sparse mmap capability is truncated")
    (count,) = struct.unpack_from("<I", cap.data)
    size = SparseMmapArea.STRUCT.size
    if 8 + count * size > len(cap.data):
        raise _fail(f"sparse mmap capability claims {count} areas")
    return tuple(
        SparseMmapArea(*SparseMmapArea.STRUCT.unpack_from(cap.data, 8 + i * size))
        for i in range(count)
    )


@dataclass(frozen=True, slots=True)
class RegionIoFdsRequest(Payload):
    """DEVICE_GET_REGION_IO_FDS command (16 bytes)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIII")

    argsz: int
    flags: int
    index: int
    count: int


@dataclass(frozen=True, slots=True)
class IoFdSubRegion(Payload):
    """One 40-byte sub-region; ``datamatch`` is ``user_data`` for an ioregionfd."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQIII4xQ")

    offset: int
    size: int
    fd_index: int
    type: int
    flags: int
    datamatch: int


@dataclass(frozen=True, slots=True)
class RegionIoFdsReply(Payload):
    """DEVICE_GET_REGION_IO_FDS reply: 16-byte head and the sub-regions that fit in argsz.

    ``count`` is the full number of sub-regions; fewer may be present when the client's
    argsz was too small (the reply's argsz then says how much is needed).
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIII")

    argsz: int
    flags: int
    index: int
    count: int
    sub_regions: tuple[IoFdSubRegion, ...] = ()

    def pack(self) -> bytes:
        head = self.STRUCT.pack(self.argsz, self.flags, self.index, self.count)
        return head + b"".join(sub.pack() for sub in self.sub_regions)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        check_size(cls, data, cls.STRUCT.size, at_least=True)
        argsz, flags, index, count = cls.STRUCT.unpack_from(data)
        size = IoFdSubRegion.STRUCT.size
        body = len(data) - cls.STRUCT.size
        if body % size or body // size > count:
            raise _fail(f"GET_REGION_IO_FDS reply has {body} bytes for {count} sub-regions")
        subs = tuple(
            IoFdSubRegion(*fields)
            for fields in IoFdSubRegion.STRUCT.iter_unpack(data[cls.STRUCT.size :])
        )
        return cls(argsz, flags, index, count, subs)


@dataclass(frozen=True, slots=True)
class IrqInfo(Payload):
    """DEVICE_GET_IRQ_INFO command and reply (16 bytes)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIII")

    argsz: int
    flags: int  # IrqInfoFlags
    index: int
    count: int


@dataclass(frozen=True, slots=True)
class SetIrqs(Payload):
    """DEVICE_SET_IRQS command: 20 bytes, then ``count`` bool bytes with DATA_BOOL.

    With DATA_EVENTFD the eventfds travel in the message (QEMU sends argsz 20 and either
    ``count`` fds or none, which de-assigns). Empty reply.
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIIII")

    argsz: int
    flags: int  # IrqSetFlags
    index: int
    start: int
    count: int
    data: bytes = b""

    def pack(self) -> bytes:
        head = self.STRUCT.pack(self.argsz, self.flags, self.index, self.start, self.count)
        return head + self.data if self.data else head

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        check_size(cls, data, cls.STRUCT.size, at_least=True)
        argsz, flags, index, start, count = cls.STRUCT.unpack_from(data)
        data_kind = flags & _IRQ_SET_DATA_MASK
        action = flags & _IRQ_SET_ACTION_MASK
        if flags & ~(_IRQ_SET_DATA_MASK | _IRQ_SET_ACTION_MASK):
            raise _fail(f"SET_IRQS has unknown flags {flags:#x}")
        if data_kind.bit_count() != 1 or action.bit_count() != 1:
            raise _fail(f"SET_IRQS needs one DATA and one ACTION flag, got {flags:#x}")
        body = bytes(data[cls.STRUCT.size :])
        expected = count if data_kind == IrqSetFlags.DATA_BOOL else 0
        if len(body) != expected:
            raise _fail(f"SET_IRQS carries {len(body)} data bytes, expected {expected}")
        return cls(argsz, flags, index, start, count, body)


@dataclass(frozen=True, slots=True)
class RegionAccess(Payload):
    """REGION_READ / REGION_WRITE (16 bytes + data).

    ``data`` is present in a write command and a read reply and must then be exactly
    ``count`` bytes; a read command and a write reply carry none.
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QII")

    offset: int
    region: int
    count: int
    data: bytes = b""

    def pack(self) -> bytes:
        head = self.STRUCT.pack(self.offset, self.region, self.count)
        return head + self.data if self.data else head

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        size = cls.STRUCT.size
        check_size(cls, data, size, at_least=True)
        offset, region, count = cls.STRUCT.unpack_from(data)
        if len(data) == size:
            return cls(offset, region, count)
        if len(data) - size != count:
            raise _fail(f"region access carries {len(data) - size} bytes, count is {count}")
        return cls(offset, region, count, bytes(data[size:]))


@dataclass(frozen=True, slots=True)
class DmaAccess(Payload):
    """DMA_READ / DMA_WRITE as QEMU 11.1 lays them out (``VFIOUserDMARW``).

    The spec has ``address u64, count u64, data at 16``; QEMU's struct is ``offset u64,
    count u32, data[]`` with the data at 12 and ``sizeof`` padded to 16, so a message is
    12 bytes, the data, then 4 pad bytes (QEMU checks size >= 16 + count). We follow QEMU.
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QI")
    PAD: ClassVar[int] = 4

    offset: int
    count: int
    data: bytes = b""

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.offset, self.count) + self.data + b"\0" * self.PAD

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        size = cls.STRUCT.size
        check_size(cls, data, size + cls.PAD, at_least=True)
        offset, count = cls.STRUCT.unpack_from(data)
        if len(data) == size + cls.PAD:
            return cls(offset, count)
        if len(data) != size + count + cls.PAD:
            raise _fail(f"DMA access is {len(data)} bytes for count {count}")
        return cls(offset, count, bytes(data[size : size + count]))


@dataclass(frozen=True, slots=True)
class RegionWriteMulti(Payload):
    """REGION_WRITE_MULTI command: wr_cnt u64, then wr_cnt 24-byte entries.

    An entry is ``offset u64, region u32, count u32, data[8]`` (``VFIOUserWROne``); at most
    200 entries (``VFIO_USER_MULTI_MAX``), each at most 8 bytes. QEMU always sends it with
    NO_REPLY. Entries decode to ``RegionAccess`` so a server can reuse its write path.
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Q")
    ENTRY: ClassVar[struct.Struct] = struct.Struct("<QII8s")

    writes: tuple[RegionAccess, ...]

    def pack(self) -> bytes:
        parts = [self.STRUCT.pack(len(self.writes))]
        parts.extend(self.ENTRY.pack(w.offset, w.region, w.count, w.data) for w in self.writes)
        return b"".join(parts)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        check_size(cls, data, cls.STRUCT.size, at_least=True)
        (count,) = cls.STRUCT.unpack_from(data)
        if count > MULTI_MAX_WRITES:
            raise _fail(f"REGION_WRITE_MULTI has {count} writes, at most {MULTI_MAX_WRITES}")
        check_size(cls, data, cls.STRUCT.size + count * cls.ENTRY.size)
        writes = []
        for pos in range(cls.STRUCT.size, len(data), cls.ENTRY.size):
            offset, region, length, raw = cls.ENTRY.unpack_from(data, pos)
            if length > MULTI_DATA_SIZE:
                raise _fail(f"REGION_WRITE_MULTI entry of {length} bytes")
            writes.append(RegionAccess(offset, region, length, raw[:length]))
        return cls(tuple(writes))


@dataclass(frozen=True, slots=True)
class RegionWriteMultiReply(Payload):
    """REGION_WRITE_MULTI reply: the number of writes completed."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Q")

    wr_cnt: int


# The largest message a peer may send us before negotiation: a REGION_WRITE (or DMA_WRITE
# reply) carrying max_data_xfer_size bytes. QEMU bounds its own receive the same way.
DEFAULT_MAX_MSG_SIZE = HEADER_SIZE + RegionAccess.STRUCT.size + DEFAULT_MAX_DATA_XFER_SIZE
