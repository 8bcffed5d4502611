"""The tool's front-end end of the main socket: send requests, read replies, keep evidence.

``FrontendPeer.call`` sends one request and waits (bounded) for the reply with the same
request number. A reply to a request that asked for none (a SET_* without NEED_REPLY) is no
error here: it is kept in ``unsolicited`` for ``negotiation.reply_ack`` and skipped, so one
mistake does not turn every later check into a failure. Any other reply is returned as the
answer, wrong number or not (``negotiation.reply_header`` judges it); a request on the main
socket is kept in ``unexpected``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

from conformance.wire import NoReply, PeerLost, RawMessage, read_raw
from vhost_user.codec import encode, request
from vhost_user.messages import ANSWERED_REQUESTS, EMPTY, FrontendReq, Payload, VhostUserU64
from wire.errors import TransportError
from wire.unix import send_with_fds


@dataclass(frozen=True, slots=True)
class Exchange:
    """A request's bytes and the reply that answered it (None: none was due)."""

    sent: bytes
    reply: RawMessage | None

    @property
    def received(self) -> bytes | None:
        return None if self.reply is None else self.reply.raw

    def u64(self) -> int | None:
        """The reply's u64 (an ack's status, a feature mask), None when it is not one."""
        if self.reply is None or len(self.reply.body) != VhostUserU64.STRUCT.size:
            return None
        return VhostUserU64.unpack(self.reply.body).value


class Evidence(TypedDict):
    """``make``'s evidence arguments: what was sent and what came back."""

    sent: bytes | None
    received: bytes | None


def evidence(exchange: Exchange | BackendFailed) -> Evidence:
    """The bytes of ``exchange`` for a ``Check``: ``make(..., **evidence(exchange))``."""
    return {"sent": exchange.sent, "received": exchange.received}


class BackendFailed(Exception):
    """A request did not get its reply: ``exchange`` holds what was sent."""

    def __init__(self, message: str, sent: bytes, received: bytes | None = None) -> None:
        super().__init__(message)
        self.sent = sent
        self.received = received


class FrontendPeer:
    """One connection to the back-end's socket."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.timeout = timeout
        self.sock = sock
        self.unsolicited: list[tuple[bytes, RawMessage]] = []
        self.unexpected: list[RawMessage] = []
        self._silent: dict[int, bytes] = {}  # request number -> bytes sent without NEED_REPLY
        #: Set NEED_REPLY on every request without a reply of its own (REPLY_ACK acked).
        self.ack_all = False
        self.lost: str | None = None

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        try:
            send_with_fds(self.sock, data, fds)
        except (TransportError, OSError) as exc:
            self.lost = str(exc)
            raise PeerLost(f"send failed: {exc}") from exc

    def send(
        self,
        req: FrontendReq,
        payload: Payload = EMPTY,
        fds: Sequence[int] = (),
        *,
        need_reply: bool | None = None,
    ) -> bytes:
        """Send ``req``; its bytes. ``need_reply`` None means: as ``ack_all`` says."""
        need = self.ack_all and req not in ANSWERED_REQUESTS if need_reply is None else need_reply
        data, _ = encode(request(req, payload, fds=fds, need_reply=need))
        self.send_raw(data, fds)
        if not need and req not in ANSWERED_REQUESTS:
            self._silent[int(req)] = data
        return data

    def read(self, timeout: float | None = None) -> RawMessage:
        """The next message, whatever it is."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            return read_raw(self.sock, deadline)
        except PeerLost as exc:
            self.lost = str(exc)
            raise

    def wait_reply(self, req: int, sent: bytes, timeout: float | None = None) -> RawMessage:
        """The reply to ``req``; unsolicited replies are kept aside, ``NoReply`` at the end."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                msg = read_raw(self.sock, deadline)
            except NoReply as exc:
                raise BackendFailed(
                    f"no reply to {_name(req)} within {self.timeout:g} s", sent
                ) from exc
            except PeerLost as exc:
                self.lost = str(exc)
                raise BackendFailed(f"{_name(req)}: {exc}", sent) from exc
            silent = self._silent.get(msg.request)
            if msg.is_reply and msg.request != req and silent is not None:
                self.unsolicited.append((silent, msg))
                continue
            if msg.request == req or msg.is_reply:
                # Returned even with a wrong number or no REPLY flag: the caller judges it.
                return msg
            self.unexpected.append(msg)

    def call(
        self,
        req: FrontendReq,
        payload: Payload = EMPTY,
        fds: Sequence[int] = (),
        *,
        need_reply: bool | None = None,
        timeout: float | None = None,
    ) -> Exchange:
        """Send ``req`` and wait for its reply when one is due."""
        sent = self.send(req, payload, fds, need_reply=need_reply)
        due = req in ANSWERED_REQUESTS or (
            need_reply if need_reply is not None else self.ack_all and req not in ANSWERED_REQUESTS
        )
        if not due:
            return Exchange(sent, None)
        return Exchange(sent, self.wait_reply(int(req), sent, timeout))

    def ack(self, req: FrontendReq, payload: Payload = EMPTY, fds: Sequence[int] = ()) -> Exchange:
        """A SET_* request that must succeed: ``BackendFailed`` on a non-zero status."""
        exchange = self.call(req, payload, fds)
        if exchange.reply is not None and exchange.reply.request != req:
            raise BackendFailed(
                f"{req.name} answered with a reply to request {exchange.reply.request}",
                exchange.sent,
                exchange.received,
            )
        status = exchange.u64()
        if exchange.reply is not None and status != 0:
            raise BackendFailed(
                f"{req.name} refused (status {status})", exchange.sent, exchange.received
            )
        return exchange

    def close(self) -> None:
        self.sock.close()


def _name(req: int) -> str:
    try:
        return FrontendReq(req).name
    except ValueError:
        return f"request {req}"
