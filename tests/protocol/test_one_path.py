"""The server's one path: region replies encoded by the handlers are the codec's own bytes, and
DEBUG logging only observes (same replies, one line per message each way)."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emulator.app import Emulator
from emulator.config import EmulatorConfig
from emulator.pci.device import RegionIndex
from emulator.vfio_user import messages as m
from emulator.vfio_user.codec import Message, encode, region_reply
from emulator.vfio_user.server import VfioUserServer
from wire.errors import LocalProtocolError

u32 = st.integers(0, 0xFFFF_FFFF)


@given(
    msg_id=st.integers(0, 0xFFFF),
    write=st.booleans(),
    offset=st.integers(0, 2**64 - 1),
    region=u32,
    data=st.binary(max_size=64),
)
def test_region_reply_is_the_encoded_reply(
    msg_id: int, write: bool, offset: int, region: int, data: bytes
) -> None:
    command = m.Command.REGION_WRITE if write else m.Command.REGION_READ
    request = Message(command, msg_id, m.RegionAccess(offset, region, len(data)))
    payload = m.RegionAccess(offset, region, len(data), b"" if write else data)
    expected, fds = encode(request.reply(payload))
    assert fds == ()
    assert region_reply(request, offset, region, len(data), payload.data) == expected


def test_encode_refuses_an_out_of_range_region_access() -> None:
    with pytest.raises(LocalProtocolError):
        encode(Message(m.Command.REGION_READ, 0x1_0000, m.RegionAccess(0, 0, 0)))


@contextlib.contextmanager
def _standalone(tmp_path: Path) -> Iterator[tuple[VfioUserServer, socket.socket]]:
    """A standalone emulator's server, stepped by hand: no loop thread, so each request is
    decoded, handled and answered before the test reads the reply (lockstep)."""
    config = EmulatorConfig(vfio_user_socket=tmp_path / "emu.sock", virtio_id=4)
    emulator = Emulator(config)
    try:
        server = emulator.server
        server.listen()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(config.vfio_user_socket))
            server._accept()
            yield server, client
    finally:
        emulator.close()


def _session(tmp_path: Path, caplog: pytest.LogCaptureFixture, debug: bool) -> list[bytes]:
    """VERSION, a config read, a posted write and a refused read over the real server."""
    replies: list[bytes] = []
    level = logging.DEBUG if debug else logging.INFO
    requests = [
        Message(m.Command.VERSION, 0, m.Version(0, 0)),
        Message(m.Command.REGION_READ, 1, m.RegionAccess(0, RegionIndex.CONFIG, 4)),
        Message(
            m.Command.REGION_WRITE,
            2,
            m.RegionAccess(0x4, RegionIndex.CONFIG, 2, b"\x06\x00"),
            flags=m.HeaderFlags.NO_REPLY,
        ),
        Message(m.Command.REGION_READ, 3, m.RegionAccess(0, 9, 4)),
    ]
    with (
        caplog.at_level(level, logger="emulator.vfio_user.server"),
        _standalone(tmp_path) as (server, client),
    ):
        for request in requests:
            client.sendall(encode(request)[0])
            server._on_readable()
            if request.reply_expected:
                replies.append(client.recv(1 << 16))
    return replies


def test_debug_logging_changes_no_reply(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "quiet").mkdir()
    (tmp_path / "loud").mkdir()
    quiet = _session(tmp_path / "quiet", caplog, debug=False)
    assert not [r for r in caplog.records if r.levelno == logging.DEBUG]
    caplog.clear()
    loud = _session(tmp_path / "loud", caplog, debug=True)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert quiet == loud
    assert [line.split()[:3] for line in lines] == [
        ["-->", "VERSION", "id=0"],
        ["<--", "VERSION", "id=0"],
        ["-->", "REGION_READ", "id=1"],
        ["<--", "REGION_READ", "id=1"],
        ["-->", "REGION_WRITE", "id=2"],
        ["-->", "REGION_READ", "id=3"],
        ["<--", "REGION_READ", "id=3"],
    ]
    assert lines[-1].endswith("error=22")
