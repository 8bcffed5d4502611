"""Back-end side of guest memory and split virtqueues.

``GuestMemory`` maps the front-end's SET_MEM_TABLE / ADD_MEM_REG regions and translates both the
front-end's user addresses (ring addresses) and guest physical addresses (descriptor buffers).
``Vring`` walks a split virtqueue in that memory. The front-end and the guest are untrusted:
every address, length, index and chain is checked, and a bad one raises ``GuestMemoryError``
instead of touching memory outside a mapped region.

Memory is accessed with ``struct.unpack_from``/``pack_into`` on the mmap objects, so no buffer
export outlives a call and regions can always be unmapped. Ordering: CPython performs each
access as a plain load/store in program order, which suffices on x86 (TSO) where this runs.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from emulator.errors import RemoteProtocolError
from emulator.vhost.messages import VhostUserMemoryRegion

log = logging.getLogger(__name__)

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768
MAX_MEM_SLOTS = 32

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class GuestMemoryError(RemoteProtocolError):
    """An address or ring structure the front-end or guest supplied is outside its memory."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno.EFAULT)


@dataclass(eq=False)
class MappedRegion:
    """One mapped region: ``mm`` covers [0, mmap_offset + size) of the front-end's fd."""

    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int
    mm: mmap.mmap

    def matches(self, region: VhostUserMemoryRegion) -> bool:
        return (
            self.guest_phys_addr == region.guest_phys_addr
            and self.userspace_addr == region.userspace_addr
            and self.size == region.memory_size
        )


class GuestMemory:
    """The front-end's memory table, mapped into this process."""

    def __init__(self) -> None:
        self.regions: list[MappedRegion] = []

    @staticmethod
    def map_region(region: VhostUserMemoryRegion, fd: int) -> MappedRegion:
        """mmap one region from ``fd`` (not closed here; mmap keeps its own reference)."""
        if region.memory_size == 0:
            raise GuestMemoryError("memory region of size 0")
        end = region.mmap_offset + region.memory_size
        if end >= 1 << 63 or region.guest_phys_addr + region.memory_size > 1 << 64:
            raise GuestMemoryError(f"memory region {region} overflows")
        if region.userspace_addr + region.memory_size > 1 << 64:
            raise GuestMemoryError(f"memory region {region} overflows")
        try:
            mm = mmap.mmap(fd, end, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as exc:
            raise RemoteProtocolError(f"cannot map memory region {region}: {exc}") from exc
        return MappedRegion(
            region.guest_phys_addr,
            region.memory_size,
            region.userspace_addr,
            region.mmap_offset,
            mm,
        )

    def add(self, mapped: MappedRegion) -> None:
        for other in self.regions:
            if (
                mapped.guest_phys_addr < other.guest_phys_addr + other.size
                and other.guest_phys_addr < mapped.guest_phys_addr + mapped.size
            ):
                mapped.mm.close()
                raise GuestMemoryError("memory regions overlap in guest physical space")
        if len(self.regions) >= MAX_MEM_SLOTS:
            mapped.mm.close()
            raise GuestMemoryError(f"more than {MAX_MEM_SLOTS} memory regions")
        self.regions.append(mapped)

    def remove(self, region: VhostUserMemoryRegion) -> None:
        for mapped in self.regions:
            if mapped.matches(region):
                self.regions.remove(mapped)
                mapped.mm.close()
                return
        raise GuestMemoryError(f"no memory region {region} to remove")

    def close(self) -> None:
        for mapped in self.regions:
            mapped.mm.close()
        self.regions = []

    def _find(self, addr: int, length: int, user: bool) -> tuple[mmap.mmap, int]:
        for r in self.regions:
            base = r.userspace_addr if user else r.guest_phys_addr
            if base <= addr and addr + length <= base + r.size:
                return r.mm, r.mmap_offset + addr - base
        kind = "user address" if user else "guest address"
        raise GuestMemoryError(f"{kind} {addr:#x}+{length:#x} is not inside one memory region")

    def translate_user(self, addr: int, length: int) -> tuple[mmap.mmap, int]:
        """(buffer, offset) for a front-end user address range inside one region."""
        return self._find(addr, length, user=True)

    def translate_gpa(self, addr: int, length: int) -> tuple[mmap.mmap, int]:
        """(buffer, offset) for a guest physical range inside one region."""
        return self._find(addr, length, user=False)

    def _pieces(self, addr: int, length: int) -> Iterator[tuple[mmap.mmap, int, int]]:
        """Split a guest physical range into per-region pieces (buffers may cross regions)."""
        while length > 0:
            for r in self.regions:
                if r.guest_phys_addr <= addr < r.guest_phys_addr + r.size:
                    n = min(length, r.guest_phys_addr + r.size - addr)
                    yield r.mm, r.mmap_offset + addr - r.guest_phys_addr, n
                    addr += n
                    length -= n
                    break
            else:
                raise GuestMemoryError(f"guest address {addr:#x} is not in guest memory")

    def check_gpa(self, addr: int, length: int) -> None:
        for _ in self._pieces(addr, length):
            pass

    def read(self, addr: int, length: int) -> bytes:
        return b"".join(bytes(mm[off : off + n]) for mm, off, n in self._pieces(addr, length))

    def write(self, addr: int, data: bytes) -> None:
        pos = 0
        for mm, off, n in list(self._pieces(addr, len(data))):
            mm[off : off + n] = data[pos : pos + n]
            pos += n


@dataclass(frozen=True, slots=True)
class Buffer:
    """One descriptor's guest physical range."""

    addr: int
    length: int


@dataclass(slots=True)
class DescriptorChain:
    """An available chain: device-readable buffers first, then device-writable ones."""

    head: int
    readable: list[Buffer] = field(default_factory=list)
    writable: list[Buffer] = field(default_factory=list)

    @property
    def writable_len(self) -> int:
        return sum(b.length for b in self.writable)

    def read_all(self, memory: GuestMemory) -> bytes:
        return b"".join(memory.read(b.addr, b.length) for b in self.readable)

    def write(self, memory: GuestMemory, data: bytes) -> int:
        """Fill the writable buffers in order with ``data``; returns the bytes written."""
        pos = 0
        for b in self.writable:
            if pos >= len(data):
                break
            chunk = data[pos : pos + b.length]
            memory.write(b.addr, chunk)
            pos += len(chunk)
        return pos


@dataclass
class VringStats:
    kicks: int = 0
    popped: int = 0
    pushed: int = 0
    bytes_written: int = 0
    notifications: int = 0
    errors: int = 0


class Vring:
    """One split virtqueue as the back-end sees it.

    States per the spec: stopped until the first kick, stopped again by GET_VRING_BASE;
    enabled/disabled independently. ``broken`` is set when the ring structure is invalid;
    a broken ring is not processed until the front-end sets it up again.
    """

    def __init__(self, index: int, memory: GuestMemory) -> None:
        self.index = index
        self.memory = memory
        self.size = 0
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.addr_set = False
        self.last_avail_idx = 0
        self.used_idx = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.started = False
        self.broken = False
        self.stats = VringStats()

    # -- set-up -------------------------------------------------------------------------------
    def set_size(self, num: int) -> None:
        if not 1 <= num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise RemoteProtocolError(
                f"vring {self.index}: size {num} is not a power of 2 <= 32768"
            )
        self.size = num

    def set_addr(self, desc: int, avail: int, used: int) -> None:
        self.desc_addr, self.avail_addr, self.used_addr = desc, avail, used
        self.addr_set = True
        self.broken = False

    def set_base(self, base: int) -> None:
        self.last_avail_idx = base & 0xFFFF

    def replace_fd(self, kind: str, fd: int | None) -> None:
        """Install a new kick/call/err fd, closing the previous one."""
        old = getattr(self, f"{kind}_fd")
        if old is not None:
            os.close(old)
        setattr(self, f"{kind}_fd", fd)

    def start(self) -> None:
        """Start the ring: the used index is read back from memory, as the spec says."""
        self._check_layout()
        self.used_idx = self._read_u16(self.used_addr + 2)
        self.started = True

    def stop(self) -> int:
        """Stop the ring and return the next available index to process."""
        self.started = False
        return self.last_avail_idx

    def close(self) -> None:
        for kind in ("kick", "call", "err"):
            self.replace_fd(kind, None)
        self.started = False
        self.enabled = False

    # -- ring access --------------------------------------------------------------------------
    def _check_layout(self) -> None:
        if not self.addr_set or self.size == 0:
            raise GuestMemoryError(f"vring {self.index} has no size or addresses")
        n = self.size
        self.memory.translate_user(self.desc_addr, 16 * n)
        self.memory.translate_user(self.avail_addr, 6 + 2 * n)
        self.memory.translate_user(self.used_addr, 6 + 8 * n)

    def _read_u16(self, uaddr: int) -> int:
        mm, off = self.memory.translate_user(uaddr, 2)
        value: int = _U16.unpack_from(mm, off)[0]
        return value

    def _write_u16(self, uaddr: int, value: int) -> None:
        mm, off = self.memory.translate_user(uaddr, 2)
        _U16.pack_into(mm, off, value)

    def avail_idx(self) -> int:
        return self._read_u16(self.avail_addr + 2)

    def has_available(self) -> bool:
        return self.avail_idx() != self.last_avail_idx

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None. Raises ``GuestMemoryError`` and marks the ring
        broken if the driver's structures are invalid."""
        if self.broken or not self.started:
            return None
        try:
            avail = self.avail_idx()
            pending = (avail - self.last_avail_idx) & 0xFFFF
            if pending == 0:
                return None
            if pending > self.size:
                raise GuestMemoryError(
                    f"vring {self.index}: avail idx {avail} is {pending} ahead of {self.size}"
                )
            slot = self.last_avail_idx % self.size
            head = self._read_u16(self.avail_addr + 4 + 2 * slot)
            chain = self._walk(head)
        except GuestMemoryError:
            self.broken = True
            self.stats.errors += 1
            raise
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        self.stats.popped += 1
        return chain

    def _walk(self, head: int) -> DescriptorChain:
        chain = DescriptorChain(head)
        table_addr, table_size, user = self.desc_addr, self.size, True
        index = head
        seen = 0
        indirect_done = False
        while True:
            if index >= table_size:
                raise GuestMemoryError(f"vring {self.index}: descriptor {index} >= {table_size}")
            seen += 1
            if seen > table_size:
                raise GuestMemoryError(f"vring {self.index}: descriptor chain loops")
            if user:
                mm, off = self.memory.translate_user(table_addr + 16 * index, 16)
            else:
                mm, off = self.memory.translate_gpa(table_addr + 16 * index, 16)
            addr, length, flags, nxt = _DESC.unpack_from(mm, off)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect_done or not user or flags & VIRTQ_DESC_F_NEXT:
                    raise GuestMemoryError(f"vring {self.index}: invalid indirect descriptor")
                if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
                    raise GuestMemoryError(f"vring {self.index}: indirect table of {length} bytes")
                self.memory.translate_gpa(addr, length)
                table_addr, table_size, user = addr, length // 16, False
                index, seen, indirect_done = 0, 0, True
                continue
            self.memory.check_gpa(addr, length)
            if flags & VIRTQ_DESC_F_WRITE:
                chain.writable.append(Buffer(addr, length))
            elif chain.writable:
                raise GuestMemoryError(f"vring {self.index}: readable descriptor after writable")
            else:
                chain.readable.append(Buffer(addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            index = nxt

    def push(self, head: int, written: int) -> None:
        """Put one used element (descriptor head, bytes written) and publish the used index."""
        if not 0 <= head < self.size:
            raise GuestMemoryError(f"vring {self.index}: used head {head} out of range")
        slot = self.used_idx % self.size
        mm, off = self.memory.translate_user(self.used_addr + 4 + 8 * slot, 8)
        _USED_ELEM.pack_into(mm, off, head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._write_u16(self.used_addr + 2, self.used_idx)
        self.stats.pushed += 1
        self.stats.bytes_written += written

    def notify(self) -> bool:
        """Signal the call eventfd unless the driver suppressed interrupts. True if signalled."""
        if self.call_fd is None:
            return False
        if self._read_u16(self.avail_addr) & VIRTQ_AVAIL_F_NO_INTERRUPT:
            return False
        os.eventfd_write(self.call_fd, 1)
        self.stats.notifications += 1
        return True

    def signal_error(self) -> None:
        """Signal the error eventfd (SET_VRING_ERR), if the front-end gave one."""
        if self.err_fd is not None:
            os.eventfd_write(self.err_fd, 1)
