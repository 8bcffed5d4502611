"""A device that maps at start-up is what a freshly booted guest reads, behind either front-end.

Between the back-end's first map and the guest's first read, the device is reset more than
once and every reset drops the mappings: behind our emulator QEMU's DEVICE_RESET when it
connects and the driver's probe reset (each a RESET_DEVICE to the back-end); behind QEMU's own
``vhost-user-test-device-pci`` the machine reset and the driver's probe reset, of which the
back-end hears nothing. The reference back-end's ``--map-at-start`` uses the library's
persistent mappings, which map again after every reset the back-end is told of and whenever
the queues start (DRIVER_OK): the first message after QEMU's silent resets, and the first
moment QEMU 11.1 takes a map without crashing. One boot per front-end.
"""

from __future__ import annotations

import logging
import re

import pytest

from vm.scenario import Frontend, Scenario, ShmemBackend
from vm.toolchain import Toolchain

pytestmark = pytest.mark.vm

log = logging.getLogger(__name__)

MIB = 1 << 20
OFFSET = 0x10000
LENGTH = 64 << 10
SEED = 7
MAPPED = re.compile(r"persistent mapping shmid 0 \[0x10000, \+0x10000\) (still )?mapped \((.*)\)")


@pytest.mark.parametrize("frontend", ["emulator", "qemu"])
def test_a_mapping_made_at_start_is_what_a_freshly_booted_guest_reads(
    toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory, frontend: Frontend
) -> None:
    backend = ShmemBackend(
        regions=((0, 4 * MIB),),
        extra_args=("--map-at-start", f"0:{OFFSET:#x}:{LENGTH}:counter:{SEED}", "-v"),
    )
    with Scenario.run(
        backend,
        frontend=frontend,
        name=f"map-at-start-{frontend}",
        toolchain=toolchain,
        workdir=tmp_path_factory.mktemp(f"map-at-start-{frontend}"),
    ) as sc:
        with sc.step("the guest verifies the pattern mapped at start-up"):
            verify = sc.vguest(
                "verify", sc.bdf(), "--shm", "0", hex(OFFSET), str(LENGTH),
                "--pattern", "counter", "--seed", str(SEED), "--width", "8",
            )  # fmt: skip
        assert verify["match"] is True, verify
        status = sc.backend_ok(cmd="status")
        assert [(m["shmid"], m["shm_offset"]) for m in status["persistent"]] == [(0, OFFSET)]
        assert status["mappings"] == []  # nothing was mapped through the control socket
        back = sc.device().backend_proc
        rounds = [(m.group(1) is not None, m.group(2)) for m in map(MAPPED.search, back.lines())
                  if m]  # fmt: skip
        received = [
            line.split("<-- ")[1].split(" ")[0] for line in back.lines(r"conn\d+ DEBUG <-- ")
        ]
        log.info("%s: persistent rounds %s; the back-end received %s", frontend, rounds, received)
        if frontend == "emulator":
            # Every reset reached the back-end as RESET_DEVICE and the mapping came back after
            # it; at DRIVER_OK it was still there.
            assert "RESET_DEVICE" in received
            assert "after RESET_DEVICE" in rounds[0][1] and not rounds[0][0], rounds
            assert rounds[-1] == (True, "queues started"), rounds
        else:
            # QEMU never sends RESET_DEVICE and its resets before DRIVER_OK are silent; the
            # mapping is made when the queues start, the first moment QEMU takes one.
            assert "RESET_DEVICE" not in received
            assert rounds == [(False, "queues started")], rounds
