#!/usr/bin/python3
"""Guest agent: runs host-requested commands, talking JSON lines over a virtio-serial port.

Runs inside the guest (Python 3.13, stdlib only) under the PID-1 init script. Requests are
``{"id": N, "argv": [...], "timeout": S, "stdin": "..."}`` and get
``{"id": N, "rc": R, "stdout": "...", "stderr": "..."}`` (rc -1 with ``"error"`` when the command
could not start or timed out); ``{"id": N, "op": "poweroff"}`` is acknowledged, then the guest
powers off through sysrq so QEMU exits 0. Each request runs in its own thread, so a slow command
does not hold up others. On start the agent announces ``{"event": "ready", ...}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PORT_NAME = "org.virtio-emu.agent"
DEFAULT_TIMEOUT = 60.0
# After the host disconnects, reads return EOF at once until it reconnects; pace the retries.
RECONNECT_PAUSE = 0.2


def find_port() -> str:
    """The port's device node, from udev's symlink or, failing that, sysfs."""
    link = Path("/dev/virtio-ports") / PORT_NAME
    if link.exists():
        return str(link)
    for name_file in Path("/sys/class/virtio-ports").glob("*/name"):
        if name_file.read_text().strip() == PORT_NAME:
            return "/dev/" + name_file.parent.name
    raise SystemExit(f"agent: no virtio-serial port named {PORT_NAME}")


class Agent:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.write_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        with self.write_lock:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]

    def run_command(self, request: dict[str, Any]) -> None:
        rid = request.get("id")
        timeout = float(request.get("timeout") or DEFAULT_TIMEOUT)
        stdin = request.get("stdin")
        try:
            proc = subprocess.run(
                request["argv"],
                input=stdin.encode() if isinstance(stdin, str) else None,
                stdin=None if isinstance(stdin, str) else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
            reply = {
                "id": rid,
                "rc": proc.returncode,
                "stdout": proc.stdout.decode(errors="replace"),
                "stderr": proc.stderr.decode(errors="replace"),
            }
        except subprocess.TimeoutExpired as exc:
            reply = {
                "id": rid,
                "rc": -1,
                "error": f"timed out after {timeout}s",
                "stdout": (exc.stdout or b"").decode(errors="replace"),
                "stderr": (exc.stderr or b"").decode(errors="replace"),
            }
        except (OSError, KeyError, TypeError, ValueError) as exc:
            reply = {"id": rid, "rc": -1, "error": repr(exc), "stdout": "", "stderr": ""}
        self.send(reply)

    def poweroff(self, rid: object) -> None:
        self.send({"id": rid, "rc": 0, "stdout": "", "stderr": ""})
        os.sync()
        with open("/proc/sysrq-trigger", "w") as f:
            f.write("o")

    def handle(self, line: bytes) -> None:
        try:
            request = json.loads(line)
        except ValueError as exc:
            self.send({"id": None, "rc": -1, "error": f"bad request: {exc}"})
            return
        if request.get("op") == "poweroff":
            self.poweroff(request.get("id"))
        else:
            threading.Thread(target=self.run_command, args=(request,), daemon=True).start()

    def serve(self) -> None:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        self.send({"event": "ready", "uptime": uptime, "kernel": os.uname().release})
        buffer = b""
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                time.sleep(RECONNECT_PAUSE)
                continue
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    self.handle(line)


def main() -> None:
    port = find_port()
    fd = os.open(port, os.O_RDWR)
    print(f"agent: serving on {port}", file=sys.stderr, flush=True)
    Agent(fd).serve()


if __name__ == "__main__":
    main()
