"""The rules, as pure functions over what was received: each returns the problems it found.

A problem is ``(verdict, text)``; an empty list means the message passed. The checks and the
back-end channel recorder call these, and unit tests feed them crafted messages. Region
layout rules are ``vhost_user.shmem``'s (the same words both roles use); here only what a
single message can break.
"""

from __future__ import annotations

from collections.abc import Mapping

from conformance.verdict import Verdict
from conformance.wire import RawMessage
from vhost_user.messages import (
    VHOST_USER_MAX_SHMEM_REGIONS,
    VHOST_USER_VERSION,
    VhostUserMMap,
    VhostUserMMapFlag,
    VhostUserShMemConfig,
)
from vhost_user.shmem import PAGE_SIZE, RegionRefused, check_regions
from wire.errors import RemoteProtocolError

Problem = tuple[Verdict, str]
#: VIRTIO_PCI_CAP_SHARED_MEMORY_CFG capabilities that fit a virtio-pci device's config space
#: next to the common, notify, ISR, device, PCI-cfg and MSI-X capabilities.
VIRTIO_PCI_SHMEM_CAPS = 4
#: (shmid, shm_offset) -> length of the live mappings.
Live = Mapping[tuple[int, int], int]


def reply_header_problems(msg: RawMessage, request: int) -> list[Problem]:
    """A reply must carry the request's number, version 1 and the REPLY flag."""
    problems: list[Problem] = []
    if msg.request != request:
        problems.append((Verdict.FAIL, f"request number {msg.request}, expected {request}"))
    if msg.version != VHOST_USER_VERSION:
        problems.append((Verdict.FAIL, f"version bits {msg.version}, expected 1"))
    if not msg.is_reply:
        problems.append((Verdict.FAIL, f"flags {msg.flags:#x} lack REPLY (0x4)"))
    if msg.need_reply:
        problems.append((Verdict.WARN, f"flags {msg.flags:#x} set NEED_REPLY on a reply"))
    return problems


def parse_shmem_config(body: bytes) -> tuple[VhostUserShMemConfig | None, str]:
    """The configuration, or None and the size rule it broke (the codec's words)."""
    try:
        return VhostUserShMemConfig.unpack(body), ""
    except RemoteProtocolError as exc:
        return None, str(exc)


def region_problems(config: VhostUserShMemConfig, sent_sizes: int) -> list[Problem]:
    """``nregions`` against the non-zero sizes, page multiples, the count a virtio-pci
    config space holds. ``sent_sizes`` is how many sizes the reply carried."""
    problems: list[Problem] = []
    nonzero = {shmid: size for shmid, size in enumerate(config.memory_sizes) if size}
    if len(nonzero) != config.nregions:
        problems.append(
            (
                Verdict.FAIL,
                f"nregions={config.nregions} but {len(nonzero)} non-zero sizes: QEMU reads only "
                f"the first nregions ({sorted(config.regions())})",
            )
        )
    try:
        check_regions(nonzero)
    except RegionRefused as exc:
        problems.append((Verdict.FAIL, str(exc)))
    if len(nonzero) > VIRTIO_PCI_SHMEM_CAPS:
        problems.append(
            (
                Verdict.WARN,
                f"{len(nonzero)} regions: a virtio-pci config space holds "
                f"{VIRTIO_PCI_SHMEM_CAPS} shared-memory capabilities",
            )
        )
    if sent_sizes > VHOST_USER_MAX_SHMEM_REGIONS:
        problems.append((Verdict.FAIL, f"{sent_sizes} sizes sent, at most 256"))
    return problems


def _overlaps(shmid: int, start: int, length: int, live: Live) -> list[tuple[int, int]]:
    return [
        key
        for key, size in live.items()
        if key[0] == shmid and start < key[1] + size and key[1] < start + length
    ]


def map_problems(msg: RawMessage, regions: Mapping[int, int] | None, live: Live) -> list[Problem]:
    """One SHMEM_MAP against the rules. ``regions`` None: the layout is unknown (no
    GET_SHMEM_CONFIG reply), so the shmid and range checks are skipped."""
    problems: list[Problem] = []
    if not msg.need_reply:
        problems.append((Verdict.FAIL, "NEED_REPLY not set: the back-end cannot know the outcome"))
    if len(msg.fds) != 1:
        problems.append((Verdict.FAIL, f"{len(msg.fds)} fds, exactly one expected"))
    try:
        req = VhostUserMMap.unpack(msg.body)
    except RemoteProtocolError as exc:
        problems.append((Verdict.FAIL, f"payload: {exc}"))
        return problems
    if req.flags & ~int(VhostUserMMapFlag.RW):
        problems.append((Verdict.FAIL, f"unknown flags {req.flags:#x} (only bit 0, RW, exists)"))
    if req.length == 0:
        problems.append((Verdict.FAIL, "length 0"))
    if (req.fd_offset | req.shm_offset | req.length) % PAGE_SIZE:
        problems.append(
            (
                Verdict.FAIL,
                f"not page-aligned: fd_offset={req.fd_offset:#x} shm_offset={req.shm_offset:#x} "
                f"len={req.length:#x}",
            )
        )
    if regions is not None:
        size = regions.get(req.shmid)
        if size is None:
            problems.append(
                (Verdict.FAIL, f"shmid {req.shmid} not declared (declared: {sorted(regions)})")
            )
        elif req.shm_offset + req.length > size:
            problems.append(
                (
                    Verdict.FAIL,
                    f"[{req.shm_offset:#x}, +{req.length:#x}) ends past the {size:#x}-byte "
                    f"region {req.shmid}",
                )
            )
    clash = _overlaps(req.shmid, req.shm_offset, req.length, live)
    if clash:
        where = ", ".join(f"[{off:#x}, +{live[(s, off)]:#x})" for s, off in clash)
        problems.append(
            (
                Verdict.FAIL,
                f"shmid {req.shmid} [{req.shm_offset:#x}, +{req.length:#x}) "
                f"overlaps the live mapping {where}",
            )
        )
    if len(msg.fds) == 1:
        fd = msg.fds[0]
        end = req.fd_offset + req.length
        if fd.regular and fd.size < end:
            problems.append(
                (
                    Verdict.WARN,
                    f"the file has {fd.size:#x} bytes, the map reaches {end:#x}: pages past EOF "
                    "read zeros behind our emulator and QEMU 11.1 refuses the map",
                )
            )
    return problems


def unmap_problems(msg: RawMessage, live: Live) -> list[Problem]:
    """One SHMEM_UNMAP: exactly one whole live mapping, no fd, NEED_REPLY."""
    problems: list[Problem] = []
    if not msg.need_reply:
        problems.append((Verdict.FAIL, "NEED_REPLY not set"))
    if msg.fds:
        problems.append((Verdict.FAIL, f"{len(msg.fds)} fds with an unmap (none expected)"))
    try:
        req = VhostUserMMap.unpack(msg.body)
    except RemoteProtocolError as exc:
        problems.append((Verdict.FAIL, f"payload: {exc}"))
        return problems
    if live.get((req.shmid, req.shm_offset)) != req.length:
        problems.append(
            (
                Verdict.FAIL,
                f"shmid {req.shmid} [{req.shm_offset:#x}, +{req.length:#x}) is not one whole "
                "live mapping",
            )
        )
    return problems
