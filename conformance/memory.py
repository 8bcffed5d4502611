"""Guest memory as a memfd (sent in SET_MEM_TABLE), split rings in it, and a tiny driver.

Layout: ring ``q`` at ``q * RING_STRIDE`` (descriptor table, then the available ring at
+0x1000, the used ring at +0x2000), buffers from ``BUFFERS_AT`` up, handed out by a bump
allocator that starts again at every ``reset_buffers``. Descriptors carry guest-physical
addresses (``GPA_BASE`` + offset); SET_VRING_ADDR carries user addresses (``UVA_BASE`` +
offset), which the back-end translates through the memory table as the spec says.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import time
from dataclasses import dataclass

from vhost_user.messages import VhostUserMemoryRegion

GPA_BASE = 0x1_0000_0000
UVA_BASE = 0x7E00_0000_0000
MEM_SIZE = 8 << 20
RING_STRIDE = 0x4000
MAX_QUEUES = 8
BUFFERS_AT = MAX_QUEUES * RING_STRIDE
QUEUE_SIZE = 64
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED = struct.Struct("<II")
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2


class GuestMemory:
    """One memfd region of ``MEM_SIZE`` bytes; the tool closes it when the session ends."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("check-backend-guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, MEM_SIZE)
            self.mm = mmap.mmap(self.fd, MEM_SIZE)
        except BaseException:
            os.close(self.fd)
            raise
        self._next = BUFFERS_AT

    @property
    def region(self) -> VhostUserMemoryRegion:
        return VhostUserMemoryRegion(GPA_BASE, MEM_SIZE, UVA_BASE, 0)

    def alloc(self, size: int) -> int:
        """A buffer's guest-physical address (8-byte aligned)."""
        offset = self._next
        self._next = (offset + size + 7) & ~7
        if self._next > MEM_SIZE:
            raise MemoryError("guest memory buffers exhausted")
        return GPA_BASE + offset

    def reset_buffers(self) -> None:
        self._next = BUFFERS_AT

    def write(self, gpa: int, data: bytes) -> None:
        offset = gpa - GPA_BASE
        self.mm[offset : offset + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        offset = gpa - GPA_BASE
        return bytes(self.mm[offset : offset + size])

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


@dataclass(frozen=True, slots=True)
class Used:
    head: int
    length: int


class SplitQueue:
    """One split virtqueue in ``memory``, driven like a Linux driver without EVENT_IDX."""

    def __init__(self, memory: GuestMemory, index: int, size: int = QUEUE_SIZE) -> None:
        self.memory = memory
        self.index = index
        self.size = size
        self.base = index * RING_STRIDE
        self.avail_idx = 0
        self.used_seen = 0
        self._next_desc = 0
        self.clear()

    def clear(self) -> None:
        """Zero the ring (a fresh activation starts at index 0)."""
        self.memory.mm[self.base : self.base + RING_STRIDE] = bytes(RING_STRIDE)
        self.avail_idx = self.used_seen = self._next_desc = 0

    def addresses(self) -> tuple[int, int, int]:
        """(desc, used, avail) as user addresses, the order of SET_VRING_ADDR's fields."""
        base = UVA_BASE + self.base
        return base, base + 0x2000, base + 0x1000

    def post(self, chain: list[tuple[int, int, bool]]) -> int:
        """Make ``[(gpa, length, device_writable)]`` available; its head."""
        head = self._next_desc
        for i, (gpa, length, writable) in enumerate(chain):
            slot = (head + i) % self.size
            last = i == len(chain) - 1
            flags = (VRING_DESC_F_WRITE if writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            nxt = 0 if last else (slot + 1) % self.size
            _DESC.pack_into(self.memory.mm, self.base + 16 * slot, gpa, length, flags, nxt)
        self._next_desc = (head + len(chain)) % self.size
        avail = self.base + 0x1000
        _U16.pack_into(self.memory.mm, avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        _U16.pack_into(self.memory.mm, avail + 2, self.avail_idx)
        return head

    @property
    def used_idx(self) -> int:
        return int(_U16.unpack_from(self.memory.mm, self.base + 0x2000 + 2)[0])

    def take_used(self) -> Used | None:
        if self.used_idx == self.used_seen:
            return None
        slot = self.used_seen % self.size
        head, length = _USED.unpack_from(self.memory.mm, self.base + 0x2000 + 4 + 8 * slot)
        self.used_seen = (self.used_seen + 1) & 0xFFFF
        return Used(head, length)


def wait_call(call_fd: int, queue: SplitQueue, timeout: float) -> tuple[Used | None, bool]:
    """Wait for a used entry; (the entry or None, whether the call eventfd fired)."""
    deadline = time.monotonic() + timeout
    called = False
    while True:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([call_fd], [], [], max(0.0, min(remaining, 0.05)))
        if ready:
            os.eventfd_read(call_fd)
            called = True
        if called and queue.used_idx != queue.used_seen:
            return queue.take_used(), True
        if remaining <= 0:
            return queue.take_used(), called
