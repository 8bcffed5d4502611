"""The pieces every benchmark starts: the emulator as its own process (through ``testkit``),
in-process back-ends.

The emulator runs as a separate process (as in production) so its RSS, fd count and VMAs are
its own and its single thread is not slowed by our GIL. The back-end is the project's back-end
library running in a thread of the benchmark process, so ``shmem_map`` round trips are timed
from the library call to the front-end's reply, exactly the path a device built on it takes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from testkit import Process, ProcessGroup, start_emulator
from vhost_user_backend.daemon import VhostUserDaemon
from vhost_user_backend.devices.shmem_reference import ShmemRngDevice

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
REPO = Path(__file__).resolve().parents[1]


class BenchSetupError(RuntimeError):
    """Something the benchmark needs did not come up or did not stop cleanly."""


@contextlib.contextmanager
def emulator_process(
    workdir: Path,
    args: Sequence[str],
    *,
    name: str = "emulator",
    max_mappings: int | None = None,
) -> Iterator[Process]:
    """Start the emulator with ``args`` (the normal CLI options), awaited on its ready line;
    ``path`` is its socket, ``pid`` for ``testkit.procfs``. A stop that is not clean (killed,
    a non-zero status after SIGTERM) raises ``TeardownError`` when the block ends.

    ``max_mappings`` raises the BAR-wide cap on live mappings above the default (which is
    derived from vm.max_map_count) with the emulator's ``--max-mappings``.
    """
    extra = [] if max_mappings is None else ["--max-mappings", str(max_mappings)]
    group = ProcessGroup(workdir)
    with group.running():
        yield start_emulator(
            group,
            workdir / f"{name}.sock",
            *extra,
            *args,
            name=name,
            timeout=START_TIMEOUT,
            log_file=True,
        )


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
        thread.join(STOP_TIMEOUT)
    if thread.is_alive():
        raise BenchSetupError(
            f"back-end on {socket_path} still running {STOP_TIMEOUT} s after stop"
        )


def wait_negotiated(backend: VhostUserDaemon, timeout: float = 30.0) -> None:
    """Wait until the front-end connected and set up the back-end channel."""
    if not backend.wait_backend_channel(timeout):
        raise BenchSetupError(f"no back-end channel after {timeout}s")


def memfd(size: int, name: str = "bench") -> int:
    """A memfd of ``size`` bytes."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
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
