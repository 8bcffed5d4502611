"""Linux's own virtio-fs driver on our shared memory: ``mount -o dax=always``, both front-ends.

The guest kernel's DAX code (fs/fuse/dax.c) sets up its cache window on shared-memory region 0 and
reads and writes file data through it; our ``vhost-device-fs`` answers FUSE_SETUPMAPPING with a
SHMEM_MAP of the file's fd. The same back-end, guest commands and checks run behind our emulator
(every guest access to the window is a trapped vfio-user round trip) and behind QEMU 11.1's
``vhost-user-test-device-pci`` (QEMU maps the pages into the guest), one boot each.

Where the two front-ends differ the device adapts, and the checks do not: ours accepts a mapping
that reaches past the end of a small file; QEMU refuses it, so the device maps a bounce page for a
file's partial last page there (the ``bounce`` counter says which happened).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from testkit import LISTENING_LINE, ProcessGroup, procfs
from tests.helpers.docs import BIN, readme_block, user_env
from vm.scenario import Frontend, Scenario, VirtiofsDaxBackend
from vm.toolchain import Toolchain

pytestmark = pytest.mark.vm

log = logging.getLogger(__name__)

TAG = "daxshare"
MNT = "/mnt/dax"
#: Every guest access to our window is a trapped round trip, and TCG copies byte by byte: modest.
FILES = {"empty": 0, "one-byte": 1, "page": 4096, "256k-plus-1": (256 << 10) + 1}
BIG = "256k-plus-1"
QEMU_UNMAP_GRACE = 10.0

#: Runs in the guest: read (or mmap) a file, time it, print its SHA-256 and the seconds it took.
READ_SCRIPT = """
import hashlib, json, mmap, os, sys, time
path, how = sys.argv[1], sys.argv[2]
start = time.monotonic()
with open(path, "rb") as f:
    if how == "mmap" and os.fstat(f.fileno()).st_size:
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            data = bytes(m)
    else:
        data = f.read()
print(json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                  "seconds": time.monotonic() - start}))
"""


@dataclass
class Dax:
    sc: Scenario
    frontend: Frontend
    shared: Path
    contents: dict[str, bytes]
    timings: dict[str, float] = field(default_factory=dict)

    def window(self) -> dict[str, Any]:
        """The back-end's DAX window: counters, live mappings and its chunk table."""
        window: dict[str, Any] = self.sc.backend_ok(cmd="status")["window"]
        return window

    def guest_read(self, name: str, how: str = "read", timeout: float = 600.0) -> dict[str, Any]:
        result: dict[str, Any] = self.sc.g.json(
            ["python3", "-c", READ_SCRIPT, f"{MNT}/{name}", how], timeout=timeout
        )
        return result

    def frontend_pid(self) -> int:
        """The process that maps the back-end's files: our emulator, or QEMU itself."""
        device = self.sc.device()
        return device.emulator.pid if device.emulator is not None else self.sc.g.pid

    def frontend_maps_of_shared_files(self) -> list[str]:
        """Lines of the front-end's /proc/PID/maps that map a file of the shared directory."""
        return [line for line in procfs.maps_lines(self.frontend_pid()) if str(self.shared) in line]

    def assert_frontend_maps_no_shared_file(self) -> None:
        """Ours unmaps before it replies; QEMU frees a map's memory region after an RCU grace
        period, so its munmap may come a little after the reply: give it a few seconds."""
        deadline = time.monotonic() + (0 if self.frontend == "emulator" else QEMU_UNMAP_GRACE)
        while (left := self.frontend_maps_of_shared_files()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == []

    def mount(self) -> None:
        self.sc.g.run(["mkdir", "-p", MNT], check=True)
        self.sc.g.run(["mount", "-t", "virtiofs", TAG, MNT, "-o", "dax=always"], check=True)


def make_share(root: Path) -> dict[str, bytes]:
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(26)
    contents = {name: rng.randbytes(size) for name, size in FILES.items()}
    for name, data in contents.items():
        (root / name).write_bytes(data)
    return contents


@pytest.fixture(scope="module", params=["emulator", "qemu"])
def dax(
    request: pytest.FixtureRequest, toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Dax]:
    frontend: Frontend = request.param
    work = tmp_path_factory.mktemp(f"dax-{frontend}")
    shared = work / "shared"
    contents = make_share(shared)
    with Scenario.open(f"dax-{frontend}", toolchain, work / "run") as sc:
        sc.add_device(VirtiofsDaxBackend(shared, tag=TAG), frontend)
        sc.boot()
        setup = Dax(sc, frontend, shared, contents)
        with sc.step("mount the share with dax=always"):
            setup.mount()
        yield setup
        log.warning("DAX read timings (%s front-end): %s", frontend, setup.timings)


@pytest.fixture
def sc(dax: Dax) -> Scenario:
    """The scenario itself, so a failure report shows its console and process logs."""
    return dax.sc


def test_the_share_is_mounted_with_dax(dax: Dax) -> None:
    mounts = dax.sc.g.run(["cat", "/proc/mounts"], check=True).stdout
    (line,) = [m for m in mounts.splitlines() if f" {MNT} " in m]
    assert line.split()[2] == "virtiofs"
    assert "dax=always" in line.split()[3]
    dmesg = dax.sc.g.run(["dmesg"], check=True).stdout
    assert "Cache len: 0x4000000" in dmesg  # the 64 MiB window, region 0 of our BAR 4


@pytest.mark.parametrize("name", list(FILES))
def test_guest_reads_match_the_host(
    dax: Dax, name: str, record_property: Callable[[str, object], None]
) -> None:
    before = dax.window()["counters"]["setups"]
    seen = dax.guest_read(name)
    assert seen["size"] == len(dax.contents[name])
    assert seen["sha256"] == hashlib.sha256(dax.contents[name]).hexdigest()
    dax.timings[name] = round(seen["seconds"], 2)
    record_property(f"read_{name}_seconds", seen["seconds"])
    if FILES[name]:  # an empty file has nothing to map; a chunk already set up is reused
        window = dax.window()
        assert window["counters"]["setups"] > before or window["live_mappings"]


def test_guest_mmap_of_a_dax_file(dax: Dax) -> None:
    seen = dax.guest_read(BIG, "mmap")
    assert seen["sha256"] == hashlib.sha256(dax.contents[BIG]).hexdigest()
    dax.timings["mmap"] = round(seen["seconds"], 2)


def test_guest_write_through_dax_reaches_the_host(dax: Dax) -> None:
    """Overwrites bytes that exist: a write that extends a file goes by FUSE_WRITE instead."""
    payload = b"written by the guest through the DAX window"
    offset = 8192 + 3
    dax.sc.g.run(
        ["dd", f"of={MNT}/{BIG}", "bs=1", f"seek={offset}", "conv=notrunc", "status=none"],
        stdin=payload.decode(),
        check=True,
        timeout=300,
    )
    dax.sc.g.run(["sync"], check=True)
    on_host = (dax.shared / BIG).read_bytes()
    assert on_host[offset : offset + len(payload)] == payload
    assert len(on_host) == FILES[BIG]
    expected = bytearray(dax.contents[BIG])
    expected[offset : offset + len(payload)] = payload
    dax.contents[BIG] = bytes(expected)


def test_host_change_is_seen_by_the_guest_after_a_re_read(dax: Dax) -> None:
    """The guest reads the host's page cache itself: a host change shows without a remount."""
    path = dax.shared / "page"
    changed = bytes(reversed(dax.contents["page"]))
    with path.open("r+b") as f:
        f.write(changed)
    dax.contents["page"] = changed
    seen = dax.guest_read("page")
    assert seen["sha256"] == hashlib.sha256(changed).hexdigest()


def test_inode_eviction_sends_removemapping_for_every_mapping(dax: Dax) -> None:
    """While mounted, an evicted inode's window ranges go back by FUSE_REMOVEMAPPING."""
    assert dax.window()["live_mappings"], "reads left no live DAX mapping to remove"
    assert dax.frontend_maps_of_shared_files()
    removes = dax.window()["counters"]["removes"]
    dax.sc.g.sh("sync; echo 2 > /proc/sys/vm/drop_caches", check=True)
    window = dax.window()
    assert window["counters"]["removes"] > removes
    assert window["live_mappings"] == 0 and window["chunks"] == []
    dax.assert_frontend_maps_no_shared_file()


def test_unmount_leaves_no_mapping(dax: Dax) -> None:
    """At unmount the kernel sends no REMOVEMAPPING (its inodes are evicted with the super block
    inactive) but FUSE_DESTROY: the device unmaps what is left, and the front-end holds nothing."""
    assert dax.guest_read("page")["sha256"] == hashlib.sha256(dax.contents["page"]).hexdigest()
    assert dax.window()["live_mappings"]
    dax.sc.g.run(["umount", MNT], check=True)
    window = dax.window()
    assert window["live_mappings"] == 0 and window["chunks"] == []
    dax.assert_frontend_maps_no_shared_file()


def test_device_reset_with_live_mappings_then_remount(dax: Dax) -> None:
    """Unbinding the PCI function while mounted resets the device with mappings live: the
    front-end drops every mapping and the back-end forgets its window; bound again, the share
    mounts and reads as before."""
    dax.mount()
    assert dax.guest_read("page")["sha256"] == hashlib.sha256(dax.contents["page"]).hexdigest()
    assert dax.frontend_maps_of_shared_files()
    bdf = dax.sc.bdf()
    assert dax.window()["live_mappings"]
    dax.sc.g.sh(f"echo {bdf} > /sys/bus/pci/drivers/virtio-pci/unbind", check=True)
    dax.assert_frontend_maps_no_shared_file()
    assert dax.window()["live_mappings"] == 0
    dax.sc.g.run(["umount", "-l", MNT], check=True)
    dax.sc.g.sh(f"echo {bdf} > /sys/bus/pci/drivers/virtio-pci/bind", check=True)
    dax.mount()
    for name in FILES:
        seen = dax.guest_read(name)
        assert seen["sha256"] == hashlib.sha256(dax.contents[name]).hexdigest(), name
    dax.sc.g.run(["umount", MNT], check=True)
    log.info("window after the remount: %s", json.dumps(dax.window()["counters"]))


def test_past_eof_maps_as_each_front_end_allows(dax: Dax) -> None:
    """Ours maps a small file's last page straight from the file; QEMU 11.1 refuses a map past
    EOF (its RAM-from-fd size check), so the device used a bounce page there instead."""
    window = dax.window()
    if dax.frontend == "emulator":
        assert window["refuses_past_eof"] is False
        assert window["counters"]["bounces"] == 0
    else:
        assert window["refuses_past_eof"] is True
        assert window["counters"]["bounces"] > 0


def test_readme_dax_commands(toolchain: Toolchain, tmp_path: Path) -> None:
    """README's virtio-fs DAX block, run as a user would: the share, the back-end, one guest."""
    commands = readme_block("tests/vm/test_e2e_virtiofs_dax.py runs the commands of this block")
    short = Path(tempfile.mkdtemp(prefix="dax-readme-"))  # UNIX socket paths: 108 bytes at most
    lines = [line.replace("/tmp/", f"{short}/") for line in commands]
    share, backend, guest = lines
    env = user_env()
    try:
        subprocess.run(share, shell=True, check=True, env=env)
        argv = shlex.split(backend.removesuffix("&"))
        socket_path = Path(argv[argv.index("--socket-path") + 1])
        group = ProcessGroup(tmp_path)
        with group.running():
            proc = group.start(
                "readme-fs", [str(BIN / argv[0]), *argv[1:]], socket_path=socket_path
            )
            proc.wait_for_log(LISTENING_LINE + str(socket_path))
            run = subprocess.run(
                guest, shell=True, capture_output=True, env=env, timeout=300, check=False
            )
        assert run.returncode == 0, run.stderr.decode(errors="replace")
        assert run.stdout.decode().splitlines() == ["dax=always", "hello through the DAX window"]
    finally:
        shutil.rmtree(short, ignore_errors=True)
