"""Every vhost-user message, flag and payload, under the names and numbers of the spec.

Source: QEMU's ``docs/interop/vhost-user.rst`` plus the merged VIRTIO Shared Memory Region
series (``GET_SHMEM_CONFIG`` 44, ``BACKEND_SHMEM_MAP``/``UNMAP`` 9/10, protocol feature bit 22;
the draft patches used bit 20, which upstream later gave to ``GET_VRING_BASE_INFLIGHT``, and
rust-vmm's ``vhost`` crate up to 0.16 used bit 21, upstream's ``GPA_ADDRESSES``).

All numbers are in native byte order (every ``STRUCT`` says ``=``). Each payload subclasses
``wire.payload.Payload``, which packs and unpacks the fixed-size ones from their ``STRUCT``
alone; only the variable-size ones (memory table, config space, shmem config) and those with
a check the struct cannot express override ``pack``/``unpack``. Payloads only check syntax
(sizes, counts, reserved values that would make the bytes ambiguous); what a value means is
the handler's business.
The tables at the end say, per request, which payload it carries, what the reply carries and
how many fds may travel with it; the codec enforces them.
"""

from __future__ import annotations

import enum
import errno
import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar, Self

from wire.errors import LocalProtocolError, RemoteProtocolError
from wire.payload import Payload as Payload  # noqa: PLC0414 - re-exported for importers
from wire.payload import TrailingArray, check_size, rule_broken

VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_F_PROTOCOL_FEATURES = 30
VHOST_MEMORY_BASELINE_NREGIONS = 8
VHOST_USER_MAX_CONFIG_SIZE = 256
VHOST_USER_MAX_SHMEM_REGIONS = 256
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x100
SHMEM_FEATURE_BIT_UPSTREAM = 22
SHMEM_FEATURE_BIT_DRAFT = 20
SHMEM_FEATURE_BIT_RUST_VMM = 21
#: Every bit some back-end uses for shared memory, and what that bit means upstream.
SHMEM_FEATURE_BITS: dict[int, str] = {
    SHMEM_FEATURE_BIT_UPSTREAM: "SHMEM upstream",
    SHMEM_FEATURE_BIT_DRAFT: "GET_VRING_BASE_INFLIGHT upstream, SHMEM in the draft patches",
    SHMEM_FEATURE_BIT_RUST_VMM: "GPA_ADDRESSES upstream, SHMEM in rust-vmm vhost <= 0.16",
}


class VhostUserHeaderFlag(IntFlag):
    """Header ``flags``: version in bits 0-1, then REPLY and NEED_REPLY."""

    VERSION_1 = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


class FrontendReq(IntEnum):
    """Requests the front-end sends on the main socket (``VHOST_USER_*``)."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44


class BackendReq(IntEnum):
    """Requests the back-end sends on the back-end channel (``VHOST_USER_BACKEND_*``)."""

    NONE = 0
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class VhostUserProtocolFeature(IntFlag):
    """``VHOST_USER_PROTOCOL_F_*`` as masks (``1 << bit``)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    GET_VRING_BASE_INFLIGHT = 1 << 20
    GPA_ADDRESSES = 1 << 21
    SHMEM = 1 << 22


class VhostVringAddrFlag(IntFlag):
    """``flags`` of the vring address description."""

    LOG = 1 << 0


class VhostUserConfigFlag(IntEnum):
    """``flags`` of the device config space payload."""

    WRITABLE = 0
    MIGRATION = 1


class VhostUserMMapFlag(IntFlag):
    """``flags`` of the MMap request: bit 0 set means read-write, clear means read-only."""

    RW = 1 << 0


class IotlbType(IntEnum):
    """``type`` of an IOTLB message."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


@dataclass(frozen=True, slots=True)
class NoPayload(Payload):
    """The empty payload (``size`` 0)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=")


EMPTY = NoPayload()


@dataclass(frozen=True, slots=True)
class VhostUserU64(Payload):
    """A single 64-bit integer (features, vring index + NOFD flag, REPLY_ACK status)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=Q")
    value: int


@dataclass(frozen=True, slots=True)
class VhostUserVringState(Payload):
    """A vring state description: index and a number (size, base, enable flag)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=II")
    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VhostUserVringAddr(Payload):
    """A vring address description (``struct vhost_vring_addr``)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


@dataclass(frozen=True, slots=True)
class VhostUserMemoryRegion(Payload):
    """One memory region description; its fd travels alongside the message."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQQ")
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class VhostUserMemory(Payload):
    """Multiple memory regions description: ``nregions``, padding, up to 8 regions.

    QEMU sends only the ``nregions`` regions it uses; a full 8-slot table is accepted too.
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=II")
    regions: tuple[VhostUserMemoryRegion, ...]

    def pack(self) -> bytes:
        if len(self.regions) > VHOST_MEMORY_BASELINE_NREGIONS:
            raise LocalProtocolError(f"{len(self.regions)} memory regions, at most 8 fit")
        return self.STRUCT.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        check_size(cls, data, cls.STRUCT.size, at_least=True)
        nregions, _padding = cls.STRUCT.unpack_from(data)
        if nregions > VHOST_MEMORY_BASELINE_NREGIONS:
            raise RemoteProtocolError(f"memory table with {nregions} regions, at most 8")
        region_size = VhostUserMemoryRegion.STRUCT.size
        allowed = {
            cls.STRUCT.size + nregions * region_size,
            cls.STRUCT.size + VHOST_MEMORY_BASELINE_NREGIONS * region_size,
        }
        if len(data) not in allowed:
            raise RemoteProtocolError(
                f"memory table of {len(data)} bytes does not fit nregions={nregions}"
            )
        regions = VhostUserMemoryRegion.STRUCT.iter_unpack(
            data[cls.STRUCT.size : cls.STRUCT.size + nregions * region_size]
        )
        return cls(tuple(VhostUserMemoryRegion(*fields) for fields in regions))


@dataclass(frozen=True, slots=True)
class VhostUserSingleMemoryRegion(Payload):
    """Single memory region description (ADD_MEM_REG / REM_MEM_REG): u64 padding + region."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=8xQQQQ")
    region: VhostUserMemoryRegion

    def pack(self) -> bytes:
        return bytes(8) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        check_size(cls, data, cls.STRUCT.size)
        return cls(VhostUserMemoryRegion(*cls.STRUCT.unpack(data)))


@dataclass(frozen=True, slots=True)
class VhostUserLog(Payload):
    """Log description (SET_LOG_BASE with LOG_SHMFD)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQ")
    mmap_size: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class VhostUserIotlb(Payload):
    """``struct vhost_iotlb_msg`` (32 bytes with its trailing C padding)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQBB6x")
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int


@dataclass(frozen=True, slots=True)
class VhostUserConfig(Payload):
    """Device config space access: offset, size, flags and ``size`` bytes (at most 256)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=III")
    offset: int
    size: int
    flags: int
    payload: bytes

    def pack(self) -> bytes:
        if len(self.payload) != self.size or self.size > VHOST_USER_MAX_CONFIG_SIZE:
            raise LocalProtocolError(
                f"config payload of {len(self.payload)} bytes, size={self.size}"
            )
        try:
            return self.STRUCT.pack(self.offset, self.size, self.flags) + self.payload
        except struct.error as exc:
            raise LocalProtocolError(f"config header out of range: {exc}") from exc

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        check_size(cls, data, cls.STRUCT.size, at_least=True)
        offset, size, flags = cls.STRUCT.unpack_from(data)
        if size > VHOST_USER_MAX_CONFIG_SIZE:
            raise RemoteProtocolError(f"config size {size} exceeds {VHOST_USER_MAX_CONFIG_SIZE}")
        check_size(cls, data, cls.STRUCT.size + size)
        return cls(offset, size, flags, bytes(data[cls.STRUCT.size :]))


@dataclass(frozen=True, slots=True)
class VhostUserVringArea(Payload):
    """Vring area description (VRING_HOST_NOTIFIER_MSG): u64 index+flags, size, offset."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQ")
    u64: int
    size: int
    offset: int


@dataclass(frozen=True, slots=True)
class VhostUserInflight(Payload):
    """Inflight description (24 bytes: the C struct is padded to 8)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQHH4x")
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(frozen=True, slots=True)
class VhostUserShared(Payload):
    """``VhostUserShared``: a 16-byte UUID (``pack`` refuses any other length rather than
    letting ``16s`` pad or cut it)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=16s")
    uuid: bytes

    def pack(self) -> bytes:
        if len(self.uuid) != self.STRUCT.size:
            raise LocalProtocolError(f"UUID of {len(self.uuid)} bytes, expected 16")
        return bytes(self.uuid)


@dataclass(frozen=True, slots=True)
class VhostUserTransferDeviceState(Payload):
    """Device state transfer parameters: direction and migration phase."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=II")
    direction: int
    phase: int


@dataclass(frozen=True, slots=True)
class VhostUserShMemConfig(TrailingArray):
    """VIRTIO Shared Memory Region configuration: ``nregions``, padding, 256 u64 sizes.

    The index into ``memory_sizes`` is the shmid; 0 marks an unused id. Shorter tuples are
    padded with zeros to all 256 entries, and ``pack`` always writes the whole 2,056 bytes.

    Read as QEMU 11.1 reads it: libvhost-user back-ends cannot hold 2,056 bytes and send
    ``nregions``, the padding and the sizes up to the last one they declare (two regions at
    shmids 0 and 1: 24 bytes), so a reply may stop after any whole size and the rest read as
    zeros; the regions are the first ``nregions`` non-zero sizes (``regions()``). Besides the
    size rules of ``TrailingArray`` (``head``, ``whole-items``, ``max-items``) a reply is
    refused by rule ``max-nregions`` (``nregions`` above 256) or ``nregions-sizes`` (it ends
    before ``nregions`` non-zero sizes were found).
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct(f"=I4x{VHOST_USER_MAX_SHMEM_REGIONS}Q")
    HEAD: ClassVar[struct.Struct] = struct.Struct("=I4x")
    ITEM: ClassVar[struct.Struct] = struct.Struct("=Q")
    MAX_ITEMS: ClassVar[int] = VHOST_USER_MAX_SHMEM_REGIONS
    nregions: int
    memory_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.memory_sizes) > VHOST_USER_MAX_SHMEM_REGIONS:
            raise LocalProtocolError(f"{len(self.memory_sizes)} shared memory sizes, at most 256")
        padding = (0,) * (VHOST_USER_MAX_SHMEM_REGIONS - len(self.memory_sizes))
        object.__setattr__(self, "memory_sizes", tuple(self.memory_sizes) + padding)

    @classmethod
    def declaring(cls, sizes: Sequence[int]) -> Self:
        """The configuration declaring ``sizes`` (indexed by shmid, 0 = unused): ``nregions``
        counts the regions, not the ids."""
        return cls(sum(1 for size in sizes if size), tuple(sizes))

    def regions(self) -> dict[int, int]:
        """shmid -> size of the first ``nregions`` non-zero sizes (QEMU's reading)."""
        declared = ((shmid, size) for shmid, size in enumerate(self.memory_sizes) if size)
        return dict(itertools.islice(declared, self.nregions))

    def pack(self) -> bytes:
        if not 0 <= self.nregions <= VHOST_USER_MAX_SHMEM_REGIONS:
            raise LocalProtocolError(f"rule max-nregions: nregions={self.nregions} out of range")
        if len(self.regions()) < self.nregions:
            raise LocalProtocolError(
                f"rule nregions-sizes: nregions={self.nregions} but only "
                f"{len(self.regions())} non-zero sizes"
            )
        try:
            return self.STRUCT.pack(self.nregions, *self.memory_sizes)
        except struct.error as exc:
            raise LocalProtocolError(f"shared memory size out of range: {exc}") from exc

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        (nregions,), items = cls.split(data)
        if nregions > VHOST_USER_MAX_SHMEM_REGIONS:
            raise rule_broken(
                cls,
                data,
                "max-nregions",
                f"nregions={nregions}, at most {VHOST_USER_MAX_SHMEM_REGIONS}",
            )
        config = cls(nregions, tuple(size for (size,) in items))
        found = len(config.regions())
        if found < nregions:
            raise rule_broken(
                cls,
                data,
                "nregions-sizes",
                f"nregions={nregions} but the {len(items)} sizes sent hold only {found} non-zero",
            )
        return config


@dataclass(frozen=True, slots=True)
class VhostUserMMap(Payload):
    """MMap request (BACKEND_SHMEM_MAP / UNMAP): u8 shmid, 7 padding, fd_offset, shm_offset,
    len, flags."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=B7xQQQQ")
    shmid: int
    fd_offset: int
    shm_offset: int
    length: int
    flags: int

    @property
    def writable(self) -> bool:
        return bool(self.flags & VhostUserMMapFlag.RW)


@dataclass(frozen=True, slots=True)
class RawPayload(Payload):
    """Opaque bytes, for the rare requests whose layout this project does not model
    (the crypto session description)."""

    data: bytes

    def pack(self) -> bytes:
        return bytes(self.data)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        return cls(bytes(data))


class FdRule(enum.Enum):
    """How many fds may travel with a message."""

    NONE = "none"
    ONE = "one"
    OPTIONAL = "optional"  # zero or one
    PER_REGION = "per_region"  # one per memory table region
    VRING = "vring"  # one unless the u64 payload has the NOFD bit


def allowed_fd_count(rule: FdRule, payload: Payload) -> tuple[int, ...]:
    """The fd counts that ``rule`` allows for ``payload``."""
    if rule is FdRule.NONE:
        return (0,)
    if rule is FdRule.ONE:
        return (1,)
    if rule is FdRule.OPTIONAL:
        return (0, 1)
    if rule is FdRule.PER_REGION:
        return (len(payload.regions),) if isinstance(payload, VhostUserMemory) else (0,)
    if isinstance(payload, VhostUserU64):
        return (0,) if payload.value & VHOST_USER_VRING_NOFD_MASK else (1,)
    return (0,)


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """What one request carries: request payload types, reply payload types, fd rules.

    ``reply`` is empty when the request has no explicit reply (then a REPLY_ACK reply is a u64).
    """

    request: tuple[type[Payload], ...]
    reply: tuple[type[Payload], ...] = ()
    fds: FdRule = FdRule.NONE
    reply_fds: FdRule = FdRule.NONE

    def reply_types(self) -> tuple[type[Payload], ...]:
        return self.reply or (VhostUserU64,)


_E: tuple[type[Payload], ...] = (NoPayload,)
_U64: tuple[type[Payload], ...] = (VhostUserU64,)
_STATE: tuple[type[Payload], ...] = (VhostUserVringState,)

#: Requests answered whether or not NEED_REPLY is set: the GET_* ones, whose reply carries
#: what was asked (the REPLY_ACK u64 is only for the others).
ANSWERED_REQUESTS = frozenset(
    {
        FrontendReq.GET_FEATURES,
        FrontendReq.GET_PROTOCOL_FEATURES,
        FrontendReq.GET_QUEUE_NUM,
        FrontendReq.GET_VRING_BASE,
        FrontendReq.GET_CONFIG,
        FrontendReq.GET_SHMEM_CONFIG,
        FrontendReq.GET_MAX_MEM_SLOTS,
        FrontendReq.GET_INFLIGHT_FD,
        FrontendReq.GET_STATUS,
    }
)

FRONTEND_SPECS: dict[FrontendReq, MessageSpec] = {
    FrontendReq.GET_FEATURES: MessageSpec(_E, _U64),
    FrontendReq.SET_FEATURES: MessageSpec(_U64),
    FrontendReq.SET_OWNER: MessageSpec(_E),
    FrontendReq.RESET_OWNER: MessageSpec(_E),
    FrontendReq.SET_MEM_TABLE: MessageSpec((VhostUserMemory,), fds=FdRule.PER_REGION),
    # QEMU sends the log description; with LOG_SHMFD its fd comes along and the reply is empty.
    FrontendReq.SET_LOG_BASE: MessageSpec(
        (VhostUserLog, VhostUserU64), (NoPayload, VhostUserU64), FdRule.OPTIONAL
    ),
    FrontendReq.SET_LOG_FD: MessageSpec(_E, fds=FdRule.ONE),
    FrontendReq.SET_VRING_NUM: MessageSpec(_STATE),
    FrontendReq.SET_VRING_ADDR: MessageSpec((VhostUserVringAddr,)),
    FrontendReq.SET_VRING_BASE: MessageSpec(_STATE),
    FrontendReq.GET_VRING_BASE: MessageSpec(_STATE, _STATE),
    FrontendReq.SET_VRING_KICK: MessageSpec(_U64, fds=FdRule.VRING),
    FrontendReq.SET_VRING_CALL: MessageSpec(_U64, fds=FdRule.VRING),
    FrontendReq.SET_VRING_ERR: MessageSpec(_U64, fds=FdRule.VRING),
    FrontendReq.GET_PROTOCOL_FEATURES: MessageSpec(_E, _U64),
    FrontendReq.SET_PROTOCOL_FEATURES: MessageSpec(_U64),
    FrontendReq.GET_QUEUE_NUM: MessageSpec(_E, _U64),
    FrontendReq.SET_VRING_ENABLE: MessageSpec(_STATE),
    FrontendReq.SEND_RARP: MessageSpec(_U64),
    FrontendReq.NET_SET_MTU: MessageSpec(_U64),
    FrontendReq.SET_BACKEND_REQ_FD: MessageSpec(_E, fds=FdRule.ONE),
    FrontendReq.IOTLB_MSG: MessageSpec((VhostUserIotlb,), _U64),
    FrontendReq.SET_VRING_ENDIAN: MessageSpec(_STATE),
    # A zero-length reply is how a back-end reports a GET_CONFIG failure.
    FrontendReq.GET_CONFIG: MessageSpec((VhostUserConfig,), (VhostUserConfig, NoPayload)),
    FrontendReq.SET_CONFIG: MessageSpec((VhostUserConfig,)),
    FrontendReq.CREATE_CRYPTO_SESSION: MessageSpec((RawPayload,), (RawPayload,)),
    FrontendReq.CLOSE_CRYPTO_SESSION: MessageSpec(_U64),
    FrontendReq.POSTCOPY_ADVISE: MessageSpec(_E, _E, reply_fds=FdRule.ONE),
    FrontendReq.POSTCOPY_LISTEN: MessageSpec(_E),
    FrontendReq.POSTCOPY_END: MessageSpec(_E, _U64),
    FrontendReq.GET_INFLIGHT_FD: MessageSpec(
        (VhostUserInflight,), (VhostUserInflight,), reply_fds=FdRule.ONE
    ),
    FrontendReq.SET_INFLIGHT_FD: MessageSpec((VhostUserInflight,), fds=FdRule.ONE),
    FrontendReq.GPU_SET_SOCKET: MessageSpec(_E, fds=FdRule.ONE),
    FrontendReq.RESET_DEVICE: MessageSpec(_E),
    FrontendReq.VRING_KICK: MessageSpec(_STATE),
    FrontendReq.GET_MAX_MEM_SLOTS: MessageSpec(_E, _U64),
    FrontendReq.ADD_MEM_REG: MessageSpec((VhostUserSingleMemoryRegion,), fds=FdRule.ONE),
    # The spec lets a back-end accept (and must close) one stray fd on REM_MEM_REG.
    FrontendReq.REM_MEM_REG: MessageSpec((VhostUserSingleMemoryRegion,), fds=FdRule.OPTIONAL),
    FrontendReq.SET_STATUS: MessageSpec(_U64),
    FrontendReq.GET_STATUS: MessageSpec(_E, _U64),
    FrontendReq.GET_SHARED_OBJECT: MessageSpec((VhostUserShared,), _U64, reply_fds=FdRule.OPTIONAL),
    FrontendReq.SET_DEVICE_STATE_FD: MessageSpec(
        (VhostUserTransferDeviceState,), _U64, FdRule.ONE, FdRule.OPTIONAL
    ),
    FrontendReq.CHECK_DEVICE_STATE: MessageSpec(_E, _U64),
    FrontendReq.GET_SHMEM_CONFIG: MessageSpec(_E, (VhostUserShMemConfig,)),
}

BACKEND_SPECS: dict[BackendReq, MessageSpec] = {
    BackendReq.IOTLB_MSG: MessageSpec((VhostUserIotlb,)),
    BackendReq.CONFIG_CHANGE_MSG: MessageSpec(_E),
    BackendReq.VRING_HOST_NOTIFIER_MSG: MessageSpec((VhostUserVringArea,), fds=FdRule.OPTIONAL),
    BackendReq.VRING_CALL: MessageSpec(_STATE),
    BackendReq.VRING_ERR: MessageSpec(_STATE),
    BackendReq.SHARED_OBJECT_ADD: MessageSpec((VhostUserShared,)),
    BackendReq.SHARED_OBJECT_REMOVE: MessageSpec((VhostUserShared,)),
    BackendReq.SHARED_OBJECT_LOOKUP: MessageSpec(
        (VhostUserShared,), _U64, reply_fds=FdRule.OPTIONAL
    ),
    BackendReq.SHMEM_MAP: MessageSpec((VhostUserMMap,), fds=FdRule.ONE),
    BackendReq.SHMEM_UNMAP: MessageSpec((VhostUserMMap,)),
}

# Which protocol feature a front-end request needs (the back-end library checks it).
FRONTEND_REQUIRED_FEATURE: dict[FrontendReq, VhostUserProtocolFeature] = {
    FrontendReq.SET_LOG_BASE: VhostUserProtocolFeature.LOG_SHMFD,
    FrontendReq.GET_QUEUE_NUM: VhostUserProtocolFeature.MQ,
    FrontendReq.SEND_RARP: VhostUserProtocolFeature.RARP,
    FrontendReq.NET_SET_MTU: VhostUserProtocolFeature.MTU,
    FrontendReq.SET_BACKEND_REQ_FD: VhostUserProtocolFeature.BACKEND_REQ,
    FrontendReq.SET_VRING_ENDIAN: VhostUserProtocolFeature.CROSS_ENDIAN,
    FrontendReq.GET_CONFIG: VhostUserProtocolFeature.CONFIG,
    FrontendReq.SET_CONFIG: VhostUserProtocolFeature.CONFIG,
    FrontendReq.CREATE_CRYPTO_SESSION: VhostUserProtocolFeature.CRYPTO_SESSION,
    FrontendReq.CLOSE_CRYPTO_SESSION: VhostUserProtocolFeature.CRYPTO_SESSION,
    FrontendReq.POSTCOPY_ADVISE: VhostUserProtocolFeature.PAGEFAULT,
    FrontendReq.POSTCOPY_LISTEN: VhostUserProtocolFeature.PAGEFAULT,
    FrontendReq.POSTCOPY_END: VhostUserProtocolFeature.PAGEFAULT,
    FrontendReq.GET_INFLIGHT_FD: VhostUserProtocolFeature.INFLIGHT_SHMFD,
    FrontendReq.SET_INFLIGHT_FD: VhostUserProtocolFeature.INFLIGHT_SHMFD,
    FrontendReq.RESET_DEVICE: VhostUserProtocolFeature.RESET_DEVICE,
    FrontendReq.VRING_KICK: VhostUserProtocolFeature.INBAND_NOTIFICATIONS,
    FrontendReq.GET_MAX_MEM_SLOTS: VhostUserProtocolFeature.CONFIGURE_MEM_SLOTS,
    FrontendReq.ADD_MEM_REG: VhostUserProtocolFeature.CONFIGURE_MEM_SLOTS,
    FrontendReq.REM_MEM_REG: VhostUserProtocolFeature.CONFIGURE_MEM_SLOTS,
    FrontendReq.SET_STATUS: VhostUserProtocolFeature.STATUS,
    FrontendReq.GET_STATUS: VhostUserProtocolFeature.STATUS,
    FrontendReq.GET_SHARED_OBJECT: VhostUserProtocolFeature.SHARED_OBJECT,
    FrontendReq.SET_DEVICE_STATE_FD: VhostUserProtocolFeature.DEVICE_STATE,
    FrontendReq.CHECK_DEVICE_STATE: VhostUserProtocolFeature.DEVICE_STATE,
    FrontendReq.GET_SHMEM_CONFIG: VhostUserProtocolFeature.SHMEM,
}


def shmem_feature(bit: int = SHMEM_FEATURE_BIT_UPSTREAM) -> int:
    """The SHMEM protocol feature mask for ``bit`` (22 upstream, 20 in the draft patches, 21
    in rust-vmm vhost <= 0.16)."""
    if bit not in SHMEM_FEATURE_BITS:
        raise ValueError(f"shared-memory feature bit must be 22, 20 or 21, not {bit}")
    return 1 << bit


def vring_index_and_fd(value: int) -> tuple[int, bool]:
    """Split a SET_VRING_KICK/CALL/ERR u64 into (vring index, whether an fd comes along)."""
    return value & VHOST_USER_VRING_IDX_MASK, not value & VHOST_USER_VRING_NOFD_MASK


def errno_of(exc: BaseException) -> int:
    """The errno a REPLY_ACK should carry for ``exc`` (EINVAL when it names none)."""
    code = getattr(exc, "errno", None)
    return code if isinstance(code, int) and code > 0 else errno.EINVAL
