"""The optional message trace: one JSON line per message, both directions, every socket.

Meant for debugging a peer: ``--trace FILE`` and then ``jq`` over it. Payload fields are the
decoded dataclass fields; bulk data is summarised by its length. A message a codec refused is
traced too (``record_refused``): ``cmd`` is ``invalid:NAME`` (or the raw number), with the raw
header fields, the fd count, the errno and the decode error's text as ``reason``; the peer
that sent it is the one being debugged.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from pathlib import Path
from typing import IO, Any

from wire.errors import DecodeError


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
        **extra: object,
    ) -> None:
        """Append one record; ``direction`` is ``"in"`` or ``"out"`` as seen by the emulator.
        ``extra`` fields are written as they are (they must be JSON values)."""
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
        entry.update(extra)
        self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def record_refused(
        self, channel: str, command: str, exc: DecodeError, *, size: int | None
    ) -> None:
        """A received message the codec refused: ``command`` names its request (or is its raw
        number), ``size`` is its length on the wire when the header says it."""
        header = {"request": exc.request, "flags": exc.flags, "size": exc.size}
        self.record(
            channel,
            "in",
            f"invalid:{command}",
            msg_id=exc.msg_id,
            size=size,
            nfds=exc.nfds,
            error=exc.errno,
            header={k: v for k, v in header.items() if v is not None},
            reason=str(exc),
            fatal=exc.fatal,
        )

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
