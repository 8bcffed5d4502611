"""The vhost-user back-end library, for prototyping devices.

A ``VhostUserDaemon`` listens on a UNIX socket, serves one front-end at a time, negotiates
features, maps the front-end's memory, runs split virtqueues
and hands each kicked queue to the device's ``handle_queue``. Every request goes through the
same fixed steps: decode header, fds and body (the codec checks fds and size against the
payload type), check the protocol feature, call one typed handler, send the reply or the
REPLY_ACK status. Devices never see REPLY_ACK. The device's shared-memory layout is checked when
the daemon is built, by the rules the front-end applies (``vhost_user.shmem``).

``shmem_map``/``shmem_unmap`` send BACKEND_SHMEM_MAP/UNMAP on the back-end channel and wait for
the front-end's u64 status; they may be called from any thread while the loop runs. Sends and
the wait are bounded by ``reply_timeout``; a timeout, a channel the front-end closed (alone or
with the main socket) or anything but the one u64 reply raises ``ChannelFailed`` and drops the
channel, whose next bytes are never read. The main socket is served on regardless. A non-zero
status is ``FrontendRefused``, which says what it means (``EEXIST: overlaps a live mapping``).

Lifecycle: the hooks, each tied to a message the back-end really receives, run on the loop
thread while that message is handled (before it is answered)::

    on_connect(daemon)    a front-end connected
    on_channel_ready()    SET_BACKEND_REQ_FD arrived and BACKEND_REQ is acked
    on_queues_started()   a ring runs (SET_VRING_KICK / SET_VRING_ENABLE, or the first kick)
    reset()               RESET_DEVICE, or GET_VRING_BASE stopped the last running ring, or the
                          front-end left; the front-end drops every mapping on a device reset
    on_disconnect()       the front-end left; everything it set up is gone

Behind our emulator every device reset sends RESET_DEVICE, after GET_VRING_BASE when the rings
ran (a RESET_DEVICE straight after the GET_VRING_BASE that stopped the last ring is that same
reset: ``reset`` runs once), and SHMEM_MAP is taken whenever the channel is up. QEMU 11.1's own
front-end acks RESET_DEVICE but never sends it, resets a device whose rings were not started
(the machine reset at boot, the guest driver's probe) without a word, and segfaults on a
SHMEM_MAP while its device is not started (during realize, before DRIVER_OK, after a stop):
behind it, map only while queues run. ``on_queues_started`` is the first message after its
silent resets. Stopped rings are not always a reset (our emulator's bus mastering off, QEMU's
VM stop): ``reset`` runs and nothing was dropped. docs/shared-memory-lifecycle.md has the table.

Hooks must not wait for the front-end: QEMU does not read the back-end channel while it waits
for our answer, so a ``shmem_map`` there stalls until ``reply_timeout`` and loses the channel.
``persistent_map`` is the way to keep mappings across resets: the library maps them from its
own thread after every RESET_DEVICE and whenever queues start, the moments both front-ends
take a map, unless it is still live (mapped since the front-end last dropped mappings: the
spec forbids mapping over an existing map), and forgets one when ``shmem_unmap`` removes
exactly its range.

When the front-end leaves (end of stream, a reset, a fatal protocol error) everything it set up
goes: the back-end channel, the kick/call/err fds, the guest memory mappings; the device's
``reset`` and ``on_disconnect`` run (an exception in any hook is logged, not raised into the
loop). Then the daemon accepts the next front-end, or with ``serve_once`` returns from
``serve_forever``; the library never exits the process.

A device that serves its queues from a thread of its own (so that a queue request may wait for
the front-end's answer to ``shmem_map`` while the loop keeps answering the front-end, which may
itself be waiting for us, e.g. QEMU re-sending the memory table before it answers a map) takes
``VhostUserDaemon.lock`` around its ring and guest-memory accesses: the loop holds it while it
handles a front-end message or a kick, so the memory table and the rings never change under
such an access. Nobody may hold it while waiting for the front-end.

Device contract: subclass ``VhostUserDevice`` (or provide the same attributes and methods).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from vhost_user.codec import (
    Channel,
    VhostUserDecoder,
    VhostUserHeader,
    VhostUserMessage,
    describe,
    encode,
    reply_to,
    request,
    spec_for,
)
from vhost_user.messages import (
    EMPTY,
    FRONTEND_REQUIRED_FEATURE,
    SHMEM_FEATURE_BIT_UPSTREAM,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_MAX_CONFIG_SIZE,
    VHOST_USER_VERSION,
    BackendReq,
    FrontendReq,
    Payload,
    VhostUserConfig,
    VhostUserHeaderFlag,
    VhostUserMemory,
    VhostUserMMap,
    VhostUserMMapFlag,
    VhostUserProtocolFeature,
    VhostUserShMemConfig,
    VhostUserSingleMemoryRegion,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringState,
    errno_of,
    shmem_feature,
    vring_index_and_fd,
)
from vhost_user.shmem import (
    PAGE_SIZE,
    QEMU_REFUSED,
    RegionRefused,
    check_regions,
    qemu_native_refuses,
)
from vhost_user_backend.errors import (
    ChannelFailed,
    DaemonError,
    DeviceConfigError,
    FrontendRefused,
)
from vhost_user_backend.memory import MAX_MEM_SLOTS, MappedRegion, MemoryTable, MemoryTableError
from vhost_user_backend.vring import Vring
from wire.errors import (
    DecodeError,
    ProtocolError,
    RemoteProtocolError,
    StateError,
    TransportError,
    WireError,
)
from wire.unix import close_fds, recv_with_fds, send_with_fds

log = logging.getLogger(__name__)

#: Logged (followed by the socket path) once the socket accepts a front-end; launchers wait
#: for it (the reference device binds its control socket before this).
LISTENING_LINE = "listening on "

VIRTIO_F_VERSION_1 = 1 << 32
__all__ = [
    "LISTENING_LINE",
    "PAGE_SIZE",
    "VIRTIO_F_VERSION_1",
    "PersistentMapping",
    "VhostUserDaemon",
    "VhostUserDevice",
    "checked_regions",
]

P = TypeVar("P", bound=Payload)


class VhostUserDevice:
    """What the library needs from a device; subclass and override what the device does."""

    #: virtio device features offered (VHOST_USER_F_PROTOCOL_FEATURES is added by the library)
    features: int = VIRTIO_F_VERSION_1
    num_queues: int = 1

    def shmem_sizes(self) -> Sequence[int]:
        """VIRTIO Shared Memory Region sizes indexed by shmid (0 = unused); page multiples."""
        return ()

    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of device config space at ``offset`` (default: none, all zeros)."""
        return bytes(size)

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        raise RemoteProtocolError("device config space is read-only", errno.EPERM)

    def handle_queue(self, index: int, vring: Vring) -> None:
        """Process available buffers of queue ``index`` (called on a kick while started)."""

    def on_connect(self, backend: VhostUserDaemon) -> None:
        """A front-end connected; nothing is negotiated yet and there is no back-end channel."""

    def on_channel_ready(self) -> None:
        """The back-end channel exists (SET_BACKEND_REQ_FD with BACKEND_REQ acked). Runs before
        the front-end has its answer: do not wait for it here. Behind QEMU 11.1 a SHMEM_MAP
        sent before the queues start crashes QEMU."""

    def on_queues_started(self) -> None:
        """A ring runs again after none did (SET_VRING_KICK / SET_VRING_ENABLE): the driver
        set DRIVER_OK. Behind QEMU's own front-end the first message after a silent reset."""

    def on_disconnect(self) -> None:
        """The front-end left; everything it set up is gone."""

    def reset(self) -> None:
        """Return to the initial state: RESET_DEVICE, GET_VRING_BASE stopped the last running
        ring, or the front-end left; once per reset. The front-end has dropped every mapping
        (a device reset does), except when stopped rings were no reset (bus mastering off)."""


@dataclass(frozen=True, slots=True)
class PersistentMapping:
    """A mapping the library keeps alive across resets (``VhostUserDaemon.persistent_map``);
    ``fd`` is the daemon's own dup, closed when the mapping is forgotten."""

    shmid: int
    fd: int
    fd_offset: int
    shm_offset: int
    length: int
    writable: bool

    def __str__(self) -> str:
        return f"shmid {self.shmid} [{self.shm_offset:#x}, +{self.length:#x})"


def checked_regions(device: VhostUserDevice) -> dict[int, int]:
    """The device's regions as ``{shmid: size}``; ``DeviceConfigError`` in the words the
    front-end would refuse them with."""
    try:
        sizes = dict(enumerate(device.shmem_sizes()))
        check_regions(sizes)
    except RegionRefused as exc:
        raise DeviceConfigError(str(exc)) from exc
    return {shmid: size for shmid, size in sizes.items() if size}


def _payload(msg: VhostUserMessage, kind: type[P]) -> P:
    if not isinstance(msg.payload, kind):
        raise RemoteProtocolError(f"{msg.request.name}: unexpected payload {msg.payload!r}")
    return msg.payload


class VhostUserDaemon:
    """Serves one vhost-user front-end at a time on ``socket_path`` for ``device``."""

    def __init__(
        self,
        device: VhostUserDevice,
        socket_path: str,
        *,
        shmem_feature_bit: int = SHMEM_FEATURE_BIT_UPSTREAM,
        configure_mem_slots: bool = False,
        reply_timeout: float = 5.0,
        serve_once: bool = False,
    ) -> None:
        self.device = device
        self.socket_path = socket_path
        #: ``{shmid: size}`` of the device's regions, checked by the front-end's rules.
        self.shmem_regions = checked_regions(device)
        if qemu_native_refuses(self.shmem_regions):
            log.warning(
                "shared memory regions %s total %#x bytes, not a power of two: QEMU 11.1's own "
                "front-end aborts on that (our emulator rounds BAR 4 up)",
                {shmid: hex(size) for shmid, size in self.shmem_regions.items()},
                sum(self.shmem_regions.values()),
            )
        self.reply_timeout = reply_timeout
        #: Return from ``serve_forever`` once the first front-end has left, instead of
        #: accepting the next one.
        self.serve_once = serve_once
        self.shmem_mask = shmem_feature(shmem_feature_bit)
        pf = VhostUserProtocolFeature
        offered = pf.MQ | pf.REPLY_ACK | pf.BACKEND_REQ | pf.BACKEND_SEND_FD | pf.CONFIG
        offered |= pf.RESET_DEVICE
        if configure_mem_slots:
            offered |= pf.CONFIGURE_MEM_SLOTS
        self.offered_protocol_features = int(offered) | self.shmem_mask
        self.offered_features = device.features | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        self.memory = MemoryTable()
        self.vrings = [Vring(i, self.memory) for i in range(device.num_queues)]
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.owner = False
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._conn_log = log
        self._decoder: VhostUserDecoder | None = None
        self._channel: socket.socket | None = None
        self._channel_lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        #: held by the loop per wake-up; see the module docstring
        self.lock = threading.RLock()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._channel_ready = threading.Event()
        self._channel_announced = False
        self._connections = 0
        #: Some ring was started since the last reset / some ring runs (started and enabled).
        self._rings_started = False
        self._running = False
        #: The last request was a GET_VRING_BASE that reset the device: a RESET_DEVICE right
        #: after it is the same reset (our emulator sends both), not a second one.
        self._reset_by_ring_stop = False
        self._persistent: dict[tuple[int, int], PersistentMapping] = {}
        #: Persistent mappings the front-end holds now: mapped since it last dropped them
        #: (a reset, the front-end leaving). A live one is not sent again: the spec forbids
        #: mapping over an existing map.
        self._live: set[tuple[int, int]] = set()
        #: Counts the drops: a map answered across one is not known to be live.
        self._drops = 0
        self._remap_cond = threading.Condition()
        #: Why a round is due, and for which mapping (None: all of them).
        self._remap_reasons: list[tuple[str, tuple[int, int] | None]] = []
        self._remap_thread: threading.Thread | None = None
        self._handlers: dict[FrontendReq, Callable[[VhostUserMessage], Payload | None]] = {
            FrontendReq.GET_FEATURES: self._get_features,
            FrontendReq.SET_FEATURES: self._set_features,
            FrontendReq.SET_OWNER: self._set_owner,
            FrontendReq.RESET_OWNER: self._reset_owner,
            FrontendReq.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            FrontendReq.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            FrontendReq.GET_QUEUE_NUM: self._get_queue_num,
            FrontendReq.SET_MEM_TABLE: self._set_mem_table,
            FrontendReq.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            FrontendReq.ADD_MEM_REG: self._add_mem_reg,
            FrontendReq.REM_MEM_REG: self._rem_mem_reg,
            FrontendReq.SET_VRING_NUM: self._set_vring_num,
            FrontendReq.SET_VRING_ADDR: self._set_vring_addr,
            FrontendReq.SET_VRING_BASE: self._set_vring_base,
            FrontendReq.GET_VRING_BASE: self._get_vring_base,
            FrontendReq.SET_VRING_KICK: self._set_vring_kick,
            FrontendReq.SET_VRING_CALL: self._set_vring_call,
            FrontendReq.SET_VRING_ERR: self._set_vring_err,
            FrontendReq.SET_VRING_ENABLE: self._set_vring_enable,
            FrontendReq.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            FrontendReq.GET_CONFIG: self._get_config,
            FrontendReq.SET_CONFIG: self._set_config,
            FrontendReq.RESET_DEVICE: self._reset_device,
            FrontendReq.GET_SHMEM_CONFIG: self._get_shmem_config,
        }

    # -- lifecycle ----------------------------------------------------------------------------
    def listen(self) -> None:
        """Bind and listen (idempotent); a stale socket file at the path is replaced."""
        if self._listener is not None:
            return
        try:
            if stat.S_ISSOCK(os.stat(self.socket_path).st_mode):
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.socket_path)
            sock.listen(1)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self._remap_thread = threading.Thread(
            target=self._remap_worker, name="vhost-user-remap", daemon=True
        )
        self._remap_thread.start()
        self._sel.register(sock, selectors.EVENT_READ, self._accept)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._wake)
        log.info("%s%s", LISTENING_LINE, self.socket_path)

    def serve_forever(self) -> None:
        """Run the selector loop until ``stop()`` (or, with ``serve_once``, until the first
        front-end has left); everything is closed when it returns."""
        self.listen()
        try:
            while not self._stopping.is_set():
                for key, _ in self._sel.select():
                    callback: Callable[[], None] = key.data
                    with self.lock:
                        callback()
        finally:
            with self.lock:
                self._shutdown()

    def serve_in_thread(self) -> threading.Thread:
        """Listen now, then run the loop in a daemon thread."""
        self.listen()
        thread = threading.Thread(target=self.serve_forever, name="vhost-user-backend", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Ask the loop to finish (from any thread)."""
        self._stopping.set()
        with self._remap_cond:
            self._remap_cond.notify()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def wait_backend_channel(self, timeout: float | None = None) -> bool:
        """Wait until the front-end has set up the back-end channel (SET_BACKEND_REQ_FD)."""
        return self._channel_ready.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 64)

    def _shutdown(self) -> None:
        if self._conn is not None:
            self._disconnect("back-end stopping")
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._stopping.set()
        with self._remap_cond:
            self._remap_cond.notify()
        if self._remap_thread is not None:
            self._remap_thread.join(self.reply_timeout + 1)
        with self._remap_cond:
            kept, self._persistent = list(self._persistent.values()), {}
        close_fds([mapping.fd for mapping in kept])

    # -- connection ---------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None
        conn, _ = self._listener.accept()
        conn.setblocking(True)
        self._connections += 1
        self._conn = conn
        self._conn_log = log.getChild(f"conn{self._connections}")
        self._decoder = VhostUserDecoder(Channel.FRONTEND, expect_replies=False)
        self._sel.unregister(self._listener)
        self._sel.register(conn, selectors.EVENT_READ, self._readable)
        self._conn_log.info("front-end connected")
        self._hook(lambda: self.device.on_connect(self), "connect", name="on_connect")
        self._connected.set()

    def _disconnect(self, reason: str) -> None:
        """Drop the front-end and everything it set up, then accept the next one (or, with
        ``serve_once``, end the loop)."""
        self._conn_log.info("front-end disconnected: %s", reason)
        self._close_channel()
        self._reset_vrings()
        self.memory.close()
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        if self._conn is not None:
            self._sel.unregister(self._conn)
            self._conn.close()
            self._conn = None
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.owner = False
        self._connected.clear()
        self._rings_started = self._running = False
        self._mappings_dropped()
        self._hook(self.device.reset, "the front-end left")
        self._hook(self.device.on_disconnect, "the front-end left")
        if self.serve_once:
            self._stopping.set()
        elif self._listener is not None and not self._stopping.is_set():
            self._sel.register(self._listener, selectors.EVENT_READ, self._accept)

    def _readable(self) -> None:
        assert self._conn is not None and self._decoder is not None
        try:
            # Never read past the current message: the kernel may deliver a later message's
            # fds with earlier bytes, so reads stay message-aligned (header, then body).
            data, fds = recv_with_fds(self._conn, self._decoder.bytes_needed())
            if not data:
                close_fds(fds)
                self._disconnect("end of stream")
                return
            self._decoder.feed(data, fds)
            if (msg := self._next_message()) is not None:
                with msg:
                    self._dispatch(msg)
        except TransportError as exc:
            self._disconnect(str(exc))
        except ProtocolError as exc:
            self._disconnect(f"fatal protocol error: {exc}")
        except OSError as exc:  # the socket failed in a way the wire layer does not name
            self._disconnect(f"socket error: {exc}")

    def _next_message(self) -> VhostUserMessage | None:
        """The next request; a rejected one is answered (if it must be) and skipped."""
        assert self._decoder is not None
        while True:
            try:
                msg = self._decoder.next_message()
            except DecodeError as exc:
                if exc.fatal:
                    raise
                self._conn_log.warning("rejected request: %s", exc)
                self._reply_rejected(exc)
                continue
            if msg is not None:
                self._conn_log.debug("<-- %s", describe(msg))
            return msg

    def _reply_rejected(self, exc: DecodeError) -> None:
        try:
            req = FrontendReq(exc.request or 0)
        except ValueError:
            self._reply_unknown(exc)
            return
        stub = request(req, need_reply=exc.reply_expected)
        self._finish(stub, None, exc)

    def _reply_unknown(self, exc: DecodeError) -> None:
        """A request number we do not know, with NEED_REPLY under REPLY_ACK: the front-end
        waits for a status, so it gets ENOSYS under that number (no enum member to encode)."""
        ack = self.acked_protocol_features & VhostUserProtocolFeature.REPLY_ACK
        if not (exc.reply_expected and ack) or self._conn is None or exc.request is None:
            return
        flags = VHOST_USER_VERSION | VhostUserHeaderFlag.REPLY
        body = VhostUserU64(errno.ENOSYS).pack()
        data = VhostUserHeader(exc.request, flags, len(body)).pack() + body
        self._conn_log.debug("--> ENOSYS to unknown request %d", exc.request)
        send_with_fds(self._conn, data)

    def _send(self, msg: VhostUserMessage) -> None:
        assert self._conn is not None
        data, fds = encode(msg)
        self._conn_log.debug("--> %s", describe(msg))
        send_with_fds(self._conn, data, fds)

    def _dispatch(self, msg: VhostUserMessage) -> None:
        req = msg.request
        assert isinstance(req, FrontendReq)
        error: WireError | DaemonError | None = None
        result: Payload | None = None
        try:
            required = FRONTEND_REQUIRED_FEATURE.get(req)
            if req is FrontendReq.GET_SHMEM_CONFIG:
                required_mask = self.shmem_mask
            else:
                required_mask = int(required) if required is not None else 0
            if required_mask and not self.acked_protocol_features & required_mask:
                raise RemoteProtocolError(
                    f"{req.name} needs protocol feature {required_mask:#x}", errno.EOPNOTSUPP
                )
            if req not in (FrontendReq.GET_VRING_BASE, FrontendReq.RESET_DEVICE):
                self._reset_by_ring_stop = False
            handler = self._handlers.get(req)
            if handler is None:
                raise RemoteProtocolError(f"{req.name} is not supported", errno.ENOSYS)
            result = handler(msg)
        except (RemoteProtocolError, StateError, DaemonError) as exc:
            self._conn_log.warning("%s failed: %s", req.name, exc)
            error = exc
        except OSError as exc:
            self._conn_log.warning("%s failed: %s", req.name, exc)
            error = RemoteProtocolError(f"{req.name}: {exc}", exc.errno or errno.EIO)
        self._finish(msg, result, error)

    def _finish(
        self, msg: VhostUserMessage, result: Payload | None, error: WireError | DaemonError | None
    ) -> None:
        """Send the explicit reply, or the REPLY_ACK status if one was asked for."""
        req = msg.request
        assert isinstance(req, FrontendReq)
        spec = spec_for(req)
        if spec.reply:
            if error is None and result is not None:
                self._send(reply_to(msg, result))
            elif req is FrontendReq.GET_CONFIG:
                self._send(reply_to(msg, EMPTY))
            else:
                raise RemoteProtocolError(f"{req.name} needs a reply it cannot get", fatal=True)
            return
        ack = self.acked_protocol_features & VhostUserProtocolFeature.REPLY_ACK
        if msg.need_reply and ack:
            code = 0 if error is None else errno_of(error)
            self._send(reply_to(msg, VhostUserU64(code)))

    # -- typed handlers -----------------------------------------------------------------------
    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RemoteProtocolError(f"vring index {index} out of range", errno.ERANGE)
        return self.vrings[index]

    def _get_features(self, msg: VhostUserMessage) -> Payload:
        return VhostUserU64(self.offered_features)

    def _set_features(self, msg: VhostUserMessage) -> None:
        value = _payload(msg, VhostUserU64).value
        if value & ~self.offered_features:
            raise RemoteProtocolError(f"features {value:#x} were not offered")
        self.acked_features = value
        if not value & 1 << VHOST_USER_F_PROTOCOL_FEATURES:
            for vring in self.vrings:
                vring.enabled = True

    def _set_owner(self, msg: VhostUserMessage) -> None:
        self.owner = True

    def _reset_owner(self, msg: VhostUserMessage) -> None:
        for vring in self.vrings:
            vring.enabled = False

    def _get_protocol_features(self, msg: VhostUserMessage) -> Payload:
        return VhostUserU64(self.offered_protocol_features)

    def _set_protocol_features(self, msg: VhostUserMessage) -> None:
        value = _payload(msg, VhostUserU64).value
        if value & ~self.offered_protocol_features:
            raise RemoteProtocolError(f"protocol features {value:#x} were not offered")
        self.acked_protocol_features = value
        self._announce_channel()

    def _get_queue_num(self, msg: VhostUserMessage) -> Payload:
        return VhostUserU64(len(self.vrings))

    def _set_mem_table(self, msg: VhostUserMessage) -> None:
        table = _payload(msg, VhostUserMemory)
        staged = MemoryTable()
        try:
            for region, fd in zip(table.regions, msg.fds, strict=True):
                staged.add(MemoryTable.map_region(region, fd))
        except BaseException:
            staged.close()
            raise
        old = self.memory.regions
        self.memory.regions = staged.regions
        for mapped in old:
            mapped.mm.close()

    def _get_max_mem_slots(self, msg: VhostUserMessage) -> Payload:
        return VhostUserU64(MAX_MEM_SLOTS)

    def _add_mem_reg(self, msg: VhostUserMessage) -> None:
        region = _payload(msg, VhostUserSingleMemoryRegion).region
        mapped: MappedRegion = MemoryTable.map_region(region, msg.fds[0])
        self.memory.add(mapped)

    def _rem_mem_reg(self, msg: VhostUserMessage) -> None:
        self.memory.remove(_payload(msg, VhostUserSingleMemoryRegion).region)

    def _set_vring_num(self, msg: VhostUserMessage) -> None:
        state = _payload(msg, VhostUserVringState)
        self._vring(state.index).set_size(state.num)

    def _set_vring_addr(self, msg: VhostUserMessage) -> None:
        addr = _payload(msg, VhostUserVringAddr)
        self._vring(addr.index).set_addr(
            addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr
        )

    def _set_vring_base(self, msg: VhostUserMessage) -> None:
        state = _payload(msg, VhostUserVringState)
        self._vring(state.index).set_base(state.num)

    def _get_vring_base(self, msg: VhostUserMessage) -> Payload:
        state = _payload(msg, VhostUserVringState)
        vring = self._vring(state.index)
        self._watch_kick(vring, None)
        base = vring.stop()
        self._update_running()
        if self._rings_started and not any(v.started for v in self.vrings):
            # QEMU's own front-end tells a back-end of a reset only this way. No re-map here:
            # QEMU 11.1 segfaults on a SHMEM_MAP once its device stopped (see the docstring).
            self._rings_started = False
            self._mappings_dropped()
            self._hook(self.device.reset, "GET_VRING_BASE stopped the last ring")
            self._reset_by_ring_stop = True
        return VhostUserVringState(state.index, base)

    def _vring_fd(self, msg: VhostUserMessage) -> tuple[Vring, int | None]:
        index, has_fd = vring_index_and_fd(_payload(msg, VhostUserU64).value)
        vring = self._vring(index)
        # The message closes its fd when it is done; the ring keeps a dup.
        return vring, os.dup(msg.fds[0]) if has_fd else None

    def _set_vring_kick(self, msg: VhostUserMessage) -> None:
        vring, fd = self._vring_fd(msg)
        self._watch_kick(vring, fd)
        if fd is None:
            self._conn_log.warning(
                "vring %d: polling mode (no kick fd) is not supported", vring.index
            )
            return
        try:
            self._start(vring)
        except MemoryTableError as exc:
            self._conn_log.warning("vring %d not started yet: %s", vring.index, exc)
            return
        self._process(vring)

    def _watch_kick(self, vring: Vring, fd: int | None) -> None:
        if vring.kick_fd is not None:
            self._sel.unregister(vring.kick_fd)
        vring.replace_fd("kick", fd)
        if fd is not None:
            self._sel.register(fd, selectors.EVENT_READ, lambda: self._kicked(vring))

    def _set_vring_call(self, msg: VhostUserMessage) -> None:
        vring, fd = self._vring_fd(msg)
        vring.replace_fd("call", fd)

    def _set_vring_err(self, msg: VhostUserMessage) -> None:
        vring, fd = self._vring_fd(msg)
        vring.replace_fd("err", fd)

    def _set_vring_enable(self, msg: VhostUserMessage) -> None:
        state = _payload(msg, VhostUserVringState)
        if state.num not in (0, 1):
            raise RemoteProtocolError(f"SET_VRING_ENABLE num={state.num}")
        vring = self._vring(state.index)
        vring.enabled = bool(state.num)
        self._update_running()
        self._process(vring)

    def _set_backend_req_fd(self, msg: VhostUserMessage) -> None:
        fd = os.dup(msg.fds[0])
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            raise RemoteProtocolError(f"back-end channel fd is not a socket: {exc}") from exc
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise RemoteProtocolError("back-end channel must be a UNIX stream socket")
        # Bounds sends as well as the wait for a reply: a front-end that stops reading the
        # channel cannot hold a device thread forever.
        sock.settimeout(self.reply_timeout)
        self._close_channel()
        with self._channel_lock:
            self._channel = sock
        self._channel_ready.set()
        self._announce_channel()

    def _get_config(self, msg: VhostUserMessage) -> Payload:
        cfg = _payload(msg, VhostUserConfig)
        if cfg.offset + cfg.size > VHOST_USER_MAX_CONFIG_SIZE:
            raise RemoteProtocolError(f"config access {cfg.offset}+{cfg.size} out of range")
        data = self.device.get_config(cfg.offset, cfg.size)
        if len(data) != cfg.size:
            raise RemoteProtocolError(f"device returned {len(data)} config bytes, not {cfg.size}")
        return VhostUserConfig(cfg.offset, cfg.size, cfg.flags, data)

    def _set_config(self, msg: VhostUserMessage) -> None:
        cfg = _payload(msg, VhostUserConfig)
        if cfg.offset + cfg.size > VHOST_USER_MAX_CONFIG_SIZE:
            raise RemoteProtocolError(f"config access {cfg.offset}+{cfg.size} out of range")
        self.device.set_config(cfg.offset, cfg.payload, cfg.flags)

    def _reset_device(self, msg: VhostUserMessage) -> None:
        self._mappings_dropped()
        self._reset_vrings()
        self._rings_started = self._running = False
        if self._reset_by_ring_stop:  # the reset GET_VRING_BASE began: the hook ran there
            self._reset_by_ring_stop = False
        else:
            self._hook(self.device.reset, "RESET_DEVICE")
        self._schedule_remap("after RESET_DEVICE")

    def _get_shmem_config(self, msg: VhostUserMessage) -> Payload:
        sizes = tuple(self.device.shmem_sizes())
        try:
            check_regions(dict(enumerate(sizes)))
        except RegionRefused as exc:  # the device changed its layout since it was built
            raise RemoteProtocolError(str(exc)) from exc
        # nregions counts the declared regions, not the ids: QEMU takes the first nregions
        # non-zero sizes, and a reply whose count includes holes is refused.
        return VhostUserShMemConfig.declaring(sizes)

    # -- lifecycle ----------------------------------------------------------------------------
    def _hook(self, hook: Callable[[], None], why: str, *, name: str | None = None) -> None:
        """Run one device hook on the loop thread; its exception is logged, never raised."""
        hook_name = name or getattr(hook, "__name__", "hook")
        self._conn_log.debug("device %s (%s)", hook_name, why)
        try:
            hook()
        except Exception:
            self._conn_log.exception("device %s failed (%s)", hook_name, why)

    def _announce_channel(self) -> None:
        """``on_channel_ready`` once per channel, when it exists and BACKEND_REQ is acked."""
        if (
            self._channel_announced
            or self._channel is None
            or not self.acked_protocol_features & VhostUserProtocolFeature.BACKEND_REQ
        ):
            return
        self._channel_announced = True
        self._hook(self.device.on_channel_ready, "SET_BACKEND_REQ_FD")

    def _start(self, vring: Vring) -> None:
        vring.start()
        self._rings_started = True
        self._update_running()

    def _update_running(self) -> None:
        """``on_queues_started`` when a ring runs (started and enabled) after none did."""
        running = any(v.started and v.enabled for v in self.vrings)
        if running and not self._running:
            self._running = True
            self._hook(self.device.on_queues_started, "a ring runs")
            self._schedule_remap("queues started")
        self._running = running

    # -- virtqueues ---------------------------------------------------------------------------
    def _reset_vrings(self) -> None:
        for vring in self.vrings:
            if vring.kick_fd is not None:
                self._sel.unregister(vring.kick_fd)
            vring.close()
        self.vrings[:] = [Vring(i, self.memory) for i in range(len(self.vrings))]

    def _kicked(self, vring: Vring) -> None:
        if vring.kick_fd is None:
            return
        with contextlib.suppress(OSError):
            os.read(vring.kick_fd, 8)
        vring.stats.kicks += 1
        if not vring.started:
            try:
                self._start(vring)
            except MemoryTableError as exc:
                self._conn_log.warning("vring %d kicked but unusable: %s", vring.index, exc)
                return
        self._process(vring)

    def _process(self, vring: Vring) -> None:
        """Run the device on ``vring``; a hostile ring breaks the ring, never the loop."""
        if not (vring.started and vring.enabled) or vring.broken:
            return
        try:
            self.device.handle_queue(vring.index, vring)
        except MemoryTableError as exc:
            self._conn_log.warning("vring %d broken: %s", vring.index, exc)
            self._ring_failed(vring)
        except Exception:
            self._conn_log.exception("vring %d: device handler failed", vring.index)
            self._ring_failed(vring)

    def _ring_failed(self, vring: Vring) -> None:
        vring.broken = True
        with contextlib.suppress(OSError):
            vring.signal_error()

    # -- back-end channel ---------------------------------------------------------------------
    def _close_channel(self) -> None:
        self._channel_ready.clear()
        self._channel_announced = False
        sock = self._channel
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread waiting for a reply
        with self._channel_lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    def shmem_map(
        self,
        shmid: int,
        fd: int,
        fd_offset: int,
        shm_offset: int,
        length: int,
        *,
        writable: bool,
    ) -> None:
        """Ask the front-end to map ``fd`` into shared memory region ``shmid``.

        ``fd`` stays the caller's. Raises ``FrontendRefused`` on a non-zero status,
        ``ChannelFailed`` on timeout or a broken channel, ``StateError`` before negotiation.
        """
        flags = int(VhostUserMMapFlag.RW) if writable else 0
        mmap_req = VhostUserMMap(shmid, fd_offset, shm_offset, length, flags)
        what = f"of shmid {shmid} [{shm_offset:#x}, +{length:#x})"
        self._backend_request(BackendReq.SHMEM_MAP, mmap_req, [fd], self.shmem_mask, what)

    def shmem_unmap(self, shmid: int, shm_offset: int, length: int) -> None:
        """Ask the front-end to unmap [shm_offset, shm_offset + length) of ``shmid``; a
        persistent mapping of exactly that range is forgotten first (never mapped again)."""
        with self._remap_cond:
            forgotten = self._persistent.get((shmid, shm_offset))
            if forgotten is not None and forgotten.length == length:
                del self._persistent[(shmid, shm_offset)]
                self._live.discard((shmid, shm_offset))
            else:
                forgotten = None
        if forgotten is not None:
            os.close(forgotten.fd)
            log.info("persistent mapping %s forgotten (unmapped)", forgotten)
        self._shmem_unmap(shmid, shm_offset, length)

    def _shmem_unmap(self, shmid: int, shm_offset: int, length: int) -> None:
        mmap_req = VhostUserMMap(shmid, 0, shm_offset, length, 0)
        what = f"of shmid {shmid} [{shm_offset:#x}, +{length:#x})"
        self._backend_request(BackendReq.SHMEM_UNMAP, mmap_req, [], self.shmem_mask, what)

    # -- persistent mappings -----------------------------------------------------------------
    def persistent_map(
        self,
        shmid: int,
        fd: int,
        fd_offset: int,
        shm_offset: int,
        length: int,
        *,
        writable: bool,
    ) -> None:
        """Keep ``fd`` mapped at ``shm_offset`` of region ``shmid`` across resets.

        The library maps it from its own thread after every RESET_DEVICE and whenever queues
        start unless it is still live (every drop the back-end can see, a reset or GET_VRING_BASE
        stopping the last ring, makes it not live), and right away if queues run now;
        never at other times, when QEMU 11.1 would crash on it (see the module docstring).
        The outcome is logged. ``fd`` stays the caller's (the daemon keeps a dup).
        ``shmem_unmap`` of exactly this range ends it. Raises ``DeviceConfigError`` for a
        range the front-end would refuse whatever its state.
        """
        self._check_persistent(shmid, fd, fd_offset, shm_offset, length)
        mapping = PersistentMapping(shmid, os.dup(fd), fd_offset, shm_offset, length, writable)
        with self._remap_cond:
            self._persistent[(shmid, shm_offset)] = mapping
        log.info("persistent mapping %s registered", mapping)
        if self._running:
            self._schedule_remap("persistent_map", (shmid, shm_offset))

    @property
    def persistent_mappings(self) -> list[PersistentMapping]:
        with self._remap_cond:
            return sorted(self._persistent.values(), key=lambda m: (m.shmid, m.shm_offset))

    def _check_persistent(
        self, shmid: int, fd: int, fd_offset: int, shm_offset: int, length: int
    ) -> None:
        """Refuse what the front-end would refuse in any state, in the words it would use."""
        size = self.shmem_regions.get(shmid)
        if size is None:
            declared = sorted(self.shmem_regions)
            raise DeviceConfigError(
                f"shmid {shmid}: no such shared memory region (the device declares {declared})"
            )
        span = f"[{shm_offset:#x}, +{length:#x}) from fd offset {fd_offset:#x}"
        with self._remap_cond:
            overlapping = [
                m
                for m in self._persistent.values()
                if m.shmid == shmid
                and shm_offset < m.shm_offset + m.length
                and m.shm_offset < shm_offset + length
            ]
        try:
            info = os.fstat(fd)
        except OSError as exc:
            raise DeviceConfigError(f"shmid {shmid}: {span}: fd {fd}: {exc}") from exc
        if length <= 0:
            problem = "length must be positive"
        elif (shm_offset | fd_offset | length) % PAGE_SIZE:
            problem = f"not {PAGE_SIZE}-byte aligned"
        elif shm_offset < 0 or fd_offset < 0 or shm_offset + length > size:
            problem = f"outside the {size:#x}-byte region"
        elif overlapping:
            problem = f"overlaps persistent mapping {overlapping[0]}"
        elif not stat.S_ISREG(info.st_mode):
            problem = f"fd {fd} is not a regular file or memfd"
        elif fd_offset + length > info.st_size:
            problem = f"file has only {info.st_size:#x} bytes"
        else:
            return
        raise DeviceConfigError(f"shmid {shmid}: {span}: {problem}")

    def _schedule_remap(self, reason: str, only: tuple[int, int] | None = None) -> None:
        with self._remap_cond:
            if self._persistent:
                self._remap_reasons.append((reason, only))
                self._remap_cond.notify()

    def _remap_worker(self) -> None:
        """Maps the persistent mappings, one round per batch of events, off the loop thread:
        the loop keeps answering the front-end, which may read the channel only then."""
        while True:
            with self._remap_cond:
                while not self._remap_reasons and not self._stopping.is_set():
                    self._remap_cond.wait()
                if self._stopping.is_set():
                    return
                due, self._remap_reasons = self._remap_reasons, []
                wanted = {only for _, only in due}
                mappings = sorted(
                    (m for key, m in self._persistent.items() if None in wanted or key in wanted),
                    key=lambda m: (m.shmid, m.shm_offset),
                )
            reasons = [reason for reason, _ in due]
            why = ", ".join(dict.fromkeys(reasons))
            after_reset = "after RESET_DEVICE" in reasons
            for mapping in mappings:
                # Behind QEMU 11.1 a map once the queues stopped again would crash it; a
                # front-end that sends RESET_DEVICE takes maps after it.
                if not (after_reset or self._running):
                    log.info("persistent mappings not mapped (%s): the queues stopped", why)
                    break
                if not self._restore(mapping, why):
                    break

    def _mappings_dropped(self) -> None:
        """The front-end dropped every mapping (a reset, or it left)."""
        with self._remap_cond:
            self._live.clear()
            self._drops += 1

    def _restore(self, mapping: PersistentMapping, why: str) -> bool:
        """Map ``mapping`` unless it is live; False when the channel is gone (the next channel
        maps it again)."""
        key = (mapping.shmid, mapping.shm_offset)

        def map_it() -> None:
            self.shmem_map(
                mapping.shmid,
                mapping.fd,
                mapping.fd_offset,
                mapping.shm_offset,
                mapping.length,
                writable=mapping.writable,
            )

        try:
            with self._remap_cond:  # forgotten meanwhile (shmem_unmap): leave it be
                if self._persistent.get(key) is not mapping:
                    return True
                live = key in self._live
                drops = self._drops
            if live:
                log.info("persistent mapping %s still mapped (%s)", mapping, why)
                return True
            try:
                map_it()
            except FrontendRefused as exc:
                if exc.code == errno.EEXIST:  # our front-end: it survived, nothing dropped it
                    log.info("persistent mapping %s still mapped (%s)", mapping, why)
                    self._mark_live(key, drops)
                    return True
                if exc.code != QEMU_REFUSED:
                    raise
                # QEMU answers 1 to everything; after an event that dropped nothing the
                # mapping is still there: replace it.
                with contextlib.suppress(FrontendRefused):
                    self._shmem_unmap(mapping.shmid, mapping.shm_offset, mapping.length)
                map_it()
        except FrontendRefused as exc:
            log.warning("persistent mapping %s not mapped (%s): %s", mapping, why, exc.meaning)
            return True
        except (ChannelFailed, StateError) as exc:
            log.warning("persistent mappings not mapped (%s): %s", why, exc)
            return False
        log.info("persistent mapping %s mapped (%s)", mapping, why)
        self._mark_live(key, drops)
        return True

    def _mark_live(self, key: tuple[int, int], drops: int) -> None:
        with self._remap_cond:
            if key in self._persistent and drops == self._drops:
                self._live.add(key)

    def config_changed(self) -> None:
        """Tell the front-end the device config changed (CONFIG_CHANGE_MSG): it re-reads it
        and raises the guest's config interrupt."""
        self._backend_request(
            BackendReq.CONFIG_CHANGE_MSG, EMPTY, [], VhostUserProtocolFeature.CONFIG
        )

    def _backend_request(
        self, req: BackendReq, payload: Payload, fds: list[int], feature: int, what: str = ""
    ) -> None:
        with self._channel_lock:
            sock = self._channel
            if sock is None:
                raise StateError(
                    f"cannot send {req.name}",
                    state="no back-end channel",
                    required="SET_BACKEND_REQ_FD",
                )
            if not self.acked_protocol_features & feature:
                raise StateError(
                    f"cannot send {req.name}",
                    state=f"protocol features {self.acked_protocol_features:#x}",
                    required=f"protocol feature {feature:#x}",
                )
            need_reply = bool(self.acked_protocol_features & VhostUserProtocolFeature.REPLY_ACK)
            msg = request(req, payload, fds=fds, need_reply=need_reply)
            data, out_fds = encode(msg)
            log.debug("--> %s (back-end channel)", describe(msg))
            try:
                send_with_fds(sock, data, out_fds)
                if not need_reply:
                    return
                reply = self._read_channel_reply(sock, req)
            except (TransportError, OSError, RemoteProtocolError) as exc:
                # Whatever the front-end sends next on it can no longer be paired with a
                # request: the channel goes (the main socket stays).
                self._channel = None
                self._channel_ready.clear()
                self._channel_announced = False
                sock.close()
                raise ChannelFailed(f"{req.name}: back-end channel failed: {exc}") from exc
        if reply:
            raise FrontendRefused(req, reply, what)

    def _read_channel_reply(self, sock: socket.socket, req: BackendReq) -> int:
        """The u64 status answering ``req``; ``TransportError`` on timeout or end of stream,
        ``RemoteProtocolError`` for anything else (the caller drops the channel)."""
        decoder = VhostUserDecoder(Channel.BACKEND, expect_replies=True)
        try:
            while (msg := decoder.next_message()) is None:
                try:
                    data, fds = recv_with_fds(sock, decoder.bytes_needed())
                except TimeoutError as exc:
                    raise TransportError(f"no reply within {self.reply_timeout}s") from exc
                if not data:
                    close_fds(fds)
                    raise TransportError("front-end closed the back-end channel")
                decoder.feed(data, fds)
        finally:
            decoder.close()
        with msg:
            log.debug("<-- %s (back-end channel)", describe(msg))
            if msg.request is not req or not isinstance(msg.payload, VhostUserU64):
                raise RemoteProtocolError(f"expected a {req.name} reply, got {describe(msg)}")
            return msg.payload.value

    # -- introspection ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """A JSON-friendly snapshot of the connection and the queues."""
        return {
            "connected": self.connected,
            "features": self.acked_features,
            "protocol_features": self.acked_protocol_features,
            "backend_channel": self._channel is not None,
            "memory_regions": len(self.memory.regions),
            "queues": [
                {
                    "index": v.index,
                    "size": v.size,
                    "started": v.started,
                    "enabled": v.enabled,
                    "broken": v.broken,
                    "kicks": v.stats.kicks,
                    "popped": v.stats.popped,
                    "pushed": v.stats.pushed,
                    "bytes_written": v.stats.bytes_written,
                    "notifications": v.stats.notifications,
                    "errors": v.stats.errors,
                }
                for v in self.vrings
            ],
        }
