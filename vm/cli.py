"""``virtio-emu-vm``: boot the cached Debian guest with your devices, from the shell.

    virtio-emu-vm --vhost-user /tmp/dev.sock -- vguest list     # one command, then power off
    virtio-emu-vm --vhost-user /tmp/dev.sock                    # a shell on the serial console

Devices: ``--vfio-user PATH`` attaches a vfio-user server that is already running (our
emulator); ``--vhost-user PATH`` starts our emulator in front of a vhost-user back-end that is
already listening (through ``vm.scenario``, like every test); ``--native PATH`` gives the same
back-end to QEMU's own vhost-user device instead, for comparison.

The guest's job is on QEMU's command line (``-fw_cfg name=opt/org.virtio-emu/run,...``, see
``vm/agent.py``), and so is everything else: no inherited fds, the serial console on QEMU's
stdio, and QEMU run through ``virtio-emu-qemu``. The line printed before booting is therefore
exactly what runs, and pasted into a shell it runs the same guest (a command's output then
comes on the console, with its status). What this program adds: it starts the emulators, owns
every process (Ctrl-C, SIGTERM or a failure stop QEMU first, then the emulators, in order), and
listens on the agent's port, where the guest streams a command's stdout and stderr apart and
exactly, and its exit status, which becomes ours. Errors of this program itself exit with 255,
as ssh does, so they differ from a guest command's statuses.

Why a command of its own rather than a ``virtio-emu`` subcommand: ``virtio-emu`` is the
emulator, whose package sits below ``vm`` (it may not import the VM harness), and its flat
options are documented and used as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from testkit.process import STOP_TIMEOUT, listening_socket, set_pdeathsig
from vm.agent import JOB_NAME
from vm.guest import guest_args
from vm.qemu import WRAPPER, select_accel
from vm.scenario import Scenario, ScenarioError, vfio_user_device_args
from vm.toolchain import Toolchain, ToolchainError, default_cache_dir, ensure_toolchain

log = logging.getLogger("virtio-emu-vm")

PROG = "virtio-emu-vm"
#: Our own failures (toolchain, devices, QEMU, guest), apart from a guest command's statuses.
FAILED = 255
DEFAULT_VIRTIO_ID = 4  # the reference back-end's (virtio-rng compatible)
NATIVE_DRIVER = "vhost-user-test-device-pci"
LOGIN_SHELL = "exec bash --login"
#: QEMU's escape key on the console: Ctrl-] (then x quits, c toggles the monitor, h helps).
ESCAPE = "0x1d"
BOOT_TIMEOUT = 240.0
POWEROFF_TIMEOUT = 60.0
AGENT_RECONNECT_MS = 1000


USAGE = f"""{PROG} [--vfio-user PATH]... [--vhost-user PATH[,OPTION=VALUE...]]...
                     [--native PATH[,PROPERTY=VALUE...]]... [-t] [options] [-- COMMAND [ARG...]]"""


class VmError(Exception):
    """This program failed (not the guest's command); the message says what and where."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: tear down as for Ctrl-C, then exit with 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- options -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SocketSpec:
    """``PATH[,KEY=VALUE...]``: a socket and options for what is put in front of it."""

    path: Path
    options: tuple[tuple[str, str | None], ...] = ()

    @classmethod
    def parse(cls, text: str) -> SocketSpec:
        path, *items = text.split(",")
        if not path:
            raise argparse.ArgumentTypeError(f"expected PATH[,KEY=VALUE...], got {text!r}")
        options = []
        for item in items:
            key, sep, value = item.partition("=")
            if not key:
                raise argparse.ArgumentTypeError(f"empty option in {text!r}")
            options.append((key, value if sep else None))
        return cls(Path(path), tuple(options))

    def keys(self) -> set[str]:
        return {key for key, _ in self.options}

    def emulator_args(self) -> list[str]:
        """``virtio-emu`` options: ``virtio-id=N`` is ``--virtio-id N``, a bare key a flag."""
        options = list(self.options)
        if "virtio-id" not in self.keys():
            options.insert(0, ("virtio-id", str(DEFAULT_VIRTIO_ID)))
        return [
            a for key, value in options for a in (f"--{key}", *(() if value is None else (value,)))
        ]

    def native_device(self, chardev: str) -> str:
        """QEMU's ``-device`` for it: ``driver=`` names the device (default: QEMU's
        vhost-user-test-device-pci as virtio id 4 with one queue), the rest are its properties."""
        props = [(k, v) for k, v in self.options if k != "driver"]
        driver = dict(self.options).get("driver") or NATIVE_DRIVER
        if driver == NATIVE_DRIVER:
            defaults = [("virtio-id", str(DEFAULT_VIRTIO_ID)), ("num_vqs", "1")]
            props = [(k, v) for k, v in defaults if k not in self.keys()] + props
        fields = [driver, f"chardev={chardev}"]
        fields += [k if v is None else f"{k}={qemu_escape(v)}" for k, v in props]
        return ",".join(fields)


def qemu_escape(value: str) -> str:
    """A value inside QEMU's ``key=value,...`` syntax: commas doubled."""
    return value.replace(",", ",,")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=USAGE,
        description="Boot the cached Debian guest (QEMU 11.1, TCG) with the devices given, "
        "then run COMMAND in it (its stdout, stderr and exit status are this command's) or, "
        "with no COMMAND, give a shell on its serial console: `exit` leaves, or Ctrl-] x. "
        "The guest powers off afterwards. Every device option is repeatable.",
        epilog="The QEMU command line is printed on stderr before booting; it runs as it is "
        "when pasted. Exit status: the command's (the shell's), 128+N after signal N, "
        f"{FAILED} when {PROG} itself failed. The VM toolchain is built on first use "
        "(as `make toolchain`; root, minutes) in $VIRTIO_EMU_CACHE.",
    )
    parser.add_argument(
        "--vfio-user",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="attach the vfio-user server listening on PATH (a running virtio-emu)",
    )
    parser.add_argument(
        "--vhost-user",
        type=SocketSpec.parse,
        action="append",
        default=[],
        metavar="PATH[,OPTION=VALUE...]",
        help="start virtio-emu in front of the vhost-user back-end listening on PATH and attach "
        "it; OPTIONs are virtio-emu's without the dashes (default virtio-id=4)",
    )
    parser.add_argument(
        "--native",
        type=SocketSpec.parse,
        action="append",
        default=[],
        metavar="PATH[,PROPERTY=VALUE...]",
        help="give the back-end on PATH to QEMU's own device instead: driver=DEVICE (default "
        f"{NATIVE_DRIVER},virtio-id=4,num_vqs=1) and its properties",
    )
    parser.add_argument(
        "-t",
        "--tty",
        action="store_true",
        help="run COMMAND on the serial console as a terminal (for interactive programs; its "
        "output then comes through the console, stdout and stderr together)",
    )
    parser.add_argument("--memory", type=int, default=1024, metavar="MIB", help="guest RAM")
    parser.add_argument("--cpus", type=int, default=2, metavar="N")
    parser.add_argument(
        "--boot-timeout", type=float, default=BOOT_TIMEOUT, metavar="SECONDS",
        help="how long the guest may take to reach its agent",
    )  # fmt: skip
    parser.add_argument(
        "--logs",
        type=Path,
        metavar="DIR",
        help="keep QEMU's, the console's and the emulators' logs in DIR (default: a temporary "
        "directory, kept only when something failed)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="do not print the QEMU command line"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="say what happens")
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="run in the guest"
    )
    return parser


# --- QEMU's command line ----------------------------------------------------------------------


def wrapper_command() -> tuple[list[str], str]:
    """How to run ``virtio-emu-qemu``: the argv prefix, and how to print it so that it pastes
    (the bare name when the shell would find this same file, else its path)."""
    beside = Path(sys.executable).parent / WRAPPER
    if beside.exists():
        found = shutil.which(WRAPPER)
        shown = WRAPPER if found and Path(found).resolve() == beside.resolve() else str(beside)
        return [str(beside)], shown
    prefix = [sys.executable, "-m", "vm.qemu"]
    return prefix, shlex.join(prefix)


def terminal_spec() -> str:
    """``TERM ROWS COLS`` of our terminal, for the guest's console session."""
    term = os.environ.get("TERM") or "vt100"
    try:
        size = os.get_terminal_size(sys.stdin.fileno())
    except (OSError, ValueError):
        return f"{term} 0 0"
    return f"{term} {size.lines} {size.columns}"


def job_args(command: Sequence[str], tty: bool) -> list[str]:
    """The guest's one job, for vm/agent.py: a ``sh -c`` text, and whether it gets a terminal."""
    text = shlex.join(command) if command else LOGIN_SHELL
    args = ["-fw_cfg", f"name={JOB_NAME}/run,string={qemu_escape(text)}"]
    if tty or not command:
        args += ["-fw_cfg", f"name={JOB_NAME}/tty,string={qemu_escape(terminal_spec())}"]
    return args


def console_args() -> list[str]:
    """The serial console and QEMU's monitor on stdio, behind QEMU's escape key (Ctrl-])."""
    return [
        "-chardev", "stdio,id=console,mux=on,signal=off",
        "-serial", "chardev:console",
        "-object", "monitor-hmp,id=monitor,chardev=console",
        "-echr", ESCAPE,
    ]  # fmt: skip


def agent_args(path: Path) -> list[str]:
    """The agent's chardev as a client of our socket: QEMU connects, so nothing here waits for
    a path to appear; run by hand, QEMU warns once that nobody listens and the guest carries
    on without us."""
    return ["-chardev", f"socket,id=agent,path={path},reconnect-ms={AGENT_RECONNECT_MS}"]


# --- running it -------------------------------------------------------------------------------


@contextlib.contextmanager
def terminal_restored() -> Iterator[None]:
    """QEMU puts our terminal in raw mode and restores it, unless it is killed: we restore too."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    saved = termios.tcgetattr(fd) if fd >= 0 and os.isatty(fd) else None
    try:
        yield
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


TEARDOWN_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP for the block; they are delivered when it ends."""
    signal.pthread_sigmask(signal.SIG_BLOCK, TEARDOWN_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, TEARDOWN_SIGNALS)


def child_setup() -> None:
    """In QEMU's process before exec: signals as usual again, and death with us."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, TEARDOWN_SIGNALS)
    set_pdeathsig()


class QemuRun:
    """One QEMU process for the scenario: started, followed through the agent, stopped first.

    ``interactive``: QEMU gets our terminal (its stdio console is the user's); otherwise its
    console goes to ``console.log`` and it runs in a session of its own, so a Ctrl-C reaches
    only us and we stop everything in order.
    """

    def __init__(self, sc: Scenario, argv: Sequence[str], interactive: bool) -> None:
        self.sc = sc
        self.interactive = interactive
        self.console_log = sc.workdir / "console.log"
        self.qemu_log = sc.workdir / "qemu.log"
        self.listener = listening_socket(sc.sockdir / "agent.sock")
        sc.group.callback(self.listener.close)
        self.conn: socket.socket | None = None
        self.buffer = b""
        self.ready: dict[str, Any] = {}
        # A Ctrl-C between fork and the teardown knowing the pid would leave QEMU to
        # PR_SET_PDEATHSIG alone, after us; deferred, it arrives once stop() is registered.
        with contextlib.ExitStack() as files, signals_deferred():
            stderr = files.enter_context(open(self.qemu_log, "wb"))
            stdout: IO[bytes] | None = None
            if not interactive:
                stdout = files.enter_context(open(self.console_log, "wb"))
            self.proc = subprocess.Popen(
                argv,
                stdin=None if interactive else subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=not interactive,
                preexec_fn=child_setup,  # noqa: PLW1509 -- a sigmask and a prctl, no locks
            )
            self.pidfd = os.pidfd_open(self.proc.pid)
            sc.group.callback(lambda: os.close(self.pidfd))
            sc.group.first(self.stop)
        log.info("QEMU started: pid %d, logs in %s", self.proc.pid, sc.workdir)

    def tail(self, lines: int = 30) -> str:
        parts = []
        for path in (self.qemu_log, self.console_log):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> str | None:
        """SIGTERM if still running (QEMU then exits 0), SIGKILL as the last resort; what was
        not clean about its end."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return f"QEMU ignored SIGTERM for {STOP_TIMEOUT} s and was killed\n{self.tail()}"
        if self.proc.returncode != 0:
            return f"QEMU exited with {self.proc.returncode}\n{self.tail()}"
        return None

    def _exited(self, what: str) -> VmError:
        rc = self.proc.wait()
        return VmError(f"QEMU exited with {rc} {what}\n{self.tail()}")

    def _wait_readable(self, fd: int | socket.socket, deadline: float | None, what: str) -> None:
        """Until ``fd`` is readable; QEMU exiting first or the deadline passing is an error."""
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([fd, self.pidfd], [], [], timeout)
            if fd in readable:
                return
            if self.pidfd in readable:
                raise self._exited(f"while waiting for {what}")
            if deadline is not None and time.monotonic() >= deadline:
                raise VmError(f"timed out waiting for {what}\n{self.tail()}")

    def events(self, boot_timeout: float) -> Iterator[dict[str, Any]]:
        """The agent's messages; QEMU connects at start, the agent speaks once the guest is up."""
        deadline = time.monotonic() + boot_timeout
        self._wait_readable(self.listener, deadline, "QEMU to connect the agent's port")
        self.conn, _ = self.listener.accept()
        while True:
            while b"\n" not in self.buffer:
                waiting = "the guest's agent" if not self.ready else "the guest's command"
                self._wait_readable(self.conn, None if self.ready else deadline, waiting)
                chunk = self.conn.recv(65536)
                if not chunk:
                    raise self._exited("after closing the agent's port")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\n", 1)
            try:
                message: dict[str, Any] = json.loads(line)
            except ValueError as exc:
                raise VmError(f"the agent sent {line[:200]!r}: {exc}") from None
            if message.get("event") == "ready":
                self.ready = message
            yield message

    def follow(self, boot_timeout: float) -> int:
        """Copy the command's output to ours until it ends; its exit status. The guest then
        powers off by itself and QEMU must exit 0."""
        outputs = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
        start = time.monotonic()
        rc: int | None = None
        try:
            for event in self.events(boot_timeout):
                kind = event.get("event")
                if kind == "ready":
                    log.info(
                        "guest up after %.1f s (kernel %s)",
                        time.monotonic() - start,
                        event.get("kernel"),
                    )
                elif kind == "output":
                    out = outputs[str(event["stream"])]
                    out.write(str(event["data"]).encode("utf-8", "surrogateescape"))
                    out.flush()
                elif kind == "exit":
                    rc = int(event["rc"])
                    break
        except VmError:
            # Ctrl-] x quits QEMU (status 0) with the shell still running: the user left.
            if self.interactive and self.proc.poll() == 0:
                return 0
            raise
        try:
            self.proc.wait(POWEROFF_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise VmError(
                f"the guest did not power off within {POWEROFF_TIMEOUT} s\n{self.tail()}"
            ) from None
        log.info("QEMU exited with %s after %.1f s", self.proc.returncode, time.monotonic() - start)
        assert rc is not None  # events() ends only by the break above or by raising
        return rc


def device_args(sc: Scenario, args: argparse.Namespace) -> list[str]:
    """Start an emulator per ``--vhost-user``; QEMU's arguments for every device, in order of
    kind (vfio-user servers given, our emulators, QEMU's own devices)."""
    qemu: list[str] = []
    for path in args.vfio_user:
        require_socket(path, "vfio-user server (virtio-emu --vfio-user-socket)")
        qemu += vfio_user_device_args(path)
    for index, spec in enumerate(args.vhost_user):
        require_socket(spec.path, "vhost-user back-end")
        emulator = sc.start_emulator(spec.path, *spec.emulator_args(), index=index)
        log.info("emulator%d: %s -> %s", index, emulator.path, spec.path)
        qemu += vfio_user_device_args(emulator.path)
    for index, spec in enumerate(args.native):
        require_socket(spec.path, "vhost-user back-end")
        chardev = f"native{index}"
        qemu += [
            "-chardev", f"socket,id={chardev},path={qemu_escape(str(spec.path))}",
            "-device", spec.native_device(chardev),
        ]  # fmt: skip
    return qemu


def require_socket(path: Path, what: str) -> None:
    if not path.is_socket():
        raise VmError(f"no {what} at {path}: start it first")


def toolchain_with_message(quiet: bool) -> Toolchain:
    """The cached toolchain; if a step must be built, say so once and show its progress."""
    announced = False

    def progress(line: str) -> None:
        nonlocal announced
        if ": up to date (" in line or line.endswith(": present"):
            log.debug("%s", line)
            return
        if line.endswith(" ...") and not announced:
            announced = True
            print(
                f"{PROG}: building the VM toolchain in {default_cache_dir()} (as `make "
                "toolchain` does; needs root, takes minutes the first time, cached after)",
                file=sys.stderr,
                flush=True,
            )
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    return ensure_toolchain(progress=progress)


def run(args: argparse.Namespace) -> int:
    """Boot, run, tear down. The logs stay (and are named) when something failed, or in
    ``--logs DIR``; after a clean run or an interrupt a temporary workdir goes away."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    interactive = args.tty or not command
    if interactive and not os.isatty(0):
        log.warning("stdin is not a terminal; the guest's console session reads it anyway")
    toolchain = toolchain_with_message(args.quiet)
    workdir = args.logs or Path(tempfile.mkdtemp(prefix=f"{PROG}-"))
    keep = True
    try:
        rc = boot(args, toolchain, workdir, command, interactive)
        keep = False
        return rc
    except (KeyboardInterrupt, Interrupted):
        keep = False
        raise
    finally:
        if args.logs is None and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif keep:
            print(f"{PROG}: logs kept in {workdir}", file=sys.stderr)


def boot(
    args: argparse.Namespace,
    toolchain: Toolchain,
    workdir: Path,
    command: list[str],
    interactive: bool,
) -> int:
    accel = select_accel(toolchain.cache, str(toolchain.read_manifest()["digest"]))
    with Scenario.open("vm", toolchain, workdir=workdir) as sc:
        sc.group.new_session = True  # Ctrl-C is ours: we stop everything in order
        devices = device_args(sc, args)
        qemu_args = [
            *guest_args(toolchain, accel, memory_mib=args.memory, cpus=args.cpus),
            *agent_args(sc.sockdir / "agent.sock"),
            *console_args(),
            *job_args(command, args.tty),
            *devices,
        ]
        prefix, shown = wrapper_command()
        if not args.quiet:
            print(f"{PROG}: QEMU command line:", file=sys.stderr)
            print(f"{shown} {shlex.join(qemu_args)}", file=sys.stderr, flush=True)
            if interactive:
                print(
                    f"{PROG}: booting (about half a minute under TCG); the shell comes up "
                    "here. `exit` leaves, or Ctrl-] x.",
                    file=sys.stderr,
                    flush=True,
                )
        with terminal_restored() if interactive else contextlib.nullcontext():
            qemu = QemuRun(sc, [*prefix, *qemu_args], interactive)
            return qemu.follow(args.boot_timeout)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"{PROG}: %(message)s",
    )
    # Its "scenario failed; logs kept" is said here, once, and not after an interrupt.
    logging.getLogger("vm.scenario").setLevel(logging.INFO if args.verbose else logging.CRITICAL)

    def interrupted(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; everything stopped", file=sys.stderr)
        return 128 + signal.SIGINT
    except Interrupted as exc:
        return 128 + exc.signum
    except (VmError, ScenarioError, ToolchainError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
