"""The monitor (``--monitor-socket``) of a real emulator process in front of the real reference
back-end: the socket's mode, every query against what the vfio-user client and the back-end
see, counters moved by real traffic, the fault-injection actions and their effect on both
peers, hostile and half-written client lines, many clients, and ``virtio-emu monitor``'s
output (JSON, the mapping table, the PNG)."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from vguest.pattern import PatternKind, generate

from emulator import __version__
from emulator.monitor import ErrorClass, MonitorClient, MonitorError
from emulator.monitor.draw import COLOURS
from emulator.monitor.protocol import MAX_LINE
from emulator.monitor.server import MAX_CLIENTS
from testkit import ControlClient, Harness, Process
from testkit.procfs import fd_count, memfd_mappings
from testkit.virtio_driver import DEVICE_NEEDS_RESET, probed_guest
from tests.helpers.processes import procs

__all__ = ["procs"]

KiB = 1 << 10
MiB = 1 << 20
BAR4 = 4
REGIONS = ("--shmem-region", "0:2M", "--shmem-region", "1:1M")
COMMANDS = [
    "device-reset",
    "disconnect-backend",
    "drop-mappings",
    "query-counters",
    "query-mappings",
    "query-regions",
    "query-status",
]


def start(
    procs: Harness, *emulator: str, backend: tuple[str, ...] = REGIONS
) -> tuple[Process, Process, ControlClient, MonitorClient]:
    """Back-end, then the emulator with its monitor, then a control and a monitor client."""
    back = procs.backend("--rng-source", "counter", *backend)
    emu = procs.emulator(
        "--vhost-user-socket",
        str(back.path),
        "--monitor-socket",
        str(monitor_path(procs)),
        *emulator,
    )
    monitor = MonitorClient(monitor_path(procs))
    procs.callback(monitor.close)
    return back, emu, procs.control(), monitor


def monitor_path(procs: Harness) -> Path:
    return procs.workdir / "monitor.sock"


def counter(seed: int, length: int) -> bytes:
    return generate(PatternKind.COUNTER, seed, length)


def refused(call: Callable[[], object]) -> MonitorError:
    with pytest.raises(MonitorError) as info:
        call()
    return info.value


def delta(before: dict[str, Any], after: dict[str, Any], *path: str) -> int:
    """How much the counter at ``path`` (absent: 0) moved."""

    def get(tree: dict[str, Any]) -> int:
        for key in path:
            tree = tree.get(key, {})
        return int(tree) if isinstance(tree, int) else 0

    return get(after) - get(before)


class RawClient:
    """A monitor client that sends whatever bytes it is given."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line.endswith(b"\n"), line
        value: dict[str, Any] = json.loads(line)
        return value

    def ask(self, data: bytes) -> dict[str, Any]:
        self.send(data)
        return self.reply()

    def at_eof(self) -> bool:
        return self.file.readline() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_socket_is_owner_only_whatever_the_umask_and_greets(procs: Harness) -> None:
    old = os.umask(0)
    try:
        back, emu, _ctl, monitor = start(procs)
    finally:
        os.umask(old)
    mode = os.stat(monitor_path(procs)).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(emu.path).st_mode) != 0o600  # the umask did reach the child
    assert monitor.greeting == {"version": __version__, "protocol": 1, "commands": COMMANDS}
    raw = RawClient(monitor_path(procs))
    assert raw.greeting == {"monitor": monitor.greeting}
    raw.close()
    emu.stop()
    assert not monitor_path(procs).exists()  # removed on exit
    back.stop()


def test_queries_describe_what_the_peers_see(procs: Harness) -> None:
    back, emu, ctl, monitor = start(procs)
    status = monitor.query_status()
    assert status["virtio_id"] == 4
    assert status["status"] == {"value": 0, "bits": []}
    assert status["active"] is False
    assert status["vfio_user"] == {
        "socket": str(emu.path),
        "connected": False,
        "clients_served": 0,
    }
    backend = status["backend"]
    assert backend["socket"] == str(back.path)
    assert backend["connected"] is True and backend["connections"] == 1
    assert backend["features_offered"]["names"] == ["PROTOCOL_FEATURES", "VERSION_1"]
    assert backend["protocol_features"]["value"] == ctl.status()["protocol_features"]
    assert {"SHMEM", "REPLY_ACK", "BACKEND_REQ", "BACKEND_SEND_FD"} <= set(
        backend["protocol_features"]["names"]
    )
    assert status["uptime"] > 0

    regions = monitor.query_regions()
    assert regions["bar"] == BAR4
    assert regions["bar_size"] == 4 * MiB
    assert [(r["shmid"], r["bar_offset"], r["size"]) for r in regions["regions"]] == [
        (0, 0, 2 * MiB),
        (1, 2 * MiB, MiB),
    ]
    assert monitor.query_mappings() == {
        "regions": [
            {"shmid": 0, "bar_offset": 0, "size": 2 * MiB, "mappings": []},
            {"shmid": 1, "bar_offset": 2 * MiB, "size": MiB, "mappings": []},
        ]
    }

    with probed_guest(emu.path) as driver:
        assert driver.startup.regions[BAR4].info.size == regions["bar_size"]
        assert [(r.shmid, r.offset, r.length) for r in driver.shm_regions] == [
            (r["shmid"], r["bar_offset"], r["size"]) for r in regions["regions"]
        ]
        driver.bring_up()
        status = monitor.query_status()
        assert status["status"]["bits"] == ["ACKNOWLEDGE", "DRIVER", "DRIVER_OK", "FEATURES_OK"]
        assert status["status"]["value"] == driver.status
        assert status["active"] is True
        assert status["driver_features"] == {"value": 1 << 32, "names": ["VERSION_1"]}
        assert status["vfio_user"]["connected"] is True
        assert status["vfio_user"]["clients_served"] == 1

        assert ctl.map(0, 0x10000, 64 * KiB, pattern="counter", seed=1)["ok"]
        assert ctl.map(1, 0x2000, 8 * KiB, pattern="counter", seed=2, writable=True)["ok"]
        region0 = {
            "shm_offset": 0x10000,
            "length": 64 * KiB,
            "fd_offset": 0,
            "access": "RO",
            "kind": "memfd",
            "fd_size": 64 * KiB,
        }
        region1 = {**region0, "shm_offset": 0x2000, "length": 8 * KiB, "fd_size": 8 * KiB}
        region1["access"] = "RW"
        mappings = monitor.query_mappings()
        assert [r["mappings"] for r in mappings["regions"]] == [[region0], [region1]]
        assert monitor.query_mappings(shmid=1)["regions"] == [mappings["regions"][1]]
        assert driver.shm_read(1, 0x2000, 8) == counter(2, 8)
        error = refused(lambda: monitor.query_mappings(shmid=9))
        assert error.error_class == ErrorClass.INVALID_ARGUMENTS
        assert "no shared memory region 9" in error.desc
        error = refused(lambda: monitor.execute("query-mappings", shmid="0"))
        assert error.error_class == ErrorClass.INVALID_ARGUMENTS
        assert monitor.query_status()["uptime"] > status["uptime"]
    emu.stop()
    back.stop()


def test_counters_follow_real_traffic(procs: Harness) -> None:
    back, emu, ctl, monitor = start(procs)
    start_counters = monitor.query_counters()
    frontend = start_counters["messages"]["vhost-user-frontend"]
    assert frontend["out"]["GET_FEATURES"] == frontend["in"]["GET_FEATURES"] == 1
    assert frontend["in"]["GET_SHMEM_CONFIG"] == 1
    assert set(start_counters["refusals"]) >= {"overlap", "not-mapped", "shmid", "alignment"}
    assert not any(start_counters["refusals"].values())
    with probed_guest(emu.path) as driver:
        driver.bring_up()
        assert ctl.map(1, 0x2000, 8 * KiB, pattern="counter", seed=2, writable=True)["ok"]
        before = monitor.query_counters()
        reads, writes = 25, 3
        for index in range(reads):
            driver.client.region_read(BAR4, 2 * MiB + 0x2000 + 8 * index, 8)
        for index in range(writes):
            driver.client.region_write(BAR4, 2 * MiB + 0x2000 + 4 * index, b"\x5a" * 4)
        after = monitor.query_counters()
        assert delta(before, after, "messages", "vfio-user", "in", "REGION_READ") == reads
        assert delta(before, after, "messages", "vfio-user", "out", "REGION_READ") == reads
        assert delta(before, after, "messages", "vfio-user", "in", "REGION_WRITE") == writes
        assert delta(before, after, "bar_accesses", "BAR4", "reads") == reads
        assert delta(before, after, "bar_accesses", "BAR4", "read_bytes") == 8 * reads
        assert delta(before, after, "bar_accesses", "BAR4", "writes") == writes
        assert delta(before, after, "bar_accesses", "BAR4", "write_bytes") == 4 * writes
        assert after["bar_accesses"]["BAR2"]["reads"] > 0  # the driver's bring-up
        assert ctl.read(1, 0x2000, 4) == b"\x5a" * 4

        backend_before = after
        outcomes = [
            ctl.map(0, 0, 4096),
            ctl.map(0, 0, 4096),  # overlap
            ctl.map(2, 0, 4096),  # no region 2: shmid
            ctl.map(0, 0x800, 4096),  # alignment
            ctl.unmap(0, 0x10000, 4096),  # a hole: not-mapped
            ctl.unmap(0, 0, 4096),
        ]
        assert [o["ok"] for o in outcomes] == [True, False, False, False, False, True]
        after = monitor.query_counters()
        channel = ("messages", "vhost-user-backend")
        assert delta(backend_before, after, *channel, "in", "SHMEM_MAP") == 4
        assert delta(backend_before, after, *channel, "out", "SHMEM_MAP") == 4
        assert delta(backend_before, after, *channel, "in", "SHMEM_UNMAP") == 2
        refusals = {
            reason: delta(backend_before, after, "refusals", reason) for reason in after["refusals"]
        }
        assert {reason: n for reason, n in refusals.items() if n} == {
            "overlap": 1,
            "shmid": 1,
            "alignment": 1,
            "not-mapped": 1,
        }
        messages_before = after["messages"]["vhost-user-frontend"]["out"]
        driver.client.device_reset()
        after = monitor.query_counters()["messages"]["vhost-user-frontend"]["out"]
        assert after["RESET_DEVICE"] == messages_before.get("RESET_DEVICE", 0) + 1
    emu.stop()
    back.stop()


def test_drop_mappings_behind_the_back_ends_back(procs: Harness) -> None:
    back, emu, ctl, monitor = start(procs)
    with probed_guest(emu.path) as driver:
        driver.bring_up()
        assert ctl.map(0, 0, 8 * KiB, pattern="counter", seed=1)["ok"]
        assert ctl.map(1, 0x1000, 4 * KiB, pattern="counter", seed=2, writable=True)["ok"]
        assert driver.shm_read(0, 0, 8) == counter(1, 8)
        assert monitor.drop_mappings(shmid=0) == 1
        assert driver.shm_read(0, 0, 8) == bytes(8)
        assert driver.shm_read(0, 4096, 8) == bytes(8)
        assert driver.shm_read(1, 0x1000, 8) == counter(2, 8)  # the other region is kept
        assert len(memfd_mappings(emu.pid)) == 1
        assert [len(r["mappings"]) for r in monitor.query_mappings()["regions"]] == [0, 1]
        # The back-end still believes in its mapping: its unmap is refused.
        before = monitor.query_counters()["refusals"]["not-mapped"]
        reply = ctl.unmap(0, 0, 8 * KiB)
        assert reply["ok"] is False and reply["code"] == errno.ENOENT
        assert monitor.query_counters()["refusals"]["not-mapped"] == before + 1
        assert monitor.drop_mappings() == 1
        assert driver.shm_read(1, 0x1000, 8) == bytes(8)
        assert memfd_mappings(emu.pid) == []
        assert monitor.drop_mappings() == 0
        error = refused(lambda: monitor.drop_mappings(shmid=7))
        assert error.error_class == ErrorClass.INVALID_ARGUMENTS
        # The BAR is usable again at once.
        assert ctl.map(0, 0, 4 * KiB, pattern="counter", seed=3)["ok"]
        assert driver.shm_read(0, 0, 8) == counter(3, 8)
        assert driver.status & DEVICE_NEEDS_RESET == 0  # the device itself noticed nothing
    emu.stop()
    back.stop()


def test_device_reset_is_the_drivers_reset(procs: Harness) -> None:
    back, emu, ctl, monitor = start(procs)
    with probed_guest(emu.path) as driver:
        driver.bring_up()
        assert ctl.map(0, 0, 8 * KiB, pattern="counter", seed=1)["ok"]
        assert ctl.map(1, 0, 4 * KiB, pattern="counter", seed=2, writable=True)["ok"]
        assert len(ctl.status()["mappings"]) == 2
        before = monitor.query_counters()["messages"]["vhost-user-frontend"]["out"]
        mark = emu.mark()
        monitor.device_reset()
        emu.wait_for_log("monitor: device-reset", start=mark)
        assert driver.status == 0
        status = monitor.query_status()
        assert status["status"] == {"value": 0, "bits": []}
        assert status["active"] is False
        assert status["driver_features"]["value"] == 0
        assert memfd_mappings(emu.pid) == []
        assert driver.shm_read(0, 0, 8) == bytes(8)
        assert ctl.status()["mappings"] == []  # the back-end got RESET_DEVICE and forgot them
        after = monitor.query_counters()["messages"]["vhost-user-frontend"]["out"]
        assert after["RESET_DEVICE"] == before.get("RESET_DEVICE", 0) + 1
        assert after["GET_VRING_BASE"] == before.get("GET_VRING_BASE", 0) + 1  # ring stopped
        # The driver can start over, as after its own reset.
        driver.close_msix()
        driver.bring_up()
        assert ctl.map(0, 0, 4 * KiB, pattern="counter", seed=5)["ok"]
        assert driver.shm_read(0, 0, 8) == counter(5, 8)
    emu.stop()
    back.stop()


def test_disconnect_backend_then_the_emulator_reconnects(procs: Harness) -> None:
    back, emu, ctl, monitor = start(procs)
    with probed_guest(emu.path) as driver:
        driver.bring_up()
        assert ctl.map(0, 0, 8 * KiB, pattern="counter", seed=1)["ok"]
        mark, back_mark = emu.mark(), back.mark()
        assert monitor.disconnect_backend() is True
        status = monitor.query_status()
        assert status["backend"]["connected"] is False
        assert "DEVICE_NEEDS_RESET" in status["status"]["bits"]
        assert driver.status & DEVICE_NEEDS_RESET
        assert memfd_mappings(emu.pid) == []
        assert driver.shm_read(0, 0, 8) == bytes(8)
        emu.wait_for_log("vhost-user back-end lost: monitor: disconnect-backend", start=mark)
        emu.wait_for_log("vhost-user back-end connected", start=mark)
        status = monitor.query_status()["backend"]
        assert status["connected"] is True and status["connections"] == 2
        frontend = monitor.query_counters()["messages"]["vhost-user-frontend"]
        assert frontend["out"]["GET_FEATURES"] == 2
        back.wait_for_log("front-end disconnected", start=back_mark)
        back.wait_for_log("front-end connected", start=back_mark)
        driver.close_msix()
        driver.bring_up()
        assert ctl.map(0, 0, 4 * KiB, pattern="counter", seed=6)["ok"]
        assert driver.shm_read(0, 0, 8) == counter(6, 8)
    emu.stop()
    back.stop()


def test_standalone_emulator_has_no_back_end_to_disconnect(procs: Harness) -> None:
    path = monitor_path(procs)
    emu = procs.emulator("--monitor-socket", str(path))
    with MonitorClient(path) as monitor:
        status = monitor.query_status()
        assert status["backend"] is None
        assert monitor.query_regions() == {
            "bar": BAR4,
            "bar_size": 0,
            "max_mappings": 0,
            "regions": [],
        }
        assert monitor.query_mappings() == {"regions": []}
        error = refused(monitor.disconnect_backend)
        assert error.error_class == ErrorClass.NOT_AVAILABLE
        error = refused(monitor.drop_mappings)
        assert error.error_class == ErrorClass.NOT_AVAILABLE
        monitor.device_reset()
    emu.stop()


def test_garbage_half_lines_and_many_clients_never_disturb_it(procs: Harness) -> None:
    back, emu, ctl, monitor = start(procs)
    path = monitor_path(procs)
    with probed_guest(emu.path) as driver:
        driver.bring_up()
        assert ctl.map(0, 0, 4 * KiB, pattern="counter", seed=1)["ok"]
        monitor.query_status()  # the loop is past the SHMEM_MAP (and has closed its fd)
        busy_fds = fd_count(emu.pid)
        a = RawClient(path)
        # Not JSON, not UTF-8, nested beyond Python's recursion limit (within MAX_LINE).
        for data in (b"not json", b"\xff\xfe\x00garbage", b"[" * 30_000):
            reply = a.ask(data + b"\n")
            assert reply["error"]["class"] == ErrorClass.JSON_PARSE_ERROR and "id" not in reply
        requests = [
            (b"[1, 2]", ErrorClass.INVALID_REQUEST, None),
            (b'{"execute": 5, "id": "a"}', ErrorClass.INVALID_REQUEST, "a"),
            (b'{"execute": "nope", "id": 3}', ErrorClass.COMMAND_NOT_FOUND, 3),
            (b'{"execute": "query-status", "arguments": {"x": 1}, "id": 4}', "InvalidArguments", 4),
            (b'{"execute": "query-status", "arguments": [], "id": 5}', "InvalidRequest", 5),
            (b'{"execute": "query-status", "bogus": 1, "id": [6]}', "InvalidRequest", [6]),
            (
                b'{"execute": "drop-mappings", "arguments": {"shmid": true}}',
                "InvalidArguments",
                None,
            ),
        ]
        for data, error_class, msg_id in requests:
            reply = a.ask(data + b"\n")
            assert reply["error"]["class"] == error_class, (data, reply)
            assert reply.get("id") == msg_id
        # Several requests in one write, a blank line between: answered in order.
        a.send(b'{"execute": "query-regions", "id": 1}\n\n{"execute": "query-regions", "id": 2}\n')
        assert [a.reply()["id"], a.reply()["id"]] == [1, 2]

        # A half line waits while another client is served; its end completes it.
        a.send(b'{"execute": "query-sta')
        with MonitorClient(path) as b:
            assert b.query_status()["active"] is True
            a.send(b'tus", "id": 9}\n')
            reply = a.reply()
            assert reply["id"] == 9 and reply["return"]["active"] is True
            assert b.query_regions()["bar_size"] == 4 * MiB

        # A client that leaves in the middle of a line, and one whose line never ends.
        c = RawClient(path)
        c.send(b'{"execute": "device-res')
        c.close()
        d = RawClient(path)
        d.send(b"[" * (MAX_LINE + 4096))
        reply = d.reply()
        assert reply["error"]["class"] == ErrorClass.INVALID_REQUEST
        assert "longer than" in reply["error"]["desc"]
        assert d.at_eof()
        d.close()

        # As many clients as the server takes, then one too many.
        extra = [RawClient(path) for _ in range(MAX_CLIENTS - 2)]  # + monitor and a
        assert all("monitor" in client.greeting for client in extra)
        refused_client = RawClient(path)
        assert refused_client.greeting["error"]["class"] == ErrorClass.GENERIC_ERROR
        assert refused_client.at_eof()
        refused_client.close()
        for client in extra:
            assert client.ask(b'{"execute": "query-regions"}\n')["return"]["bar"] == BAR4
            client.close()
        a.close()

        # The device never noticed: the guest reads on, nothing reset, the mapping is there.
        assert driver.shm_read(0, 0, 8) == counter(1, 8)
        assert monitor.query_status()["status"]["bits"][-1] == "FEATURES_OK"
        assert len(monitor.query_mappings(shmid=0)["regions"][0]["mappings"]) == 1
        deadline = time.monotonic() + 10
        while fd_count(emu.pid) != busy_fds and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fd_count(emu.pid) == busy_fds  # every other client's socket is closed
    assert emu.lines("ERROR|Traceback") == []
    assert [line.split(" WARNING ")[1] for line in emu.lines("WARNING")] == [
        f"monitor: refused a client beyond {MAX_CLIENTS}"
    ]
    emu.stop()
    back.stop()


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emulator", "monitor", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_command_line_prints_results_the_table_and_the_picture(
    procs: Harness, tmp_path: Path
) -> None:
    back, emu, ctl, monitor = start(procs)
    path = monitor_path(procs)
    status = run_cli(path, "query-status")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["backend"]["connected"] is True

    assert ctl.map(0, 0x10000, 64 * KiB, pattern="counter", seed=1)["ok"]
    assert ctl.map(1, 0x2000, 8 * KiB, pattern="counter", seed=2, writable=True)["ok"]
    table = run_cli(path, "mappings")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines() == [
        "SHMID  SHM_OFFSET   LENGTH  FD_OFFSET  ACCESS  KIND   FD_SIZE",
        "    0     0x10000  0x10000        0x0  RO      memfd  0x10000",
        "    1      0x2000   0x2000        0x0  RW      memfd   0x2000",
        "shmid 0: 0x200000 bytes at BAR offset 0x0, 1 mapping(s), 0x10000 bytes mapped",
        "shmid 1: 0x100000 bytes at BAR offset 0x200000, 1 mapping(s), 0x2000 bytes mapped",
    ]
    one = run_cli(path, "mappings", "shmid=0x1")  # the table of region 1 alone
    assert one.returncode == 0, one.stderr
    rows = table.stdout.splitlines()
    assert (
        one.stdout.splitlines()[0] == "SHMID  SHM_OFFSET  LENGTH  FD_OFFSET  ACCESS  KIND   FD_SIZE"
    )
    assert one.stdout.splitlines()[1].split() == rows[2].split()
    assert one.stdout.splitlines()[2:] == rows[4:]

    png = tmp_path / "map.png"
    drawn = run_cli(path, "map", "--png", png)
    assert drawn.returncode == 0, drawn.stderr
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.size == (1000, 70 + 110 * 2)
        rgb = image.convert("RGB")
        # Region 0 (2 MiB over 960 px from x=20): 64 KiB at 64 KiB is x 50..79, read-only.
        bar_y = 40 + 22 + 17
        assert rgb.getpixel((65, bar_y)) == COLOURS["RO"]
        assert rgb.getpixel((500, bar_y)) == COLOURS["hole"]
        # Region 1 (1 MiB): 8 KiB at 8 KiB is x 28..35, read-write.
        assert rgb.getpixel((31, bar_y + 110)) == COLOURS["RW"]
        assert rgb.getpixel((500, bar_y + 110)) == COLOURS["hole"]
    narrow = run_cli(path, "map", "--png", tmp_path / "narrow.png", "--width", "600")
    assert narrow.returncode == 0, narrow.stderr
    with Image.open(tmp_path / "narrow.png") as image:
        assert image.size == (600, 290)

    bad = run_cli(path, "drop-mappings", "shmid=9")
    assert bad.returncode == 1 and "InvalidArguments: no shared memory region 9" in bad.stderr
    unknown = run_cli(path, "query-everything")
    assert unknown.returncode == 1 and "commands: device-reset" in unknown.stderr
    assert run_cli(path, "map").returncode == 2  # no --png
    gone = run_cli(tmp_path / "nothing.sock", "query-status")
    assert gone.returncode == 1 and "cannot talk to" in gone.stderr
    dropped = run_cli(path, "drop-mappings")
    assert dropped.returncode == 0 and json.loads(dropped.stdout) == {"dropped": 2}
    assert monitor.query_mappings()["regions"][0]["mappings"] == []
    emu.stop()
    back.stop()
