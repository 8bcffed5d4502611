"""What ``query-counters`` reports: messages per socket, type and direction, the back-end
channel's refusals by reason, and guest BAR accesses.

Each is counted at one place per boundary, where the DEBUG line and the ``--trace`` record are
already written: ``VfioUserServer._process_buffered`` (every vfio-user message in and every
reply out on the Python path; ``VfioUserServer._fold`` adds what the C hot path served, after
each drain and before the next message is handled, so nothing is missed), ``MessageStream``
(every vhost-user message on either socket), ``BackendChannel`` (each refused
SHMEM_MAP/UNMAP, by its ``RefusalReason``), and the server's region handlers for BAR
accesses (the region and byte count are in the decoded access, nowhere earlier). Counting
is always on and costs a dict or list increment: keys are the messages' own enum members (an
``IntEnum`` hashes as its int), turned into names only when someone asks.

Measured on the shared 2-core machine: a REGION_READ pays four increments (message in, reply
out, BAR reads, BAR bytes), 0.24 us by ``timeit``; the server's CPU per pipelined in-process
REGION_READ (200 per batch, thread CPU time, minimum of 300 batches, four alternating runs)
went from 9.8-10.1 us to 10.4-10.5 us, and the lockstep figure of ``python -m bench --only
fig3`` (30-38 us) did not move beyond its noise.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from typing import Any

from emulator.pci.device import NUM_REGIONS, RegionIndex
from emulator.shmem import RefusalReason

#: Refusals on the back-end channel that never reached the BAR, besides ``RefusalReason``:
#: the request is not served (not SHMEM_*, or shared memory not negotiated: ENOTSUP), or it
#: is malformed (unknown flags, wrong fd count, a request the codec refused).
UNSUPPORTED = "unsupported"
INVALID = "invalid"
REFUSAL_REASONS = (*(reason.value for reason in RefusalReason), UNSUPPORTED, INVALID)

#: A message type (its request or command enum member) or ``invalid:NAME`` for one a codec
#: refused, as in the trace.
MessageKey = enum.IntEnum | str


class MessageCounts:
    """Messages on one kind of socket: ``received`` and ``sent``, per type."""

    __slots__ = ("received", "sent")

    def __init__(self) -> None:
        self.received: defaultdict[MessageKey, int] = defaultdict(int)
        self.sent: defaultdict[MessageKey, int] = defaultdict(int)

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {"in": _named(self.received), "out": _named(self.sent)}


class BarCounts:
    """Guest accesses per VFIO region index (BAR 0-5, ROM, config space): lists, so the hot
    path's increment needs no hashing."""

    __slots__ = ("read_bytes", "reads", "write_bytes", "writes")

    def __init__(self) -> None:
        self.reads = [0] * NUM_REGIONS
        self.read_bytes = [0] * NUM_REGIONS
        self.writes = [0] * NUM_REGIONS
        self.write_bytes = [0] * NUM_REGIONS

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Regions that saw an access, by name (``BAR4``, ``CONFIG``)."""
        return {
            RegionIndex(index).name: {
                "reads": self.reads[index],
                "read_bytes": self.read_bytes[index],
                "writes": self.writes[index],
                "write_bytes": self.write_bytes[index],
            }
            for index in range(NUM_REGIONS)
            if self.reads[index] or self.writes[index]
        }


class Counters:
    """Every counter of one emulator, shared by the boundaries that count."""

    def __init__(self) -> None:
        self.channels: dict[str, MessageCounts] = {}
        self.refusals: defaultdict[str, int] = defaultdict(int)
        self.bar = BarCounts()

    def messages(self, channel: str) -> MessageCounts:
        """The counts of ``channel`` (``vfio-user``, ``vhost-user-frontend``,
        ``vhost-user-backend``: the trace's names); the same object across reconnects."""
        counts = self.channels.get(channel)
        if counts is None:
            counts = self.channels[channel] = MessageCounts()
        return counts

    def snapshot(self) -> dict[str, Any]:
        """``query-counters``: every refusal reason (zeros too, so the names are discoverable)."""
        return {
            "messages": {name: counts.snapshot() for name, counts in sorted(self.channels.items())},
            "refusals": {**dict.fromkeys(REFUSAL_REASONS, 0), **self.refusals},
            "bar_accesses": self.bar.snapshot(),
        }


def _named(counts: dict[MessageKey, int]) -> dict[str, int]:
    named = {key.name if isinstance(key, enum.Enum) else key: n for key, n in counts.items()}
    return dict(sorted(named.items()))
