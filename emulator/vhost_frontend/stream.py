"""One vhost-user socket and its decoder: the I/O boundary both rooms share.

Every message the front-end receives or sends passes through a ``MessageStream`` exactly once,
so this is where the one DEBUG line per message is written (``--> NAME size=.. nfds=..`` for a
message in, ``<-- NAME ...`` for one out, on the room's logger) and the ``--trace`` record
(channel ``vhost-user-frontend`` or ``vhost-user-backend``). A message the codec refuses is
recorded here too, before the caller sees the error: its raw header, fd count and the reason
(a refused reply is what a user debugging a back-end most needs to see). The monitor's message
counters are incremented here as well (always on: one dict increment per message). The stream
knows nothing of the event loop, of waiting, or of what a message means.
"""

from __future__ import annotations

import errno
import logging
import socket

from emulator.counters import Counters
from emulator.trace import Tracer
from vhost_user.codec import (
    HEADER_SIZE,
    Channel,
    VhostUserDecoder,
    VhostUserHeader,
    VhostUserMessage,
    encode,
)
from vhost_user.messages import (
    VHOST_USER_VERSION,
    BackendReq,
    FrontendReq,
    VhostUserHeaderFlag,
    VhostUserU64,
)
from wire.errors import DecodeError, TransportError
from wire.unix import close_fds, recv_with_fds, send_with_fds


class MessageStream:
    """``sock`` with the decoder for what arrives on it; owns and closes both."""

    def __init__(
        self,
        sock: socket.socket,
        channel: Channel,
        *,
        expect_replies: bool,
        tracer: Tracer,
        log: logging.Logger,
        counters: Counters | None = None,
    ) -> None:
        self.sock = sock
        self.decoder = VhostUserDecoder(channel, expect_replies=expect_replies)
        self.tracer = tracer
        self.log = log
        self._trace_channel = f"vhost-user-{channel.value}"
        counts = (counters or Counters()).messages(self._trace_channel)
        self._received, self._sent = counts.received, counts.sent
        self._requests: type[FrontendReq] | type[BackendReq] = (
            FrontendReq if channel is Channel.FRONTEND else BackendReq
        )
        self._last_refused: DecodeError | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket and every fd received but not handed out with a message."""
        self.decoder.close()
        self.sock.close()

    # -- in --------------------------------------------------------------------------------

    def receive(self, *, nonblocking: bool = False) -> bool:
        """Read at most what completes the next header or body, and feed it to the decoder.

        False when nothing was waiting. Raises ``TransportError`` when the peer is gone (end of
        stream or a socket error) and ``RemoteProtocolError`` when the framing is lost.
        """
        try:
            data, fds = recv_with_fds(
                self.sock, max(self.decoder.bytes_needed(), 1), nonblocking=nonblocking
            )
        except BlockingIOError:
            return False
        except OSError as exc:
            raise TransportError(str(exc)) from exc
        if not data:
            close_fds(fds)
            raise TransportError("end of stream")
        self.decoder.feed(data, fds)
        return True

    def next_message(self) -> VhostUserMessage | None:
        """The next complete message (logged and traced), or None if more bytes are needed.

        Raises the decoder's ``DecodeError`` (``fatal`` or not) for what it refused, after
        logging and tracing the refused message.
        """
        try:
            message = self.decoder.next_message()
        except DecodeError as exc:
            if exc is not self._last_refused:  # a broken decoder raises the same error again
                self._last_refused = exc
                self._record_refused(exc)
            raise
        if message is None:
            return None
        self._received[message.request] += 1
        self._log("-->", message, None)
        if self.tracer.enabled:
            self.tracer.record(
                self._trace_channel,
                "in",
                message.request.name,
                nfds=len(message.fds),
                payload=message.payload,
            )
        return message

    def _record_refused(self, exc: DecodeError) -> None:
        """The DEBUG line, trace record and count of a message the decoder refused."""
        name = self._request_name(exc.request)
        self._received[f"invalid:{name}"] += 1
        size = None if exc.size is None else HEADER_SIZE + exc.size
        if self.log.isEnabledFor(logging.DEBUG):
            flags = "?" if exc.flags is None else f"{exc.flags:#x}"
            self.log.debug(
                "--> invalid %s flags=%s size=%s nfds=%d: %s", name, flags, size, exc.nfds, exc
            )
        if self.tracer.enabled:
            self.tracer.record_refused(self._trace_channel, name, exc, size=size)

    def _request_name(self, request: int | None) -> str:
        if request is None:
            return "?"
        try:
            return self._requests(request).name
        except ValueError:
            return str(request)

    # -- out -------------------------------------------------------------------------------

    def send(self, message: VhostUserMessage) -> None:
        """Encode and send ``message``; its fds are lent (sent, not closed).

        Raises ``TransportError`` when the socket refuses (peer gone, send timeout).
        """
        data, fds = encode(message)
        self._log("<--", message, len(data))
        if self.tracer.enabled:
            self.tracer.record(
                self._trace_channel,
                "out",
                message.request.name,
                size=len(data),
                nfds=len(fds),
                payload=message.payload,
            )
        self._send_bytes(data, fds)
        self._sent[message.request] += 1

    def send_rejection(self, request: int, status: int) -> None:
        """Answer a request the codec refused with ``status`` (EINVAL if 0). Its number may be
        one no enum knows (or 0) and the peer still waits for the reply it asked for, so the
        bytes are built here; counted as ``invalid:NAME``. Raises ``TransportError``."""
        flags = VHOST_USER_VERSION | VhostUserHeaderFlag.REPLY
        body = VhostUserU64(status or errno.EINVAL).pack()
        data = VhostUserHeader(request, flags, len(body)).pack() + body
        self.log.debug("<-- %d reply size=%d nfds=0", request, len(data))
        self._send_bytes(data, ())
        self._sent[f"invalid:{self._request_name(request)}"] += 1

    def _send_bytes(self, data: bytes, fds: tuple[int, ...]) -> None:
        try:
            send_with_fds(self.sock, data, fds)
        except OSError as exc:
            raise TransportError(str(exc)) from exc

    def _log(self, arrow: str, message: VhostUserMessage, size: int | None) -> None:
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug(
                "%s %s%s size=%d nfds=%d",
                arrow,
                message.request.name,
                " reply" if message.is_reply else "",
                size if size is not None else HEADER_SIZE + len(message.payload.pack()),
                len(message.fds),
            )
