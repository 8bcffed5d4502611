"""The typed face of the server's native hot path (``emulator._hotpath``, C in emulator/hotpath/).

The C side owns the receive side of the client socket: ``drain()`` reads, serves every guest
access to the shared-memory BAR and every kick of an armed queue, sends the replies, and stops
at the first message it does not serve, which ``take_cold()`` hands over byte for byte with its
fds for the Python path. Everything C knows comes from here: the BAR's host address and limits
(once), whether VERSION was negotiated, and which queues' kick eventfds it may write (borrowed:
the owner disarms them before closing them). What C did comes back as deltas Python folds after
each drain: counts, trace records (only while observed) and writes that hit faulting pages.

The generated module is imported here and nowhere else. It is built by ``pip install`` (see
``setup.py``); without it the emulator refuses to start (``HotPathMissing``).
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import Any

from emulator.errors import EmulatorError


class HotPathMissing(EmulatorError):
    """The compiled hot path is not importable: the install did not build it."""


BUILD_HINT = (
    "the emulator's compiled hot path (emulator._hotpath) is missing: build it with "
    "`make setup`, or `pip install -e .` on a machine with a C compiler (cffi compiles "
    "emulator/hotpath/hotpath.c at install)"
)


def _load() -> tuple[Any, Any]:
    try:
        module = importlib.import_module("emulator._hotpath")
    except ImportError as exc:
        raise HotPathMissing(f"{BUILD_HINT}: {exc}") from exc
    return module.ffi, module.lib


def require() -> None:
    """Fail now, with how to fix it, if the hot path cannot be loaded."""
    _load()


class Drain(enum.IntEnum):
    """What ``drain()`` stopped at (``enum hp_status``)."""

    IDLE = 0
    COLD = 1
    EOF = 2
    ERROR = 3
    TOO_MANY_FDS = 4
    YIELD = 5


class Count(enum.IntEnum):
    """Indices of the counts C keeps (``enum hp_count``)."""

    IN_READ = 0
    IN_WRITE = 1
    IN_WRITE_MULTI = 2
    OUT_READ = 3
    OUT_WRITE = 4
    OUT_WRITE_MULTI = 5
    SHMEM_READS = 6
    SHMEM_READ_BYTES = 7
    SHMEM_WRITES = 8
    SHMEM_WRITE_BYTES = 9
    NOTIFY_WRITES = 10
    NOTIFY_WRITE_BYTES = 11
    KICKS = 12
    KICK_ERRORS = 13


NUM_COUNTS = len(Count)


class Direction(enum.IntEnum):
    """``enum hp_direction``: ENTRY is one write of the REGION_WRITE_MULTI recorded before."""

    IN = 0
    OUT = 1
    ENTRY = 2


@dataclass(frozen=True, slots=True)
class Record:
    """One observed message (or one write of a multi), as C recorded it. ``count`` is the
    access's byte count, for a REGION_WRITE_MULTI its number of writes."""

    direction: Direction
    command: int
    msg_id: int
    flags: int
    size: int
    region: int
    count: int
    offset: int


class Pending(enum.IntFlag):
    """Which logs wait to be taken (``enum hp_pending``), in ``drain()``'s bits 8-10."""

    COUNTS = 1
    RECORDS = 2
    DROPS = 4


#: ``drain()``'s result: ``status & STATUS_MASK`` is a ``Drain``, ``status >> PENDING_SHIFT``
#: the ``Pending`` bits.
STATUS_MASK = 0xFF
PENDING_SHIFT = 8


class HotPath:
    """One per server; ``attach`` a client socket, ``drain`` when it is readable."""

    def __init__(self, *, max_msg_size: int, max_fds: int) -> None:
        self._ffi, self._lib = _load()
        conn = self._lib.hp_new(max_msg_size, max_fds)
        if conn == self._ffi.NULL:
            raise MemoryError("cannot allocate the hot path's buffers")
        self._conn = self._ffi.gc(conn, self._lib.hp_free)
        self._n = self._ffi.new("uint32_t *")
        self._counts = self._ffi.new("uint64_t[]", NUM_COUNTS)
        self.observed = False

    # -- configuration, all on the loop's thread between two drains -----------------------

    def attach(self, sock_fd: int) -> None:
        """A new client: C forgets the previous one (closing fds it still buffered)."""
        self._lib.hp_attach(self._conn, sock_fd)

    def detach(self) -> None:
        self._lib.hp_detach(self._conn)

    def set_negotiated(self, max_data_xfer: int) -> None:
        self._lib.hp_set_negotiated(self._conn, 1, max_data_xfer)

    def set_observed(self, observed: bool) -> None:
        if observed != self.observed:
            self.observed = observed
            self._lib.hp_set_observed(self._conn, int(observed))

    def set_shmem(self, region: int, host_address: int, size: int, max_access: int) -> None:
        """Region ``region`` is the shared-memory BAR reserved at ``host_address``."""
        self._lib.hp_set_shmem(self._conn, region, host_address, size, max_access)

    def clear_shmem(self) -> None:
        """From now on every shared-memory BAR access takes the Python path."""
        self._lib.hp_clear_shmem(self._conn)

    def set_notify(self, region: int, offset: int, multiplier: int, num_queues: int) -> None:
        """Queue q's notification is a write at ``offset + q * multiplier`` of ``region``."""
        self._lib.hp_set_notify(self._conn, region, offset, multiplier, num_queues)

    def arm(self, queue: int, eventfd: int) -> None:
        """C writes ``eventfd`` for kicks of ``queue``; it borrows the fd until ``disarm_all``."""
        self._lib.hp_arm_kick(self._conn, queue, eventfd)

    def disarm_all(self) -> None:
        self._lib.hp_disarm_kicks(self._conn)

    # -- serving ------------------------------------------------------------------------------

    def drain(self) -> int:
        """Serve what is waiting: a ``Drain`` (where it stopped) in the low byte and the
        ``Pending`` logs above it (``PENDING_SHIFT``), as one int: this runs per wake-up."""
        result: int = self._lib.hp_drain(self._conn)
        return result

    @property
    def errno(self) -> int:
        """The errno of the last ``Drain.ERROR``."""
        return int(self._lib.hp_errno(self._conn))

    def take_cold(self) -> tuple[bytes, list[int]]:
        """The message ``drain`` stopped at: its bytes and fds (the caller owns them now)."""
        cold = self._lib.hp_cold_message(self._conn)
        data = bytes(self._ffi.buffer(cold.data, cold.len))
        fds = [cold.fds[i] for i in range(cold.nfds)]
        cold.nfds = 0
        return data, fds

    def pending(self) -> Pending:
        """Which logs wait to be taken (``drain()`` says it too)."""
        return Pending(self._lib.hp_pending(self._conn))

    def take_counts(self) -> list[int]:
        """The counts since the last call, indexed by ``Count``; C's are zeroed."""
        self._lib.hp_take_counts(self._conn, self._counts)
        counts: list[int] = self._ffi.unpack(self._counts, NUM_COUNTS)
        return counts

    def take_logs(self) -> tuple[list[Record], list[tuple[int, int]]]:
        """Records of observed messages, and ``(bar_offset, length)`` of dropped writes."""
        lib, conn, n = self._lib, self._conn, self._n
        raw = lib.hp_records(conn, n)
        records = [
            Record(
                Direction(r.dir), r.command, r.msg_id, r.flags, r.size, r.region, r.count, r.offset
            )
            for r in (raw[i] for i in range(n[0]))
        ]
        raw_drops = lib.hp_drops(conn, n)
        drops = [(raw_drops[i].offset, raw_drops[i].length) for i in range(n[0])]
        lib.hp_clear_logs(conn)
        return records, drops
