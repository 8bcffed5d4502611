"""The newcomer's guide (docs/writing-a-device.md) without a guest: its device file, written
as the guide shows it and started with the guide's own command line, behind the real emulator;
the vfio-user client reads region 0 and finds the pattern the guide's ``vguest verify`` checks,
after the resets a guest's probe would make.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from vguest.pattern import PatternKind, generate

from emulator.vfio_user.client import VfioUserClient
from testkit import LISTENING_LINE, Harness
from testkit.virtio_driver import DEVICE_STATUS, GuestRam, VirtioDriver
from tests.helpers.docs import guide_block, guide_commands
from tests.helpers.processes import procs

__all__ = ["procs"]


def test_the_guides_device_maps_its_pattern_for_the_guest(procs: Harness, tmp_path: Path) -> None:
    (tmp_path / "mydevice.py").write_text(guide_block("file mydevice.py"))
    start = guide_commands("run", tmp_path)[0]
    assert start.startswith("python mydevice.py ") and start.endswith("&"), start
    argv = shlex.split(start.removesuffix("&"))
    socket_path = Path(argv[-1])
    back = procs.start("mydevice", [sys.executable, *argv[1:]], socket_path=socket_path)
    back.wait_for_log(LISTENING_LINE + str(socket_path))
    emu = procs.emulator("--vhost-user-socket", str(socket_path))
    expected = generate(PatternKind.COUNTER, 1, 64 << 10)
    with GuestRam(2 << 20) as ram, VfioUserClient.connect(str(emu.path), timeout=15.0) as client:
        driver = VirtioDriver.probe(client, ram)
        try:
            assert [r.length for r in driver.shm_regions] == [4 << 20]
            (queue,) = driver.bring_up()
            assert driver.shm_read(0, 0, 8) == expected[:8]
            assert driver.shm_read(0, (64 << 10) - 8, 8) == expected[-8:]
            assert driver.shm_read(0, 64 << 10, 8) == bytes(8)  # nothing mapped past it
            buffer = ram.alloc(32)
            head = queue.add([(buffer, 32, True)])
            driver.notify(0)
            assert driver.wait_used(0) == (head, 32)
            driver.common_write(DEVICE_STATUS, 0, 1)  # a reset: the mapping comes back
            assert driver.status == 0
            assert driver.shm_wait_for(0, 0x100, expected[0x100:0x108]) == expected[0x100:0x108]
        finally:
            driver.close_msix()
    back.stop()
