"""The QEMU-like client against a scripted server over a real socketpair.

The peer decodes with the server-role ``VfioUserDecoder`` and answers each request with one reply
(lockstep), so every test checks both what the client puts on the wire and how it reads
the answers.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from emulator.vfio_user.client import (
    QEMU_CAPABILITIES,
    VfioUserClient,
    VfioUserError,
    bar_size,
)
from emulator.vfio_user.codec import Message, Role, VfioUserDecoder, encode
from emulator.vfio_user.messages import (
    Command,
    DeviceFlags,
    DeviceInfo,
    DmaMap,
    DmaMapFlags,
    HeaderFlags,
    IrqInfo,
    IrqInfoFlags,
    IrqSetFlags,
    RegionAccess,
    RegionFlags,
    RegionInfo,
    RegionWriteMulti,
    SetIrqs,
    SparseMmapArea,
    Version,
    pack_region_caps,
    sparse_mmap_cap,
)
from wire.errors import RemoteProtocolError, TransportError
from wire.unix import close_fds, recv_with_fds, send_with_fds

QEMU_CAPS_TEXT = (
    b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
    b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, '
    b'"pgsize": 4096}, "write_multiple": true}}\x00'
)

Handler = Callable[[Message], "Message | bytes | None"]


class ScriptedServer:
    """Serves one handler per request in a thread; records every request it decoded."""

    def __init__(self, sock: socket.socket, handler: Handler) -> None:
        self.sock = sock
        self.handler = handler
        self.received: list[Message] = []
        self.raw: list[bytes] = []
        self.error: BaseException | None = None
        self._decoder = VfioUserDecoder(Role.SERVER)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                msg = self._decoder.next_message()
                if msg is None:
                    data, fds = recv_with_fds(self.sock, 65536)
                    if not data:
                        close_fds(fds)
                        return
                    self.raw.append(data)
                    self._decoder.feed(data, fds)
                    continue
                self.received.append(msg)
                answer = self.handler(msg)
                if isinstance(answer, bytes):
                    send_with_fds(self.sock, answer)
                elif answer is not None:
                    data, fds = encode(answer)
                    send_with_fds(self.sock, data, fds)
                    answer.close()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> list[Message]:
        self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self._decoder.close()
        self.sock.close()
        if self.error is not None:
            raise self.error
        return self.received


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], tuple[VfioUserClient, ScriptedServer]]]:
    made: list[tuple[VfioUserClient, ScriptedServer]] = []

    def start(handler: Handler, timeout: float = 5.0) -> tuple[VfioUserClient, ScriptedServer]:
        ours, theirs = socket.socketpair()
        pair = (VfioUserClient(ours, timeout=timeout), ScriptedServer(theirs, handler))
        made.append(pair)
        return pair

    yield start
    for client, server in made:
        client.close()
        server.stop()
        for msg in server.received:
            msg.close()


SERVER_CAPS = {"capabilities": {"max_msg_fds": 2, "max_data_xfer_size": 4096}}


def answer_version(msg: Message) -> Message:
    return msg.reply(Version(0, 0, SERVER_CAPS))


def test_version_sends_qemus_exact_text_and_applies_the_reply(
    serve: Callable[..., tuple[VfioUserClient, ScriptedServer]],
) -> None:
    client, server = serve(answer_version)
    reply = client.version()
    assert reply.caps == SERVER_CAPS["capabilities"]
    assert client.max_send_fds == 2
    assert client.max_data_xfer_size == 4096
    assert not client.write_multiple
    raw = server.raw[0]
    assert struct.unpack_from("<HHIII", raw) == (0, 1, 20 + len(QEMU_CAPS_TEXT), 0, 0)
    assert raw[16:20] == b"\0\0\0\0"
    assert raw[20:] == QEMU_CAPS_TEXT
    assert server.received[0].payload == Version(0, 0, json.loads(QEMU_CAPS_TEXT[:-1]))
    assert json.loads(QEMU_CAPS_TEXT[:-1]) == QEMU_CAPABILITIES


def _raw_version_reply(msg: Message, text: bytes, minor: int = 0) -> bytes:
    body = struct.pack("<HH", 0, minor) + text
    return struct.pack("<HHIII", msg.msg_id, 1, 16 + len(body), 1, 0) + body


@pytest.mark.parametrize(
    "text",
    [b'{"capabilities": {}}', b"", b'{"capabilities": {"max_msg_fds": 17}}\x00'],
    ids=["no-nul", "no-caps", "refused-by-qemu"],
)
def test_version_rejects_what_qemu_rejects(
    serve: Callable[..., tuple[VfioUserClient, ScriptedServer]], text: bytes
) -> None:
    client, _ = serve(lambda msg: _raw_version_reply(msg, text))
    with pytest.raises(RemoteProtocolError):
        client.version()


def test_version_reply_larger_than_the_request_is_refused(
    serve: Callable[..., tuple[VfioUserClient, ScriptedServer]],
) -> None:
    big = {"capabilities": {"padding": "x" * 300}}
    client, _ = serve(lambda msg: msg.reply(Version(0, 0, big)))
    with pytest.raises(RemoteProtocolError, match="buffer"):
        client.version()


def test_dma_map_passes_the_ram_fd(
    serve: Callable[..., tuple[VfioUserClient, ScriptedServer]],
) -> None:
    client, server = serve(lambda msg: msg.reply())
    ram = os.memfd_create("ram", os.MFD_CLOEXEC)
    try:
        client.dma_map(ram, 0x100000, 0x200000, offset=0x100000)
        client.dma_map(None, 0xC0000, 0x20000, flags=DmaMapFlags.READ)
        assert os.fstat(ram)  # still ours
        first, second = server.received
        assert first.payload == DmaMap(
            32, DmaMapFlags.READ | DmaMapFlags.WRITE, 0x100000, 0x100000, 0x200000
        )
        assert len(first.fds) == 1
        assert os.fstat(first.fds[0]).st_ino == os.fstat(ram).st_ino
        assert second.payload == DmaMap(32, DmaMapFlags.READ, 0, 0xC0000, 0x20000)
        assert second.fds == ()
    finally:
        os.close(ram)


def test_region_info_probes_with_argsz_32_then_asks_again(
    serve: Callable[..., tuple[VfioUserClient, ScriptedServer]],
) -> None:
    cap_offset, caps = pack_region_caps([sparse_mmap_cap([SparseMmapArea(0x1000, 0x1000)])])
    full = 32 + len(caps)
    flags = RegionFlags.READ | RegionFlags.WRITE | RegionFlags.MMAP | RegionFlags.CAPS
    backing = os.memfd_create("bar4", os.MFD_CLOEXEC)

    def handler(msg: Message) -> Message:
        request = msg.payload
        assert isinstance(request, RegionInfo)
        if request.argsz < full:
            return msg.reply(RegionInfo(full, flags, request.index, 0, 0x4000, 0))
        fd = os.dup(backing)
        return msg.reply(RegionInfo(full, flags, request.index, cap_offset, 0x4000, 0, caps), [fd])

    client, server = serve(handler)
    try:
        region = client.get_region_info(4)
        assert region.info.size == 0x4000
        assert region.fd is not None
        assert os.fstat(region.fd).st_ino == os.fstat(backing).st_ino
        os.close(region.fd)
        assert len(region.caps) == 1 and region.caps[0].id == 1
        probe, again = server.received
        assert probe.payload == RegionInfo(32, RegionFlags(0), 4, 0, 0, 0)
        assert again.payload == RegionInfo(full, RegionFlags(0), 4, 0, 0, 0)
        assert probe.size == again.size == 48  # QEMU's request never grows with argsz
    finally:
        os.close(backing)


def test_error_reply_raises_with_errno_and_command(
    serve: Callable[..., tuple[VfioUserClient, ScriptedServer]],
) -> None:
    client, _ = serve(lambda msg: msg.error_reply(errno.EFAULT))
    with pytest.raises(VfioUserError) as info:
        client.region_read(2, 0x100, 4)
    assert info.value.errno == errno.EFAULT
    assert info.value.command is Command.REGION_READ


def test_posted_write_is_not_waited_for(
    serve: Callable[..., tuple[VfioUserClient, ScriptedServer]],
) -> None:
    state = bytearray(16)

    def handler(msg: Message) -> Message | None:
        access = msg.payload
        assert isinstance(access, RegionAccess)
        if msg.command is Command.REGION_WRITE:
            state[access.offset : access.offset + access.count] = access.data
            return (
                None
                if msg.no_reply
                else msg.reply(RegionAccess(access.offset, access.region, access.count))
            )
        data = bytes(state[access.offset : access.offset + access.count])
        return msg.reply(RegionAccess(access.offset, access.region, access.count, data))

    client, server = serve(handler)
    client.region_write(2, 0, b"\x11\x22", posted=True)
    client.region_write(2, 2, b"\x33\x44")
    assert client.region_read(2, 0, 4) == b"\x11\x22\x33\x44"
    posted, synced, _ = server.received
    assert posted.flags == HeaderFlags.NO_REPLY
    assert synced.flags == HeaderFlags(0)


def test_write_multi_is_posted(serve: Callable[..., tuple[VfioUserClient, ScriptedServer]]) -> None:
    client, server = serve(lambda msg: None if msg.no_reply else msg.reply())
    client.region_write_multi([(2, 0, b"\1"), (2, 8, b"\2" * 8)])
    client.device_reset()
    multi, reset = server.received
    assert multi.no_reply
    assert multi.payload == RegionWriteMulti(
        (RegionAccess(0, 2, 1, b"\1"), RegionAccess(8, 2, 8, b"\2" * 8))
    )
    assert multi.size == 16 + 8 + 2 * 24
    assert reset.command is Command.DEVICE_RESET


def test_set_irqs_sends_eventfds_in_chunks_of_max_msg_fds(
    serve: Callable[..., tuple[VfioUserClient, ScriptedServer]],
) -> None:
    def handler(msg: Message) -> Message:
        return answer_version(msg) if msg.command is Command.VERSION else msg.reply()

    client, server = serve(handler)
    client.version()  # server allows 2 fds per message
    events = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(3)]
    try:
        flags = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
        client.set_irqs(2, flags, 0, 3, fds=events)
        client.set_irqs(2, IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_MASK, 0, 2, data=b"\1\0")
        _, first, second, boolean = server.received
        assert first.payload == SetIrqs(20, flags, 2, 0, 2)
        assert second.payload == SetIrqs(20, flags, 2, 2, 1)
        assert (len(first.fds), len(second.fds)) == (2, 1)
        os.eventfd_write(first.fds[1], 5)
        assert os.eventfd_read(events[1]) == 5
        assert boolean.payload == SetIrqs(
            22, IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_MASK, 2, 0, 2, b"\1\0"
        )
    finally:
        close_fds(events)


def test_timeout_is_a_transport_error(
    serve: Callable[..., tuple[VfioUserClient, ScriptedServer]],
) -> None:
    client, _ = serve(lambda msg: None, timeout=0.2)
    with pytest.raises(TransportError):
        client.device_reset()


def test_stale_reply_ids_are_skipped(
    serve: Callable[..., tuple[VfioUserClient, ScriptedServer]],
) -> None:
    def handler(msg: Message) -> bytes:
        stale, _ = encode(Message(Command.DEVICE_RESET, (msg.msg_id + 100) & 0xFFFF).reply())
        right, _ = encode(msg.reply())
        return stale + right

    client, _ = serve(handler)
    client.device_reset()
    client.device_reset()


def test_server_closing_is_a_transport_error() -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    with VfioUserClient(ours, timeout=1) as client, pytest.raises(TransportError):
        client.device_reset()


class FakeDevice:
    """Just enough of a PCI function for ``startup()``: config space with BAR masks."""

    BAR_SIZES = (0, 0, 0x4000, 0, 0x10000, 0)

    def __init__(self) -> None:
        self.config = bytearray(256)
        self.config[0:4] = struct.pack("<HH", 0x1AF4, 0x1041)
        self.config[0x10 + 8 : 0x10 + 12] = struct.pack("<I", 0xFE000000)
        self.config[0x10 + 16 : 0x10 + 20] = struct.pack("<I", 0xFD000000)

    def write_config(self, offset: int, data: bytes) -> None:
        if 0x10 <= offset < 0x28 and len(data) == 4:
            size = self.BAR_SIZES[(offset - 0x10) // 4]
            value = struct.unpack("<I", data)[0] & ~(size - 1) if size else 0
            data = struct.pack("<I", value)
        self.config[offset : offset + len(data)] = data

    def __call__(self, msg: Message) -> Message | None:
        payload = msg.payload
        if msg.command is Command.VERSION:
            return answer_version(msg)
        if msg.command is Command.DEVICE_GET_INFO:
            return msg.reply(DeviceInfo(16, DeviceFlags.PCI | DeviceFlags.RESET, 9, 5))
        if isinstance(payload, RegionInfo):
            size = 256 if payload.index == 7 else self.BAR_SIZES[payload.index]
            flags = RegionFlags.READ | RegionFlags.WRITE if size else RegionFlags(0)
            return msg.reply(RegionInfo(32, flags, payload.index, 0, size, 0))
        if msg.command is Command.DEVICE_GET_IRQ_INFO:
            assert isinstance(payload, IrqInfo)
            return msg.reply(IrqInfo(16, IrqInfoFlags.EVENTFD, payload.index, 1))
        if isinstance(payload, RegionAccess) and msg.command is Command.REGION_READ:
            data = bytes(self.config[payload.offset : payload.offset + payload.count])
            return msg.reply(RegionAccess(payload.offset, payload.region, payload.count, data))
        if isinstance(payload, RegionAccess):
            self.write_config(payload.offset, payload.data)
            return msg.reply(RegionAccess(payload.offset, payload.region, payload.count))
        return msg.reply()


def test_startup_replays_qemus_order(
    serve: Callable[..., tuple[VfioUserClient, ScriptedServer]],
) -> None:
    device = FakeDevice()
    client, server = serve(device)
    ram = os.memfd_create("ram", os.MFD_CLOEXEC)
    try:
        info = client.startup(ram, 1 << 20)
    finally:
        os.close(ram)
    order = [(m.command, getattr(m.payload, "index", None)) for m in server.received[:13]]
    assert order == [
        (Command.VERSION, None),
        (Command.DMA_MAP, None),
        (Command.DEVICE_GET_INFO, None),
        *[(Command.DEVICE_GET_REGION_INFO, i) for i in (0, 1, 2, 3, 4, 5, 7)],
        *[(Command.DEVICE_GET_IRQ_INFO, i) for i in (2, 3, 4)],
    ]
    config_read = server.received[13].payload
    assert config_read == RegionAccess(0, 7, 256)
    assert info.config[:4] == struct.pack("<HH", 0x1AF4, 0x1041)
    assert [bar_size(v) for v in info.bar_sizing] == list(FakeDevice.BAR_SIZES)
    assert struct.unpack_from("<I", device.config, 0x18)[0] == 0xFE000000  # restored
    assert struct.unpack_from("<H", device.config, 0x04)[0] == 0x6
    last = server.received[-1].payload
    assert last == RegionAccess(4, 7, 2, b"\x06\x00")
