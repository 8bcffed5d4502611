"""What the third-party back-ends serve in the VM tests: a shared directory and a disk image."""

from __future__ import annotations

from pathlib import Path

DISK_BYTES = 8 << 20
MARKER = b"virtio-emu block marker\n"


def share_and_disk(work: Path) -> tuple[Path, Path]:
    """``work/shared`` with a hello.txt (for virtiofsd), ``work/disk.raw`` starting with MARKER
    (for qemu-storage-daemon)."""
    shared = work / "shared"
    shared.mkdir()
    (shared / "hello.txt").write_text("hello from the host\n")
    disk = work / "disk.raw"
    with open(disk, "wb") as f:
        f.write(MARKER)
        f.truncate(DISK_BYTES)
    return shared, disk
