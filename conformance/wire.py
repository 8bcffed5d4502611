"""Raw vhost-user framing that never trusts the peer: header, body and fds as they came.

The project's codec refuses what breaks a rule; a conformance tool must instead keep the bytes
as evidence. ``read_raw`` reads one message (header, then exactly ``size`` bytes, so fds stay
with the message they came with) before a deadline, and every fd it received is closed
before it returns: the tool only ``fstat``-s them (``fd_facts``), nothing more.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import time
from dataclasses import dataclass, field

from vhost_user.codec import HEADER_SIZE, VhostUserHeader
from vhost_user.messages import VhostUserHeaderFlag
from wire.errors import RemoteProtocolError, TransportError
from wire.unix import close_fds, recv_with_fds

#: A size above this is not a vhost-user message (the codec's limit is 4096; some payloads,
#: e.g. a full GET_SHMEM_CONFIG reply, are 2,056 bytes).
MAX_SANE_SIZE = 1 << 16


class PeerLost(Exception):
    """The connection cannot be used any more: closed, reset, or out of step."""


class NoReply(Exception):
    """Nothing (or not the whole message) arrived before the deadline."""


@dataclass(frozen=True, slots=True)
class FdFacts:
    """What ``fstat`` says of an fd that came with a message."""

    regular: bool
    size: int


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One message as received: header fields, body, and what its fds were."""

    request: int
    flags: int
    size: int
    body: bytes
    fds: tuple[FdFacts, ...] = field(default=())

    @property
    def raw(self) -> bytes:
        return VhostUserHeader(self.request, self.flags, self.size).pack() + self.body

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VhostUserHeaderFlag.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VhostUserHeaderFlag.NEED_REPLY)

    @property
    def version(self) -> int:
        return self.flags & 0x3


def fd_facts(fd: int) -> FdFacts:
    info = os.fstat(fd)
    return FdFacts(stat.S_ISREG(info.st_mode), info.st_size)


def _recv_exact(sock: socket.socket, n: int, deadline: float, fds: list[int]) -> bytes:
    data = b""
    while len(data) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NoReply(f"{len(data)} of {n} bytes before the deadline")
        ready, _, _ = select.select([sock], [], [], remaining)
        if not ready:
            continue
        try:
            chunk, got = recv_with_fds(sock, n - len(data), nonblocking=True)
        except BlockingIOError:
            continue
        except (TransportError, RemoteProtocolError, OSError) as exc:
            raise PeerLost(str(exc)) from exc
        fds.extend(got)
        if not chunk:
            raise PeerLost("the back-end closed the connection")
        data += chunk
    return data


def read_raw(sock: socket.socket, deadline: float) -> RawMessage:
    """The next whole message. ``NoReply`` at the deadline (the stream may then be out of
    step: the caller drops the connection), ``PeerLost`` on EOF, a reset, or an absurd size."""
    fds: list[int] = []
    try:
        head = _recv_exact(sock, HEADER_SIZE, deadline, fds)
        header = VhostUserHeader.unpack(head)
        if header.size > MAX_SANE_SIZE:
            raise PeerLost(f"header announces {header.size} bytes: {head.hex()}")
        body = _recv_exact(sock, header.size, deadline, fds) if header.size else b""
        facts = []
        for fd in fds:
            try:
                facts.append(fd_facts(fd))
            except OSError:
                facts.append(FdFacts(False, 0))
        return RawMessage(header.request, header.flags, header.size, body, tuple(facts))
    finally:
        close_fds(fds)
