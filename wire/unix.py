"""UNIX stream sockets with SCM_RIGHTS: the only place that touches sendmsg/recvmsg.

Received fds are owned by the caller from the moment ``recv_with_fds`` returns; fds that the
kernel had to truncate (MSG_CTRUNC) are already closed and reported as an error.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
from collections.abc import Sequence

from wire.errors import RemoteProtocolError, TransportError

MAX_FDS_PER_MESSAGE = 16
_FD_SIZE = array.array("i").itemsize


def recv_with_fds(
    sock: socket.socket,
    bufsize: int,
    maxfds: int = MAX_FDS_PER_MESSAGE,
    *,
    nonblocking: bool = False,
) -> tuple[bytes, list[int]]:
    """Receive up to ``bufsize`` bytes and any fds sent with them.

    Returns ``(b"", [])`` on orderly shutdown. Raises ``BlockingIOError`` when nothing is
    waiting on a non-blocking socket, or on any socket with ``nonblocking`` (MSG_DONTWAIT),
    and ``TransportError`` on a reset connection.
    """
    flags = socket.MSG_DONTWAIT if nonblocking else 0
    try:
        data, ancdata, flags, _ = sock.recvmsg(bufsize, socket.CMSG_SPACE(maxfds * _FD_SIZE), flags)
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise TransportError(f"connection lost: {exc}") from exc
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    if flags & socket.MSG_CTRUNC:
        close_fds(fds)
        raise RemoteProtocolError(f"peer sent more than {maxfds} fds in one message", fatal=True)
    return data, fds


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send all of ``data``; the fds travel with its first byte. Does not close ``fds``."""
    try:
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = sock.sendmsg([data], ancillary)
        else:
            sent = sock.send(data)
        if sent < len(data):
            sock.sendall(data[sent:])
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise TransportError(f"connection lost: {exc}") from exc


def connect_unix(path: str | os.PathLike[str], timeout: float | None = None) -> socket.socket:
    """A stream socket connected to ``path`` with ``timeout`` set (closed again on failure)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
    except OSError:
        sock.close()
        raise
    return sock


def set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound blocking sends (SO_SNDTIMEO) so a peer that stops reading cannot stall us.

    Unlike ``settimeout`` this keeps the socket blocking, so there is no fcntl per call.
    """
    whole = int(seconds)
    micros = max(int((seconds - whole) * 1_000_000), 0 if whole else 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", whole, micros))


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd, ignoring ones that are already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
