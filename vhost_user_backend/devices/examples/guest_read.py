"""Runs in the guest: finds the examples' devices and reads what their back-ends wrote.

Needs only the guest tools (``vguest``, in ``/opt/vguest`` on the guest image); the project is
not in the guest, so pass the file's text: ``virtio-emu-vm --vhost-user FB.sock --vhost-user
DB.sock -- env PYTHONPATH=/opt/vguest python3 -c "$(cat .../examples/guest_read.py)"``.
Prints one JSON line per device found: the framebuffer's header and its frame counter read
twice, half a second apart; the doorbell rung once through ``/dev/hwrng`` and the ring's
record for the head it answered. Every read of shared memory is an exact-width load through
the BAR (``vguest.mmio``).
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from vguest import caps, mmio, sysfs

HWRNG = Path("/sys/class/misc/hw_random")


def region0(dev: sysfs.SysfsPciDevice) -> tuple[Path, int, int] | None:
    """(resource file, offset, length) of ``dev``'s shared-memory region 0, if it has one."""
    region = caps.parse(dev.config(), dev.resources()).shm_region(0)
    if region is None:
        return None
    return dev.resource_file(region.bar), region.offset, region.length


def read_u64(window: mmio.Mapping, off: int) -> int:
    return window.read(off, 8)


def framebuffer(dev: sysfs.SysfsPciDevice, window: mmio.Mapping) -> dict[str, object]:
    width, height, stride, fmt = struct.unpack("<4I", window.read_bytes(4, 16, 4))
    first = read_u64(window, 0x18)
    time.sleep(0.5)
    return {
        "device": "framebuffer",
        "bdf": dev.bdf,
        "size": [width, height, stride],
        "format": fmt.to_bytes(4, "little").decode(),
        "frames": [first, read_u64(window, 0x18)],
    }


def ring_doorbell() -> int:
    """Select the hwrng that answers ``DOORBELL``; the head of its answer."""
    for name in (HWRNG / "rng_available").read_text().split():
        (HWRNG / "rng_current").write_text(name)
        with open("/dev/hwrng", "rb") as rng:
            answer = rng.read(16)
        if answer[:8] == b"DOORBELL":
            return int.from_bytes(answer[8:16], "little")
    raise SystemExit("no hwrng answers DOORBELL")


def doorbell(dev: sysfs.SysfsPciDevice, window: mmio.Mapping) -> dict[str, object]:
    answered = ring_doorbell()
    head = read_u64(window, 0x10)
    capacity = window.read(8, 4)
    slot = 0x1000 + (answered - 1) % capacity * 32
    record = [read_u64(window, slot + off) for off in (0, 8, 16)]
    return {
        "device": "doorbell",
        "bdf": dev.bdf,
        "answered": answered,
        "head": head,
        "record": record,
    }


def main() -> None:
    for dev in sysfs.scan("/sys"):
        found = region0(dev) if dev.is_virtio else None
        if found is None:
            continue
        path, offset, length = found
        with mmio.Mapping.open(path, offset, min(length, 1 << 20), writable=False) as window:
            magic = window.read_bytes(0, 4, 4)
            if magic == b"VFB0":
                print(json.dumps(framebuffer(dev, window)), flush=True)
            elif magic == b"VDB0":
                print(json.dumps(doorbell(dev, window)), flush=True)


if __name__ == "__main__":
    main()
