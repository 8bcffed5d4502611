"""What must hold after every fuzz step, whatever the peers sent, and the counts a campaign keeps.

* the emulator is alive: its loop thread runs and a config-space read (region 7) is answered;
* its open fds return to the baseline once the peers are gone;
* every live mapping lies inside its region and no two overlap;
* the mapping table equals the test's model (so refused requests changed nothing), and the
  guest-visible BAR 4 shows each mapping's file bytes and zeros elsewhere (past EOF too); a
  byte the guest wrote past EOF in EOF's page may show as written or as zero (``Backing``).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from dataclasses import dataclass, field

from emulator.shmem import SharedMemoryBar
from testkit.procfs import fd_count, fd_table
from tests.fuzz.rig import (
    CONFIG_REGION,
    PAGE,
    SHMEM_BAR,
    Backing,
    RawVfioClient,
    RunningEmulator,
)

PCI_VENDOR_VIRTIO = 0x1AF4


class InvariantBroken(AssertionError):
    """An invariant failed; the message says which and how."""


def check_alive(running: RunningEmulator, client: RawVfioClient) -> None:
    """The loop still runs and answers a config-space read with the virtio vendor id."""
    if not running.alive:
        raise InvariantBroken(f"the emulator loop died: {running.error!r}")
    vendor = int.from_bytes(client.region_read(CONFIG_REGION, 0, 2), "little")
    if vendor != PCI_VENDOR_VIRTIO:
        raise InvariantBroken(f"config space reads vendor {vendor:#x}")


def out_of_region(shmem: SharedMemoryBar) -> list[str]:
    """Live mappings outside their region or overlapping another (should be none)."""
    problems = []
    for region in shmem:
        end = 0
        for info in region.mappings():
            if (
                info.shm_offset < 0
                or info.length <= 0
                or info.shm_offset + info.length > region.size
            ):
                problems.append(f"shmid {region.shmid}: {info} outside {region.size:#x}")
            if info.shm_offset < end:
                problems.append(f"shmid {region.shmid}: {info} overlaps the previous mapping")
            end = max(end, info.shm_offset + info.length)
        if len(region) > region.max_mappings:
            problems.append(f"shmid {region.shmid}: {len(region)} mappings > cap")
    if len(shmem) > shmem.max_mappings:
        problems.append(f"BAR: {len(shmem)} mappings > cap {shmem.max_mappings}")
    return problems


def check_fds(baseline: int, expected_extra: int = 0, before: dict[int, str] | None = None) -> None:
    """Our fd count is back to ``baseline`` (+ the fds the test itself still holds)."""
    now = fd_count()
    if now != baseline + expected_extra:
        table = fd_table()
        new = {fd: what for fd, what in table.items() if before is None or fd not in before}
        raise InvariantBroken(
            f"{now} fds open, expected {baseline} + {expected_extra}; new: {sorted(new.items())}"
        )


@dataclass
class ModelMapping:
    shm_offset: int
    length: int
    fd_offset: int
    writable: bool
    backing: Backing

    def view(self) -> tuple[bytes, dict[int, int]]:
        """What the guest must see: the file bytes, zeros past its current end; and the
        offsets where it may instead see what it wrote past EOF (with that byte)."""
        assert self.backing.content is not None
        start, end = self.fd_offset, self.fd_offset + self.length
        data = bytes(self.backing.content[start:end])
        either = {at - start: byte for at, byte in self.backing.tail.items() if start <= at < end}
        return data + bytes(self.length - len(data)), either


@dataclass
class ShmemModel:
    """The mapping table as the test believes it to be, per shmid."""

    sizes: dict[int, int]
    bar_offsets: dict[int, int]
    bar_size: int
    maps: dict[int, dict[int, ModelMapping]] = field(default_factory=dict)

    @classmethod
    def of(cls, shmem: SharedMemoryBar) -> ShmemModel:
        return cls(
            {r.shmid: r.size for r in shmem},
            {r.shmid: r.bar_offset for r in shmem},
            shmem.bar_size,
            {r.shmid: {} for r in shmem},
        )

    def __len__(self) -> int:
        return sum(len(m) for m in self.maps.values())

    def overlaps(self, shmid: int, start: int, length: int) -> bool:
        return any(
            m.shm_offset < start + length and start < m.shm_offset + m.length
            for m in self.maps[shmid].values()
        )

    def add(self, shmid: int, mapping: ModelMapping) -> None:
        self.maps[shmid][mapping.shm_offset] = mapping

    def remove(self, shmid: int, start: int) -> None:
        self.maps[shmid].pop(start).backing.close()

    def clear(self) -> None:
        for per_region in self.maps.values():
            for mapping in per_region.values():
                mapping.backing.close()
            per_region.clear()

    def held_fds(self) -> int:
        """Fds the test keeps for live mappings (one per mapping: the truncation handle)."""
        return sum(1 for m in self.mappings() if m.backing.keep is not None)

    def mappings(self) -> list[ModelMapping]:
        return [m for per in self.maps.values() for m in per.values()]

    def find(self, shmid: int, offset: int) -> ModelMapping | None:
        for mapping in self.maps.get(shmid, {}).values():
            if mapping.shm_offset <= offset < mapping.shm_offset + mapping.length:
                return mapping
        return None

    def guest_write(self, bar_offset: int, data: bytes) -> None:
        """What a REGION_WRITE to BAR 4 does to the files behind writable mappings."""
        for shmid, base in self.bar_offsets.items():
            for mapping in self.maps[shmid].values():
                start = base + mapping.shm_offset
                low = max(bar_offset, start)
                high = min(bar_offset + len(data), start + mapping.length)
                if low < high and mapping.writable:
                    position = mapping.fd_offset + low - start
                    mapping.backing.store(position, data[low - bar_offset : high - bar_offset])

    def expected_bar(self) -> tuple[bytes, dict[int, int]]:
        """The whole BAR 4 as the guest must see it, and the bytes that may differ (see view)."""
        bar = bytearray(self.bar_size)
        either: dict[int, int] = {}
        for shmid, base in self.bar_offsets.items():
            for mapping in self.maps[shmid].values():
                start = base + mapping.shm_offset
                view, maybe = mapping.view()
                bar[start : start + mapping.length] = view
                either.update((start + at, byte) for at, byte in maybe.items())
        return bytes(bar), either


def check_table(shmem: SharedMemoryBar, model: ShmemModel) -> None:
    """The emulator's mapping table is the model's, field by field."""
    problems = out_of_region(shmem)
    if problems:
        raise InvariantBroken("; ".join(problems))
    for region in shmem:
        actual = [(i.shm_offset, i.length, i.fd_offset, i.writable) for i in region.mappings()]
        expected = sorted(
            (m.shm_offset, m.length, m.fd_offset, m.writable)
            for m in model.maps[region.shmid].values()
        )
        if actual != expected:
            raise InvariantBroken(f"shmid {region.shmid}: table {actual}, model {expected}")


def check_bar_view(client: RawVfioClient, model: ShmemModel) -> None:
    """REGION_READ of the whole BAR 4 equals the model, page for page."""
    seen = client.region_read(SHMEM_BAR, 0, model.bar_size)
    expected, either = model.expected_bar()
    if seen == expected:
        return
    pairs = enumerate(zip(seen, expected, strict=True))
    wrong = [at for at, (got, want) in pairs if got not in (want, either.get(at))]
    if wrong:
        page = wrong[0] - wrong[0] % PAGE
        raise InvariantBroken(
            f"BAR 4 page at {page:#x}: saw {seen[page : page + 16].hex()}, "
            f"expected {expected[page : page + 16].hex()}"
        )


# -- counting ------------------------------------------------------------------------------------

_REASON = re.compile(r"\[([a-z-]+)\]$")


@dataclass
class Stats:
    """What a campaign reports per socket."""

    socket: str
    messages: int = 0
    sessions: int = 0
    seconds: float = 0.0
    refusals: Counter[str] = field(default_factory=Counter)
    crashes: int = 0
    hangs: int = 0
    leaked_fds: int = 0
    out_of_region: int = 0

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    def merge(self, other: Stats) -> None:
        self.messages += other.messages
        self.sessions += other.sessions
        self.seconds += other.seconds
        self.refusals.update(other.refusals)
        self.crashes += other.crashes
        self.hangs += other.hangs
        self.leaked_fds += other.leaked_fds
        self.out_of_region += other.out_of_region

    def lines(self) -> list[str]:
        top = ", ".join(f"{k}={v}" for k, v in self.refusals.most_common())
        return [
            f"{self.socket}: {self.messages} messages in {self.seconds:.1f} s "
            f"({self.rate:.0f}/s), {self.sessions} sessions",
            f"  crashes={self.crashes} hangs={self.hangs} leaked_fds={self.leaked_fds} "
            f"out_of_region_mappings={self.out_of_region}",
            f"  refusals: {top or 'none'}",
        ]


class RefusalCounter(logging.Handler):
    """Counts the emulator's own refusal log lines by reason while a fuzzer runs.

    The emulator logs each refusal once (``refused X: ... [reason]`` for mappings, ``refused
    CMD`` for vfio-user, ``invalid request`` for codec rejections); the lines are the
    emulator's own account of why, so they are what the campaign reports.
    """

    def __init__(self, stats: Stats) -> None:
        super().__init__(logging.DEBUG)
        self.stats = stats
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        reason: str | None = None
        if text.startswith("refused "):
            found = _REASON.search(text)
            what = text.split()[1].rstrip(":")
            reason = f"{what}:{found.group(1)}" if found else f"{what}"
        elif text.startswith("bad vfio-user message"):
            reason = "vfio-user:undecodable"
        elif text.startswith("back-end sent an invalid request"):
            reason = "channel:invalid-message"
        elif text.startswith("vfio-user client gone: protocol error") or "framing" in text:
            reason = "disconnect:framing"
        elif text.startswith("vhost-user back-end lost"):
            reason = "backend-lost"
        elif text.startswith("handler for"):
            reason = "handler-exception"
        if reason is not None:
            with self._lock:
                self.stats.refusals[reason] += 1


class counting_refusals:
    """Route the emulator's log to a ``RefusalCounter`` (and not to pytest) meanwhile."""

    def __init__(self, stats: Stats) -> None:
        self.handler = RefusalCounter(stats)
        self.logger = logging.getLogger("emulator")

    def __enter__(self) -> RefusalCounter:
        self._saved = (self.logger.level, self.logger.propagate)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.logger.addHandler(self.handler)
        return self.handler

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self._saved[0])
        self.logger.propagate = self._saved[1]
