"""When mappings die, through the real emulator: a device reset drops them before the back-end
hears of it, so what a back-end maps in answer to the reset stays; the library's persistent
mappings come back after every reset on their own and stop coming back after an unmap.

The QEMU-like vfio-user client and the virtio driver play the guest and read BAR 4 back; the
back-ends are the library in this process (a device that maps in its reset hook) or the
reference back-end's process with ``--map-at-start``, whose mappings the library makes after
every RESET_DEVICE and whenever the queues start.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest
from vguest.pattern import PatternKind, generate

from testkit import Harness, shmem_backend_argv
from testkit.virtio_driver import DEVICE_STATUS, probed_guest
from tests.helpers.processes import procs
from vhost_user_backend.daemon import VhostUserDaemon, VhostUserDevice
from vhost_user_backend.devices.shmem_reference import pattern_memfd
from vhost_user_backend.errors import DaemonError
from wire.errors import WireError

__all__ = ["procs"]

KiB = 1 << 10
MiB = 1 << 20


def counter(seed: int, length: int) -> bytes:
    return generate(PatternKind.COUNTER, seed, length)


class MapsInItsResetHook(VhostUserDevice):
    """The user's trial: on every reset, map a page holding ``counter(reset number)`` right
    away, from the hook (the loop thread). Our emulator serves the map while it waits for the
    reset's answer, so it gets status 0 either way; whether it then stays is the question."""

    def __init__(self) -> None:
        self.daemon: VhostUserDaemon | None = None
        self.resets = 0
        self.errors: list[Exception] = []
        self.lock = threading.Lock()

    def shmem_sizes(self) -> list[int]:
        return [MiB]

    def on_connect(self, backend: VhostUserDaemon) -> None:
        self.daemon = backend

    def reset(self) -> None:
        with self.lock:
            self.resets += 1
            seed = self.resets
        if self.daemon is None or not self.daemon.connected:
            return  # the front-end left: nothing to map into
        memfd = pattern_memfd("reset-map", "counter", 4 * KiB, seed)
        try:
            self.daemon.shmem_map(0, memfd, 0, 0, 4 * KiB, writable=False)
        except (DaemonError, WireError) as exc:
            self.errors.append(exc)
        finally:
            os.close(memfd)


@pytest.mark.parametrize(
    "how", ["status 0 before DRIVER_OK", "status 0 after DRIVER_OK", "DEVICE_RESET after DRIVER_OK"]
)
def test_a_map_sent_in_answer_to_a_reset_stays_mapped(
    procs: Harness, tmp_path: Path, how: str
) -> None:
    """Before DRIVER_OK the back-end hears RESET_DEVICE; after it, GET_VRING_BASE first (the
    library's reset runs there, once: the RESET_DEVICE that follows is the same reset)."""
    path = tmp_path / "maps-on-reset.sock"
    device = MapsInItsResetHook()
    daemon = VhostUserDaemon(device, str(path))
    thread = daemon.serve_in_thread()
    try:
        emu = procs.emulator("--vhost-user-socket", str(path))
        with probed_guest(emu.path) as driver:
            if how == "status 0 before DRIVER_OK":
                driver.negotiate()
            else:
                driver.bring_up()
            # Whatever reset came with the bring-up left its own page mapped.
            before = device.resets
            assert before >= 1
            assert driver.shm_read(0, 0, 8) == counter(before, 8)
            mark = emu.mark()
            if how.startswith("DEVICE_RESET"):
                driver.client.device_reset()
            else:
                driver.common_write(DEVICE_STATUS, 0, 1)
            assert driver.status == 0
            assert device.resets == before + 1, "one reset, one reset hook"
            assert device.errors == []
            # The old page was dropped (else the new map had overlapped it) and the new one,
            # mapped while the emulator waited for the reset's answer, is what the guest sees.
            assert driver.shm_read(0, 0, 8) == counter(before + 1, 8)
            assert driver.shm_read(0, 4 * KiB - 8, 8) == counter(before + 1, 4 * KiB)[-8:]
            # Logged before the back-end was told, while the reset was handled.
            emu.wait_for_log("device reset: dropping 1 shared-memory mapping", start=mark)
        emu.stop()
    finally:
        daemon.stop()
        thread.join(10)
    assert not thread.is_alive()


PERSISTENT_A = "persistent mapping shmid 0 [0x10000, +0x10000)"
PERSISTENT_B = "persistent mapping shmid 1 [0x0, +0x2000)"


def mapped(which: str, why: str, *, still: bool = False) -> str:
    """The library's log line for a round that (re)mapped ``which`` for a reason including
    ``why`` (events that arrive during a round are taken together in the next)."""
    state = "still mapped" if still else "mapped"
    return rf"{re.escape(which)} {state} \(.*{re.escape(why)}"


def test_persistent_mappings_come_back_after_every_reset_until_unmapped(
    procs: Harness,
) -> None:
    back = procs.backend(
        "--shmem-region", "0:1M", "--shmem-region", "1:64K",
        "--map-at-start", "0:0x10000:64K:counter:5",
        "--map-at-start", "1:0:8K:xorshift:9",
    )  # fmt: skip
    emu = procs.emulator("--vhost-user-socket", str(back.path))
    ctl = procs.control()
    status = ctl.status()
    assert [(m["shmid"], m["shm_offset"], m["length"]) for m in status["persistent"]] == [
        (0, 0x10000, 64 * KiB),
        (1, 0, 8 * KiB),
    ]
    xorshift = generate(PatternKind.XORSHIFT, 9, 8 * KiB)
    with probed_guest(emu.path) as driver:
        # Not at channel ready (QEMU 11.1 would crash on it): the first reset maps them.
        assert not back.lines("persistent mapping .* mapped")
        assert driver.shm_read(0, 0x10000, 8) == bytes(8)

        # Bring-up: its reset (RESET_DEVICE) maps them; DRIVER_OK starts the queue, and the
        # library maps them again unless they are still there (EEXIST from our emulator).
        mark = back.mark()
        driver.bring_up()
        back.wait_for_log(mapped(PERSISTENT_A, "after RESET_DEVICE"), start=mark, regex=True)
        back.wait_for_log(
            rf"{re.escape(PERSISTENT_B)} (still )?mapped \(.*queues started", start=mark, regex=True
        )
        assert driver.shm_read(0, 0x10000, 8) == counter(5, 8)
        assert driver.shm_read(0, 0x10000 + 64 * KiB - 8, 8) == counter(5, 64 * KiB)[-8:]
        assert driver.shm_read(1, 0x1FF8, 8) == xorshift[-8:]

        # A reset of the running device: the reset hook runs at GET_VRING_BASE, the mappings
        # come back after the RESET_DEVICE that follows.
        mark = back.mark()
        driver.common_write(DEVICE_STATUS, 0, 1)
        back.wait_for_log(mapped(PERSISTENT_B, "after RESET_DEVICE"), start=mark, regex=True)
        assert driver.shm_read(0, 0x10000, 8) == counter(5, 8)
        assert driver.shm_read(1, 0, 8) == xorshift[:8]

        # An explicit unmap of exactly one of them ends it; the other one stays persistent.
        assert ctl.unmap(0, 0x10000, 64 * KiB)["ok"] is True
        assert [m["shmid"] for m in ctl.status()["persistent"]] == [1]
        assert driver.shm_read(0, 0x10000, 8) == bytes(8)
        mark = back.mark()
        driver.client.device_reset()
        back.wait_for_log(mapped(PERSISTENT_B, "after RESET_DEVICE"), start=mark, regex=True)
        assert not [line for line in back.lines()[mark:] if PERSISTENT_A in line]
        assert driver.shm_read(0, 0x10000, 8) == bytes(8)
        assert driver.shm_read(1, 0, 8) == xorshift[:8]
    emu.stop()
    back.stop()


def test_persistent_mappings_come_back_behind_the_next_front_end(procs: Harness) -> None:
    """The front-end leaving takes every mapping with it; the next one's first reset maps."""
    back = procs.backend("--shmem-region", "0:1M", "--map-at-start", "0:0:4K:constant:0x5a5a")
    for name in ("first.sock", "second.sock"):
        emu = procs.emulator("--vhost-user-socket", str(back.path), socket_name=name)
        mark = back.mark()
        with probed_guest(emu.path) as driver:
            driver.negotiate()
            line = "persistent mapping shmid 0 [0x0, +0x1000) mapped (after RESET_DEVICE)"
            back.wait_for_log(line, start=mark)
            assert driver.shm_read(0, 0, 8) == (0x5A5A).to_bytes(8, "little")
        emu.stop()
        back.wait_for_log("front-end disconnected", start=mark)
    back.stop()


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("0:0x800:4K:counter", "shmid 0: [0x800, +0x1000) from fd offset 0x0: not 4096-byte "
         "aligned"),
        ("0:1M:4K:counter", "shmid 0: [0x100000, +0x1000) from fd offset 0x0: outside the "
         "0x100000-byte region"),
        ("3:0:4K:counter", "shmid 3: no such shared memory region (the device declares [0])"),
        ("0:0:4K:plaid", "unknown pattern 'plaid'"),
        ("0:0:4K", "is not SHMID:OFFSET:LENGTH:PATTERN[:SEED]"),
    ],
)  # fmt: skip
def test_map_at_start_refuses_what_the_front_end_would_refuse(
    procs: Harness, argument: str, message: str
) -> None:
    argv = shmem_backend_argv(
        procs.workdir / "refused.sock", "--shmem-region", "0:1M", "--map-at-start", argument
    )
    proc = procs.start("vhost-device-shmem", argv)
    assert proc.wait_exit(timeout=20) == 2
    assert proc.lines(f"^vhost-device-shmem: .*{re.escape(message)}"), proc.log()
    assert "Traceback" not in proc.log()
