"""The optional message trace: one JSON line per message, both directions, every socket.

Meant for debugging a peer: ``--trace FILE`` and then ``jq`` over it. Payload fields are the
decoded dataclass fields; bulk data is summarised by its length.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from pathlib import Path
from typing import IO, Any


class Tracer:
    """Writes trace records; a disabled tracer (no path) costs one attribute check."""

    def __init__(self, path: Path | None) -> None:
        self._file: IO[str] | None = path.open("a", buffering=1) if path else None
        self.enabled = self._file is not None

    def record(
        self,
        channel: str,
        direction: str,
        command: str,
        *,
        msg_id: int | None = None,
        size: int | None = None,
        nfds: int = 0,
        payload: object = None,
        error: int | None = None,
    ) -> None:
        """Append one record; ``direction`` is ``"in"`` or ``"out"`` as seen by the emulator."""
        if self._file is None:
            return
        entry: dict[str, Any] = {
            "t": round(time.time(), 6),
            "channel": channel,
            "dir": direction,
            "cmd": command,
        }
        if msg_id is not None:
            entry["id"] = msg_id
        if size is not None:
            entry["size"] = size
        if nfds:
            entry["nfds"] = nfds
        if error:
            entry["error"] = error
        if payload is not None:
            entry["payload"] = _jsonable(payload)
        self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.enabled = False


def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, bytes | bytearray | memoryview):
        return {"len": len(value)}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return repr(value)
