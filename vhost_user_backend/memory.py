"""The back-end's view of guest memory: the front-end's memory table, mapped here.

``MemoryTable`` maps the front-end's SET_MEM_TABLE / ADD_MEM_REG regions and translates both the
front-end's user addresses (ring addresses) and guest physical addresses (descriptor buffers).
The front-end is untrusted: an address or length outside the table raises ``MemoryTableError``
instead of touching memory outside a mapped region. Memory is accessed through the mmap objects,
so no buffer export outlives a call and regions can always be unmapped.
"""

from __future__ import annotations

import errno
import mmap
from collections.abc import Iterator
from dataclasses import dataclass

from vhost_user.messages import VhostUserMemoryRegion
from wire.errors import RemoteProtocolError

MAX_MEM_SLOTS = 32


class MemoryTableError(RemoteProtocolError):
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


class MemoryTable:
    """The front-end's memory table, mapped into this process."""

    def __init__(self) -> None:
        self.regions: list[MappedRegion] = []

    @staticmethod
    def map_region(region: VhostUserMemoryRegion, fd: int) -> MappedRegion:
        """mmap one region from ``fd`` (not closed here; mmap keeps its own reference)."""
        if region.memory_size == 0:
            raise MemoryTableError("memory region of size 0")
        end = region.mmap_offset + region.memory_size
        if end >= 1 << 63 or region.guest_phys_addr + region.memory_size > 1 << 64:
            raise MemoryTableError(f"memory region {region} overflows")
        if region.userspace_addr + region.memory_size > 1 << 64:
            raise MemoryTableError(f"memory region {region} overflows")
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
                raise MemoryTableError("memory regions overlap in guest physical space")
        if len(self.regions) >= MAX_MEM_SLOTS:
            mapped.mm.close()
            raise MemoryTableError(f"more than {MAX_MEM_SLOTS} memory regions")
        self.regions.append(mapped)

    def remove(self, region: VhostUserMemoryRegion) -> None:
        for mapped in self.regions:
            if mapped.matches(region):
                self.regions.remove(mapped)
                mapped.mm.close()
                return
        raise MemoryTableError(f"no memory region {region} to remove")

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
        raise MemoryTableError(f"{kind} {addr:#x}+{length:#x} is not inside one memory region")

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
                raise MemoryTableError(f"guest address {addr:#x} is not in guest memory")

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
