"""vhost-device-fs as a process: its command line, its control socket, and the real emulator
in front of it with the QEMU-like vfio-user client and the testkit's virtio driver playing the
guest (FUSE requests on the request queue, the DAX window read back through BAR 4)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from emulator.vfio_user.client import VfioUserClient
from testkit import Harness
from testkit.virtio_driver import GuestRam, VirtioDriver
from tests.helpers.fuse_client import DAX_CHUNK, DriverQueue, FuseClient
from tests.helpers.processes import procs
from vhost_user_backend.control import ControlClient
from vhost_user_backend.devices.virtiofs.fuse import ROOT_ID, InitFlag

__all__ = ["procs"]

KiB, MiB = 1 << 10, 1 << 20
SHMEM_BAR = 4


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "vhost_user_backend.devices.virtiofs"]
    argv += ["--socket-path", str(tmp_path / "fs.sock"), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--cache-size", "3M"), "power of two and a multiple of 2 MiB"),
        (("--cache-size", "1M"), "power of two and a multiple of 2 MiB"),
        (("--cache-size", "12M"), "power of two and a multiple of 2 MiB"),
        (("--cache-size", "lots"), "bad size"),
        (("--tag", "t" * 37), "1 to 36 bytes"),
        (("--num-request-queues", "0"), "request queues"),
    ],
)
def test_cli_refuses_a_bad_configuration(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    base = {"--shared-dir": str(tmp_path), "--tag": "fs"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    result = run_cli(tmp_path, *[x for kv in base.items() for x in kv])
    assert result.returncode == 2, result
    assert message in result.stderr and result.stderr.startswith("vhost-device-fs: ")
    assert not (tmp_path / "fs.sock").exists()


def test_cli_refuses_a_missing_directory(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "--shared-dir", str(tmp_path / "nope"), "--tag", "fs")
    assert result.returncode == 2 and "not a directory" in result.stderr


def test_cli_listens_and_reports_its_status(procs: Harness, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    back = procs.fs_backend(share, tag="myfs")
    assert back.lines("DAX window 0x4000000 bytes, 1 request queue")
    control_path = procs.workdir / "fs-control.sock"
    assert stat.S_IMODE(control_path.stat().st_mode) == 0o600
    with ControlClient(control_path) as ctl:
        status = ctl.status()
        assert status["tag"] == "myfs" and status["shared_dir"] == str(share)
        assert status["cache_size"] == 64 * MiB and status["num_request_queues"] == 1
        assert status["window"]["live_mappings"] == 0
        assert status["vhost_user"]["connected"] is False
        assert ctl("bogus")["ok"] is False
    back.stop()
    assert not control_path.exists()


def test_dax_window_through_the_emulator(procs: Harness, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    pages = os.urandom(8 * KiB)
    tail = os.urandom(5000)
    (share / "pages.bin").write_bytes(pages)
    (share / "tail.bin").write_bytes(tail)
    back = procs.fs_backend(share, "--cache-size", "4M", tag="emufs")
    emu = procs.emulator(
        "--vhost-user-socket",
        str(back.path),
        "--num-queues",
        "2",
        "--config-size",
        "40",
        virtio_id=26,
    )
    ctl = ControlClient(procs.workdir / "fs-control.sock")
    procs.callback(ctl.close)
    with GuestRam(4 * MiB) as ram, VfioUserClient.connect(str(emu.path), timeout=15.0) as client:
        driver = VirtioDriver.probe(client, ram)
        try:
            # The DAX window is BAR 4's shared memory region 0, of the configured size.
            assert driver.startup.regions[SHMEM_BAR].info.size == 4 * MiB
            region = driver.shm_region(0)
            assert (region.bar, region.offset, region.length) == (SHMEM_BAR, 0, 4 * MiB)
            assert driver.device_cfg_read(0, 40) == b"emufs".ljust(36, b"\0") + bytes([1, 0, 0, 0])
            driver.bring_up(queues=2, queue_size=16)
            fuse = FuseClient(DriverQueue(driver))
            init = fuse.init()
            assert init.flags & InitFlag.MAP_ALIGNMENT and init.map_alignment == 12

            node = fuse.lookup(ROOT_ID, b"pages.bin").nodeid
            assert fuse.setupmapping(node, 0, 0) == 0
            assert driver.shm_read(0, 0, 8 * KiB) == pages
            assert driver.shm_read(0, 8 * KiB, 8) == bytes(8)  # nothing mapped past EOF

            # A partial last page: mapped from the file or through a bounce page, depending
            # on whether the front-end accepts the page-rounded map; the guest sees the same.
            tail_node = fuse.lookup(ROOT_ID, b"tail.bin").nodeid
            assert fuse.setupmapping(tail_node, 0, DAX_CHUNK, write=True) == 0
            assert driver.shm_read(0, DAX_CHUNK, 5000) == tail
            assert driver.shm_read(0, DAX_CHUNK + 5000, 8) == bytes(8)
            # Guest stores through the window reach the host file (the tail after a FLUSH).
            driver.shm_write(0, DAX_CHUNK + 16, b"DAX-")
            driver.shm_write(0, DAX_CHUNK + 4990, b"tail!")
            fh = fuse.open(tail_node)
            fuse.flush(tail_node, fh)
            data = (share / "tail.bin").read_bytes()
            assert data[16:20] == b"DAX-" and data[4990:4995] == b"tail!" and len(data) == 5000

            status = ctl.status()["window"]
            assert status["live_chunks"] == 2 and status["counters"]["setups"] == 2
            assert fuse.removemapping(node, (0, DAX_CHUNK), (DAX_CHUNK, DAX_CHUNK)) == 0
            assert driver.shm_read(0, 0, 8) == bytes(8)
            assert driver.shm_read(0, DAX_CHUNK, 8) == bytes(8)
            assert ctl.status()["window"]["live_mappings"] == 0
            fuse.release(tail_node, fh)
        finally:
            driver.close_msix()
    emu.stop()
    back.stop()
