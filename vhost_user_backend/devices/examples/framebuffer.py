"""A framebuffer in shared memory: copy this file to start a display-like device.

Start it with ``python -m vhost_user_backend.devices.examples.framebuffer --socket-path SOCK``
and boot a guest with ``virtio-emu-vm --vhost-user SOCK -- vguest dump 0000:00:03.0 --shm 0 0 32``.

Shared-memory region 0 (8 MiB) is one sealed memfd, mapped read-only into the guest with
``VhostUserDaemon.persistent_map``, so the mapping comes back after every device reset (a
device is reset when QEMU connects and when the driver probes: a map made once is gone before
the guest looks). Its first page is a header, the pixels start at ``PIXELS_OFFSET``::

    0x00  magic   b"VFB0"
    0x04  u32     width                     (pixels)
    0x08  u32     height
    0x0c  u32     stride                    (bytes per row)
    0x10  u32     format                    DRM fourcc, XR24 = XRGB8888
    0x18  u64     frame counter             written after the frame's pixels

A timer thread draws a bar moving down the picture and then bumps the frame counter; the
guest sees each store at once, because its BAR pages are the memfd's pages. The device is
virtio-rng compatible (virtio id 4, one queue it fills with random bytes): a Linux guest's
``virtio_rng`` driver binds to it and sets DRIVER_OK, and behind QEMU's own front-end maps only
work once queues have started (docs/shared-memory-lifecycle.md).
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
import threading
from collections.abc import Sequence

from vhost_user_backend.daemon import VhostUserDaemon, VhostUserDevice
from vhost_user_backend.vring import Vring

REGION_SIZE = 8 << 20
HEADER = struct.Struct("<4sIIII4xQ")
MAGIC = b"VFB0"
FRAME_OFFSET = 0x18
PIXELS_OFFSET = 4096
FORMAT_XRGB8888 = int.from_bytes(b"XR24", "little")
BAR_ROWS = 16


class FramebufferDevice(VhostUserDevice):
    """virtio id 4 with one random-bytes queue, and a framebuffer drawn into shmid 0."""

    num_queues = 1

    def __init__(self, width: int = 640, height: int = 480, fps: float = 10.0) -> None:
        self.width, self.height, self.stride = width, height, width * 4
        if PIXELS_OFFSET + self.stride * height > REGION_SIZE:
            raise ValueError(f"{width}x{height} does not fit in {REGION_SIZE >> 20} MiB")
        self.interval = 1.0 / fps
        self.frame = 0
        self.memfd = os.memfd_create("framebuffer", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, REGION_SIZE)
        # Sealed: the front-end maps it, and a file that shrank under a mapping raises SIGBUS.
        fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.pixels = mmap.mmap(self.memfd, REGION_SIZE)
        header = (MAGIC, width, height, self.stride, FORMAT_XRGB8888, 0)
        HEADER.pack_into(self.pixels, 0, *header)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="framebuffer", daemon=True)

    def shmem_sizes(self) -> Sequence[int]:
        return [REGION_SIZE]

    def handle_queue(self, index: int, vring: Vring) -> None:
        """The virtio-rng request queue: fill each buffer with random bytes."""
        used = 0
        while (chain := vring.pop()) is not None:
            vring.push(chain.head, chain.write(vring.memory, os.urandom(chain.writable_len)))
            used += 1
        if used:
            vring.notify()

    def draw(self) -> None:
        """One frame: the bar moves down one row (wrapping), then the counter says so."""
        self.frame += 1
        row = self.frame % self.height
        gone = (row - BAR_ROWS) % self.height
        black = bytes(self.stride)
        color = (0x00FF8000 | (self.frame & 0xFF)).to_bytes(4, "little") * self.width
        self.pixels[self._row(gone) : self._row(gone) + self.stride] = black
        self.pixels[self._row(row) : self._row(row) + self.stride] = color
        struct.pack_into("<Q", self.pixels, FRAME_OFFSET, self.frame)

    def _row(self, row: int) -> int:
        return PIXELS_OFFSET + row * self.stride

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.draw()

    def start(self, daemon: VhostUserDaemon) -> None:
        """Keep the whole region mapped for the guest, then start drawing."""
        daemon.persistent_map(0, self.memfd, 0, 0, REGION_SIZE, writable=False)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.pixels.close()
        os.close(self.memfd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket-path", required=True, help="vhost-user socket to listen on")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--fps", type=float, default=10.0, help="frames per second")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    device = FramebufferDevice(args.width, args.height, args.fps)
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
