"""Errors of the wire layer, shared by the vfio-user and vhost-user stacks and both roles.

::

    WireError
     +-- ProtocolError          a message broke a protocol (carries an errno for the reply)
     |    +-- RemoteProtocolError   the peer sent it: reply with ``errno`` or, if ``fatal``,
     |    |    |                    disconnect (framing can no longer be trusted)
     |    |    +-- DecodeError      a codec refused a message (see the codecs for its context)
     |    +-- LocalProtocolError    we were asked to encode something invalid: a bug here
     +-- TransportError         the socket failed; ``reconnect`` says whether retrying makes sense
     +-- StateError             an operation arrived in the wrong state (names both states)

Peers are untrusted, so handlers raise these instead of asserting; a server turns a
``RemoteProtocolError`` into an error reply and keeps serving.
"""

from __future__ import annotations

import errno as _errno


class WireError(Exception):
    """Root of every error the wire layer raises on purpose."""


class ProtocolError(WireError):
    """A message violated a protocol; ``errno`` is what an error reply should carry."""

    def __init__(self, message: str, errno: int = _errno.EINVAL, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.errno = errno
        self.fatal = fatal


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid. ``fatal`` means the byte stream cannot be resynced."""


class LocalProtocolError(ProtocolError):
    """We tried to encode or send something the protocol does not allow."""


class TransportError(WireError):
    """The connection failed. ``reconnect`` is True when a new connection may succeed."""

    def __init__(self, message: str, *, reconnect: bool = True) -> None:
        super().__init__(message)
        self.reconnect = reconnect


class StateError(WireError):
    """An operation needs another state than the current one."""

    def __init__(self, message: str, *, state: str, required: str) -> None:
        super().__init__(f"{message} (state {state}, requires {required})")
        self.state = state
        self.required = required


class DecodeError(RemoteProtocolError):
    """A codec refused what the peer sent; both codecs raise only this.

    Not ``fatal``: the whole message was skipped and its fds closed, the stream is still in
    sync, and the caller answers it if ``reply_expected``. ``fatal``: the framing is lost, the
    decoder stays broken and the connection must go. ``request`` is the message's command or
    request number and ``msg_id`` its vfio-user id, when the header was readable; the number may
    be one no enum knows, so error replies are built from these integers. ``flags`` and
    ``size`` are the header's raw fields (``size`` as the protocol counts it: the payload for
    vhost-user, the whole message for vfio-user) and ``nfds`` the fds that came with it, so the
    I/O boundary can trace a refused message like any other.
    """

    def __init__(
        self,
        message: str,
        errno: int = _errno.EINVAL,
        *,
        fatal: bool = False,
        request: int | None = None,
        msg_id: int | None = None,
        reply_expected: bool = False,
        flags: int | None = None,
        size: int | None = None,
        nfds: int = 0,
    ) -> None:
        super().__init__(message, errno, fatal=fatal)
        self.request = request
        self.msg_id = msg_id
        self.reply_expected = reply_expected
        self.flags = flags
        self.size = size
        self.nfds = nfds
