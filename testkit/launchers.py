"""The project's own programs as processes: the emulator and the back-ends on our library
(the reference shared-memory device and the virtio-fs device).

Both are awaited on the line each logs once its socket accepts a peer; the line is defined once,
where it is logged (``emulator.vfio_user.server.READY_LINE``,
``vhost_user_backend.daemon.LISTENING_LINE``). Children run the venv's python (``sys.executable``),
where the project is installed, so they need no ``PYTHONPATH``.

``Harness`` is a ``ProcessGroup`` with one method per program, each starting it in ``workdir``::

    with Harness(tmp).running() as h:
        back = h.backend("--rng-source", "counter")
        emu = h.emulator("--vhost-user-socket", str(back.path))
        h.control().ok("map", shmid=0, shm_offset=0, length=4096)
"""

from __future__ import annotations

import sys
from pathlib import Path

from emulator.vfio_user.server import READY_LINE
from testkit.process import START_TIMEOUT, Process, ProcessGroup
from vhost_user_backend.daemon import LISTENING_LINE
from vhost_user_backend.devices.shmem_reference import ControlClient

__all__ = [
    "LISTENING_LINE",
    "READY_LINE",
    "Harness",
    "emulator_argv",
    "fs_backend_argv",
    "shmem_backend_argv",
    "start_emulator",
    "start_fs_backend",
    "start_shmem_backend",
]


def emulator_argv(vfio_user_socket: Path, *args: str) -> list[str]:
    """``virtio-emu`` (as ``python -m emulator``) serving ``vfio_user_socket``."""
    return [sys.executable, "-m", "emulator", "--vfio-user-socket", str(vfio_user_socket), *args]


def shmem_backend_argv(
    socket_path: Path, *args: str, control_socket: Path | None = None
) -> list[str]:
    """``vhost-device-shmem`` (as ``python -m``) on ``socket_path``, with its control socket."""
    argv = [
        sys.executable,
        "-m",
        "vhost_user_backend.devices.shmem_reference",
        "--socket-path",
        str(socket_path),
    ]
    if control_socket is not None:
        argv += ["--control-socket", str(control_socket)]
    return [*argv, *args]


def fs_backend_argv(
    socket_path: Path,
    shared_dir: Path,
    *args: str,
    tag: str = "testfs",
    control_socket: Path | None = None,
) -> list[str]:
    """``vhost-device-fs`` (as ``python -m``) serving ``shared_dir`` on ``socket_path``."""
    argv = [
        sys.executable,
        "-m",
        "vhost_user_backend.devices.virtiofs",
        "--socket-path",
        str(socket_path),
        "--shared-dir",
        str(shared_dir),
        "--tag",
        tag,
    ]
    if control_socket is not None:
        argv += ["--control-socket", str(control_socket)]
    return [*argv, *args]


def start_emulator(
    group: ProcessGroup,
    vfio_user_socket: Path,
    *args: str,
    name: str = "emulator",
    wait_ready: bool = True,
    timeout: float = START_TIMEOUT,
    log_file: bool = False,
) -> Process:
    """Start the emulator in ``group``; with ``wait_ready``, return once it listens."""
    proc = group.start(
        name,
        emulator_argv(vfio_user_socket, *args),
        socket_path=vfio_user_socket,
        log_file=log_file,
    )
    if wait_ready:
        proc.wait_for_log(READY_LINE + str(vfio_user_socket), timeout=timeout)
        if not vfio_user_socket.is_socket():
            raise proc.fail(f"logged ready but {vfio_user_socket} is not a socket")
    return proc


def start_shmem_backend(
    group: ProcessGroup,
    socket_path: Path,
    *args: str,
    control_socket: Path | None = None,
    name: str = "vhost-device-shmem",
    timeout: float = START_TIMEOUT,
    log_file: bool = False,
) -> Process:
    """Start the reference back-end in ``group`` and return once it listens (its control
    socket, if any, is bound before that)."""
    proc = group.start(
        name,
        shmem_backend_argv(socket_path, *args, control_socket=control_socket),
        socket_path=socket_path,
        log_file=log_file,
    )
    proc.wait_for_log(LISTENING_LINE + str(socket_path), timeout=timeout)
    return proc


def start_fs_backend(
    group: ProcessGroup,
    socket_path: Path,
    shared_dir: Path,
    *args: str,
    tag: str = "testfs",
    control_socket: Path | None = None,
    name: str = "vhost-device-fs",
    timeout: float = START_TIMEOUT,
    log_file: bool = False,
) -> Process:
    """Start ``vhost-device-fs`` in ``group`` and return once it listens (its control socket,
    if any, is bound before that)."""
    proc = group.start(
        name,
        fs_backend_argv(socket_path, shared_dir, *args, tag=tag, control_socket=control_socket),
        socket_path=socket_path,
        log_file=log_file,
    )
    proc.wait_for_log(LISTENING_LINE + str(socket_path), timeout=timeout)
    return proc


class Harness(ProcessGroup):
    """A ``ProcessGroup`` that starts the project's programs with sockets in ``workdir``."""

    def emulator(
        self,
        *args: str,
        socket_name: str = "vfio-user.sock",
        virtio_id: int = 4,
        wait_ready: bool = True,
    ) -> Process:
        """``python -m emulator`` on ``workdir/socket_name``; waits for its ready line."""
        path = self.workdir / socket_name
        return start_emulator(
            self, path, "--virtio-id", str(virtio_id), *args, wait_ready=wait_ready
        )

    def backend(
        self,
        *args: str,
        socket_name: str = "vhost-user.sock",
        control_name: str | None = "control.sock",
    ) -> Process:
        """``vhost-device-shmem`` (the reference back-end); waits until it listens."""
        control = None if control_name is None else self.workdir / control_name
        return start_shmem_backend(self, self.workdir / socket_name, *args, control_socket=control)

    def fs_backend(
        self,
        shared_dir: Path,
        *args: str,
        tag: str = "testfs",
        socket_name: str = "vhost-fs.sock",
        control_name: str | None = "fs-control.sock",
    ) -> Process:
        """``vhost-device-fs`` serving ``shared_dir``; waits until it listens."""
        control = None if control_name is None else self.workdir / control_name
        return start_fs_backend(
            self, self.workdir / socket_name, shared_dir, *args, tag=tag, control_socket=control
        )

    def control(self, control_name: str = "control.sock") -> ControlClient:
        """A control connection to a back-end started here; closed with the group."""
        client = ControlClient(self.workdir / control_name)
        self.callback(client.close)
        return client
