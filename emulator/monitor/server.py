"""The monitor socket, served on the emulator's own event loop: no thread, because what the
commands read (device state, the mapping table, the counters) belongs to the loop.

Nothing a client does may disturb the emulator, so everything is non-blocking and bounded:

- the socket is created owner-only (mode 0600: it can reset the device and drop mappings),
  bound under a umask so there is no moment with wider permissions;
- at most ``MAX_CLIENTS`` at once; each wake-up reads once (``RECV_SIZE``) and answers at
  most ``REQUESTS_PER_WAKEUP`` requests, the rest on the next loop turn, so a flood of
  requests is interleaved with guest accesses;
- a reply the socket cannot take at once is kept and the client is not read until it has
  left (``EventLoop.add_writer``): one pending reply per client, however slow it reads;
- a line that is not a request gets an error reply and the connection stays; a line
  longer than ``MAX_LINE`` closes it; a half line waits for its end or is dropped with
  its client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emulator.loop import EventLoop
from emulator.monitor.commands import Command
from emulator.monitor.protocol import (
    GREETING_KEY,
    MAX_LINE,
    PROTOCOL_VERSION,
    VERSION,
    ErrorClass,
    MonitorError,
)

logger = logging.getLogger(__name__)

MAX_CLIENTS = 16
RECV_SIZE = 64 << 10
REQUESTS_PER_WAKEUP = 8
_REQUEST_KEYS = frozenset({"execute", "arguments", "id"})


class _Client:
    """One connection: bytes received but not yet a whole line, and a reply not yet sent."""

    __slots__ = ("inbuf", "name", "outbuf", "resume_pending", "sock", "writing")

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.writing = False
        self.resume_pending = False


class MonitorServer:
    """Serves ``commands`` (``MonitorCommands.table``: name -> command) on the UNIX socket
    ``path`` from ``loop``."""

    def __init__(self, path: Path, loop: EventLoop, commands: Mapping[str, Command]) -> None:
        self.path = path
        self.loop = loop
        self.commands = commands
        self._listener: socket.socket | None = None
        self._clients: dict[int, _Client] = {}
        self._accepted = 0
        self._greeting = b""

    def listen(self) -> None:
        """Bind ``path`` owner-only (replacing a stale socket) and start accepting."""
        info = {"version": VERSION, "protocol": PROTOCOL_VERSION, "commands": sorted(self.commands)}
        self._greeting = _line({GREETING_KEY: info})
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o177)
            try:
                listener.bind(str(self.path))
            finally:
                os.umask(old)
            listener.listen(MAX_CLIENTS)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self.loop.add_reader(listener.fileno(), self._accept)
        logger.info("monitor listening on %s", self.path)

    def close(self) -> None:
        """Close every client, stop listening and remove the socket file."""
        for client in list(self._clients.values()):
            self._drop(client, "monitor closing")
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    @property
    def clients(self) -> int:
        return len(self._clients)

    # -- connections -----------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE and friends: the emulator goes on
            logger.warning("monitor: cannot accept a client: %s", exc)
            return
        sock.setblocking(False)
        if len(self._clients) >= MAX_CLIENTS:
            with contextlib.suppress(OSError):
                error = _error(ErrorClass.GENERIC_ERROR, f"more than {MAX_CLIENTS} clients")
                sock.send(_line(error))
            sock.close()
            logger.warning("monitor: refused a client beyond %d", MAX_CLIENTS)
            return
        self._accepted += 1
        client = _Client(sock, f"client {self._accepted}")
        self._clients[sock.fileno()] = client
        self.loop.add_reader(sock.fileno(), lambda: self._on_readable(client))
        logger.debug("monitor: %s connected", client.name)
        self._send(client, self._greeting)

    def _drop(self, client: _Client, reason: str) -> None:
        fd = client.sock.fileno()
        if self._clients.get(fd) is not client:
            return
        del self._clients[fd]
        self.loop.remove_reader(fd)  # also a writer: one callback per fd
        client.sock.close()
        logger.debug("monitor: %s gone: %s", client.name, reason)

    # -- in ----------------------------------------------------------------------------------

    def _on_readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(client, str(exc))
            return
        if not data:
            self._drop(client, "end of stream" + (" in a line" if client.inbuf else ""))
            return
        client.inbuf += data
        self._process(client)

    def _process(self, client: _Client) -> None:
        """Answer the complete lines, a batch per call, while nothing waits to be sent."""
        for _ in range(REQUESTS_PER_WAKEUP):
            if client.writing or self._clients.get(client.sock.fileno()) is not client:
                return
            end = client.inbuf.find(b"\n")
            if end < 0:
                if len(client.inbuf) > MAX_LINE:
                    self._refuse_long_line(client)
                return
            line = bytes(client.inbuf[:end])
            del client.inbuf[: end + 1]
            if line.strip():
                self._send(client, _line(self._answer(line)))
        if b"\n" in client.inbuf and not client.resume_pending:
            client.resume_pending = True
            self.loop.call_later(0, lambda: self._resume(client))

    def _resume(self, client: _Client) -> None:
        client.resume_pending = False
        self._process(client)

    def _refuse_long_line(self, client: _Client) -> None:
        error = _error(ErrorClass.INVALID_REQUEST, f"line longer than {MAX_LINE} bytes")
        with contextlib.suppress(OSError):
            client.sock.send(_line(error))
        self._drop(client, "line too long")

    def _answer(self, line: bytes) -> dict[str, Any]:
        """One request line to its reply object; never raises."""
        try:
            request = json.loads(line)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            return _error(ErrorClass.JSON_PARSE_ERROR, str(exc))
        except RecursionError:  # thousands of nested brackets
            return _error(ErrorClass.JSON_PARSE_ERROR, "nested too deeply")
        if not isinstance(request, dict):
            return _error(ErrorClass.INVALID_REQUEST, "a request is a JSON object")
        reply = self._execute(request)
        if "id" in request:
            reply["id"] = request["id"]
        return reply

    def _execute(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            unknown = set(request) - _REQUEST_KEYS
            if unknown:
                raise MonitorError(ErrorClass.INVALID_REQUEST, f"unknown keys {sorted(unknown)}")
            name = request.get("execute")
            if not isinstance(name, str):
                raise MonitorError(ErrorClass.INVALID_REQUEST, "'execute' must name a command")
            command = self.commands.get(name)
            if command is None:
                raise MonitorError(ErrorClass.COMMAND_NOT_FOUND, f"no command {name!r}")
            arguments = request.get("arguments", {})
            _check_arguments(command, arguments)
            return {"return": command.run(arguments)}
        except MonitorError as exc:
            return _error(exc.error_class, exc.desc)
        except Exception as exc:
            logger.exception("monitor: %s failed", request.get("execute"))
            return _error(ErrorClass.GENERIC_ERROR, f"{type(exc).__name__}: {exc}")

    # -- out ---------------------------------------------------------------------------------

    def _send(self, client: _Client, data: bytes) -> None:
        client.outbuf += data
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        """Send what the socket takes now; wait for it to drain before reading more."""
        fd = client.sock.fileno()
        while client.outbuf:
            try:
                sent = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._drop(client, str(exc))
                return
            del client.outbuf[:sent]
        if client.outbuf and not client.writing:
            client.writing = True
            self.loop.remove_reader(fd)
            self.loop.add_writer(fd, lambda: self._flush(client))
        elif not client.outbuf and client.writing:
            client.writing = False
            self.loop.remove_writer(fd)
            self.loop.add_reader(fd, lambda: self._on_readable(client))
            self._process(client)  # lines that arrived while the reply waited


def _check_arguments(command: Command, arguments: object) -> None:
    if not isinstance(arguments, dict):
        raise MonitorError(ErrorClass.INVALID_REQUEST, "'arguments' must be an object")
    for key, value in arguments.items():
        kind = command.arguments.get(key)
        if kind is None:
            takes = ", ".join(sorted(command.arguments)) or "none"
            raise MonitorError(
                ErrorClass.INVALID_ARGUMENTS,
                f"{command.name} takes no argument {key!r} (arguments: {takes})",
            )
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise MonitorError(
                ErrorClass.INVALID_ARGUMENTS, f"{key!r} must be of type {kind.__name__}"
            )


def _error(error_class: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": str(error_class), "desc": desc}}


def _line(value: object) -> bytes:
    return json.dumps(value).encode() + b"\n"
