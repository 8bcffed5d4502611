"""Sans-IO vhost-user codec: bytes and fds in, typed messages out, and back.

The same code serves both channels (the front-end's main socket with ``FrontendReq`` and the
back-end channel with ``BackendReq``) and both directions (requests and replies); the decoder is
told which channel it reads. Fds are tagged with the stream offset at which they arrived and go
to the message whose bytes cover that offset. A UNIX stream socket may hand a later message's
fds over together with earlier bytes, so callers read at most ``bytes_needed()`` bytes at a time:
each read then starts at the header of the message the fds were sent with.

Payloads (and the header) are ``wire.payload.Payload`` subclasses, as in the vfio-user codec:
decoding tries the payload types the request's spec allows, encoding checks the payload is one
of them and calls its ``pack()``.

Errors: a broken header (wrong version, oversized body) is fatal, the stream cannot be
resynchronised; anything wrong inside a complete message raises a non-fatal ``DecodeError``
(carrying the request number and whether a reply is due, so the caller can still answer) after
closing that message's fds.
"""

from __future__ import annotations

import enum
import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from vhost_user.messages import (
    BACKEND_SPECS,
    EMPTY,
    FRONTEND_SPECS,
    VHOST_USER_VERSION,
    VHOST_USER_VERSION_MASK,
    BackendReq,
    FdRule,
    FrontendReq,
    MessageSpec,
    VhostUserHeaderFlag,
    VhostUserU64,
    allowed_fd_count,
)
from wire.errors import DecodeError, LocalProtocolError, RemoteProtocolError
from wire.fds import OwnsFds
from wire.payload import Payload
from wire.unix import close_fds

MAX_PAYLOAD_SIZE = 4096


class Channel(enum.Enum):
    """Which socket a message travels on, hence which request enum its number belongs to."""

    FRONTEND = "frontend"
    BACKEND = "backend"


Request = FrontendReq | BackendReq


@dataclass(frozen=True, slots=True)
class VhostUserHeader(Payload):
    """The 12-byte header: request, flags, size (native byte order). A plain struct like the
    payloads (rust-vmm's header is ``ByteValued`` too), so it packs and unpacks the same way."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=III")
    request: int
    flags: int
    size: int


HEADER_SIZE = VhostUserHeader.STRUCT.size


@dataclass(slots=True, eq=False)
class VhostUserMessage(OwnsFds):
    """One decoded or to-be-encoded message. It owns ``fds`` and closes them when its ``with``
    block ends; whoever keeps one beyond that ``dup``-s it."""

    request: Request
    flags: int
    payload: Payload = EMPTY
    fds: tuple[int, ...] = ()

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VhostUserHeaderFlag.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VhostUserHeaderFlag.NEED_REPLY)


def request(
    req: Request, payload: Payload = EMPTY, *, fds: Sequence[int] = (), need_reply: bool = False
) -> VhostUserMessage:
    """Build a request message (version 1, NEED_REPLY if asked)."""
    flags = VHOST_USER_VERSION | (VhostUserHeaderFlag.NEED_REPLY if need_reply else 0)
    return VhostUserMessage(req, flags, payload, tuple(fds))


def reply_to(
    req: VhostUserMessage, payload: Payload, *, fds: Sequence[int] = ()
) -> VhostUserMessage:
    """Build the reply to ``req`` (version 1, REPLY set)."""
    return VhostUserMessage(
        req.request, VHOST_USER_VERSION | VhostUserHeaderFlag.REPLY, payload, tuple(fds)
    )


def spec_for(req: Request) -> MessageSpec:
    """The payload and fd rules of ``req``."""
    spec = BACKEND_SPECS.get(req) if isinstance(req, BackendReq) else FRONTEND_SPECS.get(req)
    if spec is None:
        raise LocalProtocolError(f"{req!r} has no payload specification")
    return spec


def _rules(spec: MessageSpec, is_reply: bool) -> tuple[tuple[type[Payload], ...], FdRule]:
    if not is_reply:
        return spec.request, spec.fds
    if spec.reply:
        return spec.reply, spec.reply_fds
    return (VhostUserU64,), FdRule.NONE


def describe(msg: VhostUserMessage) -> str:
    """``NAME flags=0x.. nfds=..`` for the one DEBUG line per message."""
    kind = "reply" if msg.is_reply else "request"
    return f"{msg.request.name} {kind} flags={msg.flags:#x} nfds={len(msg.fds)}"


def encode(msg: VhostUserMessage) -> tuple[bytes, tuple[int, ...]]:
    """Wire bytes and the fds to send with them. The message keeps owning its fds."""
    if msg.flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
        raise LocalProtocolError(f"{msg.request!r}: flags {msg.flags:#x} lack version 1")
    types, rule = _rules(spec_for(msg.request), msg.is_reply)
    if not isinstance(msg.payload, types):
        names = ", ".join(t.__name__ for t in types)
        raise LocalProtocolError(
            f"{msg.request.name}: payload {type(msg.payload).__name__} is not one of {names}"
        )
    if len(msg.fds) not in allowed_fd_count(rule, msg.payload):
        raise LocalProtocolError(f"{msg.request.name}: {len(msg.fds)} fds not allowed")
    body = msg.payload.pack()
    if len(body) > MAX_PAYLOAD_SIZE:
        raise LocalProtocolError(f"{msg.request.name}: payload of {len(body)} bytes is too large")
    return VhostUserHeader(msg.request, msg.flags, len(body)).pack() + body, msg.fds


class VhostUserDecoder:
    """Incremental decoder for one direction of one channel.

    ``expect_replies`` True/False rejects messages of the other kind; None accepts both.
    """

    def __init__(
        self,
        channel: Channel,
        *,
        expect_replies: bool | None = None,
        max_payload: int = MAX_PAYLOAD_SIZE,
    ) -> None:
        self.channel = channel
        self.expect_replies = expect_replies
        self.max_payload = max_payload
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._fds: list[tuple[int, int]] = []  # (stream offset, fd)
        self._broken: DecodeError | None = None

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add received bytes and the fds that arrived with them (ownership passes here)."""
        if self._broken is not None:
            close_fds(fds)
            raise self._broken
        offset = self._base + len(self._buf)
        self._fds.extend((offset, fd) for fd in fds)
        self._buf += data

    def bytes_needed(self) -> int:
        """How many more bytes complete the next header or body (0: a message is ready).

        Reading exactly this much keeps every read inside one message.
        """
        if len(self._buf) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buf)
        size = VhostUserHeader.unpack(bytes(self._buf[:HEADER_SIZE])).size
        return max(0, HEADER_SIZE + size - len(self._buf))

    @property
    def buffered_fds(self) -> int:
        """Fds received but not yet handed out with a message."""
        return len(self._fds)

    def close(self) -> None:
        """Close every fd not yet handed out with a message."""
        close_fds([fd for _, fd in self._fds])
        self._fds = []
        self._buf.clear()

    def _fail(self, message: str, header: VhostUserHeader) -> DecodeError:
        nfds = len(self._fds)
        self.close()
        self._broken = DecodeError(
            message,
            errno.EPROTO,
            fatal=True,
            request=header.request,
            flags=header.flags,
            size=header.size,
            nfds=nfds,
        )
        return self._broken

    def next_message(self) -> VhostUserMessage | None:
        """The next complete message, or None if more bytes are needed."""
        if self._broken is not None:
            raise self._broken
        if len(self._buf) < HEADER_SIZE:
            return None
        header = VhostUserHeader.unpack(bytes(self._buf[:HEADER_SIZE]))
        if header.flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
            raise self._fail(f"header flags {header.flags:#x}: unsupported version", header)
        if header.size > self.max_payload:
            raise self._fail(f"payload size {header.size} exceeds {self.max_payload}", header)
        end = HEADER_SIZE + header.size
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        self._base += end
        fds = [fd for off, fd in self._fds if off < self._base]
        self._fds = [(off, fd) for off, fd in self._fds if off >= self._base]
        try:
            return self._decode(header, body, fds)
        except BaseException:
            close_fds(fds)
            raise

    def _decode(self, header: VhostUserHeader, body: bytes, fds: list[int]) -> VhostUserMessage:
        enum_type: type[FrontendReq] | type[BackendReq] = (
            FrontendReq if self.channel is Channel.FRONTEND else BackendReq
        )
        try:
            req: Request = enum_type(header.request)
        except ValueError:
            raise _rejected(
                f"unknown {self.channel.value} request {header.request}",
                header,
                fds,
                errno.ENOSYS,
            ) from None
        if req.value == 0:
            raise _rejected("request 0 (NONE) is not a message", header, fds, errno.ENOSYS)
        is_reply = bool(header.flags & VhostUserHeaderFlag.REPLY)
        if self.expect_replies is not None and is_reply != self.expect_replies:
            kind = "reply" if is_reply else "request"
            raise _rejected(f"{req.name}: unexpected {kind}", header, fds)
        types, rule = _rules(spec_for(req), is_reply)
        payload: Payload | None = None
        problems: list[str] = []
        for payload_type in types:
            try:
                payload = payload_type.unpack(body)
                break
            except RemoteProtocolError as exc:
                problems.append(str(exc))
        if payload is None:
            raise _rejected(f"{req.name}: {'; '.join(problems)}", header, fds)
        if len(fds) not in allowed_fd_count(rule, payload):
            raise _rejected(f"{req.name}: {len(fds)} fds not allowed", header, fds, errno.EBADF)
        return VhostUserMessage(req, header.flags, payload, tuple(fds))


def _rejected(
    message: str, header: VhostUserHeader, fds: Sequence[int], code: int = errno.EINVAL
) -> DecodeError:
    """A non-fatal refusal of a complete message; a reply is due when it asked for one. It
    carries the raw header and the fd count, for the trace."""
    return DecodeError(
        message,
        code,
        request=header.request,
        reply_expected=bool(header.flags & VhostUserHeaderFlag.NEED_REPLY),
        flags=header.flags,
        size=header.size,
        nfds=len(fds),
    )
