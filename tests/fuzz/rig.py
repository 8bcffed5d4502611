"""The peers a fuzz test plays against the emulator, and the emulator itself in-process.

``ScriptedBackend`` is a vhost-user back-end the test controls message by message (including
every way of getting the protocol wrong); ``RunningEmulator`` runs the real ``Emulator`` with
its event loop in a thread, so a test can inspect the shared-memory BAR between two messages;
``RawVfioClient`` speaks vfio-user byte by byte with any fds attached. Nothing here sleeps to
synchronise: every wait is on a socket, an event or a thread, with a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from emulator.app import Emulator
from emulator.config import EmulatorConfig
from emulator.errors import ANY_ERROR
from emulator.pci.device import RegionIndex
from emulator.vfio_user import messages as vm
from emulator.vfio_user.codec import Message, Role, VfioUserDecoder, encode
from vhost_user.codec import Channel, VhostUserDecoder, VhostUserMessage, reply_to
from vhost_user.codec import encode as vhost_encode
from vhost_user.messages import (
    EMPTY,
    VHOST_USER_F_PROTOCOL_FEATURES,
    FrontendReq,
    Payload,
    VhostUserConfig,
    VhostUserMMap,
    VhostUserProtocolFeature,
    VhostUserShMemConfig,
    VhostUserU64,
    VhostUserVringState,
)
from wire.errors import DecodeError
from wire.unix import close_fds, recv_with_fds, send_with_fds

PF = VhostUserProtocolFeature
PAGE = 4096
WAIT = 10.0
VIRTIO_F_VERSION_1 = 1 << 32
BACKEND_FEATURES = VIRTIO_F_VERSION_1 | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
BACKEND_PROTOCOL = PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG | PF.RESET_DEVICE | PF.SHMEM
#: The layout every in-process fuzz target uses: small enough to compare the whole BAR often.
REGIONS = {0: 16 * PAGE, 1: 8 * PAGE}
CONFIG_REGION = int(RegionIndex.CONFIG)
SHMEM_BAR = 4
HEADER = struct.Struct("=III")
MMAP = struct.Struct("=B7xQQQQ")


# -- fds of every kind -------------------------------------------------------------------------

FD_KINDS = (
    "memfd-sealable",
    "memfd",
    "memfd-sealed",
    "memfd-write-sealed",
    "regular",
    "regular-readonly",
    "tmpfs",
    "dev-zero",
    "pipe",
    "socket",
    "eventfd",
    "directory",
)
#: Kinds the emulator maps (whatever mmap accepts); the others mmap itself refuses.
MAPPABLE_KINDS = FD_KINDS[:8]


@dataclass
class Backing:
    """A file a fuzzer offers to the emulator; ``content`` is its bytes (None: not a file).

    ``keep`` is a second fd the test holds on to (to truncate or rewrite the file later).
    ``tail`` holds what guest writes left past EOF in EOF's page: a mapping shows that page
    whole, the file never gets those bytes, and writeback of a disk file may zero them again.
    """

    kind: str
    fd: int
    content: bytearray | None
    keep: int | None = None
    extra: list[int] = field(default_factory=list)
    tail: dict[int, int] = field(default_factory=dict)

    def close(self) -> None:
        close_fds([fd for fd in (self.fd, self.keep, *self.extra) if fd is not None])

    def truncate(self, size: int) -> bool:
        """Shrink the file through our own fd; False when a seal forbids it or it would grow."""
        if self.keep is None or self.content is None or size >= len(self.content):
            return False
        try:
            os.ftruncate(self.keep, size)
        except PermissionError:
            return False
        del self.content[size:]
        self.tail.clear()  # pages past the new EOF are gone, the rest of its page zeroed
        return True

    def store(self, position: int, data: bytes) -> None:
        """What a guest write through a writable mapping does at file ``position``."""
        content = self.content
        assert content is not None
        end = position + len(data)
        inside = data[: max(0, len(content) - position)]
        content[position : position + len(inside)] = inside
        eof_page_end = -(-len(content) // PAGE) * PAGE
        for at in range(max(position, len(content)), min(end, eof_page_end)):
            self.tail[at] = data[at - position]


def pattern(length: int, seed: int) -> bytearray:
    """A page-distinct pattern, so a mapping showing up at the wrong place is visible."""
    head = struct.pack("<II", seed & 0xFFFFFFFF, 0x5EED)
    page = bytes((seed * 7 + i) & 0xFF for i in range(PAGE - 16))
    out = bytearray()
    for index in range(-(-length // PAGE)):
        out += head + struct.pack("<Q", index) + page
    return out[:length]


def make_backing(kind: str, size: int, seed: int, workdir: Path | None = None) -> Backing:
    """An fd of ``kind`` holding ``size`` bytes of ``pattern(size, seed)`` when it is a file."""
    data = pattern(size, seed)
    if kind.startswith("memfd"):
        flags = os.MFD_CLOEXEC | (0 if kind == "memfd" else os.MFD_ALLOW_SEALING)
        fd = os.memfd_create(f"fuzz-{kind}", flags)
        os.write(fd, data) if data else None
        if kind == "memfd-sealed":
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
        if kind == "memfd-write-sealed":
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        return Backing(kind, fd, data, os.dup(fd))
    if kind in ("regular", "regular-readonly", "tmpfs"):
        directory = Path("/dev/shm") if kind == "tmpfs" else workdir
        with tempfile.NamedTemporaryFile(dir=directory, delete=False) as handle:
            handle.write(data)
            name = handle.name
        try:
            fd = os.open(name, os.O_RDONLY if kind == "regular-readonly" else os.O_RDWR)
            keep = os.open(name, os.O_RDWR)
        finally:
            os.unlink(name)
        return Backing(kind, fd, data, keep)
    if kind == "pipe":
        read_end, write_end = os.pipe()
        return Backing(kind, read_end, None, extra=[write_end])
    if kind == "socket":
        one, two = socket.socketpair()
        return Backing(kind, one.detach(), None, extra=[two.detach()])
    if kind == "eventfd":
        return Backing(kind, os.eventfd(0), None)
    if kind == "dev-zero":
        return Backing(kind, os.open("/dev/zero", os.O_RDWR), bytearray())  # sized when mapped
    if kind == "directory":
        return Backing(kind, os.open("/", os.O_RDONLY | os.O_DIRECTORY), None)
    raise ValueError(kind)


# -- the scripted vhost-user back-end ------------------------------------------------------------

#: How the back-end answers one request of the front-end's.
ACTIONS = (
    "normal",
    "no-reply",
    "short",
    "long",
    "wrong-request",
    "not-a-reply",
    "extra-fd",
    "garbage",
    "bad-version",
    "huge-size",
    "disconnect",
    "map-first",
)
Policy = Callable[[FrontendReq, int], str]


def always_normal(_req: FrontendReq, _index: int) -> str:
    return "normal"


class ScriptedBackend:
    """A vhost-user back-end on ``path`` whose every answer the test chooses.

    ``policy(request, index)`` picks an ``ACTIONS`` entry for each request of a connection;
    ``channel`` is the back-end channel once SET_BACKEND_REQ_FD arrived (the test drives it).
    Connections are served one after the other by a thread, like a real back-end.
    """

    def __init__(
        self,
        path: Path,
        *,
        regions: dict[int, int] | None = None,
        protocol: int = int(BACKEND_PROTOCOL),
        features: int = BACKEND_FEATURES,
        queues: int = 1,
        policy: Policy = always_normal,
    ) -> None:
        self.path = path
        self.regions = dict(REGIONS if regions is None else regions)
        self.protocol = protocol
        self.features = features
        self.queues = queues
        self.policy = policy
        self.requests: list[FrontendReq] = []
        self.messages_in = 0
        self.messages_out = 0
        self.connections = 0
        self.channel: socket.socket | None = None
        self.channel_ready = threading.Event()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self._conn: socket.socket | None = None
        self._stop = threading.Event()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, name="scripted-backend", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        os.write(self._stop_w, b"x")
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "scripted back-end thread did not stop"
        self.listener.close()
        self.drop_channel()
        close_fds([self._stop_r, self._stop_w])
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> ScriptedBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def drop_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.channel_ready.clear()

    def kick_off(self) -> None:
        """Close the current main connection (the back-end 'crashes')."""
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _serve(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self.listener, self._stop_r], [], [])
            if self._stop_r in readable:
                return
            conn, _ = self.listener.accept()
            self._conn = conn
            self.connections += 1
            self.disconnected.clear()
            self.connected.set()
            try:
                self._serve_connection(conn)
            except (OSError, *ANY_ERROR):
                pass  # the front-end hung up or sent what the codec refuses: connection over
            except BaseException as exc:
                self.errors.append(exc)
            finally:
                self._conn = None
                conn.close()
                self.connected.clear()
                self.disconnected.set()

    def _serve_connection(self, conn: socket.socket) -> None:
        decoder = VhostUserDecoder(Channel.FRONTEND, expect_replies=False)
        index = 0
        try:
            while True:
                readable, _, _ = select.select([conn, self._stop_r], [], [])
                if self._stop_r in readable:
                    return
                data, fds = recv_with_fds(conn, max(decoder.bytes_needed(), 1))
                if not data:
                    close_fds(fds)
                    return
                decoder.feed(data, fds)
                message = decoder.next_message()
                if message is None:
                    continue
                self.messages_in += 1
                with message:
                    req = FrontendReq(message.request)
                    self.requests.append(req)
                    action = self.policy(req, index)
                    index += 1
                    if not self._answer(conn, message, req, action):
                        return
        finally:
            decoder.close()

    def _normal_reply(self, message: VhostUserMessage, req: FrontendReq) -> Payload | None:
        if req is FrontendReq.GET_FEATURES:
            return VhostUserU64(self.features)
        if req is FrontendReq.GET_PROTOCOL_FEATURES:
            return VhostUserU64(self.protocol)
        if req is FrontendReq.GET_QUEUE_NUM:
            return VhostUserU64(self.queues)
        if req is FrontendReq.GET_SHMEM_CONFIG:
            sizes = tuple(self.regions.get(i, 0) for i in range(max(self.regions, default=-1) + 1))
            return VhostUserShMemConfig.declaring(sizes)
        if req is FrontendReq.GET_CONFIG:
            query = message.payload
            assert isinstance(query, VhostUserConfig)
            return VhostUserConfig(query.offset, query.size, 0, bytes(query.size))
        if req is FrontendReq.GET_VRING_BASE:
            state = message.payload
            assert isinstance(state, VhostUserVringState)
            return VhostUserVringState(state.index, 0)
        if req is FrontendReq.SET_BACKEND_REQ_FD:
            self.drop_channel()
            self.channel = socket.socket(fileno=os.dup(message.fds[0]))
            self.channel_ready.set()
        if message.need_reply:
            return VhostUserU64(0)
        return None

    def _answer(
        self, conn: socket.socket, message: VhostUserMessage, req: FrontendReq, action: str
    ) -> bool:
        """Send what ``action`` says; False ends the connection."""
        payload = self._normal_reply(message, req)
        if action == "disconnect":
            return False
        if payload is None or action == "no-reply":
            return True
        if action == "map-first" and self.channel is not None:
            # A back-end that needs its SHMEM_MAP answered before it answers us.
            backing = make_backing("memfd-sealable", PAGE, 1)
            try:
                body = MMAP.pack(0, 0, 0, PAGE, 0)
                data = HEADER.pack(9, 0x1 | 0x8, len(body)) + body
                send_with_fds(self.channel, data, [backing.fd])
                self.channel.settimeout(WAIT)
                reply = self.channel.recv(HEADER.size + 8)
                assert len(reply) == HEADER.size + 8, "front-end never answered SHMEM_MAP"
            finally:
                backing.close()
        out = reply_to(message, payload)
        data, fds = vhost_encode(out)
        extra: list[int] = []
        if action == "short":
            data = (
                HEADER.pack(req, 0x5, max(len(data) - HEADER.size - 1, 0)) + data[HEADER.size : -1]
            )
        elif action == "long":
            data = (
                HEADER.pack(req, 0x5, len(data) - HEADER.size + 8) + data[HEADER.size :] + b"x" * 8
            )
        elif action == "wrong-request":
            other = FrontendReq.GET_FEATURES if req != FrontendReq.GET_FEATURES else 24
            data = HEADER.pack(other, 0x5, len(data) - HEADER.size) + data[HEADER.size :]
        elif action == "not-a-reply":
            data = HEADER.pack(req, 0x1, len(data) - HEADER.size) + data[HEADER.size :]
        elif action == "extra-fd":
            extra = [os.eventfd(0)]
        elif action == "garbage":
            data = os.urandom(len(data))
        elif action == "bad-version":
            data = HEADER.pack(req, 0x6, len(data) - HEADER.size) + data[HEADER.size :]
        elif action == "huge-size":
            data = HEADER.pack(req, 0x5, 0xFFFF_FFF0) + data[HEADER.size :]
        try:
            send_with_fds(conn, data, [*fds, *extra])
            self.messages_out += 1
        finally:
            close_fds(extra)
        return True


# -- the emulator in-process ------------------------------------------------------------------


class RunningEmulator:
    """The real ``Emulator`` with its event loop in a thread; ``crashed`` says if it died."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.emulator = Emulator(config)
        self.error: BaseException | None = None
        self.emulator.server.listen()
        self._thread = threading.Thread(target=self._run, name="emulator-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.emulator.loop.run()
        except BaseException as exc:
            self.error = exc

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def stop(self) -> None:
        self.emulator.loop.stop("test done")
        self._thread.join(WAIT)
        hung = self._thread.is_alive()
        if not hung:
            self.emulator.close()
        assert not hung, "the emulator loop did not stop"

    def __enter__(self) -> RunningEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def emulator_config(workdir: Path, **changes: object) -> EmulatorConfig:
    base: dict[str, object] = {
        "vfio_user_socket": workdir / "vfio-user.sock",
        "virtio_id": 4,
        "config_size": 8,
        "vhost_user_socket": workdir / "vhost-user.sock",
        "backend_timeout": 1.0,
    }
    base.update(changes)
    return EmulatorConfig(**base)  # type: ignore[arg-type]


@contextlib.contextmanager
def emulator_with_backend(
    workdir: Path, *, policy: Policy = always_normal, **config: object
) -> Iterator[tuple[RunningEmulator, ScriptedBackend]]:
    """A running emulator connected to a scripted back-end; both stopped on the way out."""
    cfg = emulator_config(workdir, **config)
    assert cfg.vhost_user_socket is not None
    with ScriptedBackend(cfg.vhost_user_socket, policy=policy) as backend:
        running = RunningEmulator(cfg)
        try:
            assert backend.channel_ready.wait(WAIT), "no back-end channel"
            yield running, backend
        finally:
            running.stop()


# -- a vfio-user client that sends anything ---------------------------------------------------


class PeerGone(Exception):
    """The emulator closed the connection."""


class RawVfioClient:
    """A vfio-user client that sends raw bytes (with any fds) and reads replies by id."""

    def __init__(self, path: Path, *, timeout: float = WAIT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.decoder = VfioUserDecoder(Role.CLIENT, max_msg_size=1 << 22)
        self.next_id = 1
        self.sent = 0

    def close(self) -> None:
        self.decoder.close()
        self.sock.close()

    def __enter__(self) -> RawVfioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def take_id(self) -> int:
        msg_id = self.next_id
        self.next_id = self.next_id % 0xFFFE + 1
        return msg_id

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        try:
            send_with_fds(self.sock, data, fds)
        except ANY_ERROR as exc:
            raise PeerGone(str(exc)) from exc
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                raise PeerGone(str(exc)) from exc
            raise
        self.sent += 1

    def send(self, message: Message) -> None:
        data, fds = encode(message)
        self.send_raw(data, fds)

    def receive(self) -> Message:
        """The next message from the server (decode errors are a failure: it must be valid)."""
        while True:
            message = self.decoder.next_message()
            if message is not None:
                return message
            try:
                data, fds = recv_with_fds(self.sock, 1 << 21)
            except ANY_ERROR as exc:
                raise PeerGone(str(exc)) from exc
            if not data:
                close_fds(fds)
                raise PeerGone("end of stream")
            self.decoder.feed(data, fds)

    def wait_reply(self, msg_id: int, seen: list[int] | None = None) -> Message:
        """Read until the reply to ``msg_id``; ids of earlier replies go to ``seen``.

        An error reply to a command number the client decoder would not accept a reply for
        (the fuzzer sent a server-to-client command) still counts as a reply by its id."""
        while True:
            try:
                message = self.receive()
            except DecodeError as exc:
                if exc.fatal or exc.msg_id is None:
                    raise
                if seen is not None:
                    seen.append(exc.msg_id)
                continue
            message.close()
            if message.msg_id == msg_id and message.is_reply:
                return message
            if seen is not None and message.is_reply:
                seen.append(message.msg_id)

    def call(self, command: vm.Command, payload: object = None) -> Message:
        msg_id = self.take_id()
        self.send(Message(command, msg_id, payload))  # type: ignore[arg-type]
        return self.wait_reply(msg_id)

    def version(self) -> None:
        reply = self.call(vm.Command.VERSION, vm.Version(0, 0, {"capabilities": {}}))
        assert not reply.is_error, f"VERSION refused: {reply.error}"

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        reply = self.call(vm.Command.REGION_READ, vm.RegionAccess(offset, region, count))
        assert not reply.is_error, f"REGION_READ {region}:{offset:#x}+{count} refused"
        payload = reply.payload
        assert isinstance(payload, vm.RegionAccess)
        assert len(payload.data) == count
        return payload.data

    def region_write(self, region: int, offset: int, data: bytes) -> Message:
        return self.call(vm.Command.REGION_WRITE, vm.RegionAccess(offset, region, len(data), data))


def connect_client(path: Path, *, deadline: float = WAIT) -> RawVfioClient:
    """Connect once the previous client is gone (the server takes one at a time)."""
    end = time.monotonic() + deadline
    while True:
        client = RawVfioClient(path)
        try:
            client.version()
            return client
        except (PeerGone, DecodeError):
            client.close()
            if time.monotonic() > end:
                raise
            # The server still served the previous client and closed us: wait for its turn.
            select.select([], [], [], 0.01)


def mmap_request(  # noqa: PLR0917 - the fields of VhostUserMMap, in wire order
    request: int,
    shmid: int,
    fd_offset: int,
    shm_offset: int,
    length: int,
    flags: int,
    *,
    need_reply: bool = True,
) -> bytes:
    body = VhostUserMMap(shmid, fd_offset, shm_offset, length, flags).pack()
    return HEADER.pack(request, 0x1 | (0x8 if need_reply else 0), len(body)) + body


def read_channel_reply(channel: socket.socket, timeout: float = WAIT) -> tuple[int, int, int]:
    """(request, flags, u64 status) of the front-end's next reply on the back-end channel."""
    channel.settimeout(timeout)
    data = b""
    while len(data) < HEADER.size + 8:
        try:
            chunk = channel.recv(HEADER.size + 8 - len(data))
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise PeerGone("back-end channel closed")
        data += chunk
    request, flags, size = HEADER.unpack_from(data)
    assert size == 8, f"reply payload of {size} bytes"
    return request, flags, struct.unpack_from("=Q", data, HEADER.size)[0]


__all__ = ["EMPTY"]
