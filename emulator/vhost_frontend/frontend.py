"""Our vhost-user front-end: the device's queues and config live in an external back-end.

To the virtio transport this is a ``VirtioDevice``. It connects to the back-end's socket,
negotiates features once per connection, and asks GET_SHMEM_CONFIG for the shared-memory
regions. The guest's DRIVER_OK activates the back-end in crosvm's order: SET_FEATURES,
SET_MEM_TABLE, then per queue NUM, ADDR, BASE, CALL, KICK, ENABLE. Call fds are the MSI-X
eventfds QEMU gave us, so the back-end interrupts the guest without passing through Python.

The back-end channel (SET_BACKEND_REQ_FD) is served on the event loop: SHMEM_MAP and
SHMEM_UNMAP go straight to the ``SharedMemoryBar``; CONFIG_CHANGE_MSG raises the config
interrupt. While we wait for a reply on the main socket we keep serving that channel, so a
back-end that maps memory before answering cannot deadlock us.

A back-end that goes away takes its mappings with it; the device reports
DEVICE_NEEDS_RESET and we reconnect in the background while the vfio-user side stays up.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import time
from collections.abc import Sequence
from typing import Protocol, TypeVar

from emulator.config import EmulatorConfig
from emulator.errors import BackendFailure, ConfigError, EmulatorError
from emulator.loop import EventLoop
from emulator.memory import GuestMemory
from emulator.pci.interrupts import IrqEventfds
from emulator.shmem import MappingRefused, SharedMemoryBar, ShmemLayout
from emulator.trace import Tracer
from emulator.virtio.device import QueueConfig
from emulator.virtio.state import UNSUPPORTED_FEATURES
from vhost_user.codec import (
    Channel,
    Decoder,
    VhostUserHeader,
    VhostUserMessage,
    encode,
    reply_to,
    request,
)
from vhost_user.messages import (
    EMPTY,
    VHOST_MEMORY_BASELINE_NREGIONS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_MAX_CONFIG_SIZE,
    VHOST_USER_VERSION,
    BackendReq,
    FrontendReq,
    Payload,
    VhostUserConfig,
    VhostUserHeaderFlag,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserMMap,
    VhostUserProtocolFeature,
    VhostUserShMemConfig,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringState,
    shmem_feature,
)
from wire.errors import DecodeError, RemoteProtocolError, TransportError, WireError
from wire.unix import close_fds, recv_with_fds, send_with_fds, set_send_timeout

logger = logging.getLogger(__name__)

PF = VhostUserProtocolFeature
#: Protocol features we use when the back-end offers them (SHMEM is added at its bit).
WANTED_PROTOCOL_FEATURES = (
    PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.BACKEND_SEND_FD | PF.CONFIG | PF.RESET_DEVICE
)
PROTOCOL_FEATURES_BIT = 1 << VHOST_USER_F_PROTOCOL_FEATURES
RECONNECT_INTERVAL = 1.0
#: The addresses in SET_MEM_TABLE (userspace_addr) and SET_VRING_ADDR are ours to choose: the
#: back-end only translates ring addresses through the table. We use GPA + this base, not where
#: we happen to mmap a region: QEMU re-sends DMA maps while a device runs (SeaBIOS drives
#: virtio-blk before the PAM split), each re-map lands elsewhere, and libvhost-user drops the
#: connection ("remapping queue 0 during setmemtable") when the rings' addresses stop resolving.
FRONTEND_ADDRESS_BASE = 1 << 48
#: Back-end channel messages served per wake-up before the loop looks at other sockets.
CHANNEL_BATCH = 64
_P = TypeVar("_P", bound=Payload)


class TransportDevice(Protocol):
    """What the front-end needs from the virtio transport (``VirtioPciDevice``)."""

    msix: IrqEventfds

    def config_changed(self) -> None: ...

    def set_needs_reset(self) -> None: ...

    def queue_interrupt(self, queue: int) -> None: ...


class VhostUserFrontend:
    """Implements ``VirtioDevice`` by forwarding to a vhost-user back-end."""

    def __init__(
        self, config: EmulatorConfig, loop: EventLoop, memory: GuestMemory, tracer: Tracer
    ) -> None:
        assert config.vhost_user_socket is not None
        self.path = config.vhost_user_socket
        self.loop = loop
        self.memory = memory
        self.tracer = tracer
        self.timeout = config.backend_timeout
        self.virtio_id = config.virtio_id
        self.num_queues = config.num_queues
        self.max_queue_size = config.queue_size
        self.config_size = min(config.config_size, VHOST_USER_MAX_CONFIG_SIZE)
        self.shmem_mask = shmem_feature(config.shmem_feature_bit)
        self.backend_features = 0
        self.protocol_features = 0
        self.shmem_sizes: dict[int, int] = {}
        self.connections = 0
        self._sock: socket.socket | None = None
        self._decoder: Decoder | None = None
        self._channel: socket.socket | None = None
        self._channel_decoder: Decoder | None = None
        self._device: TransportDevice | None = None
        self._shmem: SharedMemoryBar | None = None
        self._active: tuple[QueueConfig, ...] = ()
        self._kick_fds: dict[int, int] = {}
        self._call_fds: dict[int, int | None] = {}
        self._own_call_fds: dict[int, int] = {}
        self._reconnect_pending = False
        self._closed = False
        #: The back-end's config space as last read; a guest driver reads it a few bytes at a
        #: time, so like QEMU we ask once and again only after CONFIG_CHANGE_MSG or a write.
        self._config: bytes | None = None
        memory.on_change(self._memory_changed)

    # -- VirtioDevice -----------------------------------------------------------------------

    @property
    def device_features(self) -> int:
        return self.backend_features & ~PROTOCOL_FEATURES_BIT & ~UNSUPPORTED_FEATURES

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def read_config(self, offset: int, size: int) -> bytes:
        if not self._has(PF.CONFIG) or offset + size > self.config_size:
            return bytes(size)
        if self._config is None:
            # Always the whole space from offset 0, as QEMU asks: libvhost-user back-ends
            # (qemu-storage-daemon) ignore the offset and answer from the start of their config.
            whole = self.config_size
            query = VhostUserConfig(0, whole, 0, bytes(whole))
            reply = self._call(FrontendReq.GET_CONFIG, query, reply=VhostUserConfig)
            if reply.size != whole or len(reply.payload) != whole:
                raise BackendFailure(f"GET_CONFIG answered {reply.size} bytes for {whole}")
            self._config = reply.payload
        return self._config[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        if not self._has(PF.CONFIG) or offset + len(data) > self.config_size:
            return
        self._config = None
        self._call(FrontendReq.SET_CONFIG, VhostUserConfig(offset, len(data), 0, data))

    def activate(self, driver_features: int, queues: Sequence[QueueConfig]) -> None:
        """DRIVER_OK: hand guest memory and the enabled rings to the back-end."""
        if self._sock is None:
            raise BackendFailure(f"no vhost-user back-end connected at {self.path}")
        features = driver_features
        if self.backend_features & PROTOCOL_FEATURES_BIT:
            features |= PROTOCOL_FEATURES_BIT
        self._call(FrontendReq.SET_FEATURES, VhostUserU64(features))
        self._send_mem_table()
        self._close_queue_fds()  # a re-activation must not leak the previous kick fds
        self._active = tuple(queues)
        for queue in queues:
            self._start_queue(queue)
        logger.info("back-end activated with %d queue(s)", len(queues))

    def deactivate(self) -> None:
        """Stop the rings (device reset or bus mastering off); ``reset`` follows a reset."""
        queues, self._active = self._active, ()
        if self._sock is not None:
            try:
                for queue in queues:
                    self._call(
                        FrontendReq.GET_VRING_BASE,
                        VhostUserVringState(queue.index, 0),
                        reply=VhostUserVringState,
                    )
            except (EmulatorError, WireError) as exc:
                logger.warning("back-end did not stop its rings cleanly: %s", exc)
        self._close_queue_fds()

    def reset(self) -> None:
        """Every device reset, even before DRIVER_OK: reset the back-end, drop all mappings."""
        self._config = None
        if self._sock is not None and self._has(PF.RESET_DEVICE):
            try:
                self._call(FrontendReq.RESET_DEVICE)
            except (EmulatorError, WireError) as exc:
                logger.warning("back-end did not reset cleanly: %s", exc)
        self.drop_mappings()

    def kick(self, queue: int) -> None:
        fd = self._kick_fds.get(queue)
        if fd is not None:
            os.eventfd_write(fd, 1)

    # -- wiring ------------------------------------------------------------------------------

    def attach(self, device: TransportDevice, shmem: SharedMemoryBar | None) -> None:
        """Late binding: the transport is built after the back-end declared its regions."""
        self._device = device
        self._shmem = shmem
        device.msix.on_change(self._vectors_changed)

    def drop_mappings(self) -> None:
        if self._shmem is not None and len(self._shmem):
            logger.info("dropping %d shared-memory mapping(s)", len(self._shmem))
            self._shmem.reset()

    def close(self) -> None:
        self._closed = True
        self._disconnect("front-end closing", quiet=True)

    # -- connection ------------------------------------------------------------------------

    def connect_blocking(self) -> None:
        """Connect at start-up, waiting as long as it takes for the back-end to come up."""
        waited_since = time.monotonic()
        last_message = 0.0
        while True:
            try:
                self._connect()
                return
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                now = time.monotonic()
                if now - last_message >= 5.0:
                    logger.info(
                        "waiting for the vhost-user back-end at %s (%s; %.0f s so far)",
                        self.path,
                        exc.strerror,
                        now - waited_since,
                    )
                    last_message = now
                time.sleep(0.1)

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._decoder = Decoder(Channel.FRONTEND, expect_replies=True)
        try:
            self._negotiate()
        except BaseException:
            self._disconnect("negotiation failed", quiet=True)
            raise
        self.loop.add_reader(sock.fileno(), self._on_main_readable)
        self.connections += 1
        logger.info(
            "vhost-user back-end connected at %s: features %#x, protocol features %#x",
            self.path,
            self.backend_features,
            self.protocol_features,
        )

    def _negotiate(self) -> None:
        features = self._call(FrontendReq.GET_FEATURES, reply=VhostUserU64).value
        self.backend_features = features
        self.protocol_features = 0
        if features & PROTOCOL_FEATURES_BIT:
            offered = self._call(FrontendReq.GET_PROTOCOL_FEATURES, reply=VhostUserU64).value
            acked = offered & (int(WANTED_PROTOCOL_FEATURES) | self.shmem_mask)
            self._call(FrontendReq.SET_PROTOCOL_FEATURES, VhostUserU64(acked))
            self.protocol_features = acked
        self._call(FrontendReq.SET_OWNER)
        if self._has(PF.MQ):
            queues = self._call(FrontendReq.GET_QUEUE_NUM, reply=VhostUserU64).value
            if queues < self.num_queues:
                raise ConfigError(
                    f"back-end supports {queues} queue(s), --num-queues asks for {self.num_queues}"
                )
        if self._has(PF.BACKEND_REQ):
            ours, theirs = socket.socketpair(
                socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
            )
            try:
                self._call(FrontendReq.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            # Blocking sends bounded by SO_SNDTIMEO, MSG_DONTWAIT receives: no fcntl per reply.
            set_send_timeout(ours, self.timeout)
            self._channel = ours
            self._channel_decoder = Decoder(Channel.BACKEND, expect_replies=False)
            self.loop.add_reader(ours.fileno(), self._on_channel_readable)
        sizes: dict[int, int] = {}
        if self.protocol_features & self.shmem_mask:
            config = self._call(FrontendReq.GET_SHMEM_CONFIG, reply=VhostUserShMemConfig)
            sizes = {shmid: size for shmid, size in enumerate(config.memory_sizes) if size}
            ShmemLayout.from_sizes(sizes)
        if self.connections and sizes != self.shmem_sizes:
            raise ConfigError(
                f"back-end now declares shared memory {sizes}, the BAR was built for "
                f"{self.shmem_sizes}; restart the emulator to change it"
            )
        self.shmem_sizes = sizes

    def _disconnect(self, reason: str, *, quiet: bool = False) -> None:
        was_connected = self._sock is not None
        for sock in (self._sock, self._channel):
            if sock is not None:
                self.loop.remove_reader(sock.fileno())
                sock.close()
        for decoder in (self._decoder, self._channel_decoder):
            if decoder is not None:
                decoder.close()
        self._sock = self._channel = None
        self._decoder = self._channel_decoder = None
        self._config = None
        if not was_connected:
            return
        if not quiet:
            logger.warning("vhost-user back-end lost: %s", reason)
        self._close_queue_fds()
        self._active = ()
        self.drop_mappings()
        if self._closed:
            return
        if self._device is not None:
            self._device.set_needs_reset()
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if not self._reconnect_pending and not self._closed:
            self._reconnect_pending = True
            self.loop.call_later(RECONNECT_INTERVAL, self._try_reconnect)

    def _try_reconnect(self) -> None:
        self._reconnect_pending = False
        if self._closed or self._sock is not None:
            return
        try:
            self._connect()
        except (OSError, EmulatorError, WireError) as exc:
            logger.debug("reconnect to %s failed: %s", self.path, exc)
            self._schedule_reconnect()

    def _on_main_readable(self) -> None:
        """The back-end never speaks first on the main socket: this is EOF or garbage."""
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self._disconnect(str(exc))
            return
        self._disconnect("unexpected data" if data else "end of stream")

    # -- request / reply ---------------------------------------------------------------------

    def _has(self, feature: VhostUserProtocolFeature) -> bool:
        return bool(self.protocol_features & feature)

    def _call(
        self,
        req: FrontendReq,
        payload: Payload = EMPTY,
        *,
        fds: Sequence[int] = (),
        reply: type[_P] | None = None,
    ) -> _P:
        """Send ``req``; wait for its reply (typed) or, with REPLY_ACK, for its status."""
        sock = self._sock
        if sock is None:
            raise BackendFailure(f"{req.name}: no back-end connected")
        need_ack = reply is None and self._has(PF.REPLY_ACK)
        message = request(req, payload, fds=fds, need_reply=need_ack)
        data, send_fds = encode(message)
        self._trace_out("frontend", message, len(data))
        try:
            send_with_fds(sock, data, send_fds)
        except (TransportError, OSError) as exc:
            self._disconnect(f"{req.name}: {exc}")
            raise BackendFailure(f"{req.name}: back-end connection lost") from exc
        if reply is None and not need_ack:
            return EMPTY  # type: ignore[return-value]
        answer = self._wait_reply(req)
        try:
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
        finally:
            answer.close()

    def _wait_reply(self, req: FrontendReq) -> VhostUserMessage:
        """Read the reply to ``req``, serving the back-end channel while we wait."""
        deadline = time.monotonic() + self.timeout
        while True:
            sock, decoder = self._sock, self._decoder
            if sock is None or decoder is None:
                raise BackendFailure(f"{req.name}: back-end disconnected while we waited")
            try:
                message = decoder.next_message()
            except RemoteProtocolError as exc:
                self._disconnect(f"bad reply to {req.name}: {exc}")
                raise BackendFailure(f"bad reply to {req.name}: {exc}") from exc
            if message is not None:
                self._trace_in("frontend", message)
                if message.request != req:
                    message.close()
                    self._disconnect(f"reply to {message.request.name} when {req.name} was due")
                    raise BackendFailure(f"back-end answered {req.name} out of order")
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._disconnect(f"no reply to {req.name} within {self.timeout} s")
                raise BackendFailure(f"back-end did not answer {req.name} within {self.timeout} s")
            watched = [sock] + ([self._channel] if self._channel is not None else [])
            readable, _, _ = select.select(watched, [], [], remaining)
            if self._channel is not None and self._channel in readable:
                self._on_channel_readable()
            if sock in readable:
                self._receive_main(sock, decoder, req)

    def _receive_main(self, sock: socket.socket, decoder: Decoder, req: FrontendReq) -> None:
        try:
            data, fds = recv_with_fds(sock, max(decoder.bytes_needed(), 1))
        except BlockingIOError:
            return
        except (TransportError, RemoteProtocolError, OSError) as exc:
            self._disconnect(f"waiting for {req.name}: {exc}")
            raise BackendFailure(f"back-end connection lost waiting for {req.name}") from exc
        if not data:
            close_fds(fds)
            self._disconnect(f"end of stream while waiting for {req.name}")
            raise BackendFailure(f"back-end closed the connection instead of answering {req.name}")
        decoder.feed(data, fds)

    # -- activation ------------------------------------------------------------------------

    def _send_mem_table(self) -> None:
        regions: list[VhostUserMemoryRegion] = []
        fds: list[int] = []
        for region in self.memory:
            if region.fd is None or region.host_addr is None:
                continue
            regions.append(
                VhostUserMemoryRegion(
                    region.gpa, region.size, FRONTEND_ADDRESS_BASE + region.gpa, region.fd_offset
                )
            )
            fds.append(region.fd)
        if len(regions) > VHOST_MEMORY_BASELINE_NREGIONS:
            raise BackendFailure(
                f"guest memory has {len(regions)} fd-backed regions; vhost-user takes at most "
                f"{VHOST_MEMORY_BASELINE_NREGIONS}"
            )
        self._call(FrontendReq.SET_MEM_TABLE, VhostUserMemory(tuple(regions)), fds=fds)

    def _start_queue(self, queue: QueueConfig) -> None:
        index = queue.index
        self._call(FrontendReq.SET_VRING_NUM, VhostUserVringState(index, queue.size))
        desc, used, avail = (self._frontend_address(*area) for area in _ring_areas(queue))
        self._call(FrontendReq.SET_VRING_ADDR, VhostUserVringAddr(index, 0, desc, used, avail, 0))
        self._call(FrontendReq.SET_VRING_BASE, VhostUserVringState(index, 0))
        self._send_call_fd(queue)
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._kick_fds[index] = kick
        self._call(FrontendReq.SET_VRING_KICK, VhostUserU64(index), fds=[kick])
        if self.backend_features & PROTOCOL_FEATURES_BIT:
            self._call(FrontendReq.SET_VRING_ENABLE, VhostUserVringState(index, 1))

    def _rings_mapped(self) -> bool:
        return all(
            self._in_backed_memory(gpa, size)
            for queue in self._active
            for _, gpa, size in _ring_areas(queue)
        )

    def _in_backed_memory(self, gpa: int, size: int) -> bool:
        region = self.memory.find(gpa, size)
        return region is not None and region.fd is not None and region.host_addr is not None

    def _frontend_address(self, what: str, gpa: int, size: int) -> int:
        """The address the back-end is told for guest-physical ``gpa`` (see the base above)."""
        if not self._in_backed_memory(gpa, size):
            raise BackendFailure(f"the {what} at {gpa:#x} is not in fd-backed guest memory")
        return FRONTEND_ADDRESS_BASE + gpa

    def _send_call_fd(self, queue: QueueConfig) -> None:
        """Give the back-end the queue's MSI-X eventfd, or one of ours that we relay."""
        assert self._device is not None
        fd = self._device.msix.eventfd(queue.msix_vector)
        if fd is None:
            fd = self._own_call_fds.get(queue.index)
            if fd is None:
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._own_call_fds[queue.index] = fd
                self.loop.add_reader(fd, lambda: self._relay_call(queue.index))
        self._call_fds[queue.index] = fd
        self._call(FrontendReq.SET_VRING_CALL, VhostUserU64(queue.index), fds=[fd])

    def _relay_call(self, index: int) -> None:
        fd = self._own_call_fds.get(index)
        if fd is None:
            return
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)
            if self._device is not None:
                self._device.queue_interrupt(index)

    def _vectors_changed(self) -> None:
        """QEMU replaced MSI-X eventfds: point the running rings at the new ones."""
        if not self._active or self._sock is None or self._device is None:
            return
        for queue in self._active:
            wanted = self._device.msix.eventfd(queue.msix_vector)
            if wanted is None:
                wanted = self._own_call_fds.get(queue.index)
            if wanted != self._call_fds.get(queue.index):
                try:
                    self._send_call_fd(queue)
                except (EmulatorError, WireError) as exc:
                    logger.warning("could not update the call fd of queue %d: %s", queue.index, exc)

    def _memory_changed(self) -> None:
        if not self._active or self._sock is None:
            return
        if not self._rings_mapped():
            # QEMU unmaps a range before mapping its pieces again; a table without the rings
            # makes libvhost-user back-ends drop the connection, so wait for the next change.
            logger.debug("memory table not re-sent: the rings are not in fd-backed memory yet")
            return
        try:
            self._send_mem_table()
        except (EmulatorError, WireError) as exc:
            logger.warning("could not re-send the memory table: %s", exc)
            if self._device is not None:
                self._device.set_needs_reset()

    def _close_queue_fds(self) -> None:
        close_fds(list(self._kick_fds.values()))
        self._kick_fds.clear()
        for fd in self._own_call_fds.values():
            self.loop.remove_reader(fd)
        close_fds(list(self._own_call_fds.values()))
        self._own_call_fds.clear()
        self._call_fds.clear()

    # -- back-end channel --------------------------------------------------------------------

    def _on_channel_readable(self) -> None:
        """Serve the requests already waiting on the back-end channel, at most
        ``CHANNEL_BATCH`` of them: a back-end that floods must not starve the guest's accesses
        (the selector is level-triggered and calls again for the rest)."""
        for _ in range(CHANNEL_BATCH):
            if self._channel is None or self._channel_decoder is None:
                return
            channel, decoder = self._channel, self._channel_decoder
            try:
                data, fds = recv_with_fds(channel, max(decoder.bytes_needed(), 1), nonblocking=True)
            except BlockingIOError:
                return
            except (TransportError, RemoteProtocolError, OSError) as exc:
                self._disconnect(f"back-end channel: {exc}")
                return
            if not data:
                close_fds(fds)
                self._disconnect("back-end channel closed")
                return
            try:
                decoder.feed(data, fds)
                while (message := decoder.next_message()) is not None:
                    self._serve_backend_request(message)
            except DecodeError as exc:
                if exc.fatal:
                    self._disconnect(f"back-end channel framing: {exc}")
                    return
                logger.warning("back-end sent an invalid request: %s", exc)
                self._trace_rejected(exc)
                if exc.reply_expected and exc.request is not None:
                    self._channel_reply_raw(exc.request, exc.errno)
            except RemoteProtocolError as exc:
                self._disconnect(f"back-end channel framing: {exc}")
                return

    def _serve_backend_request(self, message: VhostUserMessage) -> None:
        self._trace_in("backend", message)
        with message:
            try:
                status = self._backend_request(message)
            except MappingRefused as exc:
                logger.info("refused %s: %s", message.request.name, exc)
                status = exc.errno or errno.EINVAL
            except RemoteProtocolError as exc:
                logger.warning("refused %s: %s", message.request.name, exc)
                status = exc.errno or errno.EINVAL
            if message.need_reply:
                answer = reply_to(message, VhostUserU64(status))
                self._channel_send(answer)

    def _backend_request(self, message: VhostUserMessage) -> int:
        req = message.request
        if req in (BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP):
            mmap_request = message.payload
            if not isinstance(mmap_request, VhostUserMMap):
                raise RemoteProtocolError(f"{req.name} without an MMap payload")
            if not self.protocol_features & self.shmem_mask or self._shmem is None:
                raise RemoteProtocolError(f"{req.name}: no shared memory", errno.ENOTSUP)
            if mmap_request.flags & ~1:
                raise RemoteProtocolError(f"{req.name}: unknown flags {mmap_request.flags:#x}")
            if req is BackendReq.SHMEM_MAP:
                self._shmem_map(message, mmap_request)
            else:
                self._shmem.unmap(mmap_request.shmid, mmap_request.shm_offset, mmap_request.length)
            return 0
        if req is BackendReq.CONFIG_CHANGE_MSG:
            self._config = None
            if self._device is not None:
                self._device.config_changed()
            return 0
        raise RemoteProtocolError(f"{req.name} is not supported", errno.ENOTSUP)

    def _shmem_map(self, message: VhostUserMessage, mmap_request: VhostUserMMap) -> None:
        assert self._shmem is not None
        if len(message.fds) != 1:
            raise RemoteProtocolError(f"SHMEM_MAP needs exactly one fd, got {len(message.fds)}")
        self._shmem.map(
            mmap_request.shmid,
            message.fds[0],
            mmap_request.fd_offset,
            mmap_request.shm_offset,
            mmap_request.length,
            writable=mmap_request.writable,
        )

    def _channel_send(self, message: VhostUserMessage) -> None:
        if self._channel is None:
            return
        data, fds = encode(message)
        self._trace_out("backend", message, len(data))
        self._channel_send_bytes(data, fds)

    def _channel_send_bytes(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if self._channel is None:
            return
        try:
            send_with_fds(self._channel, data, fds)
        except (TransportError, OSError) as exc:
            self._disconnect(f"back-end channel: {exc}")

    def _channel_reply_raw(self, request_id: int, status: int) -> None:
        """Answer a request the codec rejected. Its number may be one no enum knows (or 0),
        and the back-end still waits for the reply it asked for, so build the bytes here."""
        flags = VHOST_USER_VERSION | VhostUserHeaderFlag.REPLY
        body = VhostUserU64(status or errno.EINVAL).pack()
        self._channel_send_bytes(VhostUserHeader(request_id, flags, len(body)).pack() + body)

    # -- logging and trace -----------------------------------------------------------------

    def _trace_out(self, channel: str, message: VhostUserMessage, size: int) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "<-- %s %s size=%d nfds=%d", channel, message.request.name, size, len(message.fds)
            )
        if self.tracer.enabled:
            self.tracer.record(
                f"vhost-user-{channel}",
                "out",
                message.request.name,
                size=size,
                nfds=len(message.fds),
                payload=message.payload,
            )

    def _trace_in(self, channel: str, message: VhostUserMessage) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "--> %s %s%s nfds=%d",
                channel,
                message.request.name,
                " reply" if message.is_reply else "",
                len(message.fds),
            )
        if self.tracer.enabled:
            self.tracer.record(
                f"vhost-user-{channel}",
                "in",
                message.request.name,
                nfds=len(message.fds),
                payload=message.payload,
            )

    def _trace_rejected(self, exc: DecodeError) -> None:
        if self.tracer.enabled:
            self.tracer.record(
                "vhost-user-backend", "in", f"invalid:{exc.request}", error=exc.errno
            )


def _ring_areas(queue: QueueConfig) -> tuple[tuple[str, int, int], ...]:
    """The split ring's three areas, in SET_VRING_ADDR order: descriptors, used, available."""
    return (
        ("descriptor table", queue.desc, 16 * queue.size),
        ("used ring", queue.device, 6 + 8 * queue.size),
        ("available ring", queue.driver, 6 + 2 * queue.size),
    )
