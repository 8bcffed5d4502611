"""Run the trixie root's QEMU, qemu-storage-daemon and virtiofsd on the Debian 12 host.

The binaries need glibc 2.39+, which the host lacks, so they run through the root's own dynamic
loader with the root's library path; QEMU also needs ``-L`` for its firmware and
``QEMU_MODULE_DIR`` for the devices built as modules. No chroot, so sockets and files keep their
host paths.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ACCEL_ENV = "VIRTIO_EMU_ACCEL"
KVM_PROBE_FILE = "kvm-probe.json"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class HostBinaries:
    """Command lines for the programs in the host root, runnable without chroot."""

    root: Path

    @property
    def loader(self) -> Path:
        return self.root / "lib64/ld-linux-x86-64.so.2"

    @property
    def library_path(self) -> str:
        return ":".join(
            str(self.root / d) for d in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")
        )

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for any of the binaries (QEMU reads QEMU_MODULE_DIR; others ignore it)."""
        env = dict(os.environ if base is None else base)
        env["QEMU_MODULE_DIR"] = str(self.root / "usr/lib/x86_64-linux-gnu/qemu")
        return env

    def _wrap(self, binary: str, args: Sequence[str]) -> list[str]:
        return [
            str(self.loader),
            "--library-path",
            self.library_path,
            str(self.root / binary),
            *args,
        ]

    def qemu_argv(self, *args: str) -> list[str]:
        firmware = ("usr/share/qemu", "usr/share/seabios")
        fw_args = [a for d in firmware for a in ("-L", str(self.root / d))]
        return self._wrap("usr/bin/qemu-system-x86_64", [*fw_args, *args])

    def storage_daemon_argv(self, *args: str) -> list[str]:
        return self._wrap("usr/bin/qemu-storage-daemon", args)

    def virtiofsd_argv(self, *args: str) -> list[str]:
        return self._wrap("usr/libexec/virtiofsd", args)


def set_pdeathsig() -> None:
    """Runs in a child before exec: it dies with us even if we are SIGKILLed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def listening_socket(path: Path) -> socket.socket:
    """A bound, listening UNIX socket to hand to a child as an fd.

    The socket exists before the child starts, so whoever connects next needs no wait for the
    path to appear.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    return sock


@contextlib.contextmanager
def daemon(
    argv: Sequence[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    stop_timeout: float = 10.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a helper process for the length of a block; SIGTERM, then SIGKILL, on the way out."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=tuple(pass_fds),
            preexec_fn=set_pdeathsig,  # noqa: PLW1509 -- only a prctl, no locks taken
        )
    log.debug("started pid %d: %s", proc.pid, " ".join(argv))
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()


@contextlib.contextmanager
def virtiofsd(
    binaries: HostBinaries,
    socket_path: Path,
    shared_dir: Path,
    log_path: Path,
    *extra_args: str,
) -> Iterator[subprocess.Popen[bytes]]:
    """virtiofsd serving ``shared_dir`` on ``socket_path``, namespace sandbox included.

    The listening socket is made here and passed with --fd, so QEMU may connect right away.
    """
    listener = listening_socket(socket_path)
    argv = binaries.virtiofsd_argv(
        f"--fd={listener.fileno()}", f"--shared-dir={shared_dir}", *extra_args
    )
    try:
        with daemon(argv, log_path, binaries.env(), pass_fds=(listener.fileno(),)) as proc:
            listener.close()
            yield proc
    finally:
        listener.close()


@contextlib.contextmanager
def storage_daemon_blk(
    binaries: HostBinaries,
    socket_path: Path,
    image: Path,
    log_path: Path,
    *,
    image_format: str = "raw",
    writable: bool = True,
) -> Iterator[subprocess.Popen[bytes]]:
    """qemu-storage-daemon exporting ``image`` as a vhost-user-blk back-end (one queue).

    QEMU's vhost-user-blk-pci must use ``num-queues=1`` to match the export's default.
    """
    listener = listening_socket(socket_path)
    fd = listener.fileno()
    argv = binaries.storage_daemon_argv(
        "--blockdev", f"driver=file,node-name=file0,filename={image}",
        "--blockdev", f"driver={image_format},node-name=disk0,file=file0",
        "--export",
        f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=fd,addr.str={fd},"
        f"writable={'on' if writable else 'off'}",
    )  # fmt: skip
    try:
        with daemon(argv, log_path, binaries.env(), pass_fds=(fd,)) as proc:
            listener.close()
            yield proc
    finally:
        listener.close()


def select_accel(cache: Path, image_digest: str) -> str:
    """TCG unless KVM was asked for or a cached probe saw this image boot under it.

    /dev/kvm on the project's machines is a software KVM under which Linux guests fail, so its
    mere presence proves nothing. ``python -m vm.guest --probe-kvm`` writes the probe.
    """
    requested = os.environ.get(ACCEL_ENV, "").strip().lower()
    if requested in ("kvm", "tcg"):
        return requested
    if requested:
        raise ValueError(f"{ACCEL_ENV}={requested!r}: expected 'kvm' or 'tcg'")
    probe = cache / KVM_PROBE_FILE
    try:
        result = json.loads(probe.read_text())
        if result.get("guest_boots") is True and result.get("image") == image_digest:
            return "kvm"
    except (OSError, ValueError):
        pass
    return "tcg"


def machine_args(accel: str) -> list[str]:
    return ["-machine", f"q35,accel={accel}", "-cpu", "max" if accel == "tcg" else "host"]


def device_help(binaries: HostBinaries) -> str:
    """QEMU's ``-device help`` output, to check which devices this build has."""
    proc = subprocess.run(
        binaries.qemu_argv("-nodefaults", "-machine", "none", "-device", "help"),
        capture_output=True,
        text=True,
        env=binaries.env(),
        timeout=60,
        check=True,
    )
    return proc.stdout + proc.stderr
