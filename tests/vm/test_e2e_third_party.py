"""Unmodified third-party vhost-user back-ends through our front-end, in one guest boot.

virtiofsd (virtio-fs, id 26: hiprio + one request queue; ``--tag`` makes it answer GET_CONFIG
with the tag, so the emulator needs no tag of its own) and qemu-storage-daemon's vhost-user-blk
export (id 2, one queue), each behind its own emulator process and vfio-user-pci device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from vguest.pattern import PatternKind, generate

from tests.vm.third_party import DISK_BYTES, MARKER, share_and_disk
from vm.scenario import BlockBackend, Scenario, VirtiofsdBackend
from vm.toolchain import Toolchain

pytestmark = pytest.mark.vm

TAG = "hostshare"
WRITE_OFFSET = 1 << 20
WRITE_LENGTH = 256 << 10


@dataclass
class Setup:
    sc: Scenario
    shared: Path
    disk: Path


@pytest.fixture(scope="module")
def setup(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("e2e-third-party")
    shared, disk = share_and_disk(work)
    with Scenario.run(
        VirtiofsdBackend(shared, tag=TAG),
        BlockBackend(disk),
        name="e2e-third-party",
        toolchain=toolchain,
        workdir=work / "run",
    ) as sc:
        yield Setup(sc, shared, disk)


@pytest.fixture
def sc(setup: Setup) -> Scenario:
    """The scenario itself, so a failure report shows its console and process logs."""
    return setup.sc


def test_both_devices_are_ours_on_the_guest_bus(sc: Scenario) -> None:
    ids = sc.g.run(["lspci", "-n"], check=True).stdout
    assert " 1af4:105a " in ids  # virtio-fs, modern-only
    assert " 1af4:1042 " in ids  # virtio-blk, modern-only (the root disk is 1af4:1001)
    assert sc.guest_device(0)["virtio_id"] == 26
    assert sc.guest_device(1)["virtio_id"] == 2


def test_virtiofs_share_mounts_by_the_backends_tag(sc: Scenario, setup: Setup) -> None:
    sc.g.run(["mkdir", "-p", "/mnt/share"], check=True)
    sc.g.run(["mount", "-t", "virtiofs", TAG, "/mnt/share"], check=True)
    try:
        text = sc.g.run(["cat", "/mnt/share/hello.txt"], check=True).stdout
        assert text == "hello from the host\n"
        sc.g.sh("echo from the guest > /mnt/share/back.txt && sync", check=True)
        assert (setup.shared / "back.txt").read_text() == "from the guest\n"
        (setup.shared / "later.txt").write_text("written on the host after the mount\n")
        later = sc.g.run(["cat", "/mnt/share/later.txt"], check=True).stdout
        assert later == "written on the host after the mount\n"
    finally:
        sc.g.run(["umount", "/mnt/share"])


def test_vhost_user_blk_disk_reads_and_writes_the_image(sc: Scenario, setup: Setup) -> None:
    disks = sc.g.json(["lsblk", "--json", "-b", "-d", "-o", "NAME,SIZE"])["blockdevices"]
    (name,) = [d["name"] for d in disks if d["size"] == DISK_BYTES]
    block_size = sc.g.run(["cat", f"/sys/block/{name}/queue/logical_block_size"], check=True)
    assert block_size.stdout.strip() == "512"
    head = sc.g.run(
        ["dd", f"if=/dev/{name}", "bs=512", "count=1", "status=none", "iflag=direct"], check=True
    )
    assert head.stdout.encode()[: len(MARKER)] == MARKER

    # The guest writes a pattern the host can compute, straight to the disk, and reads it back.
    writer = (
        "import os, sys; from vguest.pattern import PatternKind, generate, crc32c; "
        f"data = generate(PatternKind.XORSHIFT, 77, {WRITE_LENGTH}); "
        f"fd = os.open('/dev/{name}', os.O_WRONLY); os.pwrite(fd, data, {WRITE_OFFSET}); "
        "os.fsync(fd); print(crc32c(data))"
    )
    wrote = sc.g.run(["env", "PYTHONPATH=/opt/vguest", "python3", "-c", writer], check=True)
    want = generate(PatternKind.XORSHIFT, 77, WRITE_LENGTH)
    with open(setup.disk, "rb") as f:
        f.seek(WRITE_OFFSET)
        assert f.read(WRITE_LENGTH) == want
    back = sc.g.sh(
        f"dd if=/dev/{name} bs=64k skip={WRITE_OFFSET // 65536} count={WRITE_LENGTH // 65536} "
        "iflag=direct status=none | PYTHONPATH=/opt/vguest python3 -c "
        "'import sys; from vguest.pattern import crc32c; print(crc32c(sys.stdin.buffer.read()))'",
        check=True,
    )
    assert back.stdout == wrote.stdout
