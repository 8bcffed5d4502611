"""A doorbell and a ring in shared memory: copy this file to start a device that reports events.

Start it with ``python -m vhost_user_backend.devices.examples.doorbell --socket-path SOCK``
and ring it from a guest:
``virtio-emu-vm --vhost-user SOCK -- sh -c 'head -c 16 /dev/hwrng | od -c'``.

The doorbell is a virtqueue: each buffer the guest makes available is one ring. The device
appends a record to a ring in shared-memory region 0, then returns the buffer holding
``b"DOORBELL"`` and the new head (u64, little-endian). The guest reads the records from the
BAR. The queue is virtio-rng's request queue (virtio id 4): driving a virtqueue from guest user
space would mean unbinding the kernel driver, while a read of ``/dev/hwrng`` makes Linux's
``virtio_rng`` driver put a buffer on it. So ``head -c 16 /dev/hwrng`` rings the bell. The
kernel also reads the hwrng now and then to feed its entropy pool: those rings are records too.
``virtio_rng`` queues a buffer ahead of reads, so a read may return the answer to an earlier
ring; its head is never past the ring's.

Region 0 (1 MiB), mapped read-only with ``VhostUserDaemon.persistent_map`` (so it survives
device resets)::

    0x0000  magic    b"VDB0"
    0x0004  u32      record size (32)
    0x0008  u32      capacity (records)
    0x0010  u64      head: records written so far; written after the record
    0x1000  records  record n (1-based) at 0x1000 + ((n - 1) % capacity) * 32:
                     u64 n, u64 CLOCK_MONOTONIC ns, u64 bytes the guest offered, 8 reserved
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import mmap
import os
import signal
import struct
import sys
import time
from collections.abc import Sequence

from vhost_user_backend.daemon import VhostUserDaemon, VhostUserDevice
from vhost_user_backend.vring import Vring

REGION_SIZE = 1 << 20
HEADER = struct.Struct("<4sII4xQ")
MAGIC = b"VDB0"
HEAD_OFFSET = 0x10
RECORDS_OFFSET = 0x1000
RECORD = struct.Struct("<QQQ8x")
CAPACITY = (REGION_SIZE - RECORDS_OFFSET) // RECORD.size
REPLY_TAG = b"DOORBELL"


def record_offset(n: int) -> int:
    """Where record ``n`` (1-based) lives in region 0."""
    return RECORDS_OFFSET + ((n - 1) % CAPACITY) * RECORD.size


class DoorbellDevice(VhostUserDevice):
    """virtio id 4; each buffer on queue 0 appends a record to the ring in shmid 0."""

    num_queues = 1

    def __init__(self) -> None:
        self.head = 0
        self.memfd = os.memfd_create("doorbell-ring", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, REGION_SIZE)
        fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.ring = mmap.mmap(self.memfd, REGION_SIZE)
        HEADER.pack_into(self.ring, 0, MAGIC, RECORD.size, CAPACITY, 0)

    def shmem_sizes(self) -> Sequence[int]:
        return [REGION_SIZE]

    def handle_queue(self, index: int, vring: Vring) -> None:
        """Runs on the daemon's loop thread, the ring's only writer: no lock needed."""
        used = 0
        while (chain := vring.pop()) is not None:
            head = self.append(chain.writable_len)
            reply = (REPLY_TAG + head.to_bytes(8, "little"))[: chain.writable_len]
            vring.push(chain.head, chain.write(vring.memory, reply))
            used += 1
        if used:
            vring.notify()

    def append(self, offered: int) -> int:
        """Write the next record, then publish it by moving the head; returns the new head."""
        n = self.head + 1
        RECORD.pack_into(self.ring, record_offset(n), n, time.monotonic_ns(), offered)
        struct.pack_into("<Q", self.ring, HEAD_OFFSET, n)
        self.head = n
        return n

    def start(self, daemon: VhostUserDaemon) -> None:
        daemon.persistent_map(0, self.memfd, 0, 0, REGION_SIZE, writable=False)

    def close(self) -> None:
        self.ring.close()
        os.close(self.memfd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket-path", required=True, help="vhost-user socket to listen on")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    device = DoorbellDevice()
    daemon = VhostUserDaemon(device, args.socket_path)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    try:
        device.start(daemon)
        daemon.serve_forever()
    finally:
        device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
