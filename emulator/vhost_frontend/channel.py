"""The back-end channel: the requests a back-end sends us on the SET_BACKEND_REQ_FD socket.

Served on the event loop (and from ``BackendConnection``'s wait for a reply, see the package
docstring). One request goes: ``serve`` reads what completes it, the stream decodes it,
``_dispatch`` calls the handler, ``_serve`` replies with a u64 status: 0, or the errno of what
refused it. The handler does no I/O and this module does no mapping:

- SHMEM_MAP   -> ``handler.shared_memory.map(shmid, fd, ...)``, the message's fd *lent* (the
  ``SharedMemoryBar`` dups what it keeps; the message closes its own when served);
- SHMEM_UNMAP -> ``handler.shared_memory.unmap(shmid, shm_offset, length)``;
- CONFIG_CHANGE_MSG -> ``handler.config_changed()``;
- anything else, or SHMEM_* without negotiated shared memory -> ENOTSUP; an undecodable
  request -> the codec's errno (the stream builds the reply from the raw request number).

Every refusal is counted by reason for the monitor (``emulator.counters``).

Hostile input never raises out of ``serve``: refusals are statuses, a lost framing or a dead
socket drops the whole back-end connection (``on_lost``), and a flood is served at most
``CHANNEL_BATCH`` reads per wake-up so the guest's accesses on the same loop get their turn.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import Protocol

from emulator.counters import INVALID, UNSUPPORTED, Counters
from emulator.loop import EventLoop
from emulator.shmem import MappingRefused
from emulator.trace import Tracer
from emulator.vhost_frontend.stream import MessageStream
from vhost_user.codec import Channel, VhostUserMessage, reply_to
from vhost_user.messages import (
    BackendReq,
    VhostUserMMap,
    VhostUserMMapFlag,
    VhostUserU64,
)
from wire.errors import DecodeError, RemoteProtocolError, TransportError

logger = logging.getLogger(__name__)

#: Back-end channel reads served per wake-up before the loop looks at other sockets (each read
#: completes at most one header or body, so at most this many requests).
CHANNEL_BATCH = 64


class SharedMemory(Protocol):
    """Where SHMEM_MAP and SHMEM_UNMAP land: ``emulator.shmem.SharedMemoryBar``.

    Refusals raise ``RemoteProtocolError`` (``MappingRefused``) carrying the errno to answer.
    """

    def map(
        self, shmid: int, fd: int, fd_offset: int, shm_offset: int, length: int, *, writable: bool
    ) -> None:
        """Map ``length`` bytes of ``fd`` (lent: never closed here; dup what is kept)."""
        ...

    def unmap(self, shmid: int, shm_offset: int, length: int) -> None: ...


class ChannelHandler(Protocol):
    """What the channel dispatches to (``VhostUserFrontend``)."""

    @property
    def ready(self) -> bool:
        """False until the device exists (the first negotiation, before BAR 4 is built):
        requests wait in the socket until then instead of being refused for a BAR that is
        about to exist. The loop serves them once it runs."""
        ...

    @property
    def shared_memory(self) -> SharedMemory | None:
        """The BAR, or None when shared memory was not negotiated or has no BAR (ENOTSUP)."""
        ...

    def config_changed(self) -> None:
        """CONFIG_CHANGE_MSG: the back-end's config space changed."""
        ...


class BackendChannel:
    """Our end of the back-end channel; owns ``sock`` and serves it on ``loop``."""

    def __init__(
        self,
        sock: socket.socket,
        loop: EventLoop,
        tracer: Tracer,
        handler: ChannelHandler,
        on_lost: Callable[[str], None],
        *,
        counters: Counters | None = None,
    ) -> None:
        counters = counters or Counters()
        self._stream: MessageStream | None = MessageStream(
            sock,
            Channel.BACKEND,
            expect_replies=False,
            tracer=tracer,
            log=logger,
            counters=counters,
        )
        self._refusals = counters.refusals
        self._loop = loop
        self._handler = handler
        self._on_lost = on_lost
        self._fd = sock.fileno()
        loop.add_reader(self._fd, self.serve)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            self._loop.remove_reader(self._fd)
            stream.close()

    def serve(self) -> None:
        """Serve what is waiting, at most ``CHANNEL_BATCH`` reads: a back-end that floods must
        not starve the guest (the loop is level-triggered and calls again for the rest)."""
        for _ in range(CHANNEL_BATCH):
            stream = self._stream
            if stream is None:
                return
            try:
                if not stream.receive(nonblocking=True):
                    return
                while (message := self._next_request(stream)) is not None:
                    self._serve(stream, message)
            except TransportError as exc:
                self._lose(f"back-end channel: {exc}")
                return
            except RemoteProtocolError as exc:  # fatal: the framing is lost
                self._lose(f"back-end channel framing: {exc}")
                return

    def _lose(self, reason: str) -> None:
        self.close()
        self._on_lost(reason)

    def _next_request(self, stream: MessageStream) -> VhostUserMessage | None:
        """The next decoded request; requests the codec refused are answered here."""
        while True:
            try:
                return stream.next_message()
            except DecodeError as exc:
                if exc.fatal:
                    raise
                logger.warning("back-end sent an invalid request: %s", exc)
                self._refusals[INVALID] += 1
                if exc.reply_expected and exc.request is not None:
                    stream.send_rejection(exc.request, exc.errno)

    def _serve(self, stream: MessageStream, message: VhostUserMessage) -> None:
        with message:
            try:
                self._dispatch(message)
                status = 0
            except RemoteProtocolError as exc:
                log = logger.info if isinstance(exc, MappingRefused) else logger.warning
                log("refused %s: %s", message.request.name, exc)
                status = exc.errno or errno.EINVAL
                self._refusals[_refusal_reason(exc)] += 1
            if message.need_reply:
                stream.send(reply_to(message, VhostUserU64(status)))

    def _dispatch(self, message: VhostUserMessage) -> None:
        req = message.request
        if req is BackendReq.CONFIG_CHANGE_MSG:
            self._handler.config_changed()
            return
        if req not in (BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP):
            raise RemoteProtocolError(f"{req.name} is not supported", errno.ENOTSUP)
        mmap = message.payload
        if not isinstance(mmap, VhostUserMMap):
            raise RemoteProtocolError(f"{req.name} without an MMap payload")
        shmem = self._handler.shared_memory
        if shmem is None:
            raise RemoteProtocolError(f"{req.name}: no shared memory", errno.ENOTSUP)
        if mmap.flags & ~int(VhostUserMMapFlag.RW):  # IntFlag's own ~ keeps only known bits
            raise RemoteProtocolError(f"{req.name}: unknown flags {mmap.flags:#x}")
        if req is BackendReq.SHMEM_UNMAP:
            shmem.unmap(mmap.shmid, mmap.shm_offset, mmap.length)
            return
        if len(message.fds) != 1:
            raise RemoteProtocolError(f"SHMEM_MAP needs exactly one fd, got {len(message.fds)}")
        shmem.map(
            mmap.shmid,
            message.fds[0],  # lent: the message closes it when served
            mmap.fd_offset,
            mmap.shm_offset,
            mmap.length,
            writable=mmap.writable,
        )


def _refusal_reason(exc: RemoteProtocolError) -> str:
    """The counter a refusal goes to: the BAR's reason, or whether the request was not served
    at all or malformed (``emulator.counters``)."""
    if isinstance(exc, MappingRefused):
        return exc.reason.value
    return UNSUPPORTED if exc.errno == errno.ENOTSUP else INVALID
