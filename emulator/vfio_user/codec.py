"""Sans-IO vfio-user codec: bytes and fds in, typed ``Message`` objects out, and back.

The same ``VfioUserDecoder`` serves both ends; its ``Role`` says which direction it reads. A server
reads the client's commands and the replies to its own DMA_READ/DMA_WRITE; a client reads
replies and the server's DMA_READ/DMA_WRITE commands.

Everything is checked before anyone acts on it. A header whose size is impossible breaks
framing: ``DecodeError(fatal=True)``, and the decoder stays broken. Anything else wrong with
a message is reported only once the whole message is buffered, so the decoder has already
skipped it, closed its fds and can decode the next one; the error names the ``msg_id`` and
``command`` so the caller can send ``error_reply_for(exc)``.

Payloads are ``wire.payload.Payload`` subclasses, as in the vhost-user codec. Region accesses
(a guest's BAR and config accesses, most of the traffic) are decoded and encoded with
precomputed structs and ``region_reply`` encodes their replies directly; both give exactly the
bytes and objects of the general path and do not depend on logging.

Fd attachment follows the kernel: a recvmsg() may glue fd-less bytes in front of a chunk
that carries fds but never glues anything after it, so the fds received with a chunk belong
to the message containing the chunk's last byte (the last message that starts in it).
"""

from __future__ import annotations

import enum
import errno
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from emulator.vfio_user.messages import (
    DEFAULT_MAX_MSG_SIZE,
    HEADER,
    HEADER_SIZE,
    MAX_MAX_MSG_FDS,
    TYPE_MASK,
    Command,
    DeviceInfo,
    DmaAccess,
    DmaMap,
    DmaUnmap,
    HeaderFlags,
    IrqInfo,
    IrqSetFlags,
    MsgType,
    RegionAccess,
    RegionInfo,
    RegionIoFdsReply,
    RegionIoFdsRequest,
    RegionWriteMulti,
    RegionWriteMultiReply,
    SetIrqs,
    Version,
)
from wire.errors import DecodeError, LocalProtocolError, RemoteProtocolError, StateError
from wire.fds import OwnsFds
from wire.payload import Payload
from wire.unix import close_fds

__all__ = [
    "Message",
    "Role",
    "VfioUserDecoder",
    "encode",
    "error_reply_for",
    "region_reply",
]

_MAX_MSG_ID = 0xFFFF
_MAX_U32 = 0xFFFF_FFFF
_NO_FLAGS = HeaderFlags(0)
_NO_REPLY_BIT = int(HeaderFlags.NO_REPLY)
_ERROR_BIT = int(HeaderFlags.ERROR)
_Header = tuple[int, int, int, int, int]
_A = TypeVar("_A", RegionAccess, DmaAccess)


class Role(enum.Enum):
    """Which end of the socket the decoder sits on."""

    SERVER = "server"
    CLIENT = "client"


@dataclass(slots=True)
class Message(OwnsFds):
    """One vfio-user message. It owns ``fds`` and closes them when its ``with`` block ends."""

    command: Command
    msg_id: int
    payload: Payload | None = None
    fds: tuple[int, ...] = ()
    type: MsgType = MsgType.COMMAND
    flags: HeaderFlags = _NO_FLAGS
    error: int = 0
    size: int = field(default=0, compare=False)

    @property
    def is_reply(self) -> bool:
        return self.type is MsgType.REPLY

    # int() first: an IntFlag ``&`` builds a new enum object, which costs a guest access ~1 us.
    @property
    def is_error(self) -> bool:
        return bool(int(self.flags) & _ERROR_BIT)

    @property
    def no_reply(self) -> bool:
        return bool(int(self.flags) & _NO_REPLY_BIT)

    @property
    def reply_expected(self) -> bool:
        return self.type is MsgType.COMMAND and not int(self.flags) & _NO_REPLY_BIT

    def reply(self, payload: Payload | None = None, fds: Sequence[int] = ()) -> Message:
        """The success reply to this command (same id and command)."""
        return Message(self.command, self.msg_id, payload, tuple(fds) if fds else (), MsgType.REPLY)

    def error_reply(self, err: int) -> Message:
        """The error reply to this command: header only, ERROR flag and ``err``."""
        return Message(self.command, self.msg_id, None, (), MsgType.REPLY, HeaderFlags.ERROR, err)


def region_reply(request: Message, offset: int, region: int, count: int, data: bytes) -> bytes:
    """The encoded success reply to a REGION_READ/WRITE ``request``: the same bytes as
    ``encode(request.reply(RegionAccess(offset, region, count, data)))`` without building
    the two objects, which a guest BAR access would pay for on every read (fig3)."""
    return _pack_access(
        request.msg_id,
        request.command,
        _REPLY,
        offset=offset,
        region=region,
        count=count,
        data=data,
    )


def _pack_access(
    msg_id: int, command: int, type_flags: int, *, offset: int, region: int, count: int, data: bytes
) -> bytes:
    """Header and RegionAccess head in one pack, then the data: every guest BAR access."""
    try:
        head = _ACCESS_MESSAGE.pack(
            msg_id, command, _ACCESS_HEAD + len(data), type_flags, 0, offset, region, count
        )
    except struct.error as exc:
        raise LocalProtocolError(f"region access out of range: {exc}") from exc
    return head + data if data else head


def error_reply_for(exc: DecodeError) -> bytes | None:
    """The encoded error reply a decode error calls for, or None when none is due.

    Bytes rather than a ``Message`` because the command number may be one ``Command`` does
    not know; the reply echoes it all the same.
    """
    if exc.fatal or not exc.reply_expected or exc.msg_id is None or exc.request is None:
        return None
    flags = MsgType.REPLY | HeaderFlags.ERROR
    return HEADER.pack(exc.msg_id, exc.request, HEADER_SIZE, flags, exc.errno)


Parser = Callable[[memoryview], Payload | None]


class _Rule(NamedTuple):
    parse: Parser
    types: tuple[type[Payload], ...]
    allow_empty: bool
    max_fds: int | None  # None: as many as the decoder accepts


def _empty(data: memoryview) -> None:
    if len(data):
        raise RemoteProtocolError(f"unexpected {len(data)}-byte payload", errno.EINVAL)


def _empty_or(parse: Parser) -> Parser:
    def parser(data: memoryview) -> Payload | None:
        return parse(data) if len(data) else None

    return parser


def _access(kind: type[_A], *, with_data: bool) -> Callable[[memoryview], _A]:
    """A region or DMA access that must (write command, read reply) or must not carry data."""
    what = "region" if kind is RegionAccess else "DMA"

    def parse(data: memoryview) -> _A:
        access = kind.unpack(data)
        if with_data and access.count and not access.data:
            raise RemoteProtocolError(f"{what} access without its data", errno.EINVAL)
        if not with_data and access.data:
            raise RemoteProtocolError(f"{what} access with unexpected data", errno.EINVAL)
        return access

    return parse


_region_with_data = _access(RegionAccess, with_data=True)
_region_without_data = _access(RegionAccess, with_data=False)
_dma_with_data = _access(DmaAccess, with_data=True)
_dma_without_data = _access(DmaAccess, with_data=False)


def _region_info_request(data: memoryview) -> RegionInfo:
    info = RegionInfo.unpack(data)
    if info.caps:
        raise RemoteProtocolError("region info request with capability bytes", errno.EINVAL)
    return info


def _rule(parse: Parser, *types: type[Payload], empty: bool = False, fds: int | None = 0) -> _Rule:
    return _Rule(parse, types, empty, fds)


# (command, is_reply) -> how to parse it, what encode() accepts, how many fds it may carry.
_RULES: dict[tuple[Command, bool], _Rule] = {
    (Command.VERSION, False): _rule(Version.unpack, Version),
    (Command.VERSION, True): _rule(Version.unpack, Version, fds=1),
    (Command.DMA_MAP, False): _rule(DmaMap.unpack, DmaMap, fds=1),
    (Command.DMA_MAP, True): _rule(_empty, empty=True),
    (Command.DMA_UNMAP, False): _rule(DmaUnmap.unpack, DmaUnmap),
    (Command.DMA_UNMAP, True): _rule(_empty_or(DmaUnmap.unpack), DmaUnmap, empty=True),
    (Command.DEVICE_GET_INFO, False): _rule(DeviceInfo.unpack, DeviceInfo),
    (Command.DEVICE_GET_INFO, True): _rule(DeviceInfo.unpack, DeviceInfo),
    (Command.DEVICE_GET_REGION_INFO, False): _rule(_region_info_request, RegionInfo),
    (Command.DEVICE_GET_REGION_INFO, True): _rule(RegionInfo.unpack, RegionInfo, fds=1),
    (Command.DEVICE_GET_REGION_IO_FDS, False): _rule(RegionIoFdsRequest.unpack, RegionIoFdsRequest),
    (Command.DEVICE_GET_REGION_IO_FDS, True): _rule(
        RegionIoFdsReply.unpack, RegionIoFdsReply, fds=None
    ),
    (Command.DEVICE_GET_IRQ_INFO, False): _rule(IrqInfo.unpack, IrqInfo),
    (Command.DEVICE_GET_IRQ_INFO, True): _rule(IrqInfo.unpack, IrqInfo),
    (Command.DEVICE_SET_IRQS, False): _rule(SetIrqs.unpack, SetIrqs, fds=None),
    (Command.DEVICE_SET_IRQS, True): _rule(_empty, empty=True),
    (Command.REGION_READ, False): _rule(_region_without_data, RegionAccess),
    (Command.REGION_READ, True): _rule(_region_with_data, RegionAccess),
    (Command.REGION_WRITE, False): _rule(_region_with_data, RegionAccess),
    (Command.REGION_WRITE, True): _rule(_region_without_data, RegionAccess),
    (Command.DMA_READ, False): _rule(_dma_without_data, DmaAccess),
    (Command.DMA_READ, True): _rule(_dma_with_data, DmaAccess),
    (Command.DMA_WRITE, False): _rule(_dma_with_data, DmaAccess),
    # QEMU 11.1 answers DMA_WRITE with a bare header; the spec wants address and count.
    (Command.DMA_WRITE, True): _rule(_empty_or(_dma_without_data), DmaAccess, empty=True),
    (Command.DEVICE_RESET, False): _rule(_empty, empty=True),
    (Command.DEVICE_RESET, True): _rule(_empty, empty=True),
    (Command.REGION_WRITE_MULTI, False): _rule(RegionWriteMulti.unpack, RegionWriteMulti),
    (Command.REGION_WRITE_MULTI, True): _rule(RegionWriteMultiReply.unpack, RegionWriteMultiReply),
}

_SERVER_TO_CLIENT = frozenset({Command.DMA_READ, Command.DMA_WRITE})
_COMMANDS = {int(c): c for c in Command}
_REGION_RW = frozenset({int(Command.REGION_READ), int(Command.REGION_WRITE)})
_REGION_READ = int(Command.REGION_READ)
_ACCESS = RegionAccess.STRUCT
_ACCESS_HEAD = HEADER_SIZE + _ACCESS.size
_HFLAGS = {0: _NO_FLAGS, int(HeaderFlags.NO_REPLY): HeaderFlags.NO_REPLY}
# Header and RegionAccess head in one pack: the shape of every guest BAR access and its reply.
_ACCESS_MESSAGE = struct.Struct(HEADER.format + _ACCESS.format.lstrip("<"))
_REGION_COMMANDS = frozenset({Command.REGION_READ, Command.REGION_WRITE})
_REPLY = int(MsgType.REPLY)


def _accepts(role: Role) -> dict[tuple[int, int], tuple[Command, _Rule]]:
    """(command number, type) -> rule, for the messages ``role`` may receive."""
    table: dict[tuple[int, int], tuple[Command, _Rule]] = {}
    for (command, is_reply), rule in _RULES.items():
        sent_by_client = command not in _SERVER_TO_CLIENT
        from_client = sent_by_client != is_reply
        if from_client == (role is Role.SERVER):
            table[(int(command), int(is_reply))] = (command, rule)
    return table


_ACCEPTS = {role: _accepts(role) for role in Role}


class VfioUserDecoder:
    """Incremental decoder for one connection; see the module docstring for the rules."""

    def __init__(
        self,
        role: Role,
        *,
        max_msg_size: int = DEFAULT_MAX_MSG_SIZE,
        max_fds: int = MAX_MAX_MSG_FDS,
    ) -> None:
        self.role = role
        self.max_msg_size = max_msg_size
        self.max_fds = max_fds
        self._accepts = _ACCEPTS[role]
        self._data: bytes | bytearray = b""
        self._start = 0  # where the next message starts in _data
        self._base = 0  # stream offset of _data[0]
        self._fds: deque[tuple[int, list[int]]] = deque()  # (stream offset of last byte, fds)
        self._broken: DecodeError | None = None
        self._closed = False

    def bytes_needed(self) -> int:
        """How many more bytes the next message needs (0 when one is ready)."""
        avail = len(self._data) - self._start
        if avail < HEADER_SIZE:
            return HEADER_SIZE - avail
        size = HEADER.unpack_from(self._data, self._start)[2]
        return max(size, HEADER_SIZE) - avail if size > avail else 0

    @property
    def buffered_fds(self) -> int:
        """Fds received but not yet handed out with a message."""
        return sum(len(fds) for _, fds in self._fds)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Append received bytes; ``fds`` came with them and are owned by the decoder now."""
        if self._closed or self._broken is not None:
            close_fds(fds)
            if self._broken is not None:
                raise self._broken
            raise StateError("decoder used after close()", state="closed", required="open")
        if self._start == len(self._data):
            self._base += self._start
            self._start = 0
            self._data = data
        else:
            if self._start:
                self._data = self._data[self._start :]
                self._base += self._start
                self._start = 0
            if isinstance(self._data, bytes):
                self._data = bytearray(self._data)
            self._data += data
        if fds:
            self._fds.append((self._base + len(self._data) - 1, list(fds)))

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes arrive.

        Raises ``DecodeError`` for a bad message (already skipped, fds closed).
        """
        if self._broken is not None:
            raise self._broken
        data = self._data
        start = self._start
        if len(data) - start < HEADER_SIZE:
            return None
        header: _Header = HEADER.unpack_from(data, start)
        msg_id, command, size, flags, _ = header
        if size < HEADER_SIZE or size > self.max_msg_size:
            self._break(
                DecodeError(
                    f"message size {size} outside [{HEADER_SIZE}, {self.max_msg_size}]",
                    errno.EINVAL,
                    fatal=True,
                    msg_id=msg_id,
                    request=command,
                    flags=flags,
                    size=size,
                    nfds=self.buffered_fds,
                )
            )
        end = start + size
        if end > len(data):
            return None
        self._start = end
        fds = self._claim_fds(self._base + end) if self._fds else ()
        if end == len(data):
            self._base += end
            self._start = 0
            self._data = b""
        # Hot path: a guest BAR or config access, no fds, nothing unusual.
        if command in _REGION_RW and flags in _HFLAGS and not fds and self.role is Role.SERVER:
            return self._region_command(data, start, header)
        return self._decode(data, start, header, fds)

    def close(self) -> None:
        """Drop buffered bytes and close every fd not yet handed out."""
        self._closed = True
        self._data = b""
        self._start = 0
        while self._fds:
            close_fds(self._fds.popleft()[1])

    def _break(self, exc: DecodeError) -> None:
        self._broken = exc
        self.close()
        raise exc

    def _claim_fds(self, end: int) -> tuple[int, ...]:
        claimed: list[int] = []
        while self._fds and self._fds[0][0] < end:
            claimed.extend(self._fds.popleft()[1])
        return tuple(claimed)

    def _region_command(self, data: bytes | bytearray, start: int, header: _Header) -> Message:
        msg_id, command, size, flags, _ = header
        body = size - _ACCESS_HEAD
        if body < 0:
            raise DecodeError(
                f"short region access (id {msg_id}, command {command})",
                errno.EINVAL,
                msg_id=msg_id,
                request=command,
                reply_expected=not flags,
                flags=flags,
                size=size,
            )
        offset, region, count = _ACCESS.unpack_from(data, start + HEADER_SIZE)
        if command == _REGION_READ:
            ok = body == 0
            payload = RegionAccess(offset, region, count)
        else:
            ok = body == count
            first = start + _ACCESS_HEAD
            payload = RegionAccess(offset, region, count, bytes(data[first : first + count]))
        if not ok:
            raise DecodeError(
                f"region access of {body} data bytes for count {count} "
                f"(id {msg_id}, command {command})",
                errno.EINVAL,
                msg_id=msg_id,
                request=command,
                reply_expected=not flags,
                flags=flags,
                size=size,
            )
        return Message(
            _COMMANDS[command], msg_id, payload, (), MsgType.COMMAND, _HFLAGS[flags], 0, size
        )

    def _decode(
        self, data: bytes | bytearray, start: int, header: _Header, fds: tuple[int, ...]
    ) -> Message:
        msg_id, command, size, flags, err = header
        kind = flags & TYPE_MASK
        reply_expected = kind == MsgType.COMMAND and not flags & HeaderFlags.NO_REPLY

        def fail(why: str, code: int = errno.EINVAL) -> DecodeError:
            close_fds(fds)
            return DecodeError(
                f"{why} (id {msg_id}, command {command})",
                code,
                msg_id=msg_id,
                request=command,
                reply_expected=reply_expected,
                flags=flags,
                size=size,
                nfds=len(fds),
            )

        if kind not in (MsgType.COMMAND, MsgType.REPLY):
            raise fail(f"unknown message type {kind}")
        if command not in _COMMANDS:
            raise fail("unknown command", errno.ENOSYS)
        entry = self._accepts.get((command, kind))
        if entry is None:
            raise fail(f"{'reply' if kind else 'command'} not valid towards the {self.role.value}")
        cmd, rule = entry
        if flags & ~(TYPE_MASK | HeaderFlags.NO_REPLY | HeaderFlags.ERROR):
            raise fail(f"unknown header flags {flags:#x}")
        if len(fds) > self.max_fds:
            raise fail(f"{len(fds)} fds, at most {self.max_fds}")
        header_flags = HeaderFlags(flags & ~TYPE_MASK)
        if header_flags & HeaderFlags.ERROR:
            if kind != MsgType.REPLY:
                raise fail("ERROR flag on a command")
            if fds or size != HEADER_SIZE:
                raise fail("error reply with a payload or fds")
            return Message(cmd, msg_id, None, (), MsgType.REPLY, header_flags, err, size)
        limit = self.max_fds if rule.max_fds is None else rule.max_fds
        if len(fds) > limit:
            raise fail(f"{len(fds)} fds on a message that takes at most {limit}")
        try:
            payload = _parse_payload(rule.parse, data, start, size)
        except RemoteProtocolError as exc:
            raise fail(str(exc), exc.errno) from None
        if isinstance(payload, SetIrqs):
            _check_irq_fds(payload, fds, fail)
        return Message(cmd, msg_id, payload, fds, MsgType(kind), header_flags, err, size)


def _parse_payload(parse: Parser, data: bytes | bytearray, start: int, size: int) -> Payload | None:
    """Run ``parse`` over the payload without copying it; the view never outlives the call,
    so the buffer behind it stays resizable even if an exception keeps the frame alive.
    """
    view = memoryview(data)[start + HEADER_SIZE : start + size]
    try:
        return parse(view)
    finally:
        view.release()


def _check_irq_fds(
    payload: SetIrqs, fds: tuple[int, ...], fail: Callable[[str], DecodeError]
) -> None:
    """Eventfds only with DATA_EVENTFD: ``count`` of them, or none to de-assign."""
    if not fds:
        return
    if not payload.flags & IrqSetFlags.DATA_EVENTFD:
        raise fail("SET_IRQS carries fds without DATA_EVENTFD")
    if len(fds) != payload.count:
        raise fail(f"SET_IRQS carries {len(fds)} fds for count {payload.count}")


def encode(message: Message) -> tuple[bytes, tuple[int, ...]]:
    """Serialise ``message``; returns the bytes and the fds to send with them.

    Does not close or take the fds. Raises ``LocalProtocolError`` for a message the
    protocol does not allow (wrong payload type, too many fds, bad id, a field too large).
    A region access without fds or error (a guest BAR access, its reply) is packed with one
    precomputed struct; the bytes are the same as the general path's.
    """
    payload = message.payload
    if (
        type(payload) is RegionAccess
        and message.command in _REGION_COMMANDS
        and message.flags in _HFLAGS
        and not message.fds
        and not message.error
    ):
        wire = _pack_access(
            message.msg_id,
            message.command,
            message.type | message.flags,
            offset=payload.offset,
            region=payload.region,
            count=payload.count,
            data=payload.data,
        )
        return wire, ()
    rule = _RULES.get((message.command, message.is_reply))
    if rule is None:
        raise LocalProtocolError(f"no such message: {message.command!r} {message.type!r}")
    _check_encodable(message, rule)
    if not 0 <= message.msg_id <= _MAX_MSG_ID or not 0 <= message.error <= _MAX_U32:
        raise LocalProtocolError(f"msg_id {message.msg_id} or error {message.error} out of range")
    try:
        body = payload.pack() if payload is not None else b""
    except struct.error as exc:
        raise LocalProtocolError(f"{message.command.name} payload out of range: {exc}") from exc
    size = HEADER_SIZE + len(body)
    if size > _MAX_U32:
        raise LocalProtocolError(f"message of {size} bytes")
    header = HEADER.pack(
        message.msg_id, message.command, size, message.type | message.flags, message.error
    )
    return header + body, message.fds


def _check_encodable(message: Message, rule: _Rule) -> None:
    payload = message.payload
    if message.is_error:
        if not message.is_reply or payload is not None or message.fds:
            raise LocalProtocolError("an error reply is a bare header")
        return
    if payload is None:
        if not rule.allow_empty:
            raise LocalProtocolError(f"{message.command.name} needs a payload")
    elif not isinstance(payload, rule.types):
        raise LocalProtocolError(f"{message.command.name} cannot carry {type(payload).__name__}")
    limit = MAX_MAX_MSG_FDS if rule.max_fds is None else rule.max_fds
    if len(message.fds) > limit:
        raise LocalProtocolError(f"{message.command.name} takes at most {limit} fds")
