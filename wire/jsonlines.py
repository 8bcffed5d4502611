"""A client for line-delimited JSON over a UNIX socket: one object per line, each way.

The emulator's monitor and the back-end devices' control sockets speak it; their clients differ
only in what a request and a refusal look like, so the connection, the framing and the cleanup
live here once.
"""

from __future__ import annotations

import json
import os
from typing import Any, Self

from wire.unix import connect_unix


class JsonLinesClient:
    """A connection to ``path``; ``peer`` names the server in errors (``"the monitor"``)."""

    peer = "the server"

    def __init__(self, path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.sock = connect_unix(path, timeout)
        self._file = self.sock.makefile("rwb")

    def send(self, value: dict[str, Any]) -> None:
        self._file.write(json.dumps(value).encode() + b"\n")
        self._file.flush()

    def receive(self) -> dict[str, Any]:
        """The next line as an object; ``ConnectionError`` if the server closed or sent
        something else."""
        line = self._file.readline()
        if not line.endswith(b"\n"):
            raise ConnectionError(f"{self.peer} closed the connection")
        value = json.loads(line)
        if not isinstance(value, dict):
            raise ConnectionError(f"{self.peer} sent {line!r}")
        return value

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
