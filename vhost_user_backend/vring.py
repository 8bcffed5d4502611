"""Split virtqueues as a back-end sees them.

``Vring`` walks a split virtqueue in the front-end's memory table (``memory.MemoryTable``).
The front-end and the guest are untrusted: every address, length, index and chain is
checked, and a bad one raises ``MemoryTableError`` instead of touching memory outside a
mapped region.

Memory is accessed with ``struct.unpack_from``/``pack_into`` on the mmap objects, so no buffer
export outlives a call and regions can always be unmapped. Ordering: CPython performs each
access as a plain load/store in program order, which suffices on x86 (TSO) where this runs.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field

from vhost_user_backend.memory import MemoryTable, MemoryTableError
from wire.errors import RemoteProtocolError

log = logging.getLogger(__name__)

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


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

    def read_all(self, memory: MemoryTable) -> bytes:
        return b"".join(memory.read(b.addr, b.length) for b in self.readable)

    def write(self, memory: MemoryTable, data: bytes) -> int:
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

    def __init__(self, index: int, memory: MemoryTable) -> None:
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
            raise MemoryTableError(f"vring {self.index} has no size or addresses")
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
        """The next available chain, or None. Raises ``MemoryTableError`` and marks the ring
        broken if the driver's structures are invalid."""
        if self.broken or not self.started:
            return None
        try:
            avail = self.avail_idx()
            pending = (avail - self.last_avail_idx) & 0xFFFF
            if pending == 0:
                return None
            if pending > self.size:
                raise MemoryTableError(
                    f"vring {self.index}: avail idx {avail} is {pending} ahead of {self.size}"
                )
            slot = self.last_avail_idx % self.size
            head = self._read_u16(self.avail_addr + 4 + 2 * slot)
            chain = self._walk(head)
        except MemoryTableError:
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
                raise MemoryTableError(f"vring {self.index}: descriptor {index} >= {table_size}")
            seen += 1
            if seen > table_size:
                raise MemoryTableError(f"vring {self.index}: descriptor chain loops")
            if user:
                mm, off = self.memory.translate_user(table_addr + 16 * index, 16)
            else:
                mm, off = self.memory.translate_gpa(table_addr + 16 * index, 16)
            addr, length, flags, nxt = _DESC.unpack_from(mm, off)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect_done or not user or flags & VIRTQ_DESC_F_NEXT:
                    raise MemoryTableError(f"vring {self.index}: invalid indirect descriptor")
                if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
                    raise MemoryTableError(f"vring {self.index}: indirect table of {length} bytes")
                self.memory.translate_gpa(addr, length)
                table_addr, table_size, user = addr, length // 16, False
                index, seen, indirect_done = 0, 0, True
                continue
            self.memory.check_gpa(addr, length)
            if flags & VIRTQ_DESC_F_WRITE:
                chain.writable.append(Buffer(addr, length))
            elif chain.writable:
                raise MemoryTableError(f"vring {self.index}: readable descriptor after writable")
            else:
                chain.readable.append(Buffer(addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            index = nxt

    def push(self, head: int, written: int) -> None:
        """Put one used element (descriptor head, bytes written) and publish the used index."""
        if not 0 <= head < self.size:
            raise MemoryTableError(f"vring {self.index}: used head {head} out of range")
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
