"""One child process with its output collected line by line, and a group that stops them in order.

A ``Process`` reads the child's stderr (and stdout, unless told otherwise) in a thread, keeps
every line, optionally appends them to a log file, and lets a caller wait for a line as an event
with a timeout: nothing polls with sleeps. A child that ends while someone waits fails the wait at
once, with its log. ``stop()`` sends SIGTERM and checks what a clean exit means for it (an exit
status it is allowed, and its listening socket removed); SIGKILL is the last resort and makes the
stop unclean. Children carry ``PR_SET_PDEATHSIG`` so nothing outlives the Python process.

A ``ProcessGroup`` owns teardown order: whatever was registered with ``first()`` (a guest: QEMU
must be gone before the processes it talks to) closes first, then every process stops in reverse
start order. ``close()`` says what was not clean; ``check()`` raises ``TeardownError`` for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1

T = TypeVar("T")


class ProcessFailed(AssertionError):
    """A process did not start, log or stop as expected; the message carries its log."""


class TeardownError(Exception):
    """Something did not stop cleanly (killed, a bad exit status, a socket left behind)."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("unclean teardown:\n" + "\n".join(problems))
        self.problems = list(problems)


def set_pdeathsig() -> None:
    """Runs in a child before exec: it dies with us even if we are SIGKILLed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def foreground_job_signals() -> None:
    """Runs in a child before exec: SIGINT and SIGQUIT as a terminal's foreground job has them.

    A shell without job control starts background commands with both ignored (CI may run the
    suite that way), the ignored disposition survives exec, and Python then never raises
    KeyboardInterrupt: a test that plays Ctrl-C must undo that.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def listening_socket(path: Path) -> socket.socket:
    """A bound, listening UNIX socket to hand to a child as an fd.

    The socket exists before the child starts, so whoever connects next needs no wait for the
    path to appear.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


class Process:
    """A running child; its output lines are at hand in ``lines()``, ``log()`` and ``tail()``.

    ``socket_path`` is the socket it listens on (``path``); a clean stop must remove it.
    ``clean_exit`` lists the exit statuses that count as a clean stop after SIGTERM.
    ``new_session`` starts it in a session of its own, out of reach of the terminal's Ctrl-C, so
    a command line tool that owns it stops it in order instead.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        log_path: Path | None = None,
        socket_path: Path | None = None,
        with_stdout: bool = True,
        clean_exit: Collection[int] = (0,),
        new_session: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.socket_path = socket_path
        self.clean_exit = clean_exit
        self.returncode: int | None = None
        #: Why the last stop was not clean, or None.
        self.unclean: str | None = None
        self._lines: list[str] = []
        self._eof = False
        self._cond = threading.Condition()
        self._proc = subprocess.Popen(
            self.argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if with_stdout else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if with_stdout else subprocess.PIPE,
            env=env,
            pass_fds=tuple(pass_fds),
            preexec_fn=set_pdeathsig,  # noqa: PLW1509 -- only a prctl, no locks taken
            start_new_session=new_session,
        )
        stream = self._proc.stdout if with_stdout else self._proc.stderr
        assert stream is not None
        self._stream = stream
        self._thread = threading.Thread(target=self._pump, name=f"log-{name}", daemon=True)
        self._thread.start()
        log.debug("%s: pid %d: %s", name, self._proc.pid, " ".join(self.argv))

    # --- state -----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    @property
    def path(self) -> Path:
        """The socket this process listens on."""
        if self.socket_path is None:
            raise self.fail("has no socket")
        return self.socket_path

    def send_signal(self, signum: int) -> None:
        self._proc.send_signal(signum)

    # --- output ----------------------------------------------------------------------------

    def _pump(self) -> None:
        with open(self.log_path, "ab") if self.log_path else contextlib.nullcontext() as out:
            for raw in self._stream:
                if out is not None:
                    out.write(raw)
                    out.flush()
                with self._cond:
                    self._lines.append(raw.decode(errors="replace").rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def lines(self, pattern: str = "") -> list[str]:
        """Every output line so far matching the regex ``pattern``."""
        regex = re.compile(pattern)
        with self._cond:
            return [line for line in self._lines if regex.search(line)]

    def log(self) -> str:
        with self._cond:
            return "\n".join(self._lines)

    def tail(self, lines: int = 40) -> str:
        with self._cond:
            text = self._lines[-lines:]
        where = f": {self.log_path}" if self.log_path else ""
        return f"--- {self.name}{where} (last {len(text)} lines)\n" + "\n".join(text)

    def fail(self, message: str) -> ProcessFailed:
        return ProcessFailed(f"{self.name} (pid {self.pid}): {message}\n--- log ---\n{self.log()}")

    def mark(self) -> int:
        """The current end of the output, to wait only for lines logged after this point."""
        with self._cond:
            return len(self._lines)

    def wait_for_log(
        self, pattern: str, *, timeout: float = START_TIMEOUT, start: int = 0, regex: bool = False
    ) -> int:
        """Index of the first line from ``start`` on containing ``pattern`` (or matching it as a
        regex); fails at once when the process ends, or when ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        compiled = re.compile(pattern) if regex else None
        with self._cond:
            index = start
            while True:
                while index < len(self._lines):
                    line = self._lines[index]
                    if compiled.search(line) if compiled else pattern in line:
                        return index
                    index += 1
                if self._eof:
                    raise self.fail(f"exited ({self._proc.wait()}) before logging {pattern!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self.fail(f"no log line {pattern!r} within {timeout} s")
                self._cond.wait(remaining)

    def line(self, index: int) -> str:
        with self._cond:
            return self._lines[index]

    # --- ending ----------------------------------------------------------------------------

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to end by itself; its exit status."""
        try:
            self.returncode = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self.fail(f"still running after {timeout} s") from None
        self._finish()
        return self.returncode

    def stop(self, timeout: float = STOP_TIMEOUT, *, check: bool = True) -> int:
        """SIGTERM, SIGKILL after ``timeout``; the exit status. Unless the stop was clean (an
        allowed status, socket removed, no kill) ``unclean`` says why and, with ``check``,
        ``ProcessFailed`` is raised."""
        killed = False
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %.0f s; killing it", self.name, timeout)
                self._proc.kill()
                killed = True
        self.returncode = self._proc.wait()
        self._finish()
        if killed:
            self.unclean = f"killed after ignoring SIGTERM for {timeout} s"
        elif self.returncode not in self.clean_exit:
            self.unclean = f"exit status {self.returncode} after SIGTERM"
        elif self.socket_path is not None and self.socket_path.exists():
            self.unclean = f"left its socket {self.socket_path} behind"
        if self.unclean is not None and check:
            raise self.fail(self.unclean)
        return self.returncode

    def kill(self) -> None:
        """SIGKILL (a crash on purpose, or clean-up after a failure); reaps the process."""
        if self._proc.poll() is None:
            self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.returncode = self._proc.wait(STOP_TIMEOUT)
        self._finish()

    def _finish(self) -> None:
        self._thread.join(STOP_TIMEOUT)
        if not self._thread.is_alive():
            self._stream.close()


class ProcessGroup:
    """Processes started together in ``workdir``; ``close()`` ends them in teardown order.

    Whatever was registered with ``first()`` closes first, in reverse order (a guest: QEMU has
    exited before the emulator and back-ends it talks to stop); then every process still running
    stops with SIGTERM in reverse start order; then the ``callback()`` clean-ups run.
    ``new_session`` is the default of every ``start()`` (see ``Process``).
    """

    def __init__(
        self, workdir: Path, stop_timeout: float = STOP_TIMEOUT, new_session: bool = False
    ) -> None:
        self.workdir = workdir
        self.stop_timeout = stop_timeout
        self.new_session = new_session
        self.processes: list[Process] = []
        self._first: list[Callable[[], str | None]] = []
        self._last = contextlib.ExitStack()
        self.problems: list[str] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_file: bool = False,
        **options: object,
    ) -> Process:
        """Start ``argv`` as ``name`` (made unique); ``log_file`` also writes ``workdir/NAME.log``.

        ``options`` are those of ``Process`` (``cwd`` defaults to ``workdir``).
        """
        if any(p.name == name for p in self.processes):
            name = f"{name}#{len(self.processes)}"
        options.setdefault("cwd", self.workdir)
        options.setdefault("new_session", self.new_session)
        if log_file:
            options["log_path"] = self.workdir / f"{name}.log"
        proc = Process(name, argv, **options)  # type: ignore[arg-type]
        self.processes.append(proc)
        return proc

    def first(self, close: Callable[[], str | None]) -> None:
        """Run ``close`` before any process stops; it returns what was not clean, or None."""
        self._first.append(close)

    def callback(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` after every process stopped (closing clients, removing directories)."""
        self._last.callback(fn)

    def enter_first(
        self,
        cm: contextlib.AbstractContextManager[T],
        check: Callable[[T], str | None] | None = None,
    ) -> T:
        """Enter ``cm`` now and exit it before any process stops (a guest's ``boot``); then
        ``check(value)`` says what was not clean about it, if anything."""
        value = cm.__enter__()

        def close() -> str | None:
            cm.__exit__(None, None, None)
            return None if check is None else check(value)

        self.first(close)
        return value

    def close(self) -> list[str]:
        """Stop everything in teardown order; what was not clean (also kept in ``problems``)."""
        problems: list[str] = []
        try:
            while self._first:
                try:
                    problem = self._first.pop()()
                except Exception as exc:  # keep tearing down; report it
                    problem = f"{type(exc).__name__}: {exc}"
                if problem:
                    problems.append(problem)
            for proc in reversed(self.processes):
                if proc.returncode is None:  # running, or ended by itself: check how
                    proc.stop(self.stop_timeout, check=False)
                    log.info("%s exited with %s", proc.name, proc.returncode)
                if proc.unclean is not None:
                    problems.append(f"{proc.name}: {proc.unclean}\n{proc.tail(20)}")
                    proc.unclean = None
        finally:
            self._last.close()
        self.problems += problems
        return problems

    def check(self) -> None:
        """``close()``, raising ``TeardownError`` when anything was not clean."""
        problems = self.close()
        if problems:
            raise TeardownError(problems)

    def kill_all(self) -> None:
        """After a failure: close what goes first, kill every process, run the clean-ups."""
        try:
            while self._first:
                with contextlib.suppress(Exception):
                    self._first.pop()()
            for proc in reversed(self.processes):
                proc.kill()
        finally:
            self._last.close()

    def logs(self) -> str:
        return "\n".join(f"=== {p.name}: {' '.join(p.argv)}\n{p.log()}" for p in self.processes)

    def failure_report(self, lines: int = 40) -> str:
        return "\n".join(proc.tail(lines) for proc in self.processes)

    @contextlib.contextmanager
    def running(self) -> Iterator[ProcessGroup]:
        """The group for a block: a clean block ends with ``check()``; a failing one still
        stops everything (in order) and lets the block's own exception through."""
        try:
            yield self
        except BaseException:
            problems = self.close()
            if problems:
                log.error("teardown after a failure was not clean either: %s", problems)
            raise
        self.check()
