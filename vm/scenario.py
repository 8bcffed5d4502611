"""A whole setup in one ``with``: vhost-user back-end(s), front-end(s) and a QEMU 11.1 guest.

Each device is a back-end plus a front-end: either our emulator (QEMU's ``vfio-user-pci``
connects to it) or QEMU's own vhost-user device (``-chardev`` straight to the back-end), so
the same guest checks can run against both. Processes run under ``testkit``'s
``ProcessGroup``, which owns the teardown order: the guest powers off and QEMU exits first, then
every process stops with SIGTERM in reverse start order, failures included; a stop that was not
clean (killed, a bad exit status, a socket left behind) makes a clean block raise. Children
carry ``PR_SET_PDEATHSIG`` so nothing outlives the Python process. Nothing waits by sleeping:
back-ends that accept a listening socket get one made here; the others, and the emulator, are
awaited on the log line that says they listen.

    with Scenario.run(ShmemBackend(regions=((0, 4 << 20),)), name="t") as sc:
        sc.backend_ok(cmd="map", shmid=0, shm_offset=0, length=65536, pattern="counter")
        sc.vguest("verify", sc.bdf(), "--shm", "0", "0", "65536", "--pattern", "counter")

Every step can be wrapped in ``sc.step("what")``: a failure inside names the step and carries
the tails of the guest console and of every process log (``sc.failure_report()``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from testkit import (
    LISTENING_LINE,
    ControlClient,
    Process,
    ProcessGroup,
    listening_socket,
    set_pdeathsig,
    start_emulator,
    start_shmem_backend,
)
from vm.guest import Guest
from vm.qemu import HostBinaries
from vm.toolchain import Toolchain, ensure_toolchain

log = logging.getLogger(__name__)

Frontend = Literal["emulator", "qemu"]
START_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0
CONTROL_TIMEOUT = 60.0


class ScenarioError(Exception):
    """A scenario step failed; the message names the step and carries the log tails."""


# --- back-ends -------------------------------------------------------------------------------


class Backend(Protocol):
    """A vhost-user back-end: how to start it and how each front-end presents it."""

    @property
    def label(self) -> str: ...

    @property
    def virtio_id(self) -> int: ...

    @property
    def num_queues(self) -> int: ...

    @property
    def config_size(self) -> int: ...

    def start(self, sc: Scenario, socket_path: Path) -> Process: ...

    def native_device(self, chardev: str) -> str:
        """QEMU's own ``-device`` for this back-end."""
        ...


@dataclass(frozen=True)
class ShmemBackend:
    """The reference back-end ``vhost-device-shmem`` (virtio-rng compatible, with shmem)."""

    regions: tuple[tuple[int, int], ...] = ((0, 4 << 20),)
    feature_bit: int = 22
    rng_source: str = "urandom"
    extra_args: tuple[str, ...] = ()
    label: str = "vhost-device-shmem"
    virtio_id: int = 4
    num_queues: int = 1
    config_size: int = 0

    def start(self, sc: Scenario, socket_path: Path) -> Process:
        # The control socket is bound before the vhost-user socket starts listening.
        return start_shmem_backend(
            sc.group,
            socket_path,
            "--shmem-feature-bit", str(self.feature_bit),
            "--rng-source", self.rng_source,
            *(a for shmid, size in self.regions for a in ("--shmem-region", f"{shmid}:{size}")),
            *self.extra_args,
            control_socket=socket_path.with_suffix(".ctl"),
            name=self.label,
            timeout=START_TIMEOUT,
            log_file=True,
        )  # fmt: skip

    def native_device(self, chardev: str) -> str:
        return (
            f"vhost-user-test-device-pci,chardev={chardev},virtio-id={self.virtio_id},"
            f"num_vqs={self.num_queues}"
        )


@dataclass(frozen=True)
class VirtiofsdBackend:
    """virtiofsd as packaged; ``--tag`` makes it offer PROTOCOL_F_CONFIG with the tag in it."""

    shared_dir: Path
    tag: str = "hostshare"
    extra_args: tuple[str, ...] = ("--sandbox=namespace",)
    label: str = "virtiofsd"
    virtio_id: int = 26
    num_queues: int = 2  # hiprio + one request queue
    config_size: int = 40  # struct virtio_fs_config: tag[36], num_request_queues

    def start(self, sc: Scenario, socket_path: Path) -> Process:
        with contextlib.closing(listening_socket(socket_path)) as listener:
            fd = listener.fileno()
            argv = sc.binaries.virtiofsd_argv(
                f"--fd={fd}", f"--shared-dir={self.shared_dir}", f"--tag={self.tag}",
                *self.extra_args,
            )  # fmt: skip
            # virtiofsd leaves with 0 by itself once its front-end disconnects, and with 1 when
            # SIGTERM arrives first (idle, or still shutting down): both are clean stops.
            return sc.spawn(
                self.label, argv, env=sc.binaries.env(), pass_fds=(fd,), clean_exit=(0, 1)
            )

    def native_device(self, chardev: str) -> str:
        return f"vhost-user-fs-pci,chardev={chardev},tag={self.tag}"


@dataclass(frozen=True)
class VirtiofsDaxBackend:
    """Our virtio-fs back-end with a DAX window (``vhost-device-fs``), with its control socket.

    Behind QEMU's own front-end it is a ``vhost-user-test-device-pci`` (virtio-id 26): QEMU asks
    GET_SHMEM_CONFIG for the window and GET_CONFIG (``config_size``) for the tag.
    """

    shared_dir: Path
    tag: str = "daxshare"
    cache_size: int = 64 << 20
    label: str = "vhost-device-fs"
    virtio_id: int = 26
    num_queues: int = 2  # hiprio + one request queue
    config_size: int = 40  # struct virtio_fs_config: tag[36], num_request_queues

    def start(self, sc: Scenario, socket_path: Path) -> Process:
        argv = [
            sys.executable, "-m", "vhost_user_backend.devices.virtiofs",
            "--socket-path", str(socket_path),
            "--shared-dir", str(self.shared_dir),
            "--tag", self.tag,
            "--cache-size", str(self.cache_size),
            "--control-socket", str(socket_path.with_suffix(".ctl")),
        ]  # fmt: skip
        proc = sc.group.start(self.label, argv, socket_path=socket_path, log_file=True)
        proc.wait_for_log(LISTENING_LINE + str(socket_path), timeout=START_TIMEOUT)
        return proc

    def native_device(self, chardev: str) -> str:
        return (
            f"vhost-user-test-device-pci,chardev={chardev},virtio-id={self.virtio_id},"
            f"num_vqs={self.num_queues},config_size={self.config_size}"
        )


@dataclass(frozen=True)
class BlockBackend:
    """qemu-storage-daemon exporting a raw image as vhost-user-blk (one queue)."""

    image: Path
    label: str = "qemu-storage-daemon"
    virtio_id: int = 2
    num_queues: int = 1
    config_size: int = 60  # struct virtio_blk_config up to write_zeroes_may_unmap + padding

    def start(self, sc: Scenario, socket_path: Path) -> Process:
        with contextlib.closing(listening_socket(socket_path)) as listener:
            fd = listener.fileno()
            argv = sc.binaries.storage_daemon_argv(
                "--blockdev", f"driver=file,node-name=file0,filename={self.image}",
                "--blockdev", "driver=raw,node-name=disk0,file=file0",
                "--export",
                f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=fd,addr.str={fd},"
                "writable=on",
            )  # fmt: skip
            return sc.spawn(self.label, argv, env=sc.binaries.env(), pass_fds=(fd,))

    def native_device(self, chardev: str) -> str:
        return f"vhost-user-blk-pci,chardev={chardev},num-queues={self.num_queues}"


# --- devices and the scenario -----------------------------------------------------------------


@dataclass
class Device:
    """One back-end and the front-end presenting it to the guest."""

    index: int
    backend: Backend
    frontend: Frontend
    vhost_socket: Path
    backend_proc: Process
    emulator: Process | None = None
    vfio_socket: Path | None = None
    control: ControlClient | None = None

    @property
    def pci_id(self) -> tuple[int, int]:
        """Vendor and device id of the virtio 1.x (modern-only) PCI function."""
        return 0x1AF4, 0x1040 + self.backend.virtio_id

    def qemu_args(self) -> list[str]:
        """What the guest's QEMU needs on its command line for this device."""
        if self.frontend == "emulator":
            assert self.vfio_socket is not None
            return vfio_user_device_args(self.vfio_socket)
        chardev = f"vhu{self.index}"
        return [
            "-chardev", f"socket,id={chardev},path={self.vhost_socket}",
            "-device", self.backend.native_device(chardev),
        ]  # fmt: skip


def vfio_user_device_args(socket_path: Path) -> list[str]:
    """QEMU's vfio-user client for the server on ``socket_path`` (only the JSON form takes a
    socket address)."""
    spec = {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(socket_path)}}
    return ["-device", json.dumps(spec)]


def qemu_exit_problem(guest: Guest) -> str | None:
    """What was not clean about a guest that was closed: QEMU must have exited 0."""
    if guest.returncode == 0:
        return None
    return f"QEMU exited with {guest.returncode}\n{guest.console_tail(20)}"


@dataclass(frozen=True)
class QemuProbe:
    """A QEMU started with ``-S`` (no guest code runs): its status, output and QMP replies."""

    returncode: int
    output: str
    replies: list[dict[str, Any]] = field(default_factory=list)


class Scenario:
    """Processes and guest of one setup; build it with :meth:`open` or :meth:`run`."""

    def __init__(self, name: str, toolchain: Toolchain, workdir: Path) -> None:
        self.name = name
        self.toolchain = toolchain
        self.binaries = HostBinaries(toolchain.host_root)
        self.workdir = workdir
        # UNIX socket paths are limited to 108 bytes; keep them short whatever the workdir is.
        self.sockdir = Path(tempfile.mkdtemp(prefix="sc-"))
        self.devices: list[Device] = []
        self.group = ProcessGroup(workdir)
        self.guest: Guest | None = None
        self.group.callback(lambda: shutil.rmtree(self.sockdir, ignore_errors=True))
        self._bdfs: dict[int, str] = {}

    @property
    def processes(self) -> list[Process]:
        """Every process started here, in start order."""
        return self.group.processes

    @classmethod
    @contextlib.contextmanager
    def open(
        cls, name: str = "scenario", toolchain: Toolchain | None = None, workdir: Path | None = None
    ) -> Iterator[Scenario]:
        """An empty scenario; whatever is started in it stops when the block ends.

        A workdir made here is removed after a clean run and kept (with every log) on failure.
        """
        made = workdir is None
        work = workdir or Path(tempfile.mkdtemp(prefix=f"scenario-{name}-"))
        work.mkdir(parents=True, exist_ok=True)
        sc = cls(name, toolchain or ensure_toolchain(), work)
        try:
            yield sc
        except BaseException:
            problems = sc.close()
            log.error("scenario %s failed; logs kept in %s; teardown: %s", name, work, problems)
            raise
        problems = sc.close()
        if problems:
            log.error("scenario %s: unclean teardown; logs kept in %s", name, work)
            raise ScenarioError("unclean teardown:\n" + "\n".join(problems))
        if made:
            shutil.rmtree(work, ignore_errors=True)

    @classmethod
    @contextlib.contextmanager
    def run(
        cls,
        *backends: Backend,
        frontend: Frontend = "emulator",
        name: str = "scenario",
        toolchain: Toolchain | None = None,
        workdir: Path | None = None,
        emulator_args: Sequence[str] = (),
        guest_args: Sequence[str] = (),
        **guest_options: Any,
    ) -> Iterator[Scenario]:
        """Start every back-end, its front-end, then boot the guest with all the devices."""
        with cls.open(name, toolchain, workdir) as sc:
            for backend in backends:
                sc.add_device(backend, frontend, emulator_args)
            sc.boot(guest_args, **guest_options)
            yield sc

    def close(self) -> list[str]:
        """Power the guest off, then stop every process in reverse start order; what was not
        clean."""
        return self.group.close()

    # --- starting things -----------------------------------------------------------------

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        clean_exit: Sequence[int] = (0,),
    ) -> Process:
        """Start a process that stops with the scenario (after the guest, before anything
        started earlier); its output goes to ``workdir/NAME.log`` too. ``clean_exit``: the
        statuses that count as a clean stop after SIGTERM."""
        return self.group.start(
            name, argv, env=env, pass_fds=pass_fds, log_file=True, clean_exit=clean_exit
        )

    def add_device(
        self,
        backend: Backend,
        frontend: Frontend = "emulator",
        emulator_args: Sequence[str] = (),
        announce: Callable[[str], None] | None = None,
    ) -> Device:
        """Start a back-end and (for ``emulator``) our emulator in front of it.

        ``announce`` hears "backend" and "emulator" as each starts (the demo numbers them).
        """
        index = len(self.devices)
        vhost_socket = self.sockdir / f"vhost{index}.sock"
        if announce is not None:
            announce("backend")
        with self.step(f"start {backend.label}"):
            backend_proc = backend.start(self, vhost_socket)
        device = Device(index, backend, frontend, vhost_socket, backend_proc)
        self.devices.append(device)
        if frontend == "emulator":
            if announce is not None:
                announce("emulator")
            device.emulator = self.start_emulator(
                vhost_socket,
                "--virtio-id", str(backend.virtio_id),
                "--num-queues", str(backend.num_queues),
                "--config-size", str(backend.config_size),
                *emulator_args,
                index=index,
            )  # fmt: skip
            device.vfio_socket = device.emulator.path
        if isinstance(backend, ShmemBackend | VirtiofsDaxBackend):
            device.control = ControlClient(vhost_socket.with_suffix(".ctl"), CONTROL_TIMEOUT)
            self.group.callback(device.control.close)
        return device

    def start_emulator(self, vhost_socket: Path, *args: str, index: int) -> Process:
        """Our emulator in front of the back-end on ``vhost_socket`` (already listening),
        serving ``sockdir/vfio{index}.sock``; ``args`` are more ``virtio-emu`` options (the
        device's shape: ``--virtio-id`` ...). Returns once it listens (``.path``)."""
        with self.step(f"start the emulator for {vhost_socket}"):
            return start_emulator(
                self.group,
                self.sockdir / f"vfio{index}.sock",
                "--vhost-user-socket", str(vhost_socket),
                *args,
                name=f"emulator{index}",
                timeout=START_TIMEOUT,
                log_file=True,
            )  # fmt: skip

    def qemu_args(self) -> list[str]:
        return [arg for device in self.devices for arg in device.qemu_args()]

    def boot(self, extra_args: Sequence[str] = (), **options: Any) -> Guest:
        """Boot the guest with every device added so far; it powers off first on the way out
        (whatever was started after it), and QEMU must exit 0 for a clean teardown."""
        with self.step("boot the guest"):
            self.guest = self.group.enter_first(
                Guest.boot(
                    [*self.qemu_args(), *extra_args],
                    name=self.name,
                    toolchain=self.toolchain,
                    workdir=self.workdir / "guest",
                    **options,
                ),
                check=qemu_exit_problem,
            )
        return self.guest

    def qemu_probe(
        self, commands: Sequence[dict[str, Any]] = (), timeout: float = START_TIMEOUT
    ) -> QemuProbe:
        """Run QEMU with the devices but no guest (``-S``): realize them, run QMP, quit.

        Shows what QEMU makes of a device without a boot, e.g. whether it aborts on a layout.
        """
        script = [{"execute": "qmp_capabilities"}, *commands, {"execute": "quit"}]
        argv = self.binaries.qemu_argv(
            "-machine", "q35,accel=tcg", "-S", "-nodefaults", "-no-user-config",
            "-display", "none", "-m", "256M",
            "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
            "-machine", "memory-backend=mem",
            "-qmp", "stdio", *self.qemu_args(),
        )  # fmt: skip
        proc = subprocess.run(
            argv,
            input="".join(json.dumps(c) + "\n" for c in script),
            capture_output=True,
            text=True,
            env=self.binaries.env(),
            timeout=timeout,
            check=False,
            preexec_fn=set_pdeathsig,
        )
        replies = []
        for line in proc.stdout.splitlines():
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if isinstance(message, dict) and ("return" in message or "error" in message):
                    replies.append(message)
        (self.workdir / "qemu-probe.log").write_text(proc.stdout + proc.stderr)
        return QemuProbe(proc.returncode, proc.stderr + proc.stdout, replies[1:])

    # --- using it ------------------------------------------------------------------------

    @property
    def g(self) -> Guest:
        if self.guest is None:
            raise ScenarioError("the guest is not booted")
        return self.guest

    def device(self, index: int = 0) -> Device:
        return self.devices[index]

    def control(self, index: int = 0) -> ControlClient:
        control = self.devices[index].control
        if control is None:
            raise ScenarioError(
                f"device {index} ({self.devices[index].backend.label}) has no control"
            )
        return control

    def backend_call(self, index: int = 0, **request: Any) -> dict[str, Any]:
        """One control command to device ``index``'s back-end; the reply as it is."""
        return self.control(index)(**request)

    def backend_ok(self, index: int = 0, **request: Any) -> dict[str, Any]:
        reply = self.backend_call(index, **request)
        if not reply.get("ok"):
            raise ScenarioError(f"back-end refused {request}: {reply}")
        return reply

    def vguest(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """``vguest ARGS --json`` in the guest; the JSON object (failures included)."""
        result = self.g.run(["vguest", *args, "--json"], timeout=timeout)
        try:
            data: dict[str, Any] = json.loads(result.stdout)
        except ValueError:
            raise ScenarioError(
                f"vguest {' '.join(args)}: rc={result.rc} error={result.error} no JSON\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            ) from None
        data.setdefault("exit_code", result.rc)
        return data

    def vguest_ok(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        data = self.vguest(*args, timeout=timeout)
        if data["exit_code"] != 0:
            raise ScenarioError(f"vguest {' '.join(args)} failed: {data}")
        return data

    def guest_device(self, index: int = 0) -> dict[str, Any]:
        """``vguest list`` entry for device ``index`` (found by its PCI ids)."""
        vendor, device_id = self.devices[index].pci_id
        devices = self.vguest_ok("list")["devices"]
        found = [d for d in devices if (d["vendor"], d["device"]) == (vendor, device_id)]
        if len(found) != 1:
            raise ScenarioError(
                f"expected one {vendor:04x}:{device_id:04x} in the guest, found {devices}"
            )
        entry: dict[str, Any] = found[0]
        self._bdfs[index] = str(entry["bdf"])
        return entry

    def bdf(self, index: int = 0) -> str:
        if index not in self._bdfs:
            self.guest_device(index)
        return self._bdfs[index]

    # --- failure reporting -------------------------------------------------------------------

    def failure_report(self, lines: int = 40) -> str:
        """Tails of the guest console, QEMU's log and every process log."""
        parts = [self.guest.console_tail(lines)] if self.guest is not None else []
        parts.append(self.group.failure_report(lines))
        return "\n".join(parts)

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Name a step: an exception inside becomes a ScenarioError saying which step failed."""
        try:
            yield
        except ScenarioError as exc:
            if str(exc).startswith("step "):
                raise
            raise ScenarioError(f"step {what!r} failed: {exc}\n{self.failure_report()}") from exc
        except Exception as exc:
            raise ScenarioError(
                f"step {what!r} failed: {type(exc).__name__}: {exc}\n{self.failure_report()}"
            ) from exc
