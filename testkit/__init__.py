"""The project's one test kit: processes, launchers, a lockstep front-end, a virtio driver, /proc.

Used by tests/, bench/ and vm/ alike, so each of these is written once:

- ``testkit.process``: ``Process`` (a child whose output lines can be awaited as events, stopped
  with SIGTERM and checked for a clean exit) and ``ProcessGroup`` (teardown order: a guest first,
  then processes in reverse start order; an unclean stop is reported, not hidden).
- ``testkit.launchers``: the emulator, ``vhost-device-shmem`` and ``vhost-device-fs`` as
  processes, awaited on the ready lines their own modules define; ``Harness`` starts them in a
  directory.
- ``testkit.frontend``: ``LockstepFrontend`` and ``ChannelPeer``, a scripted vhost-user
  front-end for tests of back-ends.
- ``testkit.virtio_driver``: a Linux-like virtio-pci driver over the vfio-user client.
- ``testkit.procfs``: fd, eventfd, mapping, memory and CPU counts from ``/proc``.
- ``testkit.fuse``: a one-file FUSE filesystem served from a thread (a real FUSE fd).
- ``testkit.broken_backend``: a back-end correct except for the breaks it is told to make
  (``python -m testkit.broken_backend --socket PATH --break NAME``), check-backend's proof.

The reference device's control client is the device's own: ``ControlClient`` in
``vhost_user_backend.devices.shmem_reference`` (re-exported here); the plain one, for
``vhost-device-fs``'s ``status``, is ``vhost_user_backend.control.ControlClient``.
"""

from testkit.frontend import ChannelPeer, LockstepFrontend
from testkit.launchers import (
    LISTENING_LINE,
    READY_LINE,
    Harness,
    emulator_argv,
    fs_backend_argv,
    shmem_backend_argv,
    start_emulator,
    start_fs_backend,
    start_shmem_backend,
)
from testkit.process import (
    Process,
    ProcessFailed,
    ProcessGroup,
    TeardownError,
    foreground_job_signals,
    listening_socket,
    set_pdeathsig,
)
from vhost_user_backend.control import ControlRefused
from vhost_user_backend.devices.shmem_reference import ControlClient

__all__ = [
    "LISTENING_LINE",
    "READY_LINE",
    "ChannelPeer",
    "ControlClient",
    "ControlRefused",
    "Harness",
    "LockstepFrontend",
    "Process",
    "ProcessFailed",
    "ProcessGroup",
    "TeardownError",
    "emulator_argv",
    "foreground_job_signals",
    "fs_backend_argv",
    "listening_socket",
    "set_pdeathsig",
    "shmem_backend_argv",
    "start_emulator",
    "start_fs_backend",
    "start_shmem_backend",
]
