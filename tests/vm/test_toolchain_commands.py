"""``virtio-emu-virtiofsd`` and ``virtio-emu-storage-daemon``: the toolchain's back-ends as
commands a user types (and hands to ``virtio-emu check-backend -- CMD``). No guest: each starts,
listens and answers GET_FEATURES, and says its version."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit import LockstepFrontend, ProcessGroup
from vhost_user.messages import FrontendReq
from vm.qemu import HostBinaries
from vm.toolchain import Toolchain

pytestmark = pytest.mark.toolchain

BIN = Path(sys.executable).parent
VIRTIO_F_VERSION_1 = 1 << 32


@pytest.fixture
def group(tmp_path: Path) -> Iterator[ProcessGroup]:
    g = ProcessGroup(tmp_path)
    try:
        yield g
    finally:
        g.kill_all()
        print(g.logs())


def answers_get_features(socket_path: Path, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while not socket_path.is_socket():
        assert time.monotonic() < deadline, f"{socket_path} never appeared"
        time.sleep(0.05)
    fe = LockstepFrontend(socket_path)
    try:
        return fe.u64(FrontendReq.GET_FEATURES)
    finally:
        fe.close()


def test_virtiofsd_command_starts_listens_and_answers(
    toolchain: Toolchain, group: ProcessGroup, tmp_path: Path
) -> None:
    (tmp_path / "share").mkdir()
    sock = tmp_path / "fs.sock"
    argv = [
        str(BIN / "virtio-emu-virtiofsd"),
        f"--socket-path={sock}",
        "--shared-dir=share",
        "--sandbox=namespace",
    ]
    proc = group.start("virtiofsd", argv, clean_exit=(0, 1))
    assert answers_get_features(sock) & VIRTIO_F_VERSION_1
    proc.wait_exit()  # virtiofsd leaves once its front-end has


def test_storage_daemon_command_starts_listens_and_answers(
    toolchain: Toolchain, group: ProcessGroup, tmp_path: Path
) -> None:
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    sock = tmp_path / "blk.sock"
    argv = [
        str(BIN / "virtio-emu-storage-daemon"),
        "--blockdev", "driver=file,node-name=file0,filename=disk.img",
        "--blockdev", "driver=raw,node-name=disk0,file=file0",
        "--export",
        f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock}",
    ]  # fmt: skip
    proc = group.start("qsd", argv)
    assert answers_get_features(sock) & VIRTIO_F_VERSION_1
    proc.stop()


@pytest.mark.parametrize(
    ("command", "package", "first_word"),
    [
        ("virtio-emu-virtiofsd", "virtiofsd", "virtiofsd"),
        ("virtio-emu-storage-daemon", "qemu-utils", "qemu-storage-daemon"),
    ],
)
def test_versions_from_the_program_and_from_dpkg(
    toolchain: Toolchain, command: str, package: str, first_word: str
) -> None:
    out = subprocess.run(
        [str(BIN / command), "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert out.split()[0] == first_word
    debian = HostBinaries(toolchain.host_root).package_version(package)
    assert debian is not None
    upstream = debian.split(":")[-1].split("-")[0].split("+")[0]
    assert upstream in out  # 1:11.1.3+ds-2~bpo13+1 -> 11.1.3; 1.13.2-1+deb13u1 -> 1.13.2
    assert HostBinaries(toolchain.host_root).package_version("no-such-package") is None
