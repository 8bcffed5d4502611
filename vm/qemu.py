"""Run the trixie root's QEMU, qemu-storage-daemon and virtiofsd on the Debian 12 host.

The binaries need glibc 2.39+, which the host lacks, so they run through the root's own dynamic
loader with the root's library path; QEMU also needs ``-L`` for its firmware and
``QEMU_MODULE_DIR`` for the devices built as modules. No chroot, so sockets and files keep their
host paths.

``virtio-emu-qemu`` (``main`` below) is that QEMU as a command: it behaves like
``qemu-system-x86_64``, every argument passed through, so a command line printed by
``virtio-emu-vm`` can be pasted into a shell as it is. ``virtio-emu-virtiofsd`` and
``virtio-emu-storage-daemon`` do the same for the root's virtiofsd and qemu-storage-daemon, so a
user can type them (or hand them to ``virtio-emu check-backend -- CMD``); ``--version`` is the
program's own, ``package_version`` the Debian package's from the root's dpkg status.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ACCEL_ENV = "VIRTIO_EMU_ACCEL"
KVM_PROBE_FILE = "kvm-probe.json"
WRAPPER = "virtio-emu-qemu"
VIRTIOFSD_WRAPPER = "virtio-emu-virtiofsd"
STORAGE_DAEMON_WRAPPER = "virtio-emu-storage-daemon"
#: What an absent QEMU exits with in a shell: "command not found".
NOT_FOUND = 127


@dataclass(frozen=True, slots=True)
class HostBinaries:
    """Command lines for the programs in the host root, runnable without chroot."""

    root: Path

    @property
    def qemu(self) -> Path:
        return self.root / "usr/bin/qemu-system-x86_64"

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
        return self._wrap(str(self.qemu.relative_to(self.root)), [*fw_args, *args])

    @property
    def storage_daemon(self) -> Path:
        return self.root / "usr/bin/qemu-storage-daemon"

    @property
    def virtiofsd(self) -> Path:
        return self.root / "usr/libexec/virtiofsd"

    def storage_daemon_argv(self, *args: str) -> list[str]:
        return self._wrap(str(self.storage_daemon.relative_to(self.root)), args)

    def virtiofsd_argv(self, *args: str) -> list[str]:
        return self._wrap(str(self.virtiofsd.relative_to(self.root)), args)

    def package_version(self, package: str) -> str | None:
        """The Debian version of ``package`` installed in the root (``1.13.2-1+deb13u1``), or
        None; read from the root's dpkg status, since the toolchain installs whatever Debian
        serves on the day it is built."""
        try:
            status = (self.root / "var/lib/dpkg/status").read_text()
        except OSError:
            return None
        for stanza in status.split("\n\n"):
            fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line[:40])
            if fields.get("Package") == package and "installed" in fields.get("Status", ""):
                return fields.get("Version")
        return None


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


def _host_binaries() -> HostBinaries:
    from vm.toolchain import HOST_ROOT_DIR, default_cache_dir  # noqa: PLC0415 -- it imports this module

    return HostBinaries(default_cache_dir() / HOST_ROOT_DIR)


def _exec(wrapper: str, binary: Path, command: list[str], env: dict[str, str]) -> int:
    """Replace this process with ``command``; 127 and a hint when the toolchain is missing."""
    if not binary.exists():
        print(
            f"{wrapper}: no {binary.name} at {binary}: build the VM toolchain first "
            "(`make toolchain` as root, or run virtio-emu-vm, which builds it)",
            file=sys.stderr,
        )
        return NOT_FOUND
    os.execve(command[0], command, env)
    return NOT_FOUND  # not reached: execve replaces this process or raises


def main(argv: Sequence[str] | None = None) -> int:
    """``virtio-emu-qemu ARGS...``: exec the cached QEMU 11.1 with ARGS, as qemu-system-x86_64.

    Only the loader, its library path, the firmware ``-L`` directories and QEMU_MODULE_DIR are
    added; everything else (``--version``, ``-device help``, a whole guest) is QEMU's own.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    binaries = _host_binaries()
    return _exec(WRAPPER, binaries.qemu, binaries.qemu_argv(*args), binaries.env())


def virtiofsd_main(argv: Sequence[str] | None = None) -> int:
    """``virtio-emu-virtiofsd ARGS...``: the root's virtiofsd with ARGS, e.g.
    ``--socket-path=S --shared-dir=DIR --sandbox=namespace`` (it exits when its front-end
    leaves)."""
    args = sys.argv[1:] if argv is None else list(argv)
    binaries = _host_binaries()
    command = binaries.virtiofsd_argv(*args)
    return _exec(VIRTIOFSD_WRAPPER, binaries.virtiofsd, command, binaries.env())


def storage_daemon_main(argv: Sequence[str] | None = None) -> int:
    """``virtio-emu-storage-daemon ARGS...``: the root's qemu-storage-daemon with ARGS, e.g. a
    ``--export type=vhost-user-blk,...,addr.type=unix,addr.path=S`` of a ``--blockdev``."""
    args = sys.argv[1:] if argv is None else list(argv)
    binaries = _host_binaries()
    command = binaries.storage_daemon_argv(*args)
    return _exec(STORAGE_DAEMON_WRAPPER, binaries.storage_daemon, command, binaries.env())


if __name__ == "__main__":
    sys.exit(main())
