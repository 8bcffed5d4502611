"""The shared-memory BAR in host memory: back-end fds really mmapped where the guest sees them.

The BAR reserves its whole size once as anonymous ``PROT_NONE`` memory. ``SHMEM_MAP`` places the
back-end's fd over part of that reservation with ``MAP_FIXED`` and ``SHMEM_UNMAP`` puts a fresh
``PROT_NONE`` reservation back, so no other allocation can ever land inside the BAR and
``MAP_FIXED`` never touches memory that is not ours. Python's ``mmap`` module cannot map at a fixed
address, hence the two libc calls through ctypes.

Guest accesses (trapped BAR, so they arrive as vfio-user REGION_READ/WRITE) are a ``bisect`` plus
one copy per mapping touched. A back-end could shrink its file under a mapping, and touching a page
past EOF raises SIGBUS, which Python cannot survive. So at map time we add ``F_SEAL_SHRINK``
(memfds created with ``MFD_ALLOW_SEALING``); sealed mappings are read and written through the
mapping. Mappings we cannot seal are accessed with ``pread``/``pwrite`` on the fd, clipped to its
current size: the same page-cache pages, bytes past EOF are a hole, and no window for SIGBUS.

Single-threaded by design (the emulator has one selector loop): between a failed ``MAP_FIXED``
and the restored reservation no other thread may map memory.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno as _errno
import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Iterator
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
from emulator.shmem.layout import PAGE_SIZE, RegionLayout, ShmemLayout
from emulator.shmem.table import MappingTable
from wire.errors import RemoteProtocolError, StateError

logger = logging.getLogger(__name__)

_RESERVE_FLAGS = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
_HUGE_ALIGN = 2 << 20

DEFAULT_MAX_MAPPINGS_PER_REGION = 65_536
DEFAULT_MAX_MAPPINGS = 262_144
DEFAULT_MAX_ACCESS = 1 << 20
_VMA_HEADROOM = 8_192

_string_at = ctypes.string_at
_memmove = ctypes.memmove


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
    MMAP = "mmap"
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
    RefusalReason.MMAP: _errno.ENOMEM,
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
    """A snapshot of one live mapping, offsets relative to its region."""

    shm_offset: int
    length: int
    fd_offset: int
    writable: bool
    sealed: bool


class _Live:
    """One live mapping; ``fd`` is -1 once sealed (the mapping itself keeps the file alive)."""

    __slots__ = (
        "addr",
        "end",
        "fd",
        "fd_offset",
        "length",
        "sealed",
        "start",
        "warned",
        "writable",
    )

    def __init__(
        self, start: int, length: int, addr: int, *, fd: int, fd_offset: int, writable: bool
    ) -> None:
        self.start = start
        self.length = length
        self.end = start + length
        self.addr = addr
        self.fd = fd
        self.fd_offset = fd_offset
        self.writable = writable
        self.sealed = fd == -1
        self.warned = False

    def read(self, rel: int, size: int) -> bytes:
        """``size`` bytes at ``rel`` into the mapping; shorter if the unsealed file ends first."""
        if self.sealed:
            return _string_at(self.addr + rel, size)
        try:
            return os.pread(self.fd, size, self.fd_offset + rel)
        except OSError as exc:
            self._warn_once("read of fd %d failed: %s", self.fd, exc)
            return b""

    def write(self, rel: int, data: bytes) -> None:
        """Store ``data`` at ``rel``; bytes past an unsealed file's current end are dropped."""
        if not self.writable:
            self._warn_once("guest write ignored: mapping is read-only")
            return
        if self.sealed:
            _memmove(self.addr + rel, data, len(data))
            return
        position = self.fd_offset + rel
        try:
            room = os.fstat(self.fd).st_size - position
            if room > 0:
                os.pwrite(self.fd, data[:room], position)
        except OSError as exc:
            self._warn_once("write to fd %d failed: %s", self.fd, exc)

    def _warn_once(self, message: str, *args: object) -> None:
        """At most one warning per mapping, so a guest or back-end cannot flood the log."""
        if not self.warned:
            self.warned = True
            logger.warning(
                "shared memory [%#x, +%#x): " + message + " (further ones not logged)",
                self.start,
                self.length,
                *args,
            )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _seal_shrink(fd: int) -> bool:
    """Make the file unshrinkable (memfds with MFD_ALLOW_SEALING); False if it cannot be."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if seals & fcntl.F_SEAL_SHRINK:
            return True
        if seals & fcntl.F_SEAL_SEAL:
            return False
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        return False
    return True


class _Reservation:
    """State the BAR and its regions share: the address range, the BAR-wide cap, owned fds."""

    __slots__ = ("address", "closed", "damaged", "fds", "limit", "live", "size")

    def __init__(self, address: int, size: int, limit: int) -> None:
        self.address = address
        self.size = size
        self.limit = limit
        self.live = 0
        self.fds: set[int] = set()
        self.closed = False
        self.damaged = False


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
            MappingInfo(start, length, live.fd_offset, live.writable, live.sealed)
            for start, length, live in self._table
        )

    def _refuse(self, reason: RefusalReason, message: str, errno: int | None = None) -> NoReturn:
        logger.debug("shmid %d: refused: %s [%s]", self.shmid, message, reason)
        raise MappingRefused(reason, f"shmid {self.shmid}: {message}", errno)

    def map(self, fd: int, fd_offset: int, shm_offset: int, length: int, writable: bool) -> None:
        """Map ``length`` bytes of ``fd`` at ``fd_offset`` to ``shm_offset`` in this region.

        ``fd`` is lent and never closed here. A mapping that must keep reaching the file after
        this call (one accessed with pread/pwrite, see the module docstring) keeps a ``dup``.
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
        try:
            info = os.fstat(fd)
        except (OSError, OverflowError) as exc:
            self._refuse(RefusalReason.FD, f"{span}: fd {fd} is unusable: {exc}")
        if not stat.S_ISREG(info.st_mode):
            self._refuse(RefusalReason.FD, f"{span}: fd {fd} is not a regular file or memfd")
        if fd_offset + length > info.st_size:
            self._refuse(RefusalReason.FD_SIZE, f"{span}: file has only {info.st_size:#x} bytes")
        address = self.host_address + shm_offset
        prot = PROT_READ | PROT_WRITE if writable else PROT_READ
        try:
            map_memory(address, length, prot, MAP_SHARED | MAP_FIXED, fd=fd, offset=fd_offset)
        except OSError as exc:
            self._restore(address, length)
            self._refuse(RefusalReason.MMAP, f"{span}: mmap: {exc.strerror}", exc.errno)
        sealed = _seal_shrink(fd)
        if sealed:
            try:
                size = os.fstat(fd).st_size
            except OSError:
                size = -1
            if fd_offset + length > size:
                self._restore(address, length)
                self._refuse(RefusalReason.FD_SIZE, f"{span}: file shrank while being mapped")
        kept_fd = -1
        if not sealed:
            try:
                kept_fd = os.dup(fd)
            except OSError as exc:
                self._restore(address, length)
                self._refuse(RefusalReason.FD, f"{span}: cannot keep the fd: {exc}", exc.errno)
        live = _Live(
            shm_offset,
            length,
            address,
            fd=kept_fd,
            fd_offset=fd_offset,
            writable=bool(writable),
        )
        self._table.insert(shm_offset, length, live)
        res.live += 1
        if not sealed:
            res.fds.add(kept_fd)
        logger.debug(
            "shmid %d: mapped %s %s%s",
            self.shmid,
            span,
            "rw" if writable else "ro",
            "" if sealed else " (unsealed: pread/pwrite)",
        )

    def _restore(self, address: int, length: int) -> None:
        """Put the reservation back after a failed MAP_FIXED (older kernels leave a hole)."""
        try:
            _reserve_fixed(address, length)
        except OSError as exc:
            self._res.damaged = True
            logger.critical(
                "shmid %d: could not restore the reservation at %#x (+%#x): %s; "
                "the BAR refuses further mappings and its address space will not be released",
                self.shmid,
                address,
                length,
                exc.strerror,
            )

    def unmap(self, shm_offset: int, length: int) -> None:
        """Remove the mapping that is exactly ``[shm_offset, +length)`` and close its fd.

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
        self._drop(live)
        logger.debug("shmid %d: unmapped [%#x, +%#x)", self.shmid, shm_offset, length)

    def _drop(self, live: _Live) -> None:
        self._table.remove(live.start, live.length)
        self._res.live -= 1
        self._res.fds.discard(live.fd)
        live.close()

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
        for _, _, live in self._table:
            self._res.fds.discard(live.fd)
            live.close()
        self._res.live -= len(self._table)
        self._table.clear()

    def _forget(self) -> None:
        """Close fds and empty the table after the whole reservation has been unmapped."""
        for _, _, live in self._table:
            self._res.fds.discard(live.fd)
            live.close()
        self._res.live -= len(self._table)
        self._table.clear()

    def read(self, offset: int, size: int) -> bytes:
        """Guest read inside the region (caller checked bounds); holes read as zero."""
        live = self._table.lookup(offset)
        if live is not None and offset + size <= live.end:
            if live.sealed:
                return _string_at(live.addr + offset - live.start, size)
            data = live.read(offset - live.start, size)
            return data if len(data) == size else data + bytes(size - len(data))
        buf = bytearray(size)
        for start, length, part in self._table.intersecting(offset, size):
            low = max(offset, start)
            data = part.read(low - start, min(offset + size, start + length) - low)
            buf[low - offset : low - offset + len(data)] = data
        return bytes(buf)

    def write(self, offset: int, data: bytes) -> None:
        """Guest write inside the region (caller checked bounds); writes to holes vanish."""
        size = len(data)
        live = self._table.lookup(offset)
        if live is not None and offset + size <= live.end:
            if live.sealed and live.writable:
                _memmove(live.addr + offset - live.start, data, size)
            else:
                live.write(offset - live.start, data)
            return
        for start, length, part in self._table.intersecting(offset, size):
            low = max(offset, start)
            high = min(offset + size, start + length)
            part.write(low - start, data[low - offset : high - offset])


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
            address = _reserve(layout.bar_size)
        except OSError as exc:
            raise ShmemError(
                f"cannot reserve {layout.bar_size:#x} bytes of address space for the "
                f"shared-memory BAR: {exc.strerror}"
            ) from exc
        self.layout = layout
        self.bar_size = layout.bar_size
        self.host_address = address
        self.max_access = max_access
        self._res = _Reservation(address, layout.bar_size, limit)
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
        if res.damaged:
            logger.error("shared-memory BAR at %#x left reserved (damaged)", res.address)
        else:
            try:
                unmap_memory(res.address, res.size)
            except OSError as exc:
                logger.error("shared-memory BAR at %#x not released: %s", res.address, exc)
        for region in self.regions:
            region._forget()
