"""The monitor's pieces on their own: the server's flow control over real sockets on a real
event loop (with stub commands), the request rules, the counters' names, the text table, the
feature names and the picture's size."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from emulator.counters import INVALID, REFUSAL_REASONS, Counters
from emulator.loop import EventLoop
from emulator.monitor.cli import mapping_table, parse_argument
from emulator.monitor.commands import Command, features, flag_names, protocol_features
from emulator.monitor.draw import draw_map, human_size, image_height
from emulator.monitor.server import REQUESTS_PER_WAKEUP, MonitorServer
from emulator.pci.device import RegionIndex
from emulator.shmem import RefusalReason
from emulator.vfio_user.messages import Command as VfioCommand
from emulator.virtio.state import DeviceStatus
from vhost_user.messages import BackendReq

BIG = 8 << 20  # far more than a UNIX socket buffer


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, MonitorServer]]:
    """A monitor with stub commands on a real loop running in a thread."""
    loop = EventLoop()
    path = tmp_path / "monitor.sock"
    table: dict[str, Command] = {}
    server = MonitorServer(path, loop, table)

    def add(name: str, result: Any, arguments: dict[str, type] | None = None) -> None:
        table[name] = Command(name, result, arguments or {}, name)

    add("big", lambda _: "x" * BIG)
    add("ping", lambda _: "pong")
    add("clients", lambda _: server.clients)
    add("echo", lambda args: args, {"n": int, "s": str})
    add("boom", lambda _: 1 // 0)
    server.listen()
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        yield path, server
    finally:
        loop.stop("test done")
        thread.join(10)
        server.close()
        loop.close()
    assert not path.exists()


class Line:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.greeting = self.read()

    def send(self, *requests: dict[str, Any]) -> None:
        self.sock.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in requests))

    def read(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.file.readline())
        return value

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_a_client_that_does_not_read_holds_only_itself_up(
    served: tuple[Path, MonitorServer],
) -> None:
    path, _ = served
    slow, quick = Line(path), Line(path)
    assert slow.greeting["monitor"]["commands"] == ["big", "boom", "clients", "echo", "ping"]
    slow.send({"execute": "big", "id": 1}, {"execute": "ping", "id": 2})
    time.sleep(0.2)  # the server has sent what the socket takes and waits to send the rest
    started = time.monotonic()
    for n in range(20):
        quick.send({"execute": "ping", "id": n})
        assert quick.read() == {"return": "pong", "id": n}
    assert time.monotonic() - started < 5
    big = slow.read()
    assert big["id"] == 1 and len(big["return"]) == BIG
    assert slow.read() == {"return": "pong", "id": 2}  # answered once the big one had left
    slow.close()
    quick.close()


def test_a_client_gone_with_its_reply_pending_is_dropped(
    served: tuple[Path, MonitorServer],
) -> None:
    path, _ = served
    gone, other = Line(path), Line(path)
    gone.send({"execute": "big"})
    time.sleep(0.2)
    gone.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        other.send({"execute": "clients"})
        if other.read()["return"] == 1:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the server kept a client that had gone")
    other.close()


def test_a_flood_of_requests_is_answered_in_order_in_batches(
    served: tuple[Path, MonitorServer],
) -> None:
    path, _ = served
    client = Line(path)
    count = 20 * REQUESTS_PER_WAKEUP + 3
    client.send(*({"execute": "echo", "arguments": {"n": n}, "id": n} for n in range(count)))
    for n in range(count):
        assert client.read() == {"return": {"n": n}, "id": n}
    client.close()


def test_request_rules(served: tuple[Path, MonitorServer]) -> None:
    path, _ = served
    client = Line(path)
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (
            {"execute": "echo", "arguments": {"s": "a", "n": 2}, "id": None},
            {"return": {"s": "a", "n": 2}},
        ),
        ({"execute": "echo", "arguments": {"n": True}}, {"class": "InvalidArguments"}),
        ({"execute": "echo", "arguments": {"n": 1.5}}, {"class": "InvalidArguments"}),
        ({"execute": "echo", "arguments": {"x": 1}}, {"class": "InvalidArguments"}),
        ({"execute": "echo", "arguments": 3}, {"class": "InvalidRequest"}),
        ({"execute": "ping", "ids": 3}, {"class": "InvalidRequest"}),
        ({"arguments": {}}, {"class": "InvalidRequest"}),
        ({"execute": "pong"}, {"class": "CommandNotFound"}),
        ({"execute": "boom", "id": "z"}, {"class": "GenericError"}),
    ]
    for request, expected in cases:
        client.send(request)
        reply = client.read()
        if "return" in expected:
            assert reply["return"] == expected["return"]
        else:
            assert reply["error"]["class"] == expected["class"], (request, reply)
        assert reply.get("id") == request.get("id")
    client.send({"execute": "ping"})  # the server is still fine after a command raised
    assert client.read() == {"return": "pong"}
    client.close()


def test_counters_name_what_they_count() -> None:
    counters = Counters()
    vfio = counters.messages("vfio-user")
    assert counters.messages("vfio-user") is vfio
    vfio.received[VfioCommand.REGION_READ] += 2
    vfio.received["invalid:99"] += 1
    vfio.sent[VfioCommand.REGION_READ] += 2
    counters.messages("vhost-user-backend").received[BackendReq.SHMEM_MAP] += 1
    counters.refusals[RefusalReason.OVERLAP.value] += 1
    counters.refusals[INVALID] += 1
    counters.bar.reads[RegionIndex.BAR4] += 3
    counters.bar.read_bytes[RegionIndex.BAR4] += 24
    snapshot = counters.snapshot()
    assert snapshot["messages"] == {
        "vfio-user": {"in": {"REGION_READ": 2, "invalid:99": 1}, "out": {"REGION_READ": 2}},
        "vhost-user-backend": {"in": {"SHMEM_MAP": 1}, "out": {}},
    }
    assert list(snapshot["refusals"]) == list(REFUSAL_REASONS)
    assert {k: v for k, v in snapshot["refusals"].items() if v} == {"overlap": 1, "invalid": 1}
    assert snapshot["bar_accesses"] == {
        "BAR4": {"reads": 3, "read_bytes": 24, "writes": 0, "write_bytes": 0}
    }
    json.dumps(snapshot)


def test_feature_and_status_names() -> None:
    assert flag_names(DeviceStatus, 0x4F | 0x10) == [
        "ACKNOWLEDGE",
        "DRIVER",
        "DRIVER_OK",
        "FEATURES_OK",
        "bit 4",
        "DEVICE_NEEDS_RESET",
    ]
    assert features((1 << 32) | (1 << 30) | (1 << 29) | 1)["names"] == [
        "bit 0",
        "EVENT_IDX",
        "bit 30",
        "VERSION_1",
    ]
    assert features(1 << 30, vhost_user=True)["names"] == ["PROTOCOL_FEATURES"]
    assert protocol_features((1 << 20) | (1 << 3) | (1 << 40), 1 << 20) == {
        "value": (1 << 20) | (1 << 3) | (1 << 40),
        "names": ["REPLY_ACK", "SHMEM", "bit 40"],
    }
    assert protocol_features(1 << 20, 1 << 22)["names"] == ["GET_VRING_BASE_INFLIGHT"]


def test_arguments_from_the_command_line() -> None:
    assert parse_argument("shmid=0x10") == ("shmid", 16)
    assert parse_argument("shmid=7") == ("shmid", 7)
    assert parse_argument("flag=true") == ("flag", True)
    assert parse_argument("name=abc") == ("name", "abc")
    assert parse_argument("list=[1, 2]") == ("list", [1, 2])
    with pytest.raises(ValueError):
        parse_argument("shmid")
    with pytest.raises(ValueError):
        parse_argument("=1")


def test_mapping_table_without_mappings_or_shared_memory() -> None:
    empty = {"regions": [{"shmid": 3, "bar_offset": 0, "size": 4096, "mappings": []}]}
    assert mapping_table(empty).splitlines() == [
        "SHMID  SHM_OFFSET  LENGTH  FD_OFFSET  ACCESS  KIND  FD_SIZE",
        "(no mappings)",
        "shmid 3: 0x1000 bytes at BAR offset 0x0, 0 mapping(s), 0x0 bytes mapped",
    ]
    assert mapping_table({"regions": []}).splitlines()[-1] == "no shared memory"
    unknown_size = {
        "regions": [
            {
                "shmid": 0,
                "bar_offset": 0,
                "size": 1 << 20,
                "mappings": [
                    {
                        "shm_offset": 0,
                        "length": 4096,
                        "fd_offset": 0x2000,
                        "access": "RW",
                        "kind": "char-device",
                        "fd_size": None,
                    }
                ],
            }
        ]
    }
    assert mapping_table(unknown_size).splitlines()[:2] == [
        "SHMID  SHM_OFFSET  LENGTH  FD_OFFSET  ACCESS  KIND         FD_SIZE",
        "    0         0x0  0x1000     0x2000  RW      char-device        -",
    ]


def test_picture_size_and_crowded_regions(tmp_path: Path) -> None:
    crowded = {
        "shmid": 0,
        "bar_offset": 0,
        "size": 1 << 30,
        "mappings": [
            {
                "shm_offset": n << 20,
                "length": 4096,
                "fd_offset": 0,
                "access": "RO" if n % 2 else "RW",
                "kind": "memfd",
                "fd_size": 4096,
            }
            for n in range(500)
        ],
    }
    path = tmp_path / "crowded.png"
    draw_map([crowded, {**crowded, "shmid": 1, "mappings": []}], path, width=800)
    with Image.open(path) as image:
        assert image.size == (800, image_height(2)) == (800, 290)
    draw_map([], path)
    with Image.open(path) as image:
        assert image.size == (1000, image_height(0)) == (1000, 180)
    assert [human_size(n) for n in (100, 4096, 3 << 19, 1 << 30)] == [
        "100 B",
        "4 KiB",
        "1.5 MiB",
        "1 GiB",
    ]
