"""VIRTIO Shared Memory Regions: the rules both roles apply, and what a refusal means.

Both sides of the protocol import this module, so a region layout is refused with the same
words by the back-end library when a device is built (``DeviceConfigError``) and by the
emulator when it lays out BAR 4 (``ConfigError``), and a back-end reads a non-zero
SHMEM_MAP/UNMAP status with the meaning our front-end gave it.

Region rules (``check_regions``): a shmid is a u8 (the PCI capability's ``id``), so 0..255;
sizes are whole 4 KiB pages (the front-end mmaps page by page); 0 means "unused"; the regions
together fit one 64-bit BAR. QEMU 11.1's own front-end also wants a power-of-two total
(``QEMU_NATIVE_POWER_OF_TWO``) and aborts on anything else; ours rounds the BAR up.

Statuses (``describe_status``): our emulator answers a refused SHMEM_MAP/UNMAP with the errno
of the refusal (``emulator/shmem/region.py``, ``RefusalReason``); QEMU 11.1 answers 1 to
every refusal and says nothing more.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from enum import StrEnum

PAGE_SIZE = 4096
MAX_SHMID = 255
#: The largest 64-bit BAR (bit 63): what all regions together may occupy.
MAX_BAR_SIZE = 1 << 63
#: The status QEMU 11.1 answers to every refused SHMEM_MAP/UNMAP.
QEMU_REFUSED = 1


class RegionRule(StrEnum):
    """The rule a declared region broke (short, stable, named in every refusal)."""

    INTEGER = "integer"
    SHMID = "shmid-range"
    PAGE_MULTIPLE = "page-multiple"
    BAR_SIZE = "bar-size"


class RegionRefused(ValueError):
    """A declared region layout breaks ``rule``; each role wraps it in its own error."""

    def __init__(self, rule: RegionRule, shmid: object, detail: str) -> None:
        where = f"shared memory region {shmid}" if shmid is not None else "shared memory regions"
        super().__init__(f"{where}: {detail} (rule {rule})")
        self.rule = rule
        self.shmid = shmid


def check_regions(sizes: Mapping[int, int]) -> None:
    """Raise ``RegionRefused`` unless ``{shmid: size}`` is a layout a front-end can build
    (size 0 marks an unused shmid)."""
    total = 0
    for shmid in sorted(sizes, key=lambda s: s if isinstance(s, int) else -1):
        size = sizes[shmid]
        if isinstance(shmid, bool) or not isinstance(shmid, int):
            raise RegionRefused(RegionRule.INTEGER, repr(shmid), "the shmid is not an integer")
        if not 0 <= shmid <= MAX_SHMID:
            raise RegionRefused(RegionRule.SHMID, shmid, f"shmid is outside 0..{MAX_SHMID}")
        if isinstance(size, bool) or not isinstance(size, int):
            raise RegionRefused(RegionRule.INTEGER, shmid, f"size {size!r} is not an integer")
        if size < 0 or size % PAGE_SIZE:
            raise RegionRefused(
                RegionRule.PAGE_MULTIPLE,
                shmid,
                f"size {size:#x} is not a non-negative multiple of {PAGE_SIZE}",
            )
        total += size
        if total > MAX_BAR_SIZE:
            raise RegionRefused(
                RegionRule.BAR_SIZE,
                None,
                f"they total {total:#x} bytes, more than a 64-bit BAR can hold ({MAX_BAR_SIZE:#x})",
            )


def qemu_native_refuses(sizes: Mapping[int, int]) -> bool:
    """True when QEMU 11.1's own front-end would abort on this layout (a total that is not a
    power of two, e.g. 2 MiB + 1 MiB); ours takes it."""
    total = sum(sizes.values())
    return bool(total & (total - 1))


#: What a non-zero SHMEM_MAP status means when our emulator sent it (the refusal's errno).
_MAP_MEANINGS: dict[int, str] = {
    errno.EINVAL: "outside the region or not page-aligned (or zero length, no such shmid, "
    "a file shorter than the range, unknown flags)",
    errno.EEXIST: "overlaps a live mapping",
    errno.EBADF: "the fd is not a regular file or memfd",
    errno.ENOSPC: "the region or the BAR already holds its maximum number of mappings",
    errno.ENOMEM: "the front-end's mmap of the fd failed",
    errno.ENODEV: "the front-end's shared-memory BAR is not usable",
    errno.ENOTSUP: "no shared memory there (not negotiated, or no region declared)",
}
#: The same for SHMEM_UNMAP.
_UNMAP_MEANINGS: dict[int, str] = {
    errno.ENOENT: "no mapping exactly there (a hole, part of a mapping, or several)",
    errno.EINVAL: "no such shmid (or unknown flags)",
    errno.ENOMEM: "the front-end could not restore its reservation",
    errno.ENODEV: "the front-end's shared-memory BAR is closed",
    errno.ENOTSUP: "no shared memory there (not negotiated, or no region declared)",
}
STATUS_MEANINGS: dict[str, dict[int, str]] = {
    "SHMEM_MAP": _MAP_MEANINGS,
    "SHMEM_UNMAP": _UNMAP_MEANINGS,
}


def describe_status(request: str, code: int) -> str:
    """``"EEXIST: overlaps a live mapping"`` for a status our front-end sent, ``"refused
    (status 1: ...)"`` for QEMU's bare 1, the errno's name and text for anything else."""
    if code == QEMU_REFUSED:
        return "refused (status 1: QEMU's answer to every refusal, no reason given)"
    name = errno.errorcode.get(code, f"status {code}")
    meaning = STATUS_MEANINGS.get(request, {}).get(code)
    if meaning is None:
        return f"{name}: {os.strerror(code)}" if code in errno.errorcode else name
    return f"{name}: {meaning}"
