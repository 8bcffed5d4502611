"""Golden bytes, round trips and hostile input for the vhost-user codec."""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from testkit.procfs import fd_count as open_fds
from vhost_user.codec import (
    Channel,
    VhostUserDecoder,
    VhostUserMessage,
    encode,
    reply_to,
    request,
)
from vhost_user.messages import (
    EMPTY,
    BackendReq,
    FrontendReq,
    VhostUserConfig,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserMMap,
    VhostUserProtocolFeature,
    VhostUserShMemConfig,
    VhostUserSingleMemoryRegion,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringState,
)
from wire.errors import DecodeError, LocalProtocolError, RemoteProtocolError


def hdr(req: int, flags: int, size: int) -> bytes:
    return struct.pack("=III", req, flags, size)


REGION = VhostUserMemoryRegion(0x1000, 0x20000, 0x7F0000000000, 0)
MMAP = VhostUserMMap(shmid=3, fd_offset=0x2000, shm_offset=0x10000, length=0x4000, flags=1)

# (message builder, expected bytes, fds needed)
GOLDEN: list[tuple[str, VhostUserMessage, bytes, int]] = [
    ("get_features", request(FrontendReq.GET_FEATURES), hdr(1, 1, 0), 0),
    (
        "features_reply",
        VhostUserMessage(FrontendReq.GET_FEATURES, 0x5, VhostUserU64(1 << 30 | 1 << 32)),
        hdr(1, 5, 8) + struct.pack("=Q", 1 << 30 | 1 << 32),
        0,
    ),
    (
        "set_vring_num",
        request(FrontendReq.SET_VRING_NUM, VhostUserVringState(1, 256), need_reply=True),
        hdr(8, 9, 8) + struct.pack("=II", 1, 256),
        0,
    ),
    (
        "set_vring_addr",
        request(FrontendReq.SET_VRING_ADDR, VhostUserVringAddr(0, 0, 0x10, 0x30, 0x20, 0)),
        hdr(9, 1, 40) + struct.pack("=IIQQQQ", 0, 0, 0x10, 0x30, 0x20, 0),
        0,
    ),
    (
        "set_mem_table",
        request(FrontendReq.SET_MEM_TABLE, VhostUserMemory((REGION,))),
        hdr(5, 1, 40) + struct.pack("=IIQQQQ", 1, 0, 0x1000, 0x20000, 0x7F0000000000, 0),
        1,
    ),
    (
        "add_mem_reg",
        request(FrontendReq.ADD_MEM_REG, VhostUserSingleMemoryRegion(REGION)),
        hdr(37, 1, 40) + struct.pack("=QQQQQ", 0, 0x1000, 0x20000, 0x7F0000000000, 0),
        1,
    ),
    (
        "set_vring_kick",
        request(FrontendReq.SET_VRING_KICK, VhostUserU64(2)),
        hdr(12, 1, 8) + struct.pack("=Q", 2),
        1,
    ),
    (
        "set_vring_call_nofd",
        request(FrontendReq.SET_VRING_CALL, VhostUserU64(0x100 | 2)),
        hdr(13, 1, 8) + struct.pack("=Q", 0x102),
        0,
    ),
    ("set_backend_req_fd", request(FrontendReq.SET_BACKEND_REQ_FD), hdr(21, 1, 0), 1),
    (
        "get_config",
        request(FrontendReq.GET_CONFIG, VhostUserConfig(0, 4, 0, bytes(4))),
        hdr(24, 1, 16) + struct.pack("=III", 0, 4, 0) + bytes(4),
        0,
    ),
    ("get_shmem_config", request(FrontendReq.GET_SHMEM_CONFIG), hdr(44, 1, 0), 0),
    (
        "shmem_config_reply",
        VhostUserMessage(
            FrontendReq.GET_SHMEM_CONFIG, 0x5, VhostUserShMemConfig(2, (0x400000, 0x1000))
        ),
        hdr(44, 5, 2056) + struct.pack("=IIQQ", 2, 0, 0x400000, 0x1000) + bytes(254 * 8),
        0,
    ),
    (
        "shmem_map",
        VhostUserMessage(BackendReq.SHMEM_MAP, 0x9, MMAP),
        hdr(9, 9, 40) + struct.pack("=B7xQQQQ", 3, 0x2000, 0x10000, 0x4000, 1),
        1,
    ),
    (
        "shmem_unmap",
        VhostUserMessage(BackendReq.SHMEM_UNMAP, 0x9, MMAP),
        hdr(10, 9, 40) + struct.pack("=B7xQQQQ", 3, 0x2000, 0x10000, 0x4000, 1),
        0,
    ),
    (
        "shmem_map_ack",
        VhostUserMessage(BackendReq.SHMEM_MAP, 0x5, VhostUserU64(1)),
        hdr(9, 5, 8) + struct.pack("=Q", 1),
        0,
    ),
]


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """Real fds (eventfds) for messages that carry some; whatever is left is closed."""
    made: list[int] = []
    yield made
    for fd in made:
        with contextlib.suppress(OSError):
            os.close(fd)


def channel_of(msg: VhostUserMessage) -> Channel:
    return Channel.BACKEND if isinstance(msg.request, BackendReq) else Channel.FRONTEND


def test_protocol_feature_bits_match_the_spec() -> None:
    assert VhostUserProtocolFeature.REPLY_ACK == 1 << 3
    assert VhostUserProtocolFeature.BACKEND_REQ == 1 << 5
    assert VhostUserProtocolFeature.CONFIG == 1 << 9
    assert VhostUserProtocolFeature.RESET_DEVICE == 1 << 13
    assert VhostUserProtocolFeature.CONFIGURE_MEM_SLOTS == 1 << 15
    assert VhostUserProtocolFeature.DEVICE_STATE == 1 << 19
    assert VhostUserProtocolFeature.GPA_ADDRESSES == 1 << 21
    assert VhostUserProtocolFeature.SHMEM == 1 << 22
    assert FrontendReq.GET_MAX_MEM_SLOTS.value == 36
    assert FrontendReq.CHECK_DEVICE_STATE.value == 43
    assert BackendReq.SHARED_OBJECT_LOOKUP.value == 8


@pytest.mark.parametrize(("name", "msg", "wire", "nfds"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_encode(name: str, msg: VhostUserMessage, wire: bytes, nfds: int) -> None:
    msg.fds = tuple(os.eventfd(0) for _ in range(nfds))
    try:
        data, out_fds = encode(msg)
        assert data == wire
        assert out_fds == msg.fds
    finally:
        msg.close()


@pytest.mark.parametrize("split", ["whole", "bytewise", "trailing"])
@pytest.mark.parametrize(("name", "msg", "wire", "nfds"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_decode(
    name: str, msg: VhostUserMessage, wire: bytes, nfds: int, split: str
) -> None:
    before = open_fds()
    dec = VhostUserDecoder(channel_of(msg))
    sent = [os.eventfd(0) for _ in range(nfds)]
    if split == "whole":
        dec.feed(wire, sent)
    elif split == "bytewise":
        for i in range(len(wire)):
            assert dec.next_message() is None
            dec.feed(wire[i : i + 1], sent if i == 0 else ())
    else:
        dec.feed(wire + hdr(1, 1, 0)[:5], sent)
    got = dec.next_message()
    assert got is not None
    assert got.request == msg.request
    assert got.flags == msg.flags
    assert got.payload == msg.payload
    assert got.fds == tuple(sent)
    assert dec.next_message() is None
    got.close()
    dec.close()
    assert open_fds() == before


def test_fds_go_to_the_message_they_arrived_with() -> None:
    dec = VhostUserDecoder(Channel.FRONTEND)
    first, _ = encode(request(FrontendReq.SET_OWNER))
    second = hdr(13, 1, 8) + VhostUserU64(0).pack()
    efd = os.eventfd(0)
    dec.feed(first)
    dec.feed(second, [efd])
    a = dec.next_message()
    b = dec.next_message()
    assert a is not None and b is not None
    assert a.fds == () and b.fds == (efd,)
    b.close()


def test_extra_fds_are_rejected_and_closed() -> None:
    before = open_fds()
    dec = VhostUserDecoder(Channel.FRONTEND)
    data, _ = encode(request(FrontendReq.GET_FEATURES))
    stray = [os.eventfd(0), os.eventfd(0)]
    dec.feed(data, stray)
    with pytest.raises(DecodeError) as info:
        dec.next_message()
    assert not info.value.fatal
    assert info.value.request == FrontendReq.GET_FEATURES
    assert open_fds() == before
    # The stream stays usable after a rejected message.
    dec.feed(data)
    msg = dec.next_message()
    assert msg is not None and msg.request is FrontendReq.GET_FEATURES


def test_missing_fd_for_kick_is_rejected() -> None:
    dec = VhostUserDecoder(Channel.FRONTEND)
    dec.feed(hdr(12, 1, 8) + struct.pack("=Q", 0))
    with pytest.raises(DecodeError):
        dec.next_message()


def test_mem_table_needs_one_fd_per_region() -> None:
    before = open_fds()
    dec = VhostUserDecoder(Channel.FRONTEND)
    data = hdr(5, 1, 72) + VhostUserMemory((REGION, REGION)).pack()
    dec.feed(data, [os.eventfd(0)])
    with pytest.raises(DecodeError):
        dec.next_message()
    assert open_fds() == before


@pytest.mark.parametrize(
    ("wire", "fatal"),
    [
        (hdr(1, 0, 0), True),  # version 0
        (hdr(1, 1, 1 << 20), True),  # oversized
        (hdr(99, 1, 0), False),  # unknown request
        (hdr(8, 1, 4) + bytes(4), False),  # vring state too short
        (hdr(1, 1, 8) + bytes(8), False),  # GET_FEATURES request with a body
        (hdr(5, 1, 8) + struct.pack("=II", 9, 0), False),  # 9 regions
        (hdr(24, 1, 12) + struct.pack("=III", 0, 300, 0), False),  # config > 256
    ],
)
def test_bad_messages(wire: bytes, fatal: bool) -> None:
    dec = VhostUserDecoder(Channel.FRONTEND)
    dec.feed(wire)
    with pytest.raises(RemoteProtocolError) as info:
        dec.next_message()
    assert info.value.fatal is fatal


def test_fatal_error_closes_pending_fds_and_sticks() -> None:
    before = open_fds()
    dec = VhostUserDecoder(Channel.BACKEND)
    dec.feed(hdr(9, 2, 40), [os.eventfd(0)])
    with pytest.raises(RemoteProtocolError):
        dec.next_message()
    assert open_fds() == before
    with pytest.raises(RemoteProtocolError):
        dec.feed(b"x", [os.eventfd(0)])
    assert open_fds() == before


def test_expect_replies_rejects_requests() -> None:
    dec = VhostUserDecoder(Channel.BACKEND, expect_replies=True)
    dec.feed(hdr(9, 1, 8) + bytes(8))
    with pytest.raises(DecodeError):
        dec.next_message()


def test_get_config_error_reply_is_empty() -> None:
    dec = VhostUserDecoder(Channel.FRONTEND, expect_replies=True)
    dec.feed(hdr(24, 5, 0))
    msg = dec.next_message()
    assert msg is not None and msg.payload == EMPTY


def test_encode_refuses_wrong_payload_and_fds() -> None:
    with pytest.raises(LocalProtocolError):
        encode(request(FrontendReq.SET_VRING_NUM, VhostUserU64(1)))
    with pytest.raises(LocalProtocolError):
        encode(VhostUserMessage(BackendReq.SHMEM_MAP, 1, MMAP))  # no fd
    with pytest.raises(LocalProtocolError):
        encode(VhostUserMessage(FrontendReq.GET_FEATURES, 0, EMPTY))  # no version
    with pytest.raises(LocalProtocolError):
        encode(request(FrontendReq.SET_FEATURES, VhostUserU64(1 << 64)))


u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
regions = st.builds(VhostUserMemoryRegion, u64, u64, u64, u64)

ROUND_TRIP = st.one_of(
    st.builds(lambda v: request(FrontendReq.SET_FEATURES, VhostUserU64(v)), u64),
    st.builds(
        lambda i, n: request(FrontendReq.SET_VRING_BASE, VhostUserVringState(i, n)), u32, u32
    ),
    st.builds(
        lambda *a: request(FrontendReq.SET_VRING_ADDR, VhostUserVringAddr(*a)),
        u32,
        u32,
        u64,
        u64,
        u64,
        u64,
    ),
    st.builds(
        lambda o, f, p: request(FrontendReq.SET_CONFIG, VhostUserConfig(o, len(p), f, p)),
        u32,
        u32,
        st.binary(max_size=256),
    ),
    st.builds(
        lambda rs: request(FrontendReq.SET_MEM_TABLE, VhostUserMemory(tuple(rs))),
        st.lists(regions, max_size=8),
    ),
    st.builds(
        lambda sizes: reply_to(
            request(FrontendReq.GET_SHMEM_CONFIG),
            VhostUserShMemConfig.declaring(sizes),
        ),
        st.lists(u64, max_size=256),
    ),
    st.builds(
        lambda s, a, b, c, f: VhostUserMessage(
            BackendReq.SHMEM_UNMAP, 9, VhostUserMMap(s, a, b, c, f)
        ),
        st.integers(0, 255),
        u64,
        u64,
        u64,
        u64,
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ROUND_TRIP, st.data())
def test_round_trip_with_random_splits(msg: VhostUserMessage, data: st.DataObject) -> None:
    nfds = len(msg.payload.regions) if isinstance(msg.payload, VhostUserMemory) else 0
    msg.fds = tuple(os.eventfd(0) for _ in range(nfds))
    try:
        wire, fds = encode(msg)
        cuts = sorted(data.draw(st.lists(st.integers(1, len(wire) - 1), max_size=4)))
        dec = VhostUserDecoder(channel_of(msg))
        prev = 0
        for cut in [*cuts, len(wire)]:
            dec.feed(wire[prev:cut], fds if prev == 0 else ())
            prev = cut
        got = dec.next_message()
        assert got is not None
        assert got.payload == msg.payload
        assert got.request == msg.request
        assert got.fds == msg.fds
    finally:
        msg.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.sampled_from([Channel.FRONTEND, Channel.BACKEND]))
def test_random_bytes_raise_only_protocol_errors(blob: bytes, channel: Channel) -> None:
    dec = VhostUserDecoder(channel)
    dec.feed(blob)
    for _ in range(60):
        try:
            msg = dec.next_message()
        except RemoteProtocolError as exc:
            if exc.fatal:
                return
            continue
        if msg is None:
            return
        msg.close()


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(list(FrontendReq)[1:]),
    st.integers(0, 15),
    st.binary(max_size=300),
)
@example(FrontendReq.REM_MEM_REG, 0, bytes(7) + b"\x01" + bytes(32))  # non-zero padding
def test_random_bodies_for_every_request(req: FrontendReq, flags: int, body: bytes) -> None:
    dec = VhostUserDecoder(Channel.FRONTEND)
    dec.feed(hdr(req, 1 | (flags & 0xC), len(body)) + body)
    try:
        msg = dec.next_message()
    except RemoteProtocolError:
        return
    assert msg is not None
    # Anything that decodes re-encodes to bytes that decode to the same message: padding is
    # ignored on the way in and sent as zeros, a short shared-memory config goes out full size.
    if not isinstance(msg.payload, VhostUserMemory):
        wire, _ = encode(msg)
        again = VhostUserDecoder(Channel.FRONTEND)
        again.feed(wire)
        echo = again.next_message()
        assert echo is not None and echo.payload == msg.payload
        if isinstance(msg.payload, VhostUserShMemConfig):
            assert len(wire) == 12 + 2056
        echo.close()
    msg.close()
