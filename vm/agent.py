#!/usr/bin/python3
"""Guest agent: runs host-requested commands, talking JSON lines over a virtio-serial port.

Runs inside the guest (Python 3.13, stdlib only) under the PID-1 init script. Requests are
``{"id": N, "argv": [...], "timeout": S, "stdin": "..."}`` and get
``{"id": N, "rc": R, "stdout": "...", "stderr": "..."}`` (rc -1 with ``"error"`` when the command
could not start or timed out); ``{"id": N, "op": "poweroff"}`` is acknowledged, then the guest
powers off through sysrq so QEMU exits 0. Each request runs in its own thread, so a slow command
does not hold up others. On start the agent announces ``{"event": "ready", ...}``.

A guest can also be given one job on QEMU's command line, so that the line alone says what the
guest does (``virtio-emu-vm`` prints it; pasted into a shell it runs as is):
``-fw_cfg name=opt/org.virtio-emu/run,string=COMMAND`` is run once with ``sh -c``, then the
agent returns and the init script powers the guest off. With
``-fw_cfg name=opt/org.virtio-emu/tty,string=TERM ROWS COLS`` the command gets the serial
console as its controlling terminal (an interactive shell). Without it, and with a host connected
to the agent's port, the command's stdout and stderr stream to the host as
``{"event": "output", "stream": "stdout", "data": "..."}`` (bytes as UTF-8 with surrogate
escapes, so they arrive exact) and its status as ``{"event": "exit", "rc": N}``; with nobody
connected (the line run by hand) it writes to the console and says its status there.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import selectors
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PORT_NAME = "org.virtio-emu.agent"
DEFAULT_TIMEOUT = 60.0
# After the host disconnects, reads return EOF at once until it reconnects; pace the retries.
RECONNECT_PAUSE = 0.2
FW_CFG_ROOT = Path("/sys/firmware/qemu_fw_cfg")
#: fw_cfg directory of the job: ``run`` (a ``sh -c`` text) and ``tty`` (``TERM ROWS COLS``).
JOB_NAME = "opt/org.virtio-emu"
JOB_DIR = FW_CFG_ROOT / "by_name" / JOB_NAME
JOB_HOME = "/root"


def find_port() -> str:
    """The port's device node, from udev's symlink or, failing that, sysfs."""
    link = Path("/dev/virtio-ports") / PORT_NAME
    if link.exists():
        return str(link)
    for name_file in Path("/sys/class/virtio-ports").glob("*/name"):
        if name_file.read_text().strip() == PORT_NAME:
            return "/dev/" + name_file.parent.name
    raise SystemExit(f"agent: no virtio-serial port named {PORT_NAME}")


@dataclass(frozen=True)
class Job:
    """The one command QEMU's command line gave this guest (see the module docstring)."""

    command: str
    term: str | None = None  # set: run on the console as a terminal session
    rows: int = 0
    cols: int = 0

    def env(self) -> dict[str, str]:
        env = {**os.environ, "HOME": JOB_HOME, "LANG": "C.UTF-8"}
        if self.term:
            env["TERM"] = self.term
        return env


def read_job() -> Job | None:
    """The job from fw_cfg, or None (the harness's guests: serve requests instead)."""
    if not FW_CFG_ROOT.exists():
        # udev normally loads it for the ACPI device QEMU0002; a missing module means no job.
        subprocess.run(["modprobe", "qemu_fw_cfg"], capture_output=True, check=False)
    try:
        command = (JOB_DIR / "run" / "raw").read_bytes().decode()
    except FileNotFoundError:
        return None
    try:
        tty = (JOB_DIR / "tty" / "raw").read_bytes().decode().split()
    except FileNotFoundError:
        return Job(command)
    term, rows, cols = [*tty, "", "0", "0"][:3]
    return Job(command, term or "linux", int(rows or 0), int(cols or 0))


def console_device() -> str:
    """The tty behind /dev/console (``console=ttyS0``), which can be a controlling terminal."""
    active = Path("/sys/class/tty/console/active").read_text().split()
    return "/dev/" + active[-1] if active else "/dev/console"


def take_terminal() -> None:
    """In the child, a session leader by then: make stdin (the console) its terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 1)  # 1: take it even if a stale session holds it


def exit_status(returncode: int) -> int:
    """A shell's convention: 128 + N for a command killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


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

    def host_connected(self) -> bool:
        """Whether a host program holds the other end of the port (else writes would block)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        return not any(mask & select.POLLHUP for _, mask in poller.poll(0))

    def run_job(self, job: Job) -> int:
        """Run the fw_cfg job once; its exit status (the caller then lets the guest power off)."""
        host = self.host_connected()
        if host:
            self.send({"event": "ready", "uptime": _uptime(), "kernel": os.uname().release})
        if job.term is not None or not host:
            rc = self._on_console(job, say_status=job.term is None)
        else:
            rc = self._streamed(job)
        if host:
            self.send({"event": "exit", "rc": rc})
        return rc

    def _on_console(self, job: Job, say_status: bool) -> int:
        tty = os.open(console_device(), os.O_RDWR | os.O_NOCTTY)
        try:
            if job.rows and job.cols:
                fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", job.rows, job.cols, 0, 0))
            stdin = tty if job.term is not None else subprocess.DEVNULL
            proc = subprocess.run(
                ["/bin/sh", "-c", job.command],
                stdin=stdin,
                stdout=tty,
                stderr=tty,
                cwd=JOB_HOME,
                env=job.env(),
                start_new_session=True,
                preexec_fn=take_terminal if job.term is not None else None,
                check=False,
            )
            rc = exit_status(proc.returncode)
            if say_status:
                os.write(tty, f"virtio-emu: {job.command!r} exited with status {rc}\n".encode())
        finally:
            os.close(tty)
        return rc

    def _streamed(self, job: Job) -> int:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", job.command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=JOB_HOME,
            env=job.env(),
        )
        assert proc.stdout is not None and proc.stderr is not None
        streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        with selectors.DefaultSelector() as sel:
            for fd in streams:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                for key, _ in sel.select():
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fd)
                        continue
                    data = chunk.decode("utf-8", "surrogateescape")
                    self.send({"event": "output", "stream": streams[key.fd], "data": data})
        proc.stdout.close()
        proc.stderr.close()
        return exit_status(proc.wait())

    def serve(self) -> None:
        self.send({"event": "ready", "uptime": _uptime(), "kernel": os.uname().release})
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


def _uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def main() -> None:
    port = find_port()
    fd = os.open(port, os.O_RDWR)
    agent = Agent(fd)
    job = read_job()
    if job is None:
        print(f"agent: serving on {port}", file=sys.stderr, flush=True)
        agent.serve()
    else:
        agent.run_job(job)


if __name__ == "__main__":
    main()
