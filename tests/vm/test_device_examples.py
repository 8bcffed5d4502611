"""The device kit's examples in one real guest, run as README's "Device kit" block says: both
back-ends, ``virtio-emu-vm`` with one ``--vhost-user`` each, and the examples' guest script
(``examples/guest_read.py``, vguest only) reading the framebuffer's header and a frame counter
that moves, and ringing the doorbell through ``/dev/hwrng`` (the kernel's virtio_rng driver
puts the buffer on the queue) and finding the record the answer names.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from testkit import LISTENING_LINE, ProcessGroup
from tests.helpers.docs import ROOT, readme_block, user_env, without_comment
from vm.toolchain import Toolchain

RUN_TIMEOUT = 240.0


@pytest.mark.vm
def test_one_guest_reads_the_framebuffer_and_rings_the_doorbell(
    toolchain: Toolchain, tmp_path: Path
) -> None:
    commands = readme_block("tests/vm/test_device_examples.py runs the commands of this block")
    *starts, guest = [without_comment(c).replace("/tmp/", f"{tmp_path}/") for c in commands]
    group = ProcessGroup(tmp_path)
    with group.running():
        for index, line in enumerate(starts):
            assert line.endswith("&"), line
            argv = shlex.split(line.removesuffix("&"))
            assert argv[0] == "python"
            path = Path(argv[argv.index("--socket-path") + 1])
            started = group.start(f"example{index}", [sys.executable, *argv[1:]], socket_path=path)
            started.wait_for_log(LISTENING_LINE + str(path))
        proc = subprocess.run(
            guest,
            shell=True,
            cwd=ROOT,
            capture_output=True,
            env=user_env(),
            timeout=RUN_TIMEOUT,
            check=False,
        )
        stderr = proc.stderr.decode(errors="replace")
        assert proc.returncode == 0, stderr[-4000:]
        found = {r["device"]: r for r in map(json.loads, proc.stdout.decode().splitlines())}
    fb, db = found["framebuffer"], found["doorbell"]
    assert fb["size"] == [640, 480, 2560] and fb["format"] == "XR24"
    first, second = fb["frames"]
    assert second > first > 0, fb
    # The answer names a record that is in the ring; the kernel may have rung it since.
    assert db["head"] >= db["answered"] >= 1, db
    sequence, ns, offered = db["record"]
    assert sequence == db["answered"] and ns > 0 and offered > 0, db
