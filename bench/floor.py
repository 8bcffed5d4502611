"""The C floor for figure 3: ``bench/floor.c`` built at bench time and run as a server.

The floor answers REGION_READ of BAR 4 from a MAP_SHARED memfd mapping with memcpy, one thread
and blocking I/O: what our emulator's per-message CPU is compared with. It is built with the
host compiler (``$CC``, default ``cc``; ``make`` installs one) into the benchmark's work
directory, so nothing compiled is kept in the tree. A missing compiler or a failed build is
``FloorUnavailable``, which the section records as an error while our own figures still count.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from bench.procs import BenchSetupError

SOURCE = Path(__file__).resolve().parent / "floor.c"
BUILD_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0


class FloorUnavailable(RuntimeError):
    """The floor could not be built (no compiler, or the compiler failed)."""


def build(workdir: Path) -> Path:
    """Compile ``floor.c`` with ``$CC -O2`` into ``workdir``; the binary's path."""
    compiler = shlex.split(os.environ.get("CC", "cc"))
    binary = workdir / "floor"
    argv = [*compiler, "-O2", "-Wall", "-Wextra", "-o", str(binary), str(SOURCE)]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise FloorUnavailable(
            f"cannot build the C floor: no usable C compiler ({shlex.join(compiler)}: {exc}); "
            "`make` installs one, or set CC"
        ) from exc
    if proc.returncode != 0:
        raise FloorUnavailable(
            f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    return binary


class FloorServer:
    """A running floor; ``cpu_ns`` asks it for its thread CPU clock (SIGUSR1, one line back)."""

    def __init__(self, proc: subprocess.Popen[str], path: Path) -> None:
        self.proc = proc
        self.path = path

    def cpu_ns(self) -> int:
        assert self.proc.stdout is not None
        self.proc.send_signal(signal.SIGUSR1)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            raise BenchSetupError(f"the floor answered {line!r} instead of its CPU time")
        return int(line)


@contextlib.contextmanager
def serving(binary: Path, path: Path, region_size: int, mapped: int) -> Iterator[FloorServer]:
    """Run the floor on ``path`` until its one client leaves; it must then exit 0 by itself."""
    proc = subprocess.Popen(
        [str(binary), str(path), str(region_size), str(mapped)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    with proc.stdout:
        try:
            if proc.stdout.readline().strip() != "ready":
                raise BenchSetupError(f"the floor did not start (status {proc.poll()})")
            yield FloorServer(proc, path)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        try:
            status = proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise BenchSetupError(
                f"the floor still ran {STOP_TIMEOUT} s after its client left"
            ) from None
    if status != 0:
        raise BenchSetupError(f"the floor exited with status {status}")


def copy_cost(binary: Path, count: int, mapped: int) -> dict[str, float]:
    """Thread CPU per 8-byte copy out of a MAP_SHARED memfd: memcpy vs process_vm_readv."""
    proc = subprocess.run(
        [str(binary), "--copy-cost", str(count), str(mapped)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data: dict[str, float] = json.loads(proc.stdout)
    return data
