"""QEMU's own vhost-user devices against the real back-ends from the host root (the baseline).

Also proves that virtiofsd's namespace sandbox works when it runs through the root's loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.third_party import DISK_BYTES, MARKER, share_and_disk
from vm.guest import Guest
from vm.scenario import BlockBackend, Scenario, VirtiofsdBackend
from vm.toolchain import Toolchain

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def backend_guest(
    toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Guest, Path, Path]]:
    work = tmp_path_factory.mktemp("backends")
    shared, disk = share_and_disk(work)
    with Scenario.open("backends", toolchain, work) as sc:
        # QEMU's own devices: vhost-user-fs-pci (tag hostshare) and vhost-user-blk-pci.
        sc.add_device(VirtiofsdBackend(shared), "qemu")
        sc.add_device(BlockBackend(disk), "qemu")
        yield sc.boot(), shared, disk


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
