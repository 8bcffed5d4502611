"""Boot a real Linux guest under QEMU 11.1 and run commands in it through the guest agent.

The agent (vm/agent.py, started by the guest's PID-1 script) speaks JSON lines over a
virtio-serial port. The host creates the listening sockets for the agent and QMP itself and hands
them to QEMU as file descriptors, so both exist before QEMU starts and nothing waits for a path to
appear. Waits select on the agent socket together with a pidfd of QEMU: a guest that dies ends the
wait at once with the console log's tail, rather than at a timeout.

    with Guest.boot(extra_args=["-device", '{"driver":"vfio-user-pci",...}'], name="t") as g:
        g.run(["lspci", "-n"]).check()
        devices = g.json(["vguest", "list", "--json"])
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from testkit.process import listening_socket, set_pdeathsig
from vm.qemu import KVM_PROBE_FILE, HostBinaries, machine_args, select_accel
from vm.toolchain import Toolchain, ensure_toolchain

log = logging.getLogger(__name__)

AGENT_PORT = "org.virtio-emu.agent"
# Slack on top of a command's own timeout (which the agent enforces) for the round trip.
REPLY_MARGIN = 30.0


class GuestError(Exception):
    """Something went wrong with the guest; the message carries the console's last lines."""


class GuestBootError(GuestError):
    """The guest did not reach a running agent."""


class GuestCommandError(GuestError):
    """A command run in the guest failed (non-zero status, timeout or could not start)."""

    def __init__(self, result: CommandResult) -> None:
        self.result = result
        super().__init__(
            f"guest command {list(result.argv)} failed: rc={result.rc}"
            + (f" error={result.error}" if result.error else "")
            + f"\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )


@dataclass(frozen=True, slots=True)
class CommandResult:
    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.error is None

    def check(self) -> CommandResult:
        if not self.ok:
            raise GuestCommandError(self)
        return self


@dataclass(frozen=True, slots=True)
class GuestConfig:
    """One guest's shape; ``extra_args`` are appended verbatim to QEMU's command line."""

    name: str = "guest"
    extra_args: tuple[str, ...] = ()
    memory_mib: int = 1024
    cpus: int = 2
    accel: str | None = None
    kernel_args: str = ""
    boot_timeout: float = 240.0
    allow_reboot: bool = False
    workdir: Path | None = None
    env: tuple[tuple[str, str], ...] = field(default=())


def guest_args(
    toolchain: Toolchain,
    accel: str,
    *,
    memory_mib: int = 1024,
    cpus: int = 2,
    kernel_args: str = "",
    allow_reboot: bool = False,
) -> list[str]:
    """QEMU's arguments for the image's guest, up to its console and the agent's chardev.

    The caller adds ``-serial ...`` and a chardev ``agent`` for the agent's virtio-serial port.
    Memory is a shared memfd so vfio-user DMA_MAP and vhost-user SET_MEM_TABLE carry fds; the
    disk is ``snapshot=on`` so a guest never writes the image.
    """
    size = f"{memory_mib}M"
    append = " ".join(
        part
        for part in (
            f"console=ttyS0 root=LABEL=guestroot rw init={toolchain.init_path}",
            "panic=-1 quiet" if not allow_reboot else "quiet",
            kernel_args,
        )
        if part
    )
    args = [
        *machine_args(accel),
        "-smp", str(cpus),
        "-m", size,
        "-object", f"memory-backend-memfd,id=mem,size={size},share=on",
        "-machine", "memory-backend=mem",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-nic", "none",
        "-kernel", str(toolchain.kernel),
        "-initrd", str(toolchain.initrd),
        "-append", append,
        "-drive", f"file={toolchain.rootfs},if=virtio,format=raw,snapshot=on",
        "-device", "virtio-serial-pci,id=agentbus",
        "-device", f"virtserialport,bus=agentbus.0,chardev=agent,name={AGENT_PORT}",
    ]  # fmt: skip
    if not allow_reboot:
        args.append("-no-reboot")
    return args


class Guest:
    """A running guest; create it with :meth:`boot` (a context manager that always cleans up)."""

    def __init__(self, config: GuestConfig, toolchain: Toolchain) -> None:
        self.config = config
        self.toolchain = toolchain
        self.binaries = HostBinaries(toolchain.host_root)
        self.accel = config.accel or select_accel(
            toolchain.cache, str(toolchain.read_manifest()["digest"])
        )
        self.workdir = config.workdir or Path(tempfile.mkdtemp(prefix=f"vm-{config.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_log = self.workdir / "console.log"
        self.qemu_log = self.workdir / "qemu.log"
        # UNIX socket paths are limited to 108 bytes; keep them short whatever the workdir is.
        self._sockdir = Path(tempfile.mkdtemp(prefix="vm-sock-"))
        self.agent_path = self._sockdir / "agent.sock"
        self.qmp_path = self._sockdir / "qmp.sock"
        self._ids = itertools.count(1)
        self._buffer = b""
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._agent: socket.socket | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self.ready_event: dict[str, Any] = {}
        self.boot_seconds = 0.0
        self.returncode: int | None = None
        self.log = log.getChild(config.name)

    # --- lifecycle ---------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def boot(
        cls,
        extra_args: Sequence[str] = (),
        name: str = "guest",
        toolchain: Toolchain | None = None,
        **options: Any,
    ) -> Iterator[Guest]:
        """Boot a guest, wait for its agent, and on exit power it off (or kill it).

        A workdir this created (no ``workdir`` option) is removed after a clean run and kept,
        with its console and QEMU logs, when the block raised.
        """
        config = GuestConfig(name=name, extra_args=tuple(extra_args), **options)
        guest = cls(config, toolchain or ensure_toolchain())
        try:
            guest.start()
            yield guest
        except BaseException:
            guest.close()
            log.error("guest %s failed; logs kept in %s", name, guest.workdir)
            raise
        guest.close()
        if config.workdir is None:
            shutil.rmtree(guest.workdir, ignore_errors=True)

    def qemu_command(self) -> list[str]:
        cfg = self.config
        args = guest_args(
            self.toolchain,
            self.accel,
            memory_mib=cfg.memory_mib,
            cpus=cfg.cpus,
            kernel_args=cfg.kernel_args,
            allow_reboot=cfg.allow_reboot,
        )
        return self.binaries.qemu_argv(
            *args, "-serial", f"file:{self.console_log}", *cfg.extra_args
        )

    def start(self) -> None:
        agent_listener = listening_socket(self.agent_path)
        qmp_listener = listening_socket(self.qmp_path)
        afd, qfd = agent_listener.fileno(), qmp_listener.fileno()
        argv = [
            *self.qemu_command(),
            "-chardev", f"socket,id=agent,fd={afd},server=on,wait=off",
            "-chardev", f"socket,id=qmp,fd={qfd},server=on,wait=off",
            "-object", "monitor-qmp,id=qmp0,chardev=qmp",
        ]  # fmt: skip
        self.log.info("starting QEMU (%s), console %s", self.accel, self.console_log)
        self.log.debug("argv: %s", argv)
        start = time.monotonic()
        with open(self.qemu_log, "wb") as qemu_log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=qemu_log,
                stderr=subprocess.STDOUT,
                pass_fds=(afd, qfd),
                env=self.binaries.env({**os.environ, **dict(self.config.env)}),
                preexec_fn=set_pdeathsig,  # noqa: PLW1509 -- only a prctl, no locks taken
            )
        agent_listener.close()
        qmp_listener.close()
        self._pidfd = os.pidfd_open(self._proc.pid)
        self._agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._agent.connect(str(self.agent_path))
        self._agent.setblocking(False)
        try:
            self.wait_ready(self.config.boot_timeout)
        except GuestError as exc:
            raise GuestBootError(str(exc)) from exc
        self.boot_seconds = time.monotonic() - start
        self.log.info(
            "agent ready after %.1fs (guest uptime %.1fs)",
            self.boot_seconds,
            self.ready_event.get("uptime", -1.0),
        )

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Wait for the agent's ready announcement (after boot or a reset)."""
        deadline = time.monotonic() + timeout
        while True:
            message = self._read_message(deadline, "the agent's ready event")
            if message.get("event") == "ready":
                self.ready_event = message
                return message

    def close(self) -> None:
        """Power off if still running, kill QEMU if that fails; idempotent."""
        try:
            # Without a ready agent nobody would act on a power-off request: kill at once.
            if self.running and self.ready_event:
                try:
                    self.poweroff()
                except GuestError as exc:
                    self.log.warning("clean power-off failed, killing QEMU: %s", exc)
        finally:
            self._kill()
            if self._qmp is not None:
                self._qmp.close()
                self._qmp = None
            if self._agent is not None:
                self._agent.close()
                self._agent = None
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1
            shutil.rmtree(self._sockdir, ignore_errors=True)

    def _kill(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self.returncode = self._proc.wait()

    @property
    def pid(self) -> int:
        """QEMU's process id (for /proc checks of what it maps)."""
        if self._proc is None:
            raise GuestError("the guest was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def poweroff(self, timeout: float = 60.0) -> int:
        """Ask the agent to power off and wait for QEMU to exit; returns QEMU's exit status."""
        assert self._proc is not None
        self._send({"id": next(self._ids), "op": "poweroff"})
        try:
            self.returncode = self._proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise GuestError(
                f"QEMU still running {timeout}s after power-off\n{self.console_tail()}"
            ) from exc
        self.log.info("QEMU exited with %d", self.returncode)
        return self.returncode

    # --- commands ----------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        timeout: float = 60.0,
        check: bool = False,
        stdin: str | None = None,
    ) -> CommandResult:
        """Run a command in the guest and return its status and output."""
        rid = next(self._ids)
        request: dict[str, Any] = {"id": rid, "argv": list(argv), "timeout": timeout}
        if stdin is not None:
            request["stdin"] = stdin
        self._send(request)
        deadline = time.monotonic() + timeout + REPLY_MARGIN
        while True:
            reply = self._read_message(deadline, f"the reply to {list(argv)}")
            if reply.get("id") == rid:
                break
            self.log.debug("ignoring agent message %s", reply)
        result = CommandResult(
            argv=tuple(argv),
            rc=int(reply.get("rc", -1)),
            stdout=str(reply.get("stdout", "")),
            stderr=str(reply.get("stderr", "")),
            error=reply.get("error"),
        )
        return result.check() if check else result

    def sh(self, script: str, timeout: float = 60.0, check: bool = False) -> CommandResult:
        return self.run(["/bin/sh", "-c", script], timeout=timeout, check=check)

    def json(self, argv: Sequence[str], timeout: float = 60.0, stdin: str | None = None) -> Any:
        """Run a command that must succeed and print JSON; return the parsed value."""
        result = self.run(argv, timeout=timeout, check=True, stdin=stdin)
        try:
            return json.loads(result.stdout)
        except ValueError as exc:
            raise GuestCommandError(
                CommandResult(result.argv, result.rc, result.stdout, result.stderr, repr(exc))
            ) from exc

    # --- QMP ---------------------------------------------------------------------------

    def qmp(self, command: str, **arguments: object) -> Any:
        """Run a QMP command synchronously (connects on first use)."""
        if self._qmp is None:
            self._qmp = QEMUMonitorProtocol(str(self.qmp_path))
            self._qmp.connect()
        return self._qmp.cmd(command, **arguments)

    def reset(self, timeout: float | None = None) -> dict[str, Any]:
        """Hard reset through QMP and wait for the agent to come back; needs ``allow_reboot``."""
        if not self.config.allow_reboot:
            raise GuestError("reset needs allow_reboot=True (with -no-reboot QEMU would exit)")
        start = time.monotonic()
        self.qmp("system_reset")
        ready = self.wait_ready(timeout or self.config.boot_timeout)
        self.log.info("agent ready %.1fs after reset", time.monotonic() - start)
        return ready

    # --- plumbing ----------------------------------------------------------------------

    def console_tail(self, lines: int = 40) -> str:
        parts = []
        for path in (self.qemu_log, self.console_log):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(parts)

    def _exit_status_after_loss(self) -> str:
        """QEMU closing the agent socket almost always means it is exiting; say how."""
        assert self._proc is not None
        try:
            self.returncode = self._proc.wait(5.0)
        except subprocess.TimeoutExpired:
            return " (QEMU still running)"
        return f" (QEMU exited with {self.returncode})"

    def _send(self, message: dict[str, Any]) -> None:
        if self._agent is None:
            raise GuestError("guest is not running")
        self._agent.setblocking(True)
        try:
            self._agent.sendall((json.dumps(message) + "\n").encode())
        finally:
            self._agent.setblocking(False)

    def _read_message(self, deadline: float, what: str) -> dict[str, Any]:
        """Next JSON line from the agent, failing fast if QEMU exits."""
        assert self._agent is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._agent, selectors.EVENT_READ, "agent")
            sel.register(self._pidfd, selectors.EVENT_READ, "qemu")
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestError(f"timed out waiting for {what}\n{self.console_tail()}")
                for key, _ in sel.select(remaining):
                    if key.data == "qemu":
                        assert self._proc is not None
                        self.returncode = self._proc.wait()
                        raise GuestError(
                            f"QEMU exited with {self.returncode} while waiting for {what}\n"
                            f"{self.console_tail()}"
                        )
                    try:
                        chunk = self._agent.recv(65536)
                    except ConnectionError:
                        chunk = b""
                    if not chunk:
                        raise GuestError(
                            f"agent connection lost while waiting for {what}"
                            f"{self._exit_status_after_loss()}\n{self.console_tail()}"
                        )
                    self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message


def probe_kvm(toolchain: Toolchain, timeout: float = 180.0) -> dict[str, Any]:
    """Boot the image under KVM once and cache whether it reached the agent.

    The result is keyed by the image digest; vm.qemu.select_accel uses KVM only on a success.
    """
    digest = str(toolchain.read_manifest()["digest"])
    result: dict[str, Any] = {"image": digest, "guest_boots": False}
    start = time.monotonic()
    try:
        with Guest.boot(
            name="kvm-probe", toolchain=toolchain, accel="kvm", boot_timeout=timeout
        ) as g:
            result["kernel"] = g.run(["uname", "-r"], check=True).stdout.strip()
            result["guest_boots"] = True
    except GuestError as exc:
        result["error"] = str(exc).splitlines()[0]
    result["seconds"] = round(time.monotonic() - start, 1)
    (toolchain.cache / KVM_PROBE_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Boot the guest, run one command (or none), power off, and print the timings as JSON."""
    parser = argparse.ArgumentParser(prog="python -m vm.guest", description=main.__doc__)
    parser.add_argument("--accel", choices=("tcg", "kvm"), default=None)
    parser.add_argument("--probe-kvm", action="store_true", help="record whether KVM boots")
    parser.add_argument("--keep", type=Path, default=None, help="workdir for the logs")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="command to run in the guest")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    toolchain = ensure_toolchain()
    if args.probe_kvm:
        print(json.dumps(probe_kvm(toolchain)))
        return 0
    start = time.monotonic()
    with Guest.boot(name="cli", toolchain=toolchain, accel=args.accel, workdir=args.keep) as g:
        timings: dict[str, Any] = {
            "accel": g.accel,
            "boot_to_agent_s": round(g.boot_seconds, 2),
            "guest_uptime_at_agent_s": g.ready_event.get("uptime"),
        }
        rc = 0
        if args.command:
            result = g.run(args.command, timeout=600)
            sys.stdout.write(result.stdout)
            sys.stderr.write(result.stderr)
            rc = result.rc
        poweroff_start = time.monotonic()
        timings["qemu_exit_status"] = g.poweroff()
        timings["poweroff_s"] = round(time.monotonic() - poweroff_start, 2)
    timings["start_to_exit_s"] = round(time.monotonic() - start, 2)
    print(json.dumps(timings))
    return rc


if __name__ == "__main__":
    sys.exit(main())
