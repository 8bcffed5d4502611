"""The C hot path through the real server: a real socket, the QEMU-like client, real mappings.

The server runs on its own loop thread in this process (so the test can count its own fds and
read the mapped files), with a shared-memory BAR whose pages cover every case the Python copy
distinguishes: mapped read-write, mapped read-only, a file shorter than its mapping, holes
inside a region and the gap between two regions. Every hot read is compared with
``SharedMemoryBar.read``, the Python path's answer for the same bytes.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from emulator.counters import Counters
from emulator.loop import EventLoop
from emulator.memory import GuestMemory
from emulator.pci.device import RegionIndex
from emulator.pci.virtio_pci import NOTIFY_OFFSET, VIRTIO_BAR, VirtioPciDevice
from emulator.shmem import SharedMemoryBar, ShmemLayout
from emulator.trace import Tracer
from emulator.vfio_user import messages as m
from emulator.vfio_user.client import VfioUserClient, VfioUserError
from emulator.vfio_user.codec import Message, Role, VfioUserDecoder, encode
from emulator.vfio_user.server import VfioUserServer
from emulator.virtio.standalone import StandaloneDevice
from testkit.virtio_driver import eventfd_signalled, probed_guest
from wire.unix import send_with_fds

PAGE = 4096
BAR4 = int(RegionIndex.BAR4)
CONFIG = int(RegionIndex.CONFIG)
# Region 0: pages 0-1 rw (file of 2 pages), 2-3 rw over a 1-page file (page 3 past EOF),
# 4 read-only, 5-7 holes. Region 1 (8 pages): nothing mapped.
REGIONS = {0: 8 * PAGE, 1: 8 * PAGE}


class KickingDevice(StandaloneDevice):
    """A standalone device whose kicks are eventfds (as the vhost-user front-end's)."""

    def __init__(self) -> None:
        super().__init__(4, 2, 64, 0)
        self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]

    def kick_fd(self, queue: int) -> int | None:
        return self.eventfds[queue] if 0 <= queue < len(self.eventfds) else None

    def close(self) -> None:
        for fd in self.eventfds:
            os.close(fd)


@dataclass
class Rig:
    path: Path
    server: VfioUserServer
    bar: SharedMemoryBar
    device: KickingDevice
    counters: Counters
    files: dict[str, int]
    trace: Path

    def map(self) -> None:
        """The mappings of the module docstring. From the test's thread, so only while no
        message is in flight (the server's loop thread is waiting in epoll); a client's
        start-up resets the device, which drops them."""
        self.bar.map(0, self.files["rw"], 0, 0, 2 * PAGE, writable=True)
        self.bar.map(0, self.files["short"], 0, 2 * PAGE, 2 * PAGE, writable=True)
        self.bar.map(0, self.files["ro"], 0, 4 * PAGE, PAGE, writable=False)

    def client(self) -> VfioUserClient:
        client = VfioUserClient.connect(str(self.path))
        client.version()
        return client


def _memfd(name: str, size: int, fill: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, bytes([fill]) * size)
    return fd


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    layout = ShmemLayout.from_sizes(REGIONS)
    bar = SharedMemoryBar(layout)
    device = KickingDevice()
    files = {
        "rw": _memfd("rw", 2 * PAGE, 0x11),
        "short": _memfd("short", PAGE, 0x22),
        "ro": _memfd("ro", PAGE, 0x33),
    }
    pci = VirtioPciDevice(device, shmem_layout=layout, shmem=bar)
    loop = EventLoop()
    counters = Counters()
    trace = tmp_path / "trace.jsonl"
    tracer = Tracer(trace)
    tracer.enabled = False  # switched on by the tests that want it
    server = VfioUserServer(
        tmp_path / "emu.sock", pci, GuestMemory(), loop, tracer, counters=counters
    )
    server.listen()
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        rig = Rig(tmp_path / "emu.sock", server, bar, device, counters, files, trace)
        rig.map()
        yield rig
    finally:
        loop.stop("test done")
        thread.join(10)
        server.close()
        tracer.close()
        pci.close()
        bar.close()
        loop.close()
        device.close()
        for fd in files.values():
            os.close(fd)


def _barrier(client: VfioUserClient) -> None:
    """A config read: the Python path, so answered only after the server folded what C did
    before it (counts, warnings, trace records). A hot reply can overtake that fold."""
    client.config_read(0, 2)


def _bar_offsets(rig: Rig) -> list[int]:
    region1 = rig.bar.regions[1].bar_offset
    return [0, 8, PAGE - 4, 2 * PAGE - 8, 3 * PAGE - 4, 4 * PAGE - 8, 5 * PAGE - 2, region1 - 8]


def test_reads_equal_the_python_copy_everywhere(rig: Rig) -> None:
    """Mapped, read-only, past EOF, holes, across pages, mappings and regions: C's bytes are
    ``SharedMemoryBar.read``'s."""
    with rig.client() as client:
        for offset in _bar_offsets(rig):
            for size in (1, 2, 4, 8, 16, PAGE + 8, 3 * PAGE):
                if offset + size > rig.bar.bar_size:
                    continue
                assert client.region_read(BAR4, offset, size) == rig.bar.read(offset, size)
        assert rig.bar.read(3 * PAGE, 8) == bytes(8)  # past EOF really is zeros
        assert rig.bar.read(4 * PAGE, 8) == b"\x33" * 8


def test_writes_land_only_where_python_would_put_them(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), rig.client() as client:
        client.region_write(BAR4, 8, b"\xaa" * 8)
        client.region_write(BAR4, PAGE - 4, b"\xbb" * 8, posted=True)  # across two pages
        client.region_write(BAR4, 3 * PAGE - 4, b"\xcc" * 8)  # file, then past its end
        client.region_write(BAR4, 4 * PAGE, b"\xdd" * 8)  # read-only
        client.region_write(BAR4, 4 * PAGE + 64, b"\xdd" * 8)  # read-only again: no 2nd line
        client.region_write(BAR4, 6 * PAGE, b"\xee" * 8)  # hole: silent
        assert client.region_read(BAR4, 6 * PAGE, 8) == bytes(8)
        _barrier(client)
    assert os.pread(rig.files["rw"], 16, 0) == b"\x11" * 8 + b"\xaa" * 8
    assert os.pread(rig.files["rw"], 8, PAGE - 4) == b"\xbb" * 8
    assert os.pread(rig.files["short"], 8, PAGE - 4) == b"\xcc" * 4  # the rest is past EOF
    assert os.fstat(rig.files["short"]).st_size == PAGE
    assert os.pread(rig.files["ro"], 8, 0) == b"\x33" * 8
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "shared memory [0x2000, +0x2000): guest write past the end of the back-end's file "
        "dropped (further ones not logged)",
        "shared memory [0x4000, +0x1000): guest write ignored: mapping is read-only "
        "(further ones not logged)",
    ]


class RawClient:
    """Messages as bytes, several per send, replies read back in order."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(str(path))
        self.decoder = VfioUserDecoder(Role.CLIENT)

    def send(self, *messages: Message, fds: tuple[int, ...] = ()) -> None:
        send_with_fds(self.sock, b"".join(encode(message)[0] for message in messages), fds)

    def replies(self, count: int) -> list[Message]:
        out: list[Message] = []
        while len(out) < count:
            reply = self.decoder.next_message()
            if reply is None:
                self.decoder.feed(self.sock.recv(1 << 20))
                continue
            out.append(reply)
        return out

    def close(self) -> None:
        self.decoder.close()
        self.sock.close()


def _read(msg_id: int, region: int, offset: int, count: int) -> Message:
    return Message(m.Command.REGION_READ, msg_id, m.RegionAccess(offset, region, count))


@pytest.fixture
def raw(rig: Rig) -> Iterator[RawClient]:
    client = RawClient(rig.path)
    client.send(Message(m.Command.VERSION, 0, m.Version(0, 0)))
    assert not client.replies(1)[0].is_error
    yield client
    client.close()


def test_a_cold_message_between_hot_ones_keeps_the_reply_order(rig: Rig, raw: RawClient) -> None:
    raw.send(
        _read(1, BAR4, 8, 8),
        _read(2, CONFIG, 0, 4),  # config space: the Python path
        _read(3, BAR4, 16, 8),
        _read(4, 9, 0, 4),  # no such region: Python's error reply
        _read(5, BAR4, 24, 8),
    )
    replies = raw.replies(5)
    assert [r.msg_id for r in replies] == [1, 2, 3, 4, 5]
    assert [r.error for r in replies] == [0, 0, 0, 22, 0]
    assert replies[1].payload == m.RegionAccess(0, CONFIG, 4, b"\xf4\x1a\x44\x10")
    for reply, offset in zip((replies[0], replies[2], replies[4]), (8, 16, 24), strict=True):
        assert reply.payload == m.RegionAccess(offset, BAR4, 8, rig.bar.read(offset, 8))


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def test_a_hot_looking_message_with_an_fd_goes_to_python(rig: Rig, raw: RawClient) -> None:
    before = _open_fds()
    fd = os.memfd_create("passed", os.MFD_CLOEXEC)
    try:
        raw.send(_read(1, BAR4, 0, 8), fds=(fd,))
        raw.send(_read(2, BAR4, 0, 8))
        first, second = raw.replies(2)
    finally:
        os.close(fd)
    assert (first.msg_id, first.error) == (1, 22)  # the codec: REGION_READ takes no fds
    assert (second.msg_id, second.error) == (2, 0)
    assert _open_fds() == before  # the server closed what it received


def test_out_of_bounds_and_oversized_accesses_get_pythons_error_reply(rig: Rig) -> None:
    size = rig.bar.bar_size
    with rig.client() as client:
        for offset, count in ((size - 4, 8), (size, 1), (2**64 - 8, 16), (0, (1 << 20) + 1)):
            with pytest.raises(VfioUserError) as refused:
                client.request(
                    m.Command.REGION_READ,
                    m.RegionAccess(offset, BAR4, count),
                    reply_size=1 << 21,
                )
            assert refused.value.errno == 22
        assert client.region_read(BAR4, size - 8, 8) == bytes(8)


def test_before_version_nothing_is_hot(rig: Rig) -> None:
    client = RawClient(rig.path)
    try:
        client.send(_read(1, BAR4, 0, 8))
        (reply,) = client.replies(1)
    finally:
        client.close()
    assert reply.error == 22  # "REGION_READ before VERSION"


def _notify(queue: int) -> tuple[int, int, int]:
    return VIRTIO_BAR, NOTIFY_OFFSET + 4 * queue, queue


def test_a_kick_reaches_the_eventfd_without_python(rig: Rig) -> None:
    with probed_guest(rig.path) as driver:
        driver.bring_up(queues=1)
        kicks = rig.device.eventfds
        assert not eventfd_signalled(kicks[0])
        driver.notify(0)  # posted, as QEMU sends it
        assert select.select([kicks[0]], [], [], 5)[0]
        assert os.eventfd_read(kicks[0]) == 1
        driver.notify(0, posted=False)
        assert os.eventfd_read(kicks[0]) == 1
        _barrier(driver.client)
        assert rig.device.kicks == [0, 0]  # VirtioDevice.kick never ran: C wrote the fd
        assert rig.server.hot_kicks == [2, 0]
        writes = rig.counters.snapshot()["bar_accesses"]["BAR2"]["writes"]
        driver.bar_write(VIRTIO_BAR, NOTIFY_OFFSET + 4, 1, 2)  # queue 1 is not enabled
        driver.reset()  # disarms: a kick now goes to Python, which ignores it
        driver.notify(0)
        driver.status  # noqa: B018 - a read answered after the posted writes
        assert not eventfd_signalled(kicks[0])
        assert rig.server.hot_kicks == [2, 0]
        snapshot = rig.counters.snapshot()["bar_accesses"]["BAR2"]
        assert snapshot["writes"] >= writes + 2


def test_write_multi_is_hot_only_when_every_write_is(rig: Rig) -> None:
    with probed_guest(rig.path) as driver:
        driver.bring_up(queues=1)
        rig.map()
        client: VfioUserClient = driver.client
        kick = rig.device.eventfds[0]
        before = dict(rig.counters.snapshot()["messages"]["vfio-user"]["in"])
        client.region_write_multi([(BAR4, 0, b"\x01" * 8), _notify_write(0)])
        client.region_write_multi([(BAR4, 8, b"\x02" * 8), (CONFIG, 0x3C, b"\x0b")])
        assert driver.client.config_read(0x3C, 1) == 0x0B  # written by the Python path
        assert os.pread(rig.files["rw"], 16, 0) == b"\x01" * 8 + b"\x02" * 8
        assert os.eventfd_read(kick) == 1
        after = rig.counters.snapshot()["messages"]["vfio-user"]["in"]
        assert after["REGION_WRITE_MULTI"] - before.get("REGION_WRITE_MULTI", 0) == 2


def _notify_write(queue: int) -> tuple[int, int, bytes]:
    region, offset, value = _notify(queue)
    return region, offset, struct.pack("<H", value)


def test_counters_and_trace_see_hot_messages(rig: Rig) -> None:
    rig.server.tracer.enabled = True
    with rig.client() as client:
        for i in range(3):
            client.region_read(BAR4, 8 * i, 8)
        client.region_write(BAR4, 0, b"\x05" * 4, posted=True)
        client.region_read(BAR4, 0, 4)
        _barrier(client)
    rig.server.tracer.enabled = False
    snapshot = rig.counters.snapshot()
    assert snapshot["bar_accesses"]["BAR4"] == {
        "reads": 4,
        "read_bytes": 28,
        "writes": 1,
        "write_bytes": 4,
    }
    vfio = snapshot["messages"]["vfio-user"]
    assert vfio["in"]["REGION_READ"] == 4 + 1  # + the barrier, whose own reply is counted
    assert vfio["out"]["REGION_READ"] >= 4  # once sent: maybe after the client has read it
    assert vfio["in"]["REGION_WRITE"] == 1 and "REGION_WRITE" not in vfio["out"]
    records = [json.loads(line) for line in rig.trace.read_text().splitlines()]
    hot = [r for r in records if r.get("payload", {}).get("region") == BAR4]
    assert [(r["dir"], r["cmd"]) for r in hot] == [
        *[("in", "REGION_READ"), ("out", "REGION_READ")] * 3,
        ("in", "REGION_WRITE"),
        ("in", "REGION_READ"),
        ("out", "REGION_READ"),
    ]
    first_in, first_out = hot[0], hot[1]
    assert first_in["size"] == 32 and first_out["size"] == 40
    assert first_in["payload"] == {
        "offset": 0,
        "region": BAR4,
        "count": 8,
        "data": {"len": 0},
    }
    assert first_out["payload"]["data"] == {"len": 8}
    assert hot[6]["payload"]["data"] == {"len": 4}
    assert first_in["id"] == first_out["id"]


def _burst(rig: Rig, raw: RawClient, debug: bool, caplog: pytest.LogCaptureFixture) -> list[bytes]:
    """Hot and cold messages in one send: replies as bytes, with DEBUG on or off."""
    level = logging.DEBUG if debug else logging.INFO
    messages = [
        _read(1, BAR4, 0, 8),
        Message(m.Command.REGION_WRITE, 2, m.RegionAccess(16, BAR4, 4, b"\x09" * 4)),
        _read(3, CONFIG, 0, 4),
        Message(
            m.Command.REGION_WRITE_MULTI,
            4,
            m.RegionWriteMulti((m.RegionAccess(24, BAR4, 2, b"\x07\x07"),)),
        ),
        _read(5, BAR4, 16, 16),
    ]
    with caplog.at_level(level, logger="emulator.vfio_user.server"):
        raw.send(*messages)
        replies = raw.replies(5)
        _ = raw.send(_read(6, CONFIG, 0, 2)), raw.replies(1)  # the fold of the burst is done
    return [encode(reply)[0] for reply in replies]


def test_debug_logging_changes_no_hot_reply(
    rig: Rig, raw: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    quiet = _burst(rig, raw, False, caplog)
    assert not [r for r in caplog.records if r.levelno == logging.DEBUG]
    caplog.clear()
    loud = _burst(rig, raw, True, caplog)
    assert quiet == loud
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert [line.split()[:4] for line in lines[:10]] == [
        ["-->", "REGION_READ", "id=1", "size=32"],
        ["<--", "REGION_READ", "id=1", "size=40"],
        ["-->", "REGION_WRITE", "id=2", "size=36"],
        ["<--", "REGION_WRITE", "id=2", "size=32"],
        ["-->", "REGION_READ", "id=3", "size=32"],
        ["<--", "REGION_READ", "id=3", "size=36"],
        ["-->", "REGION_WRITE_MULTI", "id=4", "size=48"],
        ["<--", "REGION_WRITE_MULTI", "id=4", "size=24"],
        ["-->", "REGION_READ", "id=5", "size=32"],
        ["<--", "REGION_READ", "id=5", "size=48"],
    ]


def test_a_long_burst_loses_no_record_and_no_warning(
    rig: Rig, raw: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    """More records and dropped writes than C keeps between two folds: it stops, Python
    empties its logs, it goes on."""
    rig.server.tracer.enabled = True
    writes = [
        Message(
            m.Command.REGION_WRITE,
            i,
            m.RegionAccess(4 * PAGE + 8 * (i % 2), BAR4, 4, b"\x01" * 4),
            flags=m.HeaderFlags.NO_REPLY,
        )
        for i in range(1500)
    ]
    with caplog.at_level(logging.WARNING):
        raw.send(*writes, _read(9999, CONFIG, 0, 2))
        (reply,) = raw.replies(1)
    rig.server.tracer.enabled = False
    assert reply.msg_id == 9999
    records = [json.loads(line) for line in rig.trace.read_text().splitlines()]
    ids = [r["id"] for r in records if r["cmd"] == "REGION_WRITE"]
    assert ids == list(range(1500))
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "shared memory [0x4000, +0x1000): guest write ignored: mapping is read-only "
        "(further ones not logged)"
    ]
    assert rig.counters.snapshot()["bar_accesses"]["BAR4"]["writes"] == 1500


def test_a_closed_bar_is_pythons_again(rig: Rig) -> None:
    """Once the BAR is no longer plain memory (closed here; a reservation that could not be
    restored is the other case) C stops copying and the Python path answers: EIO."""
    with rig.client() as client:
        assert client.region_read(BAR4, 0, 8) == b"\x11" * 8
        rig.bar.close()  # from the test's thread while nothing is in flight, as ``Rig.map``
        with pytest.raises(VfioUserError) as refused:
            client.region_read(BAR4, 0, 8)
        assert refused.value.errno == 5
