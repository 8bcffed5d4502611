"""The main socket to the back-end: connect, negotiate, typed blocking calls, reconnect.

``BackendConnection`` is rust-vmm's ``Frontend`` in Python: one method per front-end request
(``get_features``, ``set_mem_table``, ``set_vring_call``, ...), each sending its request and,
where one is due, waiting for the reply in ``_call``, the only place that does. REPLY_ACK is
handled there: with the protocol feature negotiated, a request without a typed reply asks for
an ack and a non-zero status raises ``BackendFailure``; callers never see acks.

The wait itself is ``_block_until_reply``: the one place the event loop stands still for the
back-end (see the package docstring for what it blocks and for how long).

Negotiation runs once per connection: GET_FEATURES, GET/SET_PROTOCOL_FEATURES (what we use of
``WANTED_PROTOCOL_FEATURES`` plus SHMEM at its bit, 22, 20 or 21), SET_OWNER, GET_QUEUE_NUM with
MQ, SET_BACKEND_REQ_FD with BACKEND_REQ (the ``BackendChannel`` is opened here), and
GET_SHMEM_CONFIG with SHMEM. A back-end that offers another of the shared-memory bits but not
ours gets no shared memory and one warning per process naming the bits (bit 20 usually means
GET_VRING_BASE_INFLIGHT, so offering it is no proof of a draft back-end). Any failure of the
socket, a reply out of order, or a timeout closes both sockets, tells the device through
``on_lost`` and retries every ``RECONNECT_INTERVAL`` seconds on the loop.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from emulator.counters import Counters
from emulator.errors import ANY_ERROR, BackendFailure, ConfigError
from emulator.loop import EventLoop
from emulator.shmem import ShmemLayout
from emulator.trace import Tracer
from emulator.vhost_frontend.channel import BackendChannel, ChannelHandler
from emulator.vhost_frontend.stream import MessageStream
from vhost_user.codec import Channel, VhostUserMessage, request
from vhost_user.messages import (
    EMPTY,
    SHMEM_FEATURE_BITS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    FrontendReq,
    Payload,
    VhostUserConfig,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserProtocolFeature,
    VhostUserShMemConfig,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringState,
)
from wire.errors import RemoteProtocolError, TransportError
from wire.unix import set_send_timeout

logger = logging.getLogger(__name__)

PF = VhostUserProtocolFeature
#: Protocol features we use when the back-end offers them (SHMEM is added at its bit).
WANTED_PROTOCOL_FEATURES = (
    PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.BACKEND_SEND_FD | PF.CONFIG | PF.RESET_DEVICE
)
PROTOCOL_FEATURES_BIT = 1 << VHOST_USER_F_PROTOCOL_FEATURES
#: Seconds between attempts to reach a back-end that went away (tests patch this).
RECONNECT_INTERVAL = 1.0
_P = TypeVar("_P", bound=Payload)


class BackendConnection:
    """The connection to the back-end at ``path``, across reconnects.

    ``on_lost`` is called when a connection that was up goes away for any reason but
    ``close()``; the device then drops what the back-end held (rings, mappings).
    """

    def __init__(
        self,
        path: Path,
        loop: EventLoop,
        tracer: Tracer,
        *,
        timeout: float,
        num_queues: int,
        shmem_mask: int,
        handler: ChannelHandler,
        on_lost: Callable[[], None],
        counters: Counters | None = None,
    ) -> None:
        self.path = path
        self.counters = counters or Counters()
        self.loop = loop
        self.tracer = tracer
        self.timeout = timeout
        self.num_queues = num_queues
        self.shmem_mask = shmem_mask
        self._handler = handler
        self._on_lost = on_lost
        #: Negotiated on the current (or last) connection.
        self.features = 0
        self.protocol_features = 0
        #: shmid -> size from GET_SHMEM_CONFIG; fixed by the first connection (it sizes BAR 4).
        self.shmem_sizes: dict[int, int] = {}
        self.connections = 0
        self._stream: MessageStream | None = None
        self._channel: BackendChannel | None = None
        self._reconnect_pending = False
        self._closed = False
        self._warned_shmem_bits = False

    @property
    def connected(self) -> bool:
        return self._stream is not None

    def has(self, feature: VhostUserProtocolFeature) -> bool:
        return bool(self.protocol_features & feature)

    @property
    def has_shmem(self) -> bool:
        return bool(self.protocol_features & self.shmem_mask)

    # -- connecting ------------------------------------------------------------------------

    def connect_blocking(self, timeout: float | None = None) -> None:
        """Connect at start-up, waiting for the back-end to come up: ``timeout`` seconds at
        most (then ``BackendFailure``), or as long as it takes."""
        waited_since = time.monotonic()
        last_message = 0.0
        while True:
            try:
                self._connect()
                return
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                now = time.monotonic()
                if timeout is not None and now - waited_since >= timeout:
                    raise BackendFailure(
                        f"no vhost-user back-end at {self.path} after {timeout:g} s "
                        f"({exc.strerror}): start the back-end first, or give it longer with "
                        "--backend-connect-timeout"
                    ) from exc
                if now - last_message >= 5.0:
                    logger.info(
                        "waiting for the vhost-user back-end at %s (%s; %.0f s so far, %s)",
                        self.path,
                        exc.strerror,
                        now - waited_since,
                        "no limit: see --backend-connect-timeout"
                        if timeout is None
                        else f"giving up after {timeout:g} s",
                    )
                    last_message = now
                time.sleep(0.1)

    def close(self) -> None:
        """Close both sockets for good: no ``on_lost``, no reconnect."""
        self._closed = True
        self.disconnect("front-end closing", quiet=True)

    def disconnect(self, reason: str, *, quiet: bool = False) -> None:
        """Close both sockets; if a connection was up, tell the device and retry later."""
        stream, self._stream = self._stream, None
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        if stream is None:
            return
        self.loop.remove_reader(stream.fileno())
        stream.close()
        if not quiet:
            logger.warning("vhost-user back-end lost: %s", reason)
        if self._closed:
            return
        self._on_lost()
        self._schedule_reconnect()

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        self._stream = MessageStream(
            sock,
            Channel.FRONTEND,
            expect_replies=True,
            tracer=self.tracer,
            log=logger,
            counters=self.counters,
        )
        try:
            self._negotiate()
        except BaseException:
            self.disconnect("negotiation failed", quiet=True)
            raise
        self.loop.add_reader(sock.fileno(), self._on_main_readable)
        self.connections += 1
        logger.info(
            "vhost-user back-end connected at %s: features %#x, protocol features %#x",
            self.path,
            self.features,
            self.protocol_features,
        )

    def _negotiate(self) -> None:
        self.features = self.get_features()
        self.protocol_features = 0
        if self.features & PROTOCOL_FEATURES_BIT:
            offered = self.get_protocol_features()
            self._check_shmem_bits(offered)
            acked = offered & (int(WANTED_PROTOCOL_FEATURES) | self.shmem_mask)
            self.set_protocol_features(acked)
            self.protocol_features = acked
        self.set_owner()
        if self.has(PF.MQ):
            queues = self.get_queue_num()
            if queues < self.num_queues:
                raise ConfigError(
                    f"back-end supports {queues} queue(s), --num-queues asks for {self.num_queues}"
                )
        if self.has(PF.BACKEND_REQ):
            self._open_channel()
        sizes = self.get_shmem_config() if self.has_shmem else {}
        if self.connections and sizes != self.shmem_sizes:
            raise ConfigError(
                f"back-end now declares shared memory {sizes}, the BAR was built for "
                f"{self.shmem_sizes}; restart the emulator to change it"
            )
        self.shmem_sizes = sizes

    def _check_shmem_bits(self, offered: int) -> None:
        """Warn once if the back-end offers another shared-memory bit but not ours; what is
        negotiated does not change (a bit that is not ours may mean something else)."""
        if self._warned_shmem_bits or offered & self.shmem_mask:
            return
        others = sorted(bit for bit in SHMEM_FEATURE_BITS if offered & (1 << bit))
        if not others:
            return
        self._warned_shmem_bits = True
        ours = self.shmem_mask.bit_length() - 1
        named = ", ".join(f"{bit} ({SHMEM_FEATURE_BITS[bit]})" for bit in others)
        one = len(others) == 1
        logger.warning(
            "back-end offers protocol feature %s %s but not bit %d, the shared-memory bit of "
            "--shmem-feature-bit %d: no shared memory is negotiated; if the back-end means "
            "shared memory by %s, restart with --shmem-feature-bit %s",
            "bit" if one else "bits",
            named,
            ours,
            ours,
            "that bit" if one else "one of them",
            "|".join(map(str, others)),
        )

    def _open_channel(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.set_backend_req_fd(theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        # Blocking sends bounded by SO_SNDTIMEO, MSG_DONTWAIT receives: no fcntl per reply.
        set_send_timeout(ours, self.timeout)
        self._channel = BackendChannel(
            ours, self.loop, self.tracer, self._handler, self.disconnect, counters=self.counters
        )

    def _schedule_reconnect(self) -> None:
        if not self._reconnect_pending and not self._closed:
            self._reconnect_pending = True
            self.loop.call_later(RECONNECT_INTERVAL, self._try_reconnect)

    def _try_reconnect(self) -> None:
        self._reconnect_pending = False
        if self._closed or self._stream is not None:
            return
        try:
            self._connect()
        except (OSError, *ANY_ERROR) as exc:
            logger.debug("reconnect to %s failed: %s", self.path, exc)
            self._schedule_reconnect()

    def _on_main_readable(self) -> None:
        """The back-end never speaks first on the main socket: this is EOF or garbage."""
        stream = self._stream
        if stream is None:
            return
        try:
            data = stream.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self.disconnect(str(exc))
            return
        self.disconnect("unexpected data" if data else "end of stream")

    # -- typed calls (rust-vmm's Frontend) ---------------------------------------------------

    def get_features(self) -> int:
        return self._call(FrontendReq.GET_FEATURES, reply=VhostUserU64).value

    def set_features(self, features: int) -> None:
        self._call(FrontendReq.SET_FEATURES, VhostUserU64(features))

    def get_protocol_features(self) -> int:
        return self._call(FrontendReq.GET_PROTOCOL_FEATURES, reply=VhostUserU64).value

    def set_protocol_features(self, features: int) -> None:
        self._call(FrontendReq.SET_PROTOCOL_FEATURES, VhostUserU64(features))

    def set_owner(self) -> None:
        self._call(FrontendReq.SET_OWNER)

    def get_queue_num(self) -> int:
        return self._call(FrontendReq.GET_QUEUE_NUM, reply=VhostUserU64).value

    def set_backend_req_fd(self, fd: int) -> None:
        """``fd`` is lent: sent, not closed."""
        self._call(FrontendReq.SET_BACKEND_REQ_FD, fds=[fd])

    def get_shmem_config(self) -> dict[int, int]:
        """shmid -> size of every declared region (checked to fit a BAR layout). A short
        reply is fine (the codec reads it as QEMU does); the regions are the first
        ``nregions`` non-zero sizes."""
        config = self._call(FrontendReq.GET_SHMEM_CONFIG, reply=VhostUserShMemConfig)
        sizes = config.regions()
        ShmemLayout.from_sizes(sizes)
        return sizes

    def set_mem_table(self, regions: Sequence[VhostUserMemoryRegion], fds: Sequence[int]) -> None:
        """One fd per region, lent."""
        self._call(FrontendReq.SET_MEM_TABLE, VhostUserMemory(tuple(regions)), fds=fds)

    def set_vring_num(self, index: int, num: int) -> None:
        self._call(FrontendReq.SET_VRING_NUM, VhostUserVringState(index, num))

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int) -> None:
        self._call(FrontendReq.SET_VRING_ADDR, VhostUserVringAddr(index, 0, desc, used, avail, 0))

    def set_vring_base(self, index: int, base: int) -> None:
        self._call(FrontendReq.SET_VRING_BASE, VhostUserVringState(index, base))

    def get_vring_base(self, index: int) -> int:
        """Stops the ring; the answer is where the back-end's available index stands."""
        query = VhostUserVringState(index, 0)
        return self._call(FrontendReq.GET_VRING_BASE, query, reply=VhostUserVringState).num

    def set_vring_call(self, index: int, fd: int) -> None:
        """``fd`` is lent: sent, not closed."""
        self._call(FrontendReq.SET_VRING_CALL, VhostUserU64(index), fds=[fd])

    def set_vring_kick(self, index: int, fd: int) -> None:
        """``fd`` is lent: sent, not closed."""
        self._call(FrontendReq.SET_VRING_KICK, VhostUserU64(index), fds=[fd])

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._call(FrontendReq.SET_VRING_ENABLE, VhostUserVringState(index, int(enable)))

    def get_config(self, size: int) -> bytes:
        """The first ``size`` bytes of the device config. Always from offset 0, as QEMU asks:
        libvhost-user back-ends (qemu-storage-daemon) ignore the offset."""
        query = VhostUserConfig(0, size, 0, bytes(size))
        reply = self._call(FrontendReq.GET_CONFIG, query, reply=VhostUserConfig)
        if reply.size != size or len(reply.payload) != size:
            raise BackendFailure(f"GET_CONFIG answered {reply.size} bytes for {size}")
        return reply.payload

    def set_config(self, offset: int, data: bytes) -> None:
        self._call(FrontendReq.SET_CONFIG, VhostUserConfig(offset, len(data), 0, data))

    def reset_device(self) -> None:
        self._call(FrontendReq.RESET_DEVICE)

    # -- request / reply: the one place -----------------------------------------------------

    def _call(
        self,
        req: FrontendReq,
        payload: Payload = EMPTY,
        *,
        fds: Sequence[int] = (),
        reply: type[_P] | None = None,
    ) -> _P:
        """Send ``req``; wait for its reply (typed) or, with REPLY_ACK, for its status."""
        stream = self._stream
        if stream is None:
            raise BackendFailure(f"{req.name}: no back-end connected")
        need_ack = reply is None and self.has(PF.REPLY_ACK)
        try:
            stream.send(request(req, payload, fds=fds, need_reply=need_ack))
        except TransportError as exc:
            self.disconnect(f"{req.name}: {exc}")
            raise BackendFailure(f"{req.name}: back-end connection lost") from exc
        if reply is None and not need_ack:
            return EMPTY  # type: ignore[return-value]
        with self._block_until_reply(req) as answer:
            if reply is not None:
                if not isinstance(answer.payload, reply):
                    raise BackendFailure(f"{req.name} reply is not a {reply.__name__}")
                return answer.payload
            status = answer.payload
            if not isinstance(status, VhostUserU64):
                raise BackendFailure(f"{req.name} ack is not a u64")
            if status.value:
                raise BackendFailure(f"back-end refused {req.name} (status {status.value})")
            return EMPTY  # type: ignore[return-value]

    def _block_until_reply(self, req: FrontendReq) -> VhostUserMessage:
        """Wait up to ``timeout`` seconds for the reply to ``req``: the event loop stands still.

        Meanwhile the back-end channel is served (a back-end may send SHMEM_MAP and wait for
        its status before it answers us), once the device exists (``ChannelHandler.ready``);
        the vfio-user socket, timers and call-fd relays are not. No reply in time, a reply to
        another request, bad framing or a dead socket: the connection is dropped and
        ``BackendFailure`` raised.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            stream = self._stream
            if stream is None:
                raise BackendFailure(f"{req.name}: back-end disconnected while we waited")
            try:
                message = stream.next_message()
            except RemoteProtocolError as exc:
                self.disconnect(f"bad reply to {req.name}: {exc}")
                raise BackendFailure(f"bad reply to {req.name}: {exc}") from exc
            if message is not None:
                if message.request != req:
                    message.close()
                    self.disconnect(f"reply to {message.request.name} when {req.name} was due")
                    raise BackendFailure(f"back-end answered {req.name} out of order")
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.disconnect(f"no reply to {req.name} within {self.timeout} s")
                raise BackendFailure(f"back-end did not answer {req.name} within {self.timeout} s")
            channel = self._channel if self._handler.ready else None
            main_fd = stream.fileno()
            watched = [main_fd] + ([channel.fileno()] if channel is not None else [])
            readable, _, _ = select.select(watched, [], [], remaining)
            if channel is not None and channel.fileno() in readable:
                channel.serve()  # may drop the connection: then the next turn raises
            if main_fd in readable and self._stream is stream:
                try:
                    stream.receive()
                except (TransportError, RemoteProtocolError) as exc:
                    self.disconnect(f"waiting for {req.name}: {exc}")
                    raise BackendFailure(
                        f"back-end connection lost waiting for {req.name}: {exc}"
                    ) from exc
