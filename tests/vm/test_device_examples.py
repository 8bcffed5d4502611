"""The device kit's examples in one real guest: both back-ends started as their docstrings say,
``virtio-emu-vm`` with one ``--vhost-user`` each, and the examples' guest script
(``examples/guest_read.py``, vguest only) reading the framebuffer's header and a frame counter
that moves, and ringing the doorbell through ``/dev/hwrng`` (the kernel's virtio_rng driver
puts the buffer on the queue) and finding the record the answer names.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testkit import LISTENING_LINE, ProcessGroup
from tests.helpers.docs import BIN, ROOT, user_env
from vm.toolchain import Toolchain

RUN_TIMEOUT = 240.0
EXAMPLES = ROOT / "vhost_user_backend" / "devices" / "examples"


@pytest.mark.vm
def test_one_guest_reads_the_framebuffer_and_rings_the_doorbell(
    toolchain: Toolchain, tmp_path: Path
) -> None:
    group = ProcessGroup(tmp_path)
    with group.running():
        sockets = {}
        for name in ("framebuffer", "doorbell"):
            path = tmp_path / f"{name}.sock"
            module = f"vhost_user_backend.devices.examples.{name}"
            argv = [sys.executable, "-m", module, "--socket-path", str(path)]
            group.start(name, argv, socket_path=path).wait_for_log(LISTENING_LINE + str(path))
            sockets[name] = path
        script = (EXAMPLES / "guest_read.py").read_text()
        proc = subprocess.run(
            [
                str(BIN / "virtio-emu-vm"),
                "--vhost-user",
                str(sockets["framebuffer"]),
                "--vhost-user",
                str(sockets["doorbell"]),
                "--",
                "env",
                "PYTHONPATH=/opt/vguest",
                "python3",
                "-c",
                script,
            ],
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
