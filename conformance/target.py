"""The back-end under test: a socket someone else runs, or ``-- CMD`` that the tool runs.

With a command the tool picks the socket path, substitutes ``{socket}`` in the arguments,
starts it in its own process group (its output goes to a log file beside the socket), waits
until the socket accepts, and can restart it for checks that need a fresh back-end. Without
one, ``can_restart`` is False and such checks say so.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from wire.unix import connect_unix

SOCKET_PLACEHOLDER = "{socket}"
STOP_GRACE = 3.0


class TargetError(Exception):
    """The back-end could not be reached or started (exit status 2)."""


class Target:
    """Where the back-end listens, and (with a command) its process."""

    def __init__(
        self, socket_path: str | None, command: Sequence[str] | None, start_timeout: float
    ) -> None:
        self.command = list(command) if command else None
        self.start_timeout = start_timeout
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if self.command is not None:
            self._tmp = tempfile.TemporaryDirectory(prefix="check-backend-")
            self.path = socket_path or str(Path(self._tmp.name) / "backend.sock")
            self.log = Path(self._tmp.name) / "backend.log"
        elif socket_path is not None:
            self.path = socket_path
        else:
            raise TargetError("give --socket PATH or -- CMD ARGS...")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        #: Exit statuses of back-end processes that ended while the tool ran.
        self.exits: list[int] = []

    @property
    def can_restart(self) -> bool:
        return self.command is not None

    def argv(self) -> list[str]:
        assert self.command is not None
        return [arg.replace(SOCKET_PLACEHOLDER, self.path) for arg in self.command]

    def start(self) -> None:
        """Start the command (if any) and wait until its socket exists."""
        if self.command is None:
            if not os.path.exists(self.path):
                raise TargetError(f"no socket at {self.path}")
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with open(self.log, "ab") as log:
            try:
                self.proc = subprocess.Popen(
                    self.argv(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise TargetError(f"cannot start {self.command[0]}: {exc}") from exc
        self.starts += 1
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                status = self.proc.returncode
                self.proc = None
                raise TargetError(f"{self.command[0]} exited with status {status}: {self.tail()}")
            if os.path.exists(self.path):
                return
            time.sleep(0.05)
        self.stop()
        raise TargetError(
            f"{self.command[0]} did not listen on {self.path} within "
            f"{self.start_timeout:g} s: {self.tail()}"
        )

    def connect(self, timeout: float) -> socket.socket:
        """A connected socket, retrying while the back-end is busy or not yet listening (a
        back-end serving one front-end at a time may have a full backlog for a moment)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = connect_unix(self.path, timeout)
            except (BlockingIOError, ConnectionRefusedError, FileNotFoundError) as exc:
                if self.proc is not None and self.proc.poll() is not None:
                    raise TargetError(
                        f"the back-end exited (status {self.proc.returncode})"
                    ) from exc
                if time.monotonic() >= deadline:
                    raise TargetError(f"cannot connect to {self.path}: {exc}") from exc
                time.sleep(0.05)
                continue
            except OSError as exc:
                raise TargetError(f"cannot connect to {self.path}: {exc}") from exc
            sock.settimeout(None)
            return sock

    def status(self) -> int | None:
        """The process's exit status once it ended (negative: killed by that signal)."""
        if self.proc is None:
            return None
        return self.proc.poll()

    def wait_exit(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def ensure(self) -> None:
        """Restart a ``-- CMD`` back-end that went away (a running one is left alone)."""
        if self.command is not None and (self.proc is None or self.proc.poll() is not None):
            self.stop()
            self.start()

    def restart(self) -> None:
        if self.command is None:
            raise TargetError("no command to restart the back-end with")
        self.stop()
        self.start()

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after a grace period."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        else:
            self.exits.append(proc.returncode)

    def tail(self, lines: int = 5) -> str:
        if self.command is None or not self.log.exists():
            return ""
        text = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def close(self) -> None:
        """Stop the back-end; its log stays readable (``tail``) until ``cleanup``."""
        self.stop()

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
