"""Golden bytes, round trips, hostile input and fd ownership for the vfio-user codec."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.vfio_user.codec import Message, Role, VfioUserDecoder, encode, error_reply_for
from emulator.vfio_user.messages import (
    DEFAULT_MAX_MSG_SIZE,
    Command,
    DeviceFlags,
    DeviceInfo,
    DmaAccess,
    DmaMap,
    DmaMapFlags,
    DmaUnmap,
    DmaUnmapFlags,
    HeaderFlags,
    IoFdSubRegion,
    IrqInfo,
    IrqInfoFlags,
    IrqSetFlags,
    MsgType,
    Payload,
    RegionAccess,
    RegionCap,
    RegionFlags,
    RegionInfo,
    RegionIoFdsReply,
    RegionIoFdsRequest,
    RegionWriteMulti,
    RegionWriteMultiReply,
    SetIrqs,
    SparseMmapArea,
    Version,
    pack_region_caps,
    parse_region_caps,
    parse_sparse_mmap,
    sparse_mmap_cap,
)
from testkit.procfs import fd_count as open_fd_count
from wire.errors import DecodeError, LocalProtocolError, RemoteProtocolError
from wire.unix import recv_with_fds, send_with_fds

QEMU_CAPS_JSON = (
    '{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
    '"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, '
    '"pgsize": 4096}, "write_multiple": true}}'
)

REPLY = 1
NO_REPLY = 0x10
ERROR = 0x20


def hdr(msg_id: int, command: int, payload: bytes, flags: int = 0, err: int = 0) -> bytes:
    """Spec header written out independently of the codec: id, command, size, flags, error."""
    return struct.pack("<HHIII", msg_id, command, 16 + len(payload), flags, err) + payload


def le(fmt: str, *values: int) -> bytes:
    return struct.pack("<" + fmt, *values)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Golden:
    name: str
    message: Message
    wire: bytes
    nfds: int = 0

    @property
    def role(self) -> Role:
        """The end that receives this message."""
        from_client = (self.message.command not in (Command.DMA_READ, Command.DMA_WRITE)) != (
            self.message.is_reply
        )
        return Role.SERVER if from_client else Role.CLIENT


def _cmd(command: Command, msg_id: int, payload: Payload | None, **kw: object) -> Message:
    return Message(command, msg_id, payload, **kw)  # type: ignore[arg-type]


def _rep(command: Command, msg_id: int, payload: Payload | None = None) -> Message:
    return Message(command, msg_id, payload, type=MsgType.REPLY)


_caps_offset, _caps = pack_region_caps([sparse_mmap_cap([SparseMmapArea(0x1000, 0x2000)])])

GOLDEN = [
    Golden(
        "version-qemu",
        _cmd(Command.VERSION, 0, Version(0, 0, json.loads(QEMU_CAPS_JSON))),
        hdr(0, 1, le("HH", 0, 0) + QEMU_CAPS_JSON.encode() + b"\0"),
    ),
    Golden(
        "version-reply",
        _rep(Command.VERSION, 0, Version(0, 0, {"capabilities": {"max_msg_fds": 8}})),
        hdr(0, 1, le("HH", 0, 0) + b'{"capabilities": {"max_msg_fds": 8}}\0', REPLY),
    ),
    Golden(
        "version-reply-bare",
        _rep(Command.VERSION, 7, Version(0, 0)),
        hdr(7, 1, le("HH", 0, 0), REPLY),
    ),
    Golden(
        "dma-map-fd",
        _cmd(
            Command.DMA_MAP,
            1,
            DmaMap(32, DmaMapFlags.READ | DmaMapFlags.WRITE, 0x1000, 0x100000, 0x40000000),
        ),
        hdr(1, 2, le("IIQQQ", 32, 3, 0x1000, 0x100000, 0x40000000)),
        nfds=1,
    ),
    Golden(
        "dma-map-readonly-no-fd",
        _cmd(Command.DMA_MAP, 2, DmaMap(32, DmaMapFlags.READ, 0, 0xC0000, 0x20000)),
        hdr(2, 2, le("IIQQQ", 32, 1, 0, 0xC0000, 0x20000)),
    ),
    Golden("dma-map-reply", _rep(Command.DMA_MAP, 1), hdr(1, 2, b"", REPLY)),
    Golden(
        "dma-unmap",
        _cmd(Command.DMA_UNMAP, 3, DmaUnmap(24, DmaUnmapFlags(0), 0xC0000, 0x20000)),
        hdr(3, 3, le("IIQQ", 24, 0, 0xC0000, 0x20000)),
    ),
    Golden(
        "dma-unmap-all-reply",
        _rep(Command.DMA_UNMAP, 4, DmaUnmap(24, DmaUnmapFlags.ALL, 0, 0)),
        hdr(4, 3, le("IIQQ", 24, 2, 0, 0), REPLY),
    ),
    Golden("dma-unmap-reply-empty", _rep(Command.DMA_UNMAP, 4), hdr(4, 3, b"", REPLY)),
    Golden(
        "device-get-info",
        _cmd(Command.DEVICE_GET_INFO, 5, DeviceInfo(16, DeviceFlags(0), 0, 0)),
        hdr(5, 4, le("IIII", 16, 0, 0, 0)),
    ),
    Golden(
        "device-get-info-reply",
        _rep(Command.DEVICE_GET_INFO, 5, DeviceInfo(16, DeviceFlags.RESET | DeviceFlags.PCI, 9, 5)),
        hdr(5, 4, le("IIII", 16, 3, 9, 5), REPLY),
    ),
    Golden(
        "region-info-probe",
        _cmd(Command.DEVICE_GET_REGION_INFO, 6, RegionInfo(32, RegionFlags(0), 2, 0, 0, 0)),
        hdr(6, 5, le("IIIIQQ", 32, 0, 2, 0, 0, 0)),
    ),
    Golden(
        "region-info-reply-caps-fd",
        _rep(
            Command.DEVICE_GET_REGION_INFO,
            6,
            RegionInfo(
                32 + len(_caps),
                RegionFlags.READ | RegionFlags.WRITE | RegionFlags.MMAP | RegionFlags.CAPS,
                4,
                32,
                0x4000,
                0,
                _caps,
            ),
        ),
        hdr(
            6,
            5,
            le("IIIIQQ", 32 + 32, 15, 4, 32, 0x4000, 0)
            + le("HHI", 1, 1, 0)
            + le("II", 1, 0)
            + le("QQ", 0x1000, 0x2000),
            REPLY,
        ),
        nfds=1,
    ),
    Golden(
        "region-io-fds",
        _cmd(Command.DEVICE_GET_REGION_IO_FDS, 8, RegionIoFdsRequest(16 + 40, 0, 2, 0)),
        hdr(8, 6, le("IIII", 56, 0, 2, 0)),
    ),
    Golden(
        "region-io-fds-reply",
        _rep(
            Command.DEVICE_GET_REGION_IO_FDS,
            8,
            RegionIoFdsReply(56, 0, 2, 1, (IoFdSubRegion(0x3000, 4, 0, 0, 1, 7),)),
        ),
        hdr(8, 6, le("IIII", 56, 0, 2, 1) + le("QQIIIIQ", 0x3000, 4, 0, 0, 1, 0, 7), REPLY),
        nfds=1,
    ),
    Golden(
        "irq-info",
        _cmd(Command.DEVICE_GET_IRQ_INFO, 9, IrqInfo(16, IrqInfoFlags(0), 2, 0)),
        hdr(9, 7, le("IIII", 16, 0, 2, 0)),
    ),
    Golden(
        "irq-info-reply",
        _rep(
            Command.DEVICE_GET_IRQ_INFO,
            9,
            IrqInfo(16, IrqInfoFlags.EVENTFD | IrqInfoFlags.NORESIZE, 2, 4),
        ),
        hdr(9, 7, le("IIII", 16, 9, 2, 4), REPLY),
    ),
    Golden(
        "set-irqs-eventfds",
        _cmd(
            Command.DEVICE_SET_IRQS,
            10,
            SetIrqs(20, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, 2, 0, 2),
        ),
        hdr(10, 8, le("IIIII", 20, 0x24, 2, 0, 2)),
        nfds=2,
    ),
    Golden(
        "set-irqs-deassign",
        _cmd(
            Command.DEVICE_SET_IRQS,
            11,
            SetIrqs(20, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, 2, 0, 3),
        ),
        hdr(11, 8, le("IIIII", 20, 0x24, 2, 0, 3)),
    ),
    Golden(
        "set-irqs-bool",
        _cmd(
            Command.DEVICE_SET_IRQS,
            12,
            SetIrqs(23, IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_MASK, 2, 1, 3, b"\1\0\1"),
        ),
        hdr(12, 8, le("IIIII", 23, 0x0A, 2, 1, 3) + b"\1\0\1"),
    ),
    Golden(
        "set-irqs-disable-all",
        _cmd(
            Command.DEVICE_SET_IRQS,
            13,
            SetIrqs(20, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 1, 0, 0),
        ),
        hdr(13, 8, le("IIIII", 20, 0x21, 1, 0, 0)),
    ),
    Golden("set-irqs-reply", _rep(Command.DEVICE_SET_IRQS, 13), hdr(13, 8, b"", REPLY)),
    Golden(
        "region-read",
        _cmd(Command.REGION_READ, 14, RegionAccess(0x10, 7, 4)),
        hdr(14, 9, le("QII", 0x10, 7, 4)),
    ),
    Golden(
        "region-read-reply",
        _rep(Command.REGION_READ, 14, RegionAccess(0x10, 7, 4, b"\xf0\xff\xff\xff")),
        hdr(14, 9, le("QII", 0x10, 7, 4) + b"\xf0\xff\xff\xff", REPLY),
    ),
    Golden(
        "region-write-posted",
        _cmd(
            Command.REGION_WRITE,
            15,
            RegionAccess(0x3000, 2, 2, b"\x01\x00"),
            flags=HeaderFlags.NO_REPLY,
        ),
        hdr(15, 10, le("QII", 0x3000, 2, 2) + b"\x01\x00", NO_REPLY),
    ),
    Golden(
        "region-write-reply",
        _rep(Command.REGION_WRITE, 16, RegionAccess(0x3000, 2, 2)),
        hdr(16, 10, le("QII", 0x3000, 2, 2), REPLY),
    ),
    Golden(
        "dma-read",
        _cmd(Command.DMA_READ, 17, DmaAccess(0x1000, 8)),
        hdr(17, 11, le("QI", 0x1000, 8) + bytes(4)),
    ),
    Golden(
        "dma-read-reply",
        _rep(Command.DMA_READ, 17, DmaAccess(0x1000, 3, b"abc")),
        hdr(17, 11, le("QI", 0x1000, 3) + b"abc" + bytes(4), REPLY),
    ),
    Golden(
        "dma-write",
        _cmd(Command.DMA_WRITE, 18, DmaAccess(0x2000, 2, b"hi")),
        hdr(18, 12, le("QI", 0x2000, 2) + b"hi" + bytes(4)),
    ),
    Golden("dma-write-reply-qemu", _rep(Command.DMA_WRITE, 18), hdr(18, 12, b"", REPLY)),
    Golden(
        "dma-write-reply-spec",
        _rep(Command.DMA_WRITE, 18, DmaAccess(0x2000, 2)),
        hdr(18, 12, le("QI", 0x2000, 2) + bytes(4), REPLY),
    ),
    Golden("device-reset", _cmd(Command.DEVICE_RESET, 19, None), hdr(19, 13, b"")),
    Golden("device-reset-reply", _rep(Command.DEVICE_RESET, 19), hdr(19, 13, b"", REPLY)),
    Golden(
        "region-write-multi",
        _cmd(
            Command.REGION_WRITE_MULTI,
            20,
            RegionWriteMulti(
                (RegionAccess(0x3000, 2, 2, b"\x01\x00"), RegionAccess(0x3008, 2, 8, bytes(8)))
            ),
            flags=HeaderFlags.NO_REPLY,
        ),
        hdr(
            20,
            15,
            le("Q", 2)
            + le("QII", 0x3000, 2, 2)
            + b"\x01\x00"
            + bytes(6)
            + le("QII", 0x3008, 2, 8)
            + bytes(8),
            NO_REPLY,
        ),
    ),
    Golden(
        "region-write-multi-reply",
        _rep(Command.REGION_WRITE_MULTI, 21, RegionWriteMultiReply(2)),
        hdr(21, 15, le("Q", 2), REPLY),
    ),
    Golden(
        "error-reply",
        Message(
            Command.REGION_READ, 22, None, type=MsgType.REPLY, flags=HeaderFlags.ERROR, error=14
        ),
        hdr(22, 9, b"", REPLY | ERROR, 14),
    ),
]

GOLDEN_IDS = [g.name for g in GOLDEN]


def with_fds(golden: Golden, make_fds: Callable[[int], list[int]]) -> Message:
    return replace(golden.message, fds=tuple(make_fds(golden.nfds)))


def decode_all(decoder: VfioUserDecoder) -> list[Message]:
    out = []
    while (msg := decoder.next_message()) is not None:
        out.append(msg)
    return out


def test_golden_table_covers_every_command() -> None:
    commands = {g.message.command for g in GOLDEN if not g.message.is_reply}
    replies = {g.message.command for g in GOLDEN if g.message.is_reply}
    assert commands == set(Command)
    assert replies == set(Command)


@pytest.mark.parametrize("golden", GOLDEN, ids=GOLDEN_IDS)
def test_encode_golden(golden: Golden, make_fds: Callable[[int], list[int]]) -> None:
    msg = with_fds(golden, make_fds)
    data, fds = encode(msg)
    assert data == golden.wire
    assert fds == msg.fds
    assert len(fds) == golden.nfds


@pytest.mark.parametrize("golden", GOLDEN, ids=GOLDEN_IDS)
def test_decode_golden_whole(golden: Golden, make_fds: Callable[[int], list[int]]) -> None:
    decoder = VfioUserDecoder(golden.role)
    fds = make_fds(golden.nfds)
    decoder.feed(golden.wire, fds)
    assert decoder.bytes_needed() == 0
    msg = decoder.next_message()
    assert msg == replace(golden.message, fds=tuple(fds))
    assert msg is not None and msg.size == len(golden.wire)
    assert decoder.next_message() is None
    assert decoder.bytes_needed() == 16


@pytest.mark.parametrize("golden", GOLDEN, ids=GOLDEN_IDS)
def test_decode_golden_byte_by_byte(golden: Golden, make_fds: Callable[[int], list[int]]) -> None:
    decoder = VfioUserDecoder(golden.role)
    fds = make_fds(golden.nfds)
    for i, byte in enumerate(golden.wire):
        assert decoder.next_message() is None
        needed = decoder.bytes_needed()
        assert 0 < needed <= len(golden.wire) - i
        decoder.feed(bytes([byte]), fds if i == 0 else ())
    assert decoder.next_message() == replace(golden.message, fds=tuple(fds))


@pytest.mark.parametrize("golden", GOLDEN, ids=GOLDEN_IDS)
def test_decode_golden_with_trailing_data(
    golden: Golden, make_fds: Callable[[int], list[int]]
) -> None:
    decoder = VfioUserDecoder(golden.role)
    fds = make_fds(golden.nfds)
    if fds:
        # The kernel ends a recvmsg() after the bytes that carried fds, so the trailing
        # data of a real stream arrives in the next chunk.
        decoder.feed(golden.wire, fds)
        decoder.feed(golden.wire[:5])
    else:
        decoder.feed(golden.wire + golden.wire[:5])
    assert decoder.next_message() == replace(golden.message, fds=tuple(fds))
    assert decoder.next_message() is None
    assert decoder.bytes_needed() == 11
    decoder.feed(golden.wire[5:])
    assert decoder.next_message() == golden.message  # no fds came with the second copy
    assert decoder.next_message() is None


@pytest.mark.parametrize("golden", GOLDEN, ids=GOLDEN_IDS)
def test_decode_golden_after_leading_data(
    golden: Golden, make_fds: Callable[[int], list[int]]
) -> None:
    decoder = VfioUserDecoder(golden.role)
    fds = make_fds(golden.nfds)
    decoder.feed(golden.wire + golden.wire, fds)
    first, second = decode_all(decoder)
    assert first == golden.message
    assert second == replace(golden.message, fds=tuple(fds))


def test_qemu_version_text_is_exact() -> None:
    data, _ = encode(Message(Command.VERSION, 0, Version(0, 0, json.loads(QEMU_CAPS_JSON))))
    assert data[20:] == QEMU_CAPS_JSON.encode() + b"\0"
    assert len(data) == 16 + 4 + len(QEMU_CAPS_JSON) + 1


def test_fds_travel_over_a_real_socket(make_fds: Callable[[int], list[int]]) -> None:
    golden = next(g for g in GOLDEN if g.name == "set-irqs-eventfds")
    msg = with_fds(golden, make_fds)
    a, b = socket.socketpair()
    with a, b:
        data, fds = encode(msg)
        send_with_fds(a, data, fds)
        chunk, received = recv_with_fds(b, 4096)
        decoder = VfioUserDecoder(Role.SERVER)
        decoder.feed(chunk, received)
        got = decoder.next_message()
        assert got is not None and len(got.fds) == 2
        for sent, came in zip(msg.fds, got.fds, strict=True):
            assert sent != came
            assert os.fstat(sent).st_ino == os.fstat(came).st_ino
        got.close()
        assert not any(is_open(fd) for fd in received)


def test_fds_go_to_the_message_holding_the_chunks_last_byte(
    make_fds: Callable[[int], list[int]],
) -> None:
    plain = next(g for g in GOLDEN if g.name == "region-read").wire
    with_fd = next(g for g in GOLDEN if g.name == "dma-map-fd").wire
    fd = make_fds(1)
    decoder = VfioUserDecoder(Role.SERVER)
    # The kernel glues fd-less data in front of the chunk that carries the fds.
    decoder.feed(plain + with_fd, fd)
    first, second = decode_all(decoder)
    assert first.fds == ()
    assert second.fds == tuple(fd)


# --- hostile input ---------------------------------------------------------------------


def expect_error(decoder: VfioUserDecoder, err: int, msg_id: int, command: int) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decoder.next_message()
    exc = info.value
    assert (exc.errno, exc.msg_id, exc.request, exc.fatal) == (err, msg_id, command, False)
    return exc


def test_unknown_command_gets_enosys_and_the_stream_stays_in_sync() -> None:
    decoder = VfioUserDecoder(Role.SERVER)
    decoder.feed(hdr(40, 14, b"abcd") + GOLDEN[0].wire)
    exc = expect_error(decoder, errno.ENOSYS, 40, 14)
    assert error_reply_for(exc) == hdr(40, 14, b"", REPLY | ERROR, errno.ENOSYS)
    assert decoder.next_message() == GOLDEN[0].message


def test_command_from_the_wrong_side_is_rejected() -> None:
    decoder = VfioUserDecoder(Role.SERVER)
    decoder.feed(hdr(41, 11, le("QI", 0, 0) + bytes(4)))  # DMA_READ is the server's to send
    expect_error(decoder, errno.EINVAL, 41, 11)
    client = VfioUserDecoder(Role.CLIENT)
    client.feed(hdr(42, 13, b""))
    expect_error(client, errno.EINVAL, 42, 13)


def test_short_payload_is_einval() -> None:
    decoder = VfioUserDecoder(Role.SERVER)
    decoder.feed(hdr(43, 2, le("IIQQ", 32, 3, 0, 0)))
    expect_error(decoder, errno.EINVAL, 43, 2)
    assert decoder.next_message() is None


def test_error_on_posted_write_asks_for_no_reply() -> None:
    decoder = VfioUserDecoder(Role.SERVER)
    decoder.feed(hdr(44, 10, le("QII", 0, 2, 4) + b"\0", NO_REPLY))
    exc = expect_error(decoder, errno.EINVAL, 44, 10)
    assert not exc.reply_expected
    assert error_reply_for(exc) is None


@pytest.mark.parametrize("size", [0, 15, DEFAULT_MAX_MSG_SIZE + 1])
def test_impossible_size_is_fatal(size: int, make_fds: Callable[[int], list[int]]) -> None:
    decoder = VfioUserDecoder(Role.SERVER)
    fds = make_fds(2)
    decoder.feed(struct.pack("<HHIII", 1, 9, size, 0, 0), fds)
    with pytest.raises(DecodeError) as info:
        decoder.next_message()
    assert info.value.fatal
    assert error_reply_for(info.value) is None
    assert not any(is_open(fd) for fd in fds)
    with pytest.raises(DecodeError):
        decoder.next_message()
    more = make_fds(1)
    with pytest.raises(DecodeError):
        decoder.feed(b"x", more)
    assert not is_open(more[0])


def test_negotiated_maximum_applies() -> None:
    decoder = VfioUserDecoder(Role.SERVER, max_msg_size=64)
    decoder.feed(hdr(1, 10, le("QII", 0, 2, 64) + bytes(64)))
    with pytest.raises(DecodeError) as info:
        decoder.next_message()
    assert info.value.fatal


BAD_FD_CASES = [
    ("fds-on-region-read", hdr(50, 9, le("QII", 0, 7, 4)), 1),
    ("two-fds-on-dma-map", hdr(51, 2, le("IIQQQ", 32, 3, 0, 0, 4096)), 2),
    ("fds-without-eventfd-flag", hdr(52, 8, le("IIIII", 20, 0x21, 2, 0, 1)), 1),
    ("fd-count-mismatch", hdr(53, 8, le("IIIII", 20, 0x24, 2, 0, 3)), 2),
    ("too-many-fds", hdr(54, 8, le("IIIII", 20, 0x24, 2, 0, 17)), 17),
    ("fds-on-bad-payload", hdr(55, 2, b"short"), 1),
]


@pytest.mark.parametrize(
    ("wire", "nfds"), [c[1:] for c in BAD_FD_CASES], ids=[c[0] for c in BAD_FD_CASES]
)
def test_fds_on_a_bad_message_are_closed(
    wire: bytes, nfds: int, make_fds: Callable[[int], list[int]]
) -> None:
    fds = make_fds(nfds)
    before = open_fd_count()
    decoder = VfioUserDecoder(Role.SERVER)
    decoder.feed(wire, fds)
    decoder.feed(GOLDEN[0].wire)
    with pytest.raises(DecodeError) as info:
        decoder.next_message()
    assert info.value.errno == errno.EINVAL
    assert not info.value.fatal
    assert open_fd_count() == before - nfds
    assert not any(is_open(fd) for fd in fds)
    assert decoder.next_message() == GOLDEN[0].message


def test_close_closes_buffered_fds(make_fds: Callable[[int], list[int]]) -> None:
    fds = make_fds(3)
    decoder = VfioUserDecoder(Role.SERVER)
    decoder.feed(GOLDEN[3].wire[:10], fds)
    assert decoder.buffered_fds == 3
    decoder.close()
    assert not any(is_open(fd) for fd in fds)


def test_message_owns_its_fds_until_its_with_block_ends(
    make_fds: Callable[[int], list[int]],
) -> None:
    fds = make_fds(2)
    with Message(Command.DEVICE_SET_IRQS, 1, None, tuple(fds)) as msg:
        kept = os.dup(msg.fds[0])
        assert all(is_open(fd) for fd in fds)
    assert not any(is_open(fd) for fd in fds)
    assert is_open(kept)
    os.close(kept)
    msg = Message(Command.DEVICE_SET_IRQS, 1, None, tuple(make_fds(1)))
    msg.close()
    msg.close()
    assert msg.fds == ()


def test_error_reply_with_payload_is_rejected() -> None:
    decoder = VfioUserDecoder(Role.CLIENT)
    decoder.feed(hdr(9, 9, b"1234", REPLY | ERROR, 5))
    with pytest.raises(DecodeError):
        decoder.next_message()


@pytest.mark.parametrize(
    "bad",
    [
        b"\x00\x00\x00\x00abc",  # no NUL
        b"{}\x00x\x00",  # NUL inside
        b"not json\x00",
        b"[1]\x00",
        b'{"capabilities": 3}\x00',
        b'{"capabilities": {"max_msg_fds": "16"}}\x00',
        b'{"capabilities": {"max_data_xfer_size": -1}}\x00',
        b'{"capabilities": {"write_multiple": 1}}\x00',
        b'{"capabilities": {"migration": {"pgsize": true}}}\x00',
        b"\xff\xfe\x00",
    ],
)
def test_bad_version_json_is_einval(bad: bytes) -> None:
    decoder = VfioUserDecoder(Role.CLIENT)
    decoder.feed(hdr(0, 1, le("HH", 0, 0) + bad, REPLY))
    with pytest.raises(DecodeError) as info:
        decoder.next_message()
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    "message",
    [
        Message(Command.REGION_READ, 1, DmaMap(32, DmaMapFlags.READ, 0, 0, 0)),
        Message(Command.REGION_READ, 1, None),
        Message(Command.REGION_READ, 70000, RegionAccess(0, 0, 0)),
        Message(Command.REGION_READ, 1, RegionAccess(0, 0, 0), fds=(0,)),
        Message(Command.REGION_READ, 1, RegionAccess(0, 0, 0), flags=HeaderFlags.ERROR),
        Message(Command.DMA_MAP, 1, DmaMap(32, DmaMapFlags.READ, 0, 0, 0), fds=(0, 1)),
    ],
)
def test_encode_refuses_invalid_messages(message: Message) -> None:
    with pytest.raises(LocalProtocolError):
        encode(message)


def test_region_caps_chain() -> None:
    caps = [RegionCap(2, 1, le("II", 1, 2)), sparse_mmap_cap([SparseMmapArea(0, 4096)])]
    offset, blob = pack_region_caps(caps)
    info = RegionInfo(32 + len(blob), RegionFlags.CAPS, 4, offset, 8192, 0, blob)
    parsed = parse_region_caps(info)
    assert parsed == tuple(caps)
    assert parse_sparse_mmap(parsed[1]) == (SparseMmapArea(0, 4096),)
    looping = RegionInfo(40, RegionFlags.CAPS, 4, 32, 0, 0, le("HHI", 1, 1, 32))
    with pytest.raises(RemoteProtocolError):
        parse_region_caps(looping)
    outside = RegionInfo(40, RegionFlags.CAPS, 4, 64, 0, 0, le("HHI", 1, 1, 0))
    with pytest.raises(RemoteProtocolError):
        parse_region_caps(outside)


# --- property tests --------------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
json_caps = st.fixed_dictionaries(
    {},
    optional={
        "max_msg_fds": st.integers(0, 16),
        "max_data_xfer_size": u32,
        "pgsizes": u64,
        "max_dma_maps": u32,
        "write_multiple": st.booleans(),
        "migration": st.fixed_dictionaries({}, optional={"pgsize": u32}),
        "other": st.text(max_size=5),
    },
)
region_data = st.binary(min_size=1, max_size=64)
irq_flags = st.tuples(st.sampled_from([1, 2, 4]), st.sampled_from([8, 16, 32])).map(
    lambda f: IrqSetFlags(f[0] | f[1])
)


@st.composite
def set_irqs(draw: st.DrawFn) -> SetIrqs:
    flags = draw(irq_flags)
    count = draw(st.integers(0, 16))
    data = draw(st.binary(min_size=count, max_size=count)) if flags & 2 else b""
    return SetIrqs(draw(u32), flags, draw(u32), draw(u32), count, data)


def _access(data: bytes) -> st.SearchStrategy[RegionAccess]:
    return st.builds(RegionAccess, u64, u32, st.just(len(data)), st.just(data))


PAYLOADS: list[tuple[Command, bool, st.SearchStrategy[Payload | None]]] = [
    (
        Command.VERSION,
        False,
        st.builds(Version, u16, u16, st.none() | json_caps.map(lambda c: {"capabilities": c})),
    ),
    (Command.VERSION, True, st.builds(Version, u16, u16, st.none())),
    (Command.DMA_MAP, False, st.builds(DmaMap, u32, u32.map(DmaMapFlags), u64, u64, u64)),
    (Command.DMA_UNMAP, False, st.builds(DmaUnmap, u32, u32.map(DmaUnmapFlags), u64, u64)),
    (Command.DMA_UNMAP, True, st.builds(DmaUnmap, u32, u32.map(DmaUnmapFlags), u64, u64)),
    (Command.DEVICE_GET_INFO, False, st.builds(DeviceInfo, u32, u32.map(DeviceFlags), u32, u32)),
    (Command.DEVICE_GET_INFO, True, st.builds(DeviceInfo, u32, u32.map(DeviceFlags), u32, u32)),
    (
        Command.DEVICE_GET_REGION_INFO,
        False,
        st.builds(RegionInfo, u32, u32.map(RegionFlags), u32, u32, u64, u64),
    ),
    (
        Command.DEVICE_GET_REGION_INFO,
        True,
        st.builds(
            RegionInfo, u32, u32.map(RegionFlags), u32, u32, u64, u64, st.binary(max_size=40)
        ),
    ),
    (Command.DEVICE_GET_REGION_IO_FDS, False, st.builds(RegionIoFdsRequest, u32, u32, u32, u32)),
    (
        Command.DEVICE_GET_REGION_IO_FDS,
        True,
        st.lists(st.builds(IoFdSubRegion, u64, u64, u32, u32, u32, u64), max_size=3).flatmap(
            lambda subs: st.builds(
                RegionIoFdsReply,
                u32,
                u32,
                u32,
                st.integers(len(subs), 0xFFFF_FFFF),
                st.just(tuple(subs)),
            )
        ),
    ),
    (Command.DEVICE_GET_IRQ_INFO, False, st.builds(IrqInfo, u32, u32.map(IrqInfoFlags), u32, u32)),
    (Command.DEVICE_GET_IRQ_INFO, True, st.builds(IrqInfo, u32, u32.map(IrqInfoFlags), u32, u32)),
    (Command.DEVICE_SET_IRQS, False, set_irqs()),
    (Command.REGION_READ, False, st.builds(RegionAccess, u64, u32, u32)),
    (Command.REGION_READ, True, region_data.flatmap(_access)),
    (Command.REGION_WRITE, False, region_data.flatmap(_access)),
    (Command.REGION_WRITE, True, st.builds(RegionAccess, u64, u32, u32)),
    (Command.DMA_READ, False, st.builds(DmaAccess, u64, u32)),
    (
        Command.DMA_READ,
        True,
        region_data.flatmap(lambda d: st.builds(DmaAccess, u64, st.just(len(d)), st.just(d))),
    ),
    (
        Command.DMA_WRITE,
        False,
        region_data.flatmap(lambda d: st.builds(DmaAccess, u64, st.just(len(d)), st.just(d))),
    ),
    (Command.DMA_WRITE, True, st.none() | st.builds(DmaAccess, u64, u32)),
    (
        Command.REGION_WRITE_MULTI,
        False,
        st.lists(st.binary(max_size=8).flatmap(_access), max_size=200).map(
            lambda w: RegionWriteMulti(tuple(w))
        ),
    ),
    (Command.REGION_WRITE_MULTI, True, st.builds(RegionWriteMultiReply, u64)),
    (Command.DEVICE_RESET, False, st.none()),
    (Command.DMA_MAP, True, st.none()),
]


def test_property_table_covers_every_payload_class() -> None:
    covered = {(c, r) for c, r, _ in PAYLOADS}
    assert covered >= {(c, False) for c in Command}


@pytest.mark.parametrize(
    ("command", "is_reply", "strategy"),
    PAYLOADS,
    ids=[f"{c.name}-{'reply' if r else 'cmd'}" for c, r, _ in PAYLOADS],
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), msg_id=u16, posted=st.booleans())
def test_round_trip(
    *,
    command: Command,
    is_reply: bool,
    strategy: st.SearchStrategy[Payload | None],
    data: st.DataObject,
    msg_id: int,
    posted: bool,
) -> None:
    payload = data.draw(strategy)
    if payload is not None:
        assert type(payload).unpack(payload.pack()) == payload
    flags = HeaderFlags.NO_REPLY if posted and not is_reply else HeaderFlags(0)
    kind = MsgType.REPLY if is_reply else MsgType.COMMAND
    msg = Message(command, msg_id, payload, type=kind, flags=flags)
    wire, _ = encode(msg)
    role = (
        Role.SERVER
        if (command in (Command.DMA_READ, Command.DMA_WRITE)) == is_reply
        else Role.CLIENT
    )
    decoder = VfioUserDecoder(role)
    cut = data.draw(st.integers(0, len(wire)))
    decoder.feed(wire[:cut])
    if cut < len(wire):
        assert decoder.next_message() is None
        decoder.feed(wire[cut:])
    assert decoder.next_message() == msg


def drain(decoder: VfioUserDecoder) -> None:
    """Decode until the buffer runs dry or framing breaks; only protocol errors may appear."""
    for _ in range(10_000):
        try:
            if decoder.next_message() is None:
                return
        except RemoteProtocolError as exc:
            if exc.fatal:
                return


@settings(max_examples=300, deadline=None)
@given(
    blob=st.binary(max_size=300),
    role=st.sampled_from(list(Role)),
    cuts=st.lists(st.integers(0, 300)),
)
def test_random_bytes_only_raise_protocol_errors(blob: bytes, role: Role, cuts: list[int]) -> None:
    decoder = VfioUserDecoder(role, max_msg_size=512)
    previous = 0
    for cut in [*sorted(c for c in cuts if c <= len(blob)), len(blob)]:
        try:
            decoder.feed(blob[previous:cut])
        except RemoteProtocolError as exc:
            assert exc.fatal
            return
        previous = cut
        drain(decoder)


@settings(max_examples=400, deadline=None)
@given(
    msg_id=u16,
    command=st.integers(0, 20),
    flags=st.sampled_from([0, 1, 0x10, 0x11, 0x21, 0x20, 2, 0x40]),
    err=u32,
    payload=st.binary(max_size=80),
    role=st.sampled_from(list(Role)),
)
def test_framed_garbage_never_desyncs(
    *, msg_id: int, command: int, flags: int, err: int, payload: bytes, role: Role
) -> None:
    """A well-framed message with any content is either decoded or skipped, never more."""
    decoder = VfioUserDecoder(role)
    follow = hdr(1, 13, b"", 0 if role is Role.SERVER else REPLY)
    decoder.feed(hdr(msg_id, command, payload, flags, err) + follow)
    try:
        first = decoder.next_message()
    except DecodeError as exc:
        assert not exc.fatal
        assert (exc.msg_id, exc.request) == (msg_id, command)
    else:
        assert first is not None and first.msg_id == msg_id
    last = decoder.next_message()
    assert last is not None and last.command is Command.DEVICE_RESET
