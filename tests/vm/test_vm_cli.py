"""``virtio-emu-vm`` and ``virtio-emu-qemu`` as a user runs them, README commands included.

The README's "Running it by hand" block is read from README.md and its commands run as they are
written (only ``/tmp/`` becomes a private directory), so the documentation cannot drift from
what works. Three boots in all: the README's command, the README's shell on a pseudo-terminal,
and one command that fails, with every kind of device attached.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import shlex
import shutil
import signal
import struct
import subprocess
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit import (
    LISTENING_LINE,
    ProcessGroup,
    foreground_job_signals,
    start_emulator,
    start_shmem_backend,
)
from tests.helpers.docs import BIN, readme_block, user_env, without_comment
from vm.toolchain import Toolchain

RUN_TIMEOUT = 240.0
PROMPT = rb"root@vguest:~# "
#: The reference device as ``vguest list`` prints it (virtio-rng, PCI id 0x1040 + 4).
REFERENCE_DEVICE = b"1af4:1044 virtio id 4"


def printed_qemu_line(stderr: str) -> str:
    lines = stderr.splitlines()
    index = next(i for i, line in enumerate(lines) if "QEMU command line:" in line)
    return lines[index + 1].strip()


def processes_mentioning(text: str) -> list[str]:
    """Processes whose command line contains ``text`` (a directory only one run used)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if text.encode() in cmdline:
                found.append(f"{pid}: {cmdline.replace(bytes(1), b' ')[:200]!r}")
    return found


def assert_nothing_left(qemu_line: str) -> None:
    """Every socket of the run was in one directory: it is gone, and no process names it."""
    match = re.search(r"path=(/\S+)/agent\.sock", qemu_line)
    assert match, qemu_line
    sockdir = match.group(1)
    assert processes_mentioning(sockdir) == []
    assert not Path(sockdir).exists()


class Terminal:
    """A program on a pseudo-terminal of its own, as an interactive shell would run it: its
    controlling terminal, in the foreground, with a window size."""

    def __init__(
        self, argv: list[str], env: dict[str, str], rows: int = 40, cols: int = 100
    ) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
            preexec_fn=self._foreground,  # noqa: PLW1509 -- an ioctl and two signal() calls
        )
        os.close(slave)
        self.output = b""
        self._seen = 0

    def expect(self, pattern: bytes, timeout: float = 60.0) -> re.Match[bytes]:
        """Wait for ``pattern`` (a regex) in the output after the last match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not (match := regex.search(self.output, self._seen)):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(remaining):
                raise AssertionError(f"no {pattern!r} in:\n{self.output[-3000:]!r}")
        self._seen = match.end()
        return match

    def _read(self, timeout: float) -> bool:
        readable, _, _ = select.select([self.master], [], [], timeout)
        if not readable:
            return False
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: every slave fd is closed, the program ended
            return False
        self.output += chunk
        return bool(chunk)

    @staticmethod
    def _foreground() -> None:
        """In the child: the pty is its controlling terminal, its signals a foreground job's."""
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        foreground_job_signals()

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 90.0) -> int:
        rc = self.proc.wait(timeout)
        while self._read(0.2):  # what it wrote last
            pass
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        os.close(self.master)


@pytest.fixture(scope="module")
def private_tmp() -> Iterator[Path]:
    """Stands for the README's /tmp (short: UNIX socket paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vmcli-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def readme_commands(private_tmp: Path) -> list[str]:
    commands = readme_block("tests/vm/test_vm_cli.py runs the commands of this block")
    return [without_comment(c).replace("/tmp/", f"{private_tmp}/") for c in commands]


@pytest.fixture(scope="module")
def readme_backend(
    toolchain: Toolchain, readme_commands: list[str], private_tmp: Path
) -> Iterator[ProcessGroup]:
    """The README's first command, a back-end in the background, running for both guests."""
    line = readme_commands[0]
    assert line.startswith("vhost-device-shmem ") and line.endswith("&"), line
    argv = shlex.split(line.removesuffix("&"))
    socket_path = Path(argv[argv.index("--socket-path") + 1])
    group = ProcessGroup(private_tmp)
    with group.running():
        backend = group.start(
            "readme-backend", [str(BIN / argv[0]), *argv[1:]], socket_path=socket_path
        )
        backend.wait_for_log(LISTENING_LINE + str(socket_path))
        yield group
        assert backend.running, "the back-end must serve one guest after the other"


@pytest.mark.vm
def test_readme_command_prints_the_device_and_exits_0(
    readme_backend: ProcessGroup, readme_commands: list[str]
) -> None:
    line = readme_commands[1]
    assert line.startswith("virtio-emu-vm ") and " -- vguest list" in line, line
    proc = subprocess.run(
        line, shell=True, capture_output=True, env=user_env(), timeout=RUN_TIMEOUT, check=False
    )
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, stderr
    assert REFERENCE_DEVICE in proc.stdout
    assert b"shm 0: BAR 4 offset 0x0 length 0x400000" in proc.stdout
    assert b"QEMU command line" not in proc.stdout  # stdout is the guest command's alone
    qemu_line = printed_qemu_line(stderr)
    assert shlex.split(qemu_line)[0] == "virtio-emu-qemu"  # found on the user's PATH
    assert_nothing_left(qemu_line)


@pytest.mark.vm
def test_readme_shell_is_a_terminal_and_exit_leaves_nothing_running(
    readme_backend: ProcessGroup, readme_commands: list[str]
) -> None:
    line = readme_commands[2]
    assert line.startswith("virtio-emu-vm ") and " -- " not in line, line
    term = Terminal(["/bin/sh", "-c", line], {**user_env(), "TERM": "xterm"})
    try:
        term.expect(rb"QEMU command line:")
        qemu_line = term.expect(rb"\n([^\r\n]*virtio-emu-qemu [^\r\n]*)\r?\n").group(1).decode()
        term.expect(PROMPT, timeout=RUN_TIMEOUT)  # the boot
        term.send("echo hi-$((1+1))\r")
        term.expect(rb"[\r\n]hi-2\r*\n")  # the echoed command line has no "hi-2" in it
        term.send("tty; stty size; echo $TERM; vguest list\r")
        term.expect(rb"[\r\n]/dev/ttyS0\r*\n40 100\r*\nxterm\r*\n")
        term.expect(REFERENCE_DEVICE)
        term.expect(PROMPT)
        term.send("exit\r")
        assert term.wait() == 0, term.output[-2000:]
    finally:
        term.close()
    assert b"reboot: Power down" in term.output  # the guest powered off; QEMU exited 0
    assert_nothing_left(qemu_line)


@pytest.mark.vm
def test_failing_command_passes_its_status_and_exact_output_with_every_kind_of_device(
    toolchain: Toolchain, private_tmp: Path
) -> None:
    """One back-end behind an emulator we started (--vfio-user), one behind an emulator the
    command starts (--vhost-user), one behind QEMU's own device (--native)."""
    work = private_tmp / "kinds"
    work.mkdir()
    group = ProcessGroup(work)
    with group.running():
        backends = [
            start_shmem_backend(group, work / f"be{i}.sock", name=f"backend{i}") for i in range(3)
        ]
        emulator = start_emulator(
            group, work / "emu.sock", "--vhost-user-socket", str(backends[0].path),
            "--virtio-id", "4",
        )  # fmt: skip
        script = "vguest list; printf 'raw:\\377\\n'; echo to-stderr >&2; exit 7"
        argv = [
            "virtio-emu-vm",
            "--vfio-user", str(emulator.path),
            "--vhost-user", f"{backends[1].path},virtio-id=4,num-queues=1",
            "--native", str(backends[2].path),
            "--", "sh", "-c", script,
        ]  # fmt: skip
        proc = subprocess.run(
            argv, capture_output=True, env=user_env(), timeout=RUN_TIMEOUT, check=False
        )
        stderr = proc.stderr.decode(errors="replace")
        assert proc.returncode == 7, stderr
        assert proc.stdout.count(REFERENCE_DEVICE) == 3
        assert proc.stdout.endswith(b"raw:\xff\n")  # bytes as the guest wrote them
        assert stderr.endswith("to-stderr\n")
        qemu_line = printed_qemu_line(stderr)
        words = shlex.split(qemu_line)
        assert shutil.which(words[0], path=user_env()["PATH"]) == str(BIN / "virtio-emu-qemu")
        assert f"name=opt/org.virtio-emu/run,string={shlex.join(['sh', '-c', script])}" in words
        assert_nothing_left(qemu_line)
        assert emulator.running  # ours, not the command's: it waits for the next client
        assert all(b.running for b in backends)


@pytest.mark.qemu
def test_readme_wrapper_commands_are_qemu_11_1_with_vfio_user(toolchain: Toolchain) -> None:
    commands = readme_block("tests/vm/test_vm_cli.py runs these two")
    assert len(commands) == 2
    outputs = []
    for command in commands:
        proc = subprocess.run(
            ["/bin/bash", "-o", "pipefail", "-c", without_comment(command)],
            capture_output=True,
            text=True,
            env=user_env(),
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert outputs[0].startswith("QEMU emulator version 11.1.")
    assert '"vfio-user-pci"' in outputs[1]


@pytest.mark.qemu
def test_ctrl_c_stops_qemu_and_the_emulator_and_leaves_the_back_end_serving(
    toolchain: Toolchain, private_tmp: Path
) -> None:
    """Ctrl-C while the guest boots: the terminal sends SIGINT to the whole foreground process
    group, as ``killpg`` does here; only virtio-emu-vm is in it, and it stops the rest."""
    work = private_tmp / "ctrl-c"
    work.mkdir()
    group = ProcessGroup(work)
    with group.running():
        backend = start_shmem_backend(group, work / "be.sock")
        tool = subprocess.Popen(
            ["virtio-emu-vm", "-v", "--vhost-user", str(backend.path), "--", "sleep", "600"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=user_env(),
            start_new_session=True,
            preexec_fn=foreground_job_signals,  # noqa: PLW1509 -- two signal() calls
        )
        try:
            assert tool.stderr is not None
            lines = iter(tool.stderr.readline, b"")
            qemu_line = ""
            for raw in lines:
                if b"QEMU command line:" in raw:
                    qemu_line = next(lines).decode().strip()
                if b"QEMU started: pid" in raw:
                    break
            sockdir = re.search(r"path=(/\S+)/agent\.sock", qemu_line)
            assert sockdir, qemu_line
            assert len(processes_mentioning(sockdir.group(1))) == 2  # the emulator and QEMU
            os.killpg(tool.pid, signal.SIGINT)
            _, stderr = tool.communicate(timeout=60)
        finally:
            if tool.poll() is None:
                tool.kill()
                tool.wait()
        assert tool.returncode == 130, stderr.decode(errors="replace")
        assert b"interrupted; everything stopped" in stderr
        assert_nothing_left(qemu_line)
        assert backend.running
