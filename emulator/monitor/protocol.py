"""The monitor's wire format, shared by the server and the client: JSON lines in the spirit of
QMP.

On connect the server sends one greeting line::

    {"monitor": {"version": "0.1.0", "protocol": 1, "commands": ["device-reset", ...]}}

then answers each request line in order, one line each::

    {"execute": "query-mappings", "arguments": {"shmid": 0}, "id": 7}
    {"return": {...}, "id": 7}
    {"error": {"class": "InvalidArguments", "desc": "no shared memory region 9"}, "id": 7}

``arguments`` and ``id`` are optional; ``id`` is any JSON value and comes back as it was sent
(an error for a line that was not even an object has none). Blank lines are ignored.
"""

from __future__ import annotations

from enum import StrEnum

from emulator import __version__
from emulator.errors import EmulatorError

#: Bumped when a command or a reply field changes incompatibly.
PROTOCOL_VERSION = 1
GREETING_KEY = "monitor"
VERSION = __version__
#: A request line longer than this (newline not found) ends the client's connection: its
#: framing cannot be trusted, and the server will not buffer without bound.
MAX_LINE = 64 << 10


class ErrorClass(StrEnum):
    """``error.class`` of a refused request."""

    JSON_PARSE_ERROR = "JSONParseError"
    """The line is not JSON (or not UTF-8)."""
    INVALID_REQUEST = "InvalidRequest"
    """Not an object with an ``execute`` string, ``arguments`` not an object, unknown keys,
    or a line longer than ``MAX_LINE``."""
    COMMAND_NOT_FOUND = "CommandNotFound"
    INVALID_ARGUMENTS = "InvalidArguments"
    """An argument the command does not take, of the wrong type, or naming nothing
    (a shmid the BAR has no region for)."""
    NOT_AVAILABLE = "NotAvailable"
    """The emulator has no such part: no vhost-user back-end, no shared memory."""
    GENERIC_ERROR = "GenericError"
    """The command failed (the emulator logged why); or the server is full."""


class MonitorError(EmulatorError):
    """A monitor request was refused: raised by commands in the server, sent as ``error``, and
    raised again by ``MonitorClient``."""

    def __init__(self, error_class: ErrorClass | str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = str(error_class)
        self.desc = desc
