"""GET_SHMEM_CONFIG replies as QEMU 11.1 reads them: cut short after the last declared size,
regions = the first ``nregions`` non-zero sizes by shmid, inconsistent replies refused by a
named rule. Through the payload and through the codec (a whole reply message)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhost_user.codec import Channel, VhostUserDecoder
from vhost_user.messages import FrontendReq, VhostUserShMemConfig
from wire.errors import DecodeError, LocalProtocolError, RemoteProtocolError

MiB = 1 << 20
REPLY_FLAGS = 0x5  # version 1 | REPLY


def wire(nregions: int, *sizes: int) -> bytes:
    """nregions, padding and ``sizes``: a payload as a back-end would send it."""
    return struct.pack(f"=II{len(sizes)}Q", nregions, 0, *sizes)


def decode_reply(payload: bytes) -> VhostUserShMemConfig:
    """The payload as the emulator's front-end decodes a GET_SHMEM_CONFIG reply."""
    dec = VhostUserDecoder(Channel.FRONTEND, expect_replies=True)
    dec.feed(struct.pack("=III", FrontendReq.GET_SHMEM_CONFIG, REPLY_FLAGS, len(payload)) + payload)
    try:
        msg = dec.next_message()
    finally:
        dec.close()
    assert msg is not None
    assert isinstance(msg.payload, VhostUserShMemConfig)
    return msg.payload


def test_libvhost_user_reply_of_24_bytes_for_two_regions() -> None:
    payload = wire(2, 4 * MiB, MiB)
    assert len(payload) == 24
    config = decode_reply(payload)
    assert config.nregions == 2
    assert config.regions() == {0: 4 * MiB, 1: MiB}
    assert len(config.memory_sizes) == 256 and set(config.memory_sizes[2:]) == {0}


def test_index_is_the_shmid_holes_included() -> None:
    config = decode_reply(wire(1, 0, 0, 0, 2 * MiB))
    assert config.regions() == {3: 2 * MiB}
    config = decode_reply(wire(2, MiB, 0, 0, 2 * MiB))
    assert config.regions() == {0: MiB, 3: 2 * MiB}


def test_only_the_first_nregions_non_zero_sizes_count() -> None:
    assert decode_reply(wire(1, MiB, 0, 2 * MiB)).regions() == {0: MiB}
    assert decode_reply(wire(0, MiB)).regions() == {}


def test_the_full_2056_byte_reply_and_the_head_alone() -> None:
    full = wire(2, MiB, *([0] * 254), 2 * MiB)
    assert len(full) == 2056
    assert decode_reply(full).regions() == {0: MiB, 255: 2 * MiB}
    assert decode_reply(wire(0)).regions() == {}


@pytest.mark.parametrize(
    ("payload", "rule"),
    [
        (b"", "head"),
        (struct.pack("=I", 1), "head"),
        (wire(1, MiB) + b"\0\0\0\0", "whole-items"),
        (wire(1, MiB)[:-1], "whole-items"),
        (wire(1, *([MiB] * 257)), "max-items"),
        (wire(257, *([MiB] * 256)), "max-nregions"),
        (wire(0x1_0000_0000 - 1), "max-nregions"),
        (wire(2, MiB), "nregions-sizes"),
        (wire(2, MiB, 0, 0), "nregions-sizes"),
        (wire(1), "nregions-sizes"),
        (wire(3, MiB, *([0] * 254), MiB), "nregions-sizes"),
    ],
)
def test_inconsistent_replies_are_refused_by_a_named_rule(payload: bytes, rule: str) -> None:
    with pytest.raises(RemoteProtocolError, match=f"breaks rule {rule}:"):
        VhostUserShMemConfig.unpack(payload)
    dec = VhostUserDecoder(Channel.FRONTEND, expect_replies=True)
    dec.feed(struct.pack("=III", 44, REPLY_FLAGS, len(payload)) + payload)
    with pytest.raises(DecodeError, match=f"breaks rule {rule}:") as info:
        dec.next_message()
    assert not info.value.fatal  # the stream is still in sync; the caller decides
    assert info.value.request == 44 and info.value.size == len(payload)
    assert info.value.flags == REPLY_FLAGS


def test_pack_writes_all_2056_bytes_and_refuses_what_would_be_refused() -> None:
    packed = VhostUserShMemConfig.declaring((MiB, 0, 2 * MiB)).pack()
    assert len(packed) == 2056
    assert packed[:32] == wire(2, MiB, 0, 2 * MiB)
    with pytest.raises(LocalProtocolError, match="nregions-sizes"):
        VhostUserShMemConfig(3, (MiB, 0, 2 * MiB)).pack()
    with pytest.raises(LocalProtocolError, match="max-nregions"):
        VhostUserShMemConfig(257, (MiB,) * 256).pack()


def test_declaring_counts_regions_not_ids() -> None:
    assert VhostUserShMemConfig.declaring((0, 0, MiB)).nregions == 1
    assert VhostUserShMemConfig.declaring(()).nregions == 0
    assert VhostUserShMemConfig.declaring((MiB,) * 256).nregions == 256


SIZES = st.lists(st.integers(0, 2**64 - 1), max_size=256)


@given(SIZES, st.data())
def test_any_cut_after_the_last_declared_size_reads_the_same(
    sizes: list[int], data: st.DataObject
) -> None:
    nonzero = [i for i, size in enumerate(sizes) if size]
    nregions = data.draw(st.integers(0, len(nonzero)), label="nregions")
    # The sender may stop anywhere after the nregions-th non-zero size.
    needed = nonzero[nregions - 1] + 1 if nregions else 0
    cut = data.draw(st.integers(needed, 256), label="cut")
    padded = sizes + [0] * (256 - len(sizes))
    config = VhostUserShMemConfig.unpack(wire(nregions, *padded[:cut]))
    expected = {i: padded[i] for i in nonzero[:nregions]}
    assert config.regions() == expected
    assert config == VhostUserShMemConfig(nregions, tuple(padded[:cut]))
    # What we send reads back as the same configuration.
    assert VhostUserShMemConfig.unpack(config.pack()) == config


@given(st.binary(max_size=2100))
def test_random_payloads_decode_consistently_or_name_a_rule(blob: bytes) -> None:
    try:
        config = VhostUserShMemConfig.unpack(blob)
    except RemoteProtocolError as exc:
        assert "breaks rule " in str(exc)
        return
    assert len(blob) % 8 == 0 and 8 <= len(blob) <= 2056
    assert len(config.regions()) == config.nregions
    assert config.pack()[: len(blob)] == blob[:4] + bytes(4) + blob[8:]
