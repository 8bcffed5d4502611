"""The emulator and the reference back-end as real processes, for integration tests.

Each process runs from a temporary directory with its stderr read by a thread, so a test can
wait for a log line (an event, not a sleep) and every log is at hand when something fails.
``stop()`` sends SIGTERM and checks what a clean exit means for these programs: status 0 and
the listening socket removed. ``Processes`` (the ``procs`` fixture) stops everything it started
even when the test fails, and prints the logs then, which pytest shows for failing tests only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

READY_EMULATOR = "ready: listening for a vfio-user client on "
READY_BACKEND = "listening on "
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
#: How the reference back-end names its memfds; the emulator maps them into BAR 4.
BACKEND_MEMFD_NAME = "memfd:vhost-shmem-"


class ProcessFailed(AssertionError):
    """A process did not start, log or stop as expected; the message carries its log."""


class ManagedProcess:
    """One child process with its stderr collected line by line."""

    def __init__(
        self, name: str, argv: Sequence[str], cwd: Path, socket_path: Path | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.socket_path = socket_path
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-log", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def path(self) -> Path:
        """The socket this process listens on."""
        if self.socket_path is None:
            raise self.fail("has no socket")
        return self.socket_path

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def fail(self, message: str) -> ProcessFailed:
        return ProcessFailed(f"{self.name} (pid {self.pid}): {message}\n--- log ---\n{self.log()}")

    def wait_for_log(
        self, pattern: str, *, timeout: float = START_TIMEOUT, start: int = 0, regex: bool = False
    ) -> int:
        """Index of the first log line from ``start`` on containing ``pattern`` (or matching
        it as a regex); fails when the process ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        compiled = re.compile(pattern) if regex else None
        with self._changed:
            index = start
            while True:
                while index < len(self.lines):
                    line = self.lines[index]
                    if compiled.search(line) if compiled else pattern in line:
                        return index
                    index += 1
                if self._eof:
                    raise self.fail(f"exited ({self.proc.poll()}) before logging {pattern!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self.fail(f"no log line {pattern!r} within {timeout} s")
                self._changed.wait(remaining)

    def mark(self) -> int:
        """The current end of the log, to wait only for lines logged after this point."""
        with self._changed:
            return len(self.lines)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self.fail(f"still running after {timeout} s") from None
        self._reader.join(STOP_TIMEOUT)
        return code

    def stop(self) -> None:
        """SIGTERM, then assert a clean exit: status 0 and the socket file removed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.wait_exit()
        if code != 0:
            raise self.fail(f"exit status {code} after SIGTERM")
        if self.socket_path is not None and self.socket_path.exists():
            raise self.fail(f"left its socket {self.socket_path} behind")

    def kill(self) -> None:
        """SIGKILL (a crash, or clean-up after a failure); reaps the process."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT)
        self._reader.join(STOP_TIMEOUT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


class Processes:
    """Starts emulators and back-ends in ``workdir``; ``close()`` ends whatever is left."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[ManagedProcess] = []
        self.controls: list[BackendControl] = []

    def emulator(
        self,
        *args: str,
        socket_name: str = "vfio-user.sock",
        virtio_id: int = 4,
        wait_ready: bool = True,
    ) -> ManagedProcess:
        """``python -m emulator`` on ``workdir/socket_name``; waits for its ready line."""
        path = self.workdir / socket_name
        argv = [
            sys.executable,
            "-m",
            "emulator",
            "--vfio-user-socket",
            str(path),
            "--virtio-id",
            str(virtio_id),
            *args,
        ]
        proc = self._start("emulator", argv, path)
        if wait_ready:
            proc.wait_for_log(READY_EMULATOR + str(path))
            if not path.is_socket():
                raise proc.fail(f"logged ready but {path} is not a socket")
        return proc

    def backend(
        self,
        *args: str,
        socket_name: str = "vhost-user.sock",
        control_name: str | None = "control.sock",
    ) -> ManagedProcess:
        """``vhost-device-shmem`` (the reference back-end); waits until it listens."""
        path = self.workdir / socket_name
        argv = [
            sys.executable,
            "-m",
            "vhost_user_backend.devices.shmem_reference",
            "--socket-path",
            str(path),
            *args,
        ]
        if control_name is not None:
            argv += ["--control-socket", str(self.workdir / control_name)]
        proc = self._start("vhost-device-shmem", argv, path)
        proc.wait_for_log(READY_BACKEND + str(path))
        return proc

    def control(self, control_name: str = "control.sock") -> BackendControl:
        """A control connection to a back-end started here; closed by ``close()``."""
        control = BackendControl(self.workdir / control_name)
        self.controls.append(control)
        return control

    def _start(self, name: str, argv: list[str], path: Path) -> ManagedProcess:
        proc = ManagedProcess(f"{name}#{len(self.started)}", argv, self.workdir, path)
        self.started.append(proc)
        return proc

    def close(self) -> None:
        for control in self.controls:
            control.close()
        for proc in reversed(self.started):
            proc.kill()

    def logs(self) -> str:
        return "\n".join(f"=== {p.name}: {' '.join(p.argv)}\n{p.log()}" for p in self.started)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Processes started in ``tmp_path``; killed at teardown if the test did not stop them."""
    group = Processes(tmp_path)
    try:
        yield group
    finally:
        group.close()
        print(group.logs())


class BackendControl:
    """The reference back-end's JSON-lines control socket: one request, one reply line."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self._file = self.sock.makefile("rwb")

    def __call__(self, cmd: str, **fields: Any) -> dict[str, Any]:
        self._file.write(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        self._file.flush()
        line = self._file.readline()
        if not line:
            raise ConnectionError("control socket closed")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def ok(self, cmd: str, **fields: Any) -> dict[str, Any]:
        """A command that must succeed."""
        reply = self(cmd, **fields)
        assert reply["ok"] is True, (cmd, fields, reply)
        return reply

    def map(
        self,
        shmid: int,
        shm_offset: int,
        length: int,
        *,
        pattern: str = "counter",
        seed: int = 0,
        writable: bool = False,
    ) -> dict[str, Any]:
        return self(
            "map",
            shmid=shmid,
            shm_offset=shm_offset,
            length=length,
            pattern=pattern,
            seed=seed,
            writable=writable,
        )

    def unmap(self, shmid: int, shm_offset: int, length: int) -> dict[str, Any]:
        return self("unmap", shmid=shmid, shm_offset=shm_offset, length=length)

    def read(self, shmid: int, shm_offset: int, length: int, offset: int = 0) -> bytes:
        reply = self.ok("read", shmid=shmid, shm_offset=shm_offset, length=length, offset=offset)
        return bytes.fromhex(reply["data"])

    def status(self) -> dict[str, Any]:
        return self.ok("status")

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> BackendControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> list[str]:
    """What each fd of ``pid`` points at (for a useful message when counts differ)."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            out.append(f"{name} -> {os.readlink(f'/proc/{pid}/fd/{name}')}")
    return sorted(out)


def memfd_mappings(pid: int, name: str = BACKEND_MEMFD_NAME) -> list[str]:
    """Lines of ``/proc/PID/maps`` backed by a memfd called ``name...``: in the emulator these
    are the live back-end mappings inside BAR 4."""
    with open(f"/proc/{pid}/maps") as maps:
        return [line.rstrip("\n") for line in maps if name in line]


def reserved_vmas(pid: int) -> int:
    """Anonymous ``PROT_NONE`` areas of ``pid``: in the emulator, the BAR 4 reservation is made
    of these (plus guard pages), so pieces left behind by unmaps show up as a higher count."""
    count = 0
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if fields[1] == "---p" and len(fields) == 5:
                count += 1
    return count


def eventfd_id(pid: int, fd: int) -> int | None:
    """The kernel's id of the eventfd behind ``fd`` of ``pid`` (``eventfd-id`` in fdinfo): the
    same eventfd passed to another process over SCM_RIGHTS has the same id there."""
    with open(f"/proc/{pid}/fdinfo/{fd}") as info:
        for line in info:
            key, _, value = line.partition(":")
            if key == "eventfd-id":
                return int(value)
    return None


def eventfd_ids(pid: int) -> set[int]:
    """Ids of every eventfd ``pid`` holds open."""
    ids = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError, ValueError):
            found = eventfd_id(pid, int(name))
            if found is not None:
                ids.add(found)
    return ids
