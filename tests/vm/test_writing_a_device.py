"""The newcomer's guide (docs/writing-a-device.md) followed as written, in one real guest: its
device file saved as the guide says, its start line and its ``virtio-emu-vm ... vguest verify``
line run in a shell (``/tmp/`` moved to a private directory), and the guest's check passing.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from testkit import LISTENING_LINE, ProcessGroup
from tests.helpers.docs import BIN, guide_block, guide_commands, user_env
from vm.toolchain import Toolchain

RUN_TIMEOUT = 240.0


@pytest.mark.vm
def test_the_guide_from_its_device_file_to_the_guest_verifying_it(
    toolchain: Toolchain, tmp_path: Path
) -> None:
    (tmp_path / "mydevice.py").write_text(guide_block("file mydevice.py"))
    start, boot = guide_commands("run", tmp_path)
    assert start.startswith("python mydevice.py ") and start.endswith("&"), start
    assert boot.startswith("virtio-emu-vm ") and " -- vguest verify " in boot, boot
    argv = shlex.split(start.removesuffix("&"))
    socket_path = Path(argv[-1])
    group = ProcessGroup(tmp_path)
    with group.running():
        back = group.start(
            "mydevice", [str(BIN / argv[0]), *argv[1:]], socket_path=socket_path, cwd=tmp_path
        )
        back.wait_for_log(LISTENING_LINE + str(socket_path))
        proc = subprocess.run(
            boot,
            shell=True,
            cwd=tmp_path,
            capture_output=True,
            env=user_env(),
            timeout=RUN_TIMEOUT,
            check=False,
        )
        stderr = proc.stderr.decode(errors="replace")
        assert proc.returncode == 0, stderr[-4000:]
        assert b"pattern matches" in proc.stdout, proc.stdout
        assert back.running
