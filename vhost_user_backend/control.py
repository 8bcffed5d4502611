"""The JSON-lines control socket the library's devices share (tests, benchmarks and people
use it to drive and inspect a running device).

One request per line, a JSON object with ``"cmd"``; one reply per line, ``{"ok": true, ...}``
or ``{"ok": false, "error": "...", "code": N}``. ``ControlServer`` serves a socket with one
thread per connection and hands each request to the device's handler, which never raises;
the socket is created with mode 0600 (it can change what the guest sees). ``ControlClient`` is
the other end.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socketserver
import threading
from collections.abc import Callable
from typing import Any

from vhost_user_backend.errors import DaemonError
from wire.jsonlines import JsonLinesClient

log = logging.getLogger(__name__)

#: one request to one reply; must not raise
CommandHandler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """JSON-lines control socket at ``path``; each connection gets a thread."""

    daemon_threads = True

    def __init__(self, path: str, handler: CommandHandler) -> None:
        self.handler = handler
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            super().__init__(path, _ControlHandler)
        finally:
            os.umask(old)

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="control", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop serving (from another thread than the serving one) and remove the socket."""
        self.shutdown()
        self.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class _ControlHandler(socketserver.StreamRequestHandler):
    server: ControlServer

    def handle(self) -> None:
        for line in self.rfile:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("a command is a JSON object")
            except ValueError as exc:
                reply: dict[str, Any] = {
                    "ok": False,
                    "error": f"bad JSON: {exc}",
                    "code": errno.EINVAL,
                }
            else:
                log.debug("control <-- %s", req.get("cmd"))
                reply = self.server.handler(req)
            self.wfile.write(json.dumps(reply).encode() + b"\n")
            self.wfile.flush()


class ControlRefused(DaemonError):
    """A control command that had to succeed got ``{"ok": false, ...}``; ``reply`` is that."""

    def __init__(self, cmd: str, fields: dict[str, Any], reply: dict[str, Any]) -> None:
        super().__init__(f"control command {cmd} {fields} refused: {reply}")
        self.reply = reply


class ControlClient(JsonLinesClient):
    """The client side of a control socket: one request line, one reply line.

    ``client("status")`` returns the reply as it is; ``client.ok(...)`` raises
    ``ControlRefused`` unless it says ``"ok": true``.
    """

    peer = "the control socket"

    def __call__(self, cmd: str, **fields: Any) -> dict[str, Any]:
        self.send({"cmd": cmd, **fields})
        return self.receive()

    def ok(self, cmd: str, **fields: Any) -> dict[str, Any]:
        """A command that must succeed."""
        reply = self(cmd, **fields)
        if reply.get("ok") is not True:
            raise ControlRefused(cmd, fields, reply)
        return reply

    def status(self) -> dict[str, Any]:
        return self.ok("status")
