"""The shared-memory BAR in host memory: back-end fds really mmapped where the guest sees them.

The BAR reserves its whole size once as anonymous ``PROT_NONE`` memory. ``SHMEM_MAP`` places the
back-end's fd over part of that reservation with ``MAP_FIXED`` and ``SHMEM_UNMAP`` puts a fresh
``PROT_NONE`` reservation back, so no other allocation can ever land inside the BAR and
``MAP_FIXED`` never touches memory that is not ours. Python's ``mmap`` module cannot map at a fixed
address, hence the two libc calls through ctypes.

The fd is the back-end's and stays as it is: no seals (back-ends reuse and shrink their memfds),
no size check (a DAX window maps 2 MiB of a small file), no fd kept (the mapping holds the file).
Any fd ``mmap`` accepts is taken (``fdkind``), except on filesystems whose page faults could
stall the emulator's one thread. So a mapping may reach past its file's end, now or after the
back-end shrinks the file, and a load there raises SIGBUS. Guest accesses (trapped BAR, so they
arrive as vfio-user REGION_READ/WRITE) are therefore a ``bisect`` plus one copy per mapping
touched, made by the kernel with ``process_vm_readv``/``writev`` (``vmcopy``): a page past EOF
reads as zeros and drops writes, and nothing in the emulator touches a mapped page itself.

Single-threaded by design (the emulator has one selector loop): between a failed ``MAP_FIXED``
and the restored reservation no other thread may map memory.
"""

from __future__ import annotations

import bisect
import contextlib
import errno as _errno
import logging
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import NoReturn

from emulator.errors import EmulatorError
from emulator.mman import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MAP_SHARED,
    MAX_FILE_OFFSET,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    map_memory,
    unmap_memory,
)
from emulator.shmem.fdkind import (
    BLOCKING_FILESYSTEMS,
    HUGETLBFS_MAGIC,
    FdKind,
    classify,
    describe,
    fd_size,
    filesystem_magic,
)
from emulator.shmem.layout import PAGE_SIZE, RegionLayout, ShmemLayout
from emulator.shmem.table import MappingTable
from emulator.shmem.vmcopy import SafeCopier
from wire.errors import RemoteProtocolError, StateError

logger = logging.getLogger(__name__)

_RESERVE_FLAGS = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
_HUGE_ALIGN = 2 << 20

DEFAULT_MAX_MAPPINGS_PER_REGION = 65_536
DEFAULT_MAX_MAPPINGS = 262_144
DEFAULT_MAX_ACCESS = 1 << 20
_VMA_HEADROOM = 8_192


def _reserve_fixed(address: int, length: int) -> None:
    """Replace ``[address, +length)``, which must be ours, by a fresh PROT_NONE reservation."""
    map_memory(address, length, PROT_NONE, _RESERVE_FLAGS | MAP_FIXED)


def _reserve(size: int) -> int:
    """Reserve ``size`` bytes of address space, 2 MiB aligned when big enough (huge pages)."""
    align = _HUGE_ALIGN if size >= _HUGE_ALIGN else PAGE_SIZE
    raw = map_memory(0, size + align - PAGE_SIZE, PROT_NONE, _RESERVE_FLAGS)
    address = -(-raw // align) * align
    if address > raw:
        unmap_memory(raw, address - raw)
    tail = raw + size + align - PAGE_SIZE - (address + size)
    if tail:
        unmap_memory(address + size, tail)
    return address


def _max_map_count() -> int | None:
    try:
        with open("/proc/sys/vm/max_map_count", encoding="ascii") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None


def default_max_mappings() -> int:
    """The per-BAR cap when none is given: 262,144, lowered to fit ``vm.max_map_count``.

    Every live mapping may cost two VMAs; a back-end that exhausted the process's map count would
    make unrelated allocations in the emulator fail, so leave headroom for everything else.
    """
    limit = _max_map_count()
    if limit is None:
        return DEFAULT_MAX_MAPPINGS
    return max(0, min(DEFAULT_MAX_MAPPINGS, (limit - _VMA_HEADROOM) // 2))


class RefusalReason(StrEnum):
    """Why a map or unmap request was refused (short, stable, machine-readable)."""

    LENGTH = "length"
    ALIGNMENT = "alignment"
    RANGE = "range"
    OVERLAP = "overlap"
    FD = "fd"
    FD_SIZE = "fd-size"
    BLOCKING_FS = "blocking-fs"
    MMAP = "mmap"
    UNCOPYABLE = "uncopyable"
    LIMIT = "limit"
    NOT_MAPPED = "not-mapped"
    SHMID = "shmid"
    CLOSED = "closed"


_REASON_ERRNO = {
    RefusalReason.LENGTH: _errno.EINVAL,
    RefusalReason.ALIGNMENT: _errno.EINVAL,
    RefusalReason.RANGE: _errno.EINVAL,
    RefusalReason.OVERLAP: _errno.EEXIST,
    RefusalReason.FD: _errno.EBADF,
    RefusalReason.FD_SIZE: _errno.EINVAL,
    RefusalReason.BLOCKING_FS: _errno.EOPNOTSUPP,
    RefusalReason.MMAP: _errno.ENOMEM,
    RefusalReason.UNCOPYABLE: _errno.EOPNOTSUPP,
    RefusalReason.LIMIT: _errno.ENOSPC,
    RefusalReason.NOT_MAPPED: _errno.ENOENT,
    RefusalReason.SHMID: _errno.EINVAL,
    RefusalReason.CLOSED: _errno.ENODEV,
}


class MappingRefused(RemoteProtocolError):
    """A back-end's SHMEM_MAP/UNMAP was refused; nothing changed. ``reason`` says why."""

    def __init__(self, reason: RefusalReason, message: str, errno: int | None = None) -> None:
        super().__init__(f"{message} [{reason}]", errno or _REASON_ERRNO[reason])
        self.reason = reason


class ShmemError(EmulatorError):
    """The host would not reserve or release the BAR's address space."""


@dataclass(frozen=True, slots=True)
class MappingInfo:
    """A snapshot of one live mapping, offsets relative to its region.

    ``fd_size`` is what the kernel said the fd's size was at map time (None: it says none, as
    for ``/dev/zero``); the mapping may reach past it.
    """

    shm_offset: int
    length: int
    fd_offset: int
    writable: bool
    kind: FdKind
    fd_size: int | None


_READ_ONLY = "guest write ignored: mapping is read-only"
_PAST_EOF = "guest write past the end of the back-end's file dropped"


class _Live:
    """One live mapping at ``addr`` in our address space; the mapping itself holds the file."""

    __slots__ = (
        "addr",
        "end",
        "fd_offset",
        "fd_size",
        "kind",
        "length",
        "start",
        "warned",
        "writable",
    )

    def __init__(
        self,
        start: int,
        length: int,
        addr: int,
        *,
        fd_offset: int,
        writable: bool,
        kind: FdKind,
        fd_size: int | None,
    ) -> None:
        self.start = start
        self.length = length
        self.end = start + length
        self.addr = addr
        self.fd_offset = fd_offset
        self.writable = writable
        self.kind = kind
        self.fd_size = fd_size
        self.warned = False

    def warn_once(self, message: str) -> None:
        """At most one warning per mapping, so a guest or back-end cannot flood the log."""
        if not self.warned:
            self.warned = True
            logger.warning(
                "shared memory [%#x, +%#x): %s (further ones not logged)",
                self.start,
                self.length,
                message,
            )


class _Reservation:
    """State the BAR and its regions share: the address range, the BAR-wide cap, the copier."""

    __slots__ = ("address", "closed", "copier", "damaged", "limit", "live", "size", "unusable")

    def __init__(self, address: int, size: int, limit: int, copier: SafeCopier) -> None:
        self.address = address
        self.size = size
        self.limit = limit
        self.copier = copier
        self.live = 0
        self.closed = False
        self.damaged = False
        #: Called once the reservation stops being plain memory (``SharedMemoryBar.on_unusable``).
        self.unusable: list[Callable[[], None]] = []

    def became_unusable(self) -> None:
        callbacks, self.unusable = self.unusable, []
        for callback in callbacks:
            callback()


class SharedMemoryRegion:
    """One VIRTIO Shared Memory Region: its slice of the BAR reservation and its mappings.

    Created by ``SharedMemoryBar``; offsets here are relative to the region.
    """

    def __init__(self, layout: RegionLayout, reservation: _Reservation, max_mappings: int) -> None:
        self.layout = layout
        self.shmid = layout.shmid
        self.bar_offset = layout.bar_offset
        self.size = layout.size
        self.host_address = reservation.address + layout.bar_offset
        self.max_mappings = max_mappings
        self._res = reservation
        self._table: MappingTable[_Live] = MappingTable()
        self._copy_out = reservation.copier.read
        self._copy_in = reservation.copier.write

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        return (
            f"<SharedMemoryRegion shmid={self.shmid} size={self.size:#x} "
            f"host={self.host_address:#x} mappings={len(self._table)}>"
        )

    def mappings(self) -> tuple[MappingInfo, ...]:
        """Every live mapping, in offset order."""
        return tuple(
            MappingInfo(start, length, live.fd_offset, live.writable, live.kind, live.fd_size)
            for start, length, live in self._table
        )

    def _refuse(self, reason: RefusalReason, message: str, errno: int | None = None) -> NoReturn:
        logger.debug("shmid %d: refused: %s [%s]", self.shmid, message, reason)
        raise MappingRefused(reason, f"shmid {self.shmid}: {message}", errno)

    def map(self, fd: int, fd_offset: int, shm_offset: int, length: int, writable: bool) -> None:
        """Map ``length`` bytes of ``fd`` at ``fd_offset`` to ``shm_offset`` in this region.

        ``fd`` is lent: never closed, never changed, and not needed once mapped (the mapping
        holds the file). The checks that need no system call come first, then the fd's own
        (``_inspect``), then ``mmap``; a mapping the kernel cannot copy through is undone.
        On ``MappingRefused`` nothing changed.
        """
        res = self._res
        span = f"[{shm_offset:#x}, +{length:#x}) from fd offset {fd_offset:#x}"
        if res.closed or res.damaged:
            self._refuse(RefusalReason.CLOSED, "the shared-memory BAR is not usable")
        if length <= 0:
            self._refuse(RefusalReason.LENGTH, f"{span}: length must be positive")
        if (shm_offset | fd_offset | length) % PAGE_SIZE:
            self._refuse(RefusalReason.ALIGNMENT, f"{span}: not {PAGE_SIZE}-byte aligned")
        if shm_offset < 0 or fd_offset < 0 or shm_offset + length > self.size:
            self._refuse(RefusalReason.RANGE, f"{span}: outside the {self.size:#x}-byte region")
        if fd_offset + length > MAX_FILE_OFFSET:
            self._refuse(RefusalReason.RANGE, f"{span}: file range overflows")
        if len(self._table) >= self.max_mappings:
            self._refuse(RefusalReason.LIMIT, f"{span}: region holds {self.max_mappings} mappings")
        if res.live >= res.limit:
            self._refuse(RefusalReason.LIMIT, f"{span}: BAR holds {res.limit} mappings")
        if self._table.overlaps(shm_offset, length):
            self._refuse(RefusalReason.OVERLAP, f"{span}: overlaps a live mapping")
        magic, info = self._inspect(fd, span, fd_offset + length, writable)
        address = self.host_address + shm_offset
        prot = PROT_READ | PROT_WRITE if writable else PROT_READ
        try:
            map_memory(address, length, prot, MAP_SHARED | MAP_FIXED, fd=fd, offset=fd_offset)
        except OSError as exc:
            self._restore(address, length)
            self._refuse(
                RefusalReason.MMAP,
                f"{span}: {describe(fd)} cannot be mapped {'rw' if writable else 'ro'}: "
                f"mmap: {exc.strerror}",
                exc.errno,
            )
        kind = classify(fd, info.st_mode, magic)
        if not kind.page_cache and not res.copier.readable(address):
            self._restore(address, length)
            self._refuse(
                RefusalReason.UNCOPYABLE,
                f"{span}: the kernel cannot copy the first page of this mapping of "
                f"{describe(fd)} (device or secret memory, or past the device's end): "
                "guest accesses could not reach it",
            )
        size = fd_size(fd, info.st_mode, info.st_size, magic)
        live = _Live(
            shm_offset,
            length,
            address,
            fd_offset=fd_offset,
            writable=bool(writable),
            kind=kind,
            fd_size=size,
        )
        self._table.insert(shm_offset, length, live)
        res.live += 1
        logger.debug(
            "shmid %d: mapped %s %s, %s of %s",
            self.shmid,
            span,
            "rw" if writable else "ro",
            kind,
            "unknown size" if size is None else f"{size:#x} bytes",
        )

    def _inspect(self, fd: int, span: str, end: int, writable: bool) -> tuple[int, os.stat_result]:
        """The fd's filesystem magic and ``fstat``, or a refusal. The filesystem is checked
        first: on a refused one nothing but ``fstatfs`` reaches it (see ``fdkind``)."""
        try:
            magic = filesystem_magic(fd)
        except OSError as exc:
            self._refuse(RefusalReason.FD, f"{span}: fd {fd} is unusable: {exc.strerror}")
        blocking = BLOCKING_FILESYSTEMS.get(magic)
        if blocking is not None:
            self._refuse(
                RefusalReason.BLOCKING_FS,
                f"{span}: {describe(fd)} is on {blocking}: a page fault there waits for "
                "another machine or process, and the emulator's only thread with it",
            )
        try:
            info = os.fstat(fd)
        except OSError as exc:
            self._refuse(RefusalReason.FD, f"{span}: fd {fd} is unusable: {exc.strerror}")
        if writable and magic == HUGETLBFS_MAGIC and end > info.st_size:
            self._refuse(
                RefusalReason.FD_SIZE,
                f"{span}: a writable mapping past the end of a hugetlbfs file would grow "
                f"the back-end's {info.st_size:#x}-byte file",
            )
        return magic, info

    def _restore(self, address: int, length: int) -> None:
        """Put the reservation back after a failed or refused ``MAP_FIXED``."""
        try:
            _reserve_fixed(address, length)
        except OSError as exc:
            self._res.damaged = True
            self._res.became_unusable()
            logger.critical(
                "shmid %d: could not restore the reservation at %#x (+%#x): %s; "
                "the BAR refuses further mappings and its address space will not be released",
                self.shmid,
                address,
                length,
                exc.strerror,
            )

    def unmap(self, shm_offset: int, length: int) -> None:
        """Remove the mapping that is exactly ``[shm_offset, +length)``.

        Refused (nothing changes) for a hole, part of a mapping, or a range over several.
        """
        if self._res.closed:
            self._refuse(RefusalReason.CLOSED, "the shared-memory BAR is closed")
        live = self._table.lookup(shm_offset)
        if live is None or live.start != shm_offset or live.length != length:
            self._refuse(
                RefusalReason.NOT_MAPPED,
                f"[{shm_offset:#x}, +{length:#x}) is not exactly one live mapping",
            )
        try:
            _reserve_fixed(live.addr, length)
        except OSError as exc:
            self._refuse(RefusalReason.MMAP, f"unmap: mmap: {exc.strerror}", exc.errno)
        self._table.remove(live.start, live.length)
        self._res.live -= 1
        logger.debug("shmid %d: unmapped [%#x, +%#x)", self.shmid, shm_offset, length)

    def reset(self) -> None:
        """Drop every mapping (device reset): one PROT_NONE remap over the whole region."""
        if not self._table or self._res.closed:
            return
        try:
            _reserve_fixed(self.host_address, self.size)
        except OSError as exc:
            logger.warning("shmid %d: reset in one call failed (%s)", self.shmid, exc.strerror)
            for start, length, _ in self._table:
                with contextlib.suppress(MappingRefused):
                    self.unmap(start, length)
            if self._table:
                raise ShmemError(
                    f"shmid {self.shmid}: {len(self._table)} mappings could not be removed"
                ) from exc
            return
        self._forget()

    def _forget(self) -> None:
        """Empty the table once the mappings themselves are gone."""
        self._res.live -= len(self._table)
        self._table.clear()

    def read(self, offset: int, size: int) -> bytes:
        """Guest read inside the region (caller checked bounds); holes read as zero."""
        live = self._table.lookup(offset)
        if live is not None and offset + size <= live.end:
            return self._copy_out(live.addr + offset - live.start, size)
        buf = bytearray(size)
        for start, length, part in self._table.intersecting(offset, size):
            low = max(offset, start)
            high = min(offset + size, start + length)
            buf[low - offset : high - offset] = self._copy_out(part.addr + low - start, high - low)
        return bytes(buf)

    def write(self, offset: int, data: bytes) -> None:
        """Guest write inside the region (caller checked bounds); writes to holes vanish."""
        size = len(data)
        live = self._table.lookup(offset)
        if live is not None and offset + size <= live.end:
            self._store(live, offset - live.start, data)
            return
        for start, length, part in self._table.intersecting(offset, size):
            low = max(offset, start)
            high = min(offset + size, start + length)
            self._store(part, low - start, data[low - offset : high - offset])

    def _store(self, live: _Live, rel: int, data: bytes) -> None:
        if not live.writable:
            live.warn_once(_READ_ONLY)
        elif self._copy_in(live.addr + rel, data):
            live.warn_once(_PAST_EOF)

    def dropped_write(self, offset: int, size: int) -> None:
        """Someone else's copy (the server's hot path) dropped a guest write to these bytes
        because their pages fault: warn as ``write`` would, once per mapping. Holes stay
        silent, as they are in ``write``."""
        for _, _, live in self._table.intersecting(offset, size):
            live.warn_once(_READ_ONLY if not live.writable else _PAST_EOF)


class SharedMemoryBar:
    """The whole shared-memory BAR: one address-space reservation holding every region.

    Guest accesses come in as ``read``/``write`` at BAR offsets; back-end requests as
    ``map``/``unmap`` with a shmid. Use as a context manager or call ``close()``.
    """

    def __init__(
        self,
        layout: ShmemLayout,
        *,
        max_mappings_per_region: int = DEFAULT_MAX_MAPPINGS_PER_REGION,
        max_mappings: int | None = None,
        max_access: int = DEFAULT_MAX_ACCESS,
    ) -> None:
        if mmap.PAGESIZE != PAGE_SIZE:
            raise ShmemError(f"host page size {mmap.PAGESIZE} is not {PAGE_SIZE}")
        limit = default_max_mappings() if max_mappings is None else max_mappings
        try:
            copier = SafeCopier(max_access)
        except OSError as exc:
            raise ShmemError(f"guest accesses to the shared-memory BAR need {exc}") from exc
        try:
            address = _reserve(layout.bar_size)
        except OSError as exc:
            copier.close()
            raise ShmemError(
                f"cannot reserve {layout.bar_size:#x} bytes of address space for the "
                f"shared-memory BAR: {exc.strerror}"
            ) from exc
        self.layout = layout
        self.bar_size = layout.bar_size
        self.host_address = address
        self.max_access = max_access
        self._res = _Reservation(address, layout.bar_size, limit, copier)
        self.regions = tuple(
            SharedMemoryRegion(region, self._res, max_mappings_per_region)
            for region in layout.regions
        )
        self._by_shmid = {region.shmid: region for region in self.regions}
        self._starts = [region.bar_offset for region in self.regions]
        logger.debug(
            "shared-memory BAR: %#x bytes at %#x, %d regions, at most %d mappings",
            self.bar_size,
            address,
            len(self.regions),
            limit,
        )

    def __len__(self) -> int:
        return self._res.live

    def __enter__(self) -> SharedMemoryBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def max_mappings(self) -> int:
        """The BAR-wide cap on live mappings."""
        return self._res.limit

    @property
    def closed(self) -> bool:
        return self._res.closed

    def __iter__(self) -> Iterator[SharedMemoryRegion]:
        return iter(self.regions)

    def region(self, shmid: int) -> SharedMemoryRegion | None:
        """The region with this shmid, or None if the layout has none."""
        return self._by_shmid.get(shmid)

    def _region_or_refuse(self, shmid: int) -> SharedMemoryRegion:
        region = self._by_shmid.get(shmid)
        if region is None:
            raise MappingRefused(RefusalReason.SHMID, f"no shared memory region {shmid}")
        return region

    def map(
        self, shmid: int, fd: int, fd_offset: int, shm_offset: int, length: int, *, writable: bool
    ) -> None:
        """SHMEM_MAP: ``SharedMemoryRegion.map`` on region ``shmid`` (``fd`` is lent)."""
        self._region_or_refuse(shmid).map(fd, fd_offset, shm_offset, length, writable)

    def unmap(self, shmid: int, shm_offset: int, length: int) -> None:
        """SHMEM_UNMAP: ``SharedMemoryRegion.unmap`` on region ``shmid``."""
        self._region_or_refuse(shmid).unmap(shm_offset, length)

    def _check(self, bar_offset: int, size: int) -> None:
        if self._res.closed:
            raise StateError("shared-memory BAR access", state="closed", required="open")
        if size < 0 or size > self.max_access or bar_offset < 0:
            raise RemoteProtocolError(f"BAR access of {size} bytes at {bar_offset:#x} refused")
        if bar_offset + size > self.bar_size:
            raise RemoteProtocolError(
                f"BAR access [{bar_offset:#x}, +{size:#x}) past the {self.bar_size:#x}-byte BAR"
            )

    def read(self, bar_offset: int, size: int) -> bytes:
        """Guest read: what the mapped pages hold, zero where nothing is mapped."""
        self._check(bar_offset, size)
        index = bisect.bisect_right(self._starts, bar_offset) - 1
        if index >= 0:
            region = self.regions[index]
            offset = bar_offset - region.bar_offset
            if offset + size <= region.size:
                return region.read(offset, size)
        buf = bytearray(size)
        end = bar_offset + size
        for region in self.regions:
            low = max(bar_offset, region.bar_offset)
            high = min(end, region.bar_offset + region.size)
            if low < high:
                start = low - bar_offset
                buf[start : start + high - low] = region.read(low - region.bar_offset, high - low)
        return bytes(buf)

    def write(self, bar_offset: int, data: bytes) -> None:
        """Guest write: lands in writable mappings; holes and read-only mappings ignore it."""
        size = len(data)
        self._check(bar_offset, size)
        index = bisect.bisect_right(self._starts, bar_offset) - 1
        if index >= 0:
            region = self.regions[index]
            offset = bar_offset - region.bar_offset
            if offset + size <= region.size:
                region.write(offset, bytes(data))
                return
        end = bar_offset + size
        for region in self.regions:
            low = max(bar_offset, region.bar_offset)
            high = min(end, region.bar_offset + region.size)
            if low < high:
                chunk = bytes(data[low - bar_offset : high - bar_offset])
                region.write(low - region.bar_offset, chunk)

    def dropped_write(self, bar_offset: int, length: int) -> None:
        """A guest write to ``[bar_offset, +length)`` that the server's hot path copied itself
        hit pages that fault (``vmcopy``'s rule): the warnings ``write`` gives, per mapping."""
        end = bar_offset + length
        for region in self.regions:
            low = max(bar_offset, region.bar_offset)
            high = min(end, region.bar_offset + region.size)
            if low < high:
                region.dropped_write(low - region.bar_offset, high - low)

    def on_unusable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once) when the reservation stops being plain memory: the BAR is
        closed, or a failed ``MAP_FIXED`` could not be covered again. Whoever copies guest
        accesses at ``host_address + offset`` itself must stop then."""
        if self._res.closed or self._res.damaged:
            callback()
        else:
            self._res.unusable.append(callback)

    def reset(self) -> None:
        """Drop every mapping in every region (device reset); the reservation stays."""
        for region in self.regions:
            region.reset()

    def close(self) -> None:
        """Drop every mapping and release the address space. Idempotent."""
        res = self._res
        if res.closed:
            return
        res.closed = True
        res.became_unusable()
        if res.damaged:
            logger.error("shared-memory BAR at %#x left reserved (damaged)", res.address)
        else:
            try:
                unmap_memory(res.address, res.size)
            except OSError as exc:
                logger.error("shared-memory BAR at %#x not released: %s", res.address, exc)
        for region in self.regions:
            region._forget()
        res.copier.close()
