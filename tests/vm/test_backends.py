"""QEMU's own vhost-user devices against the real back-ends from the host root (the baseline).

Also proves that virtiofsd's namespace sandbox works when it runs through the root's loader.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from vm.guest import Guest
from vm.qemu import HostBinaries, storage_daemon_blk, virtiofsd
from vm.toolchain import Toolchain

pytestmark = pytest.mark.vm

DISK_BYTES = 8 << 20
MARKER = b"virtio-emu block marker\n"


@pytest.fixture(scope="module")
def backend_guest(
    toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Guest, Path, Path]]:
    work = tmp_path_factory.mktemp("backends")
    shared = work / "shared"
    shared.mkdir()
    (shared / "hello.txt").write_text("hello from the host\n")
    disk = work / "disk.raw"
    with open(disk, "wb") as f:
        f.write(MARKER)
        f.truncate(DISK_BYTES)
    binaries = HostBinaries(toolchain.host_root)
    sockdir = Path(os.environ.get("TMPDIR", "/tmp"))
    fs_sock = sockdir / f"vfs-{os.getpid()}.sock"
    blk_sock = sockdir / f"blk-{os.getpid()}.sock"
    with ExitStack() as stack:
        stack.callback(fs_sock.unlink, missing_ok=True)
        stack.callback(blk_sock.unlink, missing_ok=True)
        stack.enter_context(
            virtiofsd(binaries, fs_sock, shared, work / "virtiofsd.log", "--sandbox=namespace")
        )
        stack.enter_context(storage_daemon_blk(binaries, blk_sock, disk, work / "qsd.log"))
        extra = [
            "-chardev", f"socket,id=fs0,path={fs_sock}",
            "-device", "vhost-user-fs-pci,chardev=fs0,tag=hostshare",
            "-chardev", f"socket,id=blk0,path={blk_sock}",
            "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=1",
        ]  # fmt: skip
        guest = stack.enter_context(
            Guest.boot(extra, name="backends", toolchain=toolchain, workdir=work)
        )
        yield guest, shared, disk


def test_virtiofs_share_is_readable_and_writable(
    backend_guest: tuple[Guest, Path, Path],
) -> None:
    guest, shared, _ = backend_guest
    guest.run(["mkdir", "-p", "/mnt/share"], check=True)
    guest.run(["mount", "-t", "virtiofs", "hostshare", "/mnt/share"], check=True)
    assert guest.run(["cat", "/mnt/share/hello.txt"], check=True).stdout == "hello from the host\n"
    guest.sh("echo from the guest > /mnt/share/back.txt && sync", check=True)
    assert (shared / "back.txt").read_text() == "from the guest\n"


def test_vhost_user_blk_disk_reads_the_image(backend_guest: tuple[Guest, Path, Path]) -> None:
    guest, _, _ = backend_guest
    disks = guest.json(["lsblk", "--json", "-b", "-d", "-o", "NAME,SIZE"])["blockdevices"]
    (name,) = [d["name"] for d in disks if d["size"] == DISK_BYTES]
    head = guest.run(
        ["dd", f"if=/dev/{name}", "bs=512", "count=1", "status=none", "iflag=direct"], check=True
    )
    assert head.stdout.encode()[: len(MARKER)] == MARKER
