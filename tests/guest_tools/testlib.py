"""Hand-made PCI config spaces and fake sysfs trees made of real files."""

import struct
from dataclasses import dataclass, field
from pathlib import Path

VIRTIO_VENDOR = 0x1AF4
MEM = 0x200
MEM_64 = 0x100000
PREFETCH = 0x2000
IO = 0x100
BAR2_FLAGS = MEM | MEM_64 | 0x40000
BAR4_FLAGS = MEM | MEM_64 | PREFETCH | 0x40000
BAR2_SIZE = 0x4000
BAR4_SIZE = 0x400000
SHM0 = (0, 0x200000)  # (offset, length) of shmid 0 in BAR 4
SHM1 = (0x200000, 0x100000)


class ConfigSpace:
    """A type-0 config space with a capability list built one cap at a time."""

    def __init__(self, vendor: int = VIRTIO_VENDOR, device: int = 0x1041, size: int = 256):
        self.buf = bytearray(size)
        struct.pack_into("<HH", self.buf, 0, vendor, device)
        self.next_free = 0x40
        self.last_next: int = 0x34

    def add_cap(self, cap_id: int, body: bytes) -> int:
        off = self.next_free
        self.buf[off] = cap_id
        self.buf[off + 1] = 0
        self.buf[off + 2 : off + 2 + len(body)] = body
        self.buf[self.last_next] = off
        self.last_next = off + 1
        self.buf[0x06] |= 0x10
        self.next_free = off + ((2 + len(body) + 3) & ~3)
        return off

    def virtio(
        self,
        cfg_type: int,
        bar: int,
        offset: int,
        length: int,
        *,
        cap_id: int = 0,
        extra: bytes = b"",
        cap_len: int | None = None,
    ) -> int:
        n = 16 + len(extra) if cap_len is None else cap_len
        body = struct.pack(
            "<BBBB2xII", n, cfg_type, bar, cap_id, offset & 0xFFFFFFFF, length & 0xFFFFFFFF
        )
        return self.add_cap(0x09, body + extra)

    def shm(self, shmid: int, bar: int, offset: int, length: int) -> int:
        return self.virtio(
            8,
            bar,
            offset,
            length,
            cap_id=shmid,
            extra=struct.pack("<II", offset >> 32, length >> 32),
        )

    def notify(self, bar: int, offset: int, length: int, multiplier: int) -> int:
        return self.virtio(2, bar, offset, length, extra=struct.pack("<I", multiplier))

    def bytes(self) -> bytes:
        return bytes(self.buf)


def well_formed() -> ConfigSpace:
    """Common/notify/ISR/device in BAR 2, two shared-memory regions in BAR 4, MSI-X."""
    cs = ConfigSpace()
    cs.virtio(1, 2, 0x0000, 0x38)
    cs.notify(2, 0x3000, 0x1000, 4)
    cs.virtio(3, 2, 0x1000, 0x1)
    cs.virtio(4, 2, 0x2000, 0x100)
    cs.shm(0, 4, *SHM0)
    cs.shm(1, 4, *SHM1)
    cs.add_cap(0x11, bytes(10))
    return cs


@dataclass
class Bar:
    size: int
    flags: int
    start: int = 0


def resource_text(bars: dict[int, Bar], lines: int = 13) -> str:
    out = []
    for i in range(lines):
        b = bars.get(i)
        if b is None or b.size == 0:
            out.append(f"0x{0:016x} 0x{0:016x} 0x{0:016x}")
        else:
            out.append(f"0x{b.start:016x} 0x{b.start + b.size - 1:016x} 0x{b.flags:016x}")
    return "\n".join(out) + "\n"


def virtio_bars() -> dict[int, Bar]:
    return {2: Bar(BAR2_SIZE, BAR2_FLAGS, 0xFE000000), 4: Bar(BAR4_SIZE, BAR4_FLAGS, 0x800000000)}


@dataclass
class FakeSysfs:
    """``<root>/bus/pci/devices/<BDF>/{config,resource,resource<N>,vendor,device,class}``."""

    root: Path
    devices: dict[str, Path] = field(default_factory=dict)

    def add(
        self,
        bdf: str,
        config: bytes,
        bars: dict[int, Bar],
        *,
        vendor: int = VIRTIO_VENDOR,
        device: int = 0x1041,
        class_code: int = 0xFF0000,
    ) -> Path:
        path = self.root / "bus" / "pci" / "devices" / bdf
        path.mkdir(parents=True)
        (path / "config").write_bytes(config)
        (path / "resource").write_text(resource_text(bars))
        (path / "vendor").write_text(f"{vendor:#06x}\n")
        (path / "device").write_text(f"{device:#06x}\n")
        (path / "class").write_text(f"{class_code:#08x}\n")
        for index, bar in bars.items():
            if index < 6 and bar.flags & MEM:
                with open(path / f"resource{index}", "wb") as f:
                    f.truncate(bar.size)
        self.devices[bdf] = path
        return path
