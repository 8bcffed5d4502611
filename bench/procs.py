"""The pieces every benchmark starts: the emulator as its own process, in-process back-ends.

The emulator runs as a separate process (as in production) so its RSS, fd count and VMAs are
its own and its single thread is not slowed by our GIL. The back-end is the project's back-end
library running in a thread of the benchmark process, so ``shmem_map`` round trips are timed
from the library call to the front-end's reply, exactly the path a device built on it takes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vhost_user_backend.daemon import VhostUserDaemon
from vhost_user_backend.devices.shmem_reference import ShmemRngDevice

READY_LINE = "ready: listening for a vfio-user client on "
START_TIMEOUT = 30.0
REPO = Path(__file__).resolve().parents[1]


class BenchSetupError(RuntimeError):
    """A process the benchmark needs did not come up; the message carries its log's tail."""


@dataclass
class EmulatorProcess:
    """A running ``python -m emulator``; ``pid`` for /proc, ``socket`` for clients."""

    proc: subprocess.Popen[bytes]
    socket: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        return _status_field(self.pid, "VmRSS")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def vma_count(self) -> int:
        with open(f"/proc/{self.pid}/maps", encoding="ascii", errors="replace") as handle:
            return sum(1 for _ in handle)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the whole process (clock-tick resolution, 10 ms)."""
        with open(f"/proc/{self.pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _status_field(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise BenchSetupError(f"/proc/{pid}/status has no {name}")


@contextlib.contextmanager
def emulator_process(
    workdir: Path,
    args: Sequence[str],
    *,
    name: str = "emulator",
    max_mappings: int | None = None,
) -> Iterator[EmulatorProcess]:
    """Start the emulator with ``args`` (the normal CLI options) and wait for its ready line.

    ``max_mappings`` raises the BAR-wide cap on live mappings above the default (which is
    derived from vm.max_map_count) with the emulator's ``--max-mappings``.
    """
    sock = workdir / f"{name}.sock"
    log_path = workdir / f"{name}.log"
    argv = [sys.executable, "-m", "emulator"]
    if max_mappings is not None:
        argv += ["--max-mappings", str(max_mappings)]
    argv += ["--vfio-user-socket", str(sock), *args]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    emu = EmulatorProcess(proc, sock, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while READY_LINE not in log_path.read_text(errors="replace"):
            if proc.poll() is not None:
                raise BenchSetupError(f"{name} exited with {proc.returncode}\n{emu.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchSetupError(f"{name} not ready after {START_TIMEOUT}s\n{emu.log_tail()}")
            time.sleep(0.02)
        yield emu
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def shmem_backend(
    socket_path: Path, regions: Sequence[tuple[int, int]]
) -> Iterator[tuple[ShmemRngDevice, VhostUserDaemon]]:
    """The reference shared-memory device (virtio-rng compatible) served from a thread."""
    device = ShmemRngDevice(regions)
    backend = VhostUserDaemon(device, str(socket_path))
    thread = backend.serve_in_thread()
    try:
        yield device, backend
    finally:
        backend.stop()
        thread.join(10)


def wait_negotiated(backend: VhostUserDaemon, timeout: float = 30.0) -> None:
    """Wait until the front-end connected and set up the back-end channel."""
    deadline = time.monotonic() + timeout
    while not backend.status()["backend_channel"]:
        if time.monotonic() > deadline:
            raise BenchSetupError(f"no back-end channel after {timeout}s")
        time.sleep(0.01)


def memfd(size: int, name: str = "bench") -> int:
    """A sealable memfd of ``size`` bytes (the emulator seals it against shrinking)."""
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A short temporary directory (UNIX socket paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        for child in path.iterdir():
            with contextlib.suppress(OSError):
                child.unlink()
        with contextlib.suppress(OSError):
            path.rmdir()
