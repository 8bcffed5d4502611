"""Reading PCI devices from a sysfs tree: BDF names, config space, the ``resource`` file.

Everything takes a sysfs root (``/sys`` normally) so tests can point it at a fake tree
made of real files. File contents are untrusted: parse errors become ``AccessError``.
"""

import re
from dataclasses import dataclass
from enum import IntFlag
from pathlib import Path

from vguest.errors import AccessError, DeviceMissing, UsageError

VIRTIO_VENDOR = 0x1AF4
VIRTIO_MODERN_DEVICE_MIN = 0x1040
VIRTIO_MODERN_DEVICE_MAX = 0x107F
NUM_BARS = 6

_BDF_RE = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{4}):)?(?P<bus>[0-9a-fA-F]{2}):"
    r"(?P<dev>[0-1][0-9a-fA-F])\.(?P<fn>[0-7])$"
)


class IORESOURCE(IntFlag):
    """Flag bits of the sysfs ``resource`` file (include/linux/ioport.h)."""

    IO = 0x00000100
    MEM = 0x00000200
    PREFETCH = 0x00002000
    READONLY = 0x00004000
    MEM_64 = 0x00100000
    UNSET = 0x20000000
    DISABLED = 0x10000000


@dataclass(frozen=True, slots=True)
class Resource:
    """One line of ``resource``: index 0-5 are BARs, 6 the ROM, later ones bridge windows."""

    index: int
    start: int
    end: int
    flags: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1 if self.end > self.start else 0

    @property
    def is_memory(self) -> bool:
        return bool(self.flags & IORESOURCE.MEM)

    @property
    def is_io(self) -> bool:
        return bool(self.flags & IORESOURCE.IO)

    @property
    def kind(self) -> str:
        if self.size == 0:
            return "unused"
        if self.is_io:
            return "io"
        if self.is_memory:
            bits = "64" if self.flags & IORESOURCE.MEM_64 else "32"
            pref = " prefetchable" if self.flags & IORESOURCE.PREFETCH else ""
            return f"mem{bits}{pref}"
        return "other"


def normalize_bdf(text: str) -> str:
    """``0000:00:03.0`` from ``0000:00:03.0`` or ``00:03.0``; anything else is a usage error."""
    m = _BDF_RE.match(text.strip())
    if not m:
        raise UsageError(f"{text!r} is not a PCI address like 0000:00:03.0")
    domain = m.group("domain") or "0000"
    return f"{domain}:{m.group('bus')}:{m.group('dev')}.{m.group('fn')}".lower()


def parse_resources(text: str) -> list[Resource]:
    """Parse ``start end flags`` hex triples, one per line."""
    out = []
    for index, line in enumerate(text.splitlines()):
        fields = line.split()
        if len(fields) != 3:
            raise AccessError(f"resource line {index}: expected 3 fields, got {line!r}")
        try:
            start, end, flags = (int(f, 16) for f in fields)
        except ValueError as exc:
            raise AccessError(f"resource line {index}: not hex: {line!r}") from exc
        out.append(Resource(index, start, end, flags))
    return out


def devices_dir(sysfs_root: str | Path) -> Path:
    return Path(sysfs_root) / "bus" / "pci" / "devices"


@dataclass(frozen=True, slots=True)
class SysfsPciDevice:
    """A PCI function as sysfs shows it."""

    bdf: str
    path: Path
    vendor: int
    device: int
    class_code: int

    @property
    def is_virtio(self) -> bool:
        return is_virtio_id(self.vendor, self.device)

    @property
    def virtio_id(self) -> int | None:
        return self.device - VIRTIO_MODERN_DEVICE_MIN if self.is_virtio else None

    def config(self) -> bytes:
        """Config space bytes (only 64 of them unless we are root)."""
        return _read(self.path / "config")

    def resources(self) -> list[Resource]:
        return parse_resources(_read(self.path / "resource").decode("ascii", "replace"))

    def bar(self, index: int) -> Resource:
        if not 0 <= index < NUM_BARS:
            raise UsageError(f"BAR {index} does not exist (0-5)")
        res = self.resources()
        if index >= len(res) or res[index].size == 0:
            raise AccessError(f"{self.bdf}: BAR {index} is not implemented")
        return res[index]

    def resource_file(self, index: int, *, wc: bool = False) -> Path:
        """``resource<N>`` (or ``resource<N>_wc`` when asked for and present)."""
        if wc:
            path = self.path / f"resource{index}_wc"
            if path.exists():
                return path
        path = self.path / f"resource{index}"
        if not path.exists():
            raise AccessError(f"{self.bdf}: {path.name} is missing (BAR not mappable)")
        return path


def is_virtio_id(vendor: int, device: int) -> bool:
    """A modern (virtio 1.x) PCI device: vendor 0x1af4, device 0x1040-0x107f."""
    return (
        vendor == VIRTIO_VENDOR and VIRTIO_MODERN_DEVICE_MIN <= device <= VIRTIO_MODERN_DEVICE_MAX
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except PermissionError as exc:
        raise AccessError(f"{path}: permission denied; run as root?") from exc
    except OSError as exc:
        raise AccessError(f"{path}: {exc.strerror or exc}") from exc


def _read_hex(path: Path) -> int:
    text = _read(path).decode("ascii", "replace").strip()
    try:
        return int(text, 16)
    except ValueError as exc:
        raise AccessError(f"{path}: not a hex number: {text!r}") from exc


def device_at(path: Path) -> SysfsPciDevice:
    """Describe the device directory ``path`` (named by its BDF)."""
    return SysfsPciDevice(
        bdf=path.name,
        path=path,
        vendor=_read_hex(path / "vendor"),
        device=_read_hex(path / "device"),
        class_code=_read_hex(path / "class") if (path / "class").exists() else 0,
    )


def get_device(sysfs_root: str | Path, bdf: str) -> SysfsPciDevice:
    """The device with this BDF, or ``DeviceMissing``."""
    name = normalize_bdf(bdf)
    path = devices_dir(sysfs_root) / name
    if not path.is_dir():
        raise DeviceMissing(f"no PCI device {name} under {devices_dir(sysfs_root)}")
    return device_at(path)


def scan(sysfs_root: str | Path) -> list[SysfsPciDevice]:
    """All devices by a plain directory scan (fake trees, or when udev is unavailable)."""
    base = devices_dir(sysfs_root)
    if not base.is_dir():
        return []
    out = []
    for entry in sorted(base.iterdir()):
        if _BDF_RE.match(entry.name) and entry.is_dir():
            out.append(device_at(entry))
    return out
