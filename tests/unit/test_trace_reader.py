"""``virtio-emu trace`` on a small hand-written trace: pairing, latency, filters, refusals,
malformed lines. The records have the shapes ``emulator/trace.py`` writes (taken from a real
run); the reader runs in-process through ``emulator.cli.main`` as the command would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emulator.cli import main
from emulator.trace_reader import RED, duration

T0 = 1000.0
FIXTURE = [
    # 1-4: vhost-user front-end socket: a data reply and a REPLY_ACK
    {"t": T0, "channel": "vhost-user-frontend", "dir": "out", "cmd": "GET_FEATURES", "size": 12,
     "payload": {}},
    {"t": T0 + 0.0005, "channel": "vhost-user-frontend", "dir": "in", "cmd": "GET_FEATURES",
     "payload": {"value": 0x140000000}},
    {"t": T0 + 0.001, "channel": "vhost-user-frontend", "dir": "out", "cmd": "SET_OWNER",
     "size": 12, "payload": {}},
    {"t": T0 + 0.0012, "channel": "vhost-user-frontend", "dir": "in", "cmd": "SET_OWNER",
     "payload": {"value": 0}},
    "this is not json",  # 5
    # 6-9: two pipelined vfio-user reads answered out of order
    {"t": T0 + 0.002, "channel": "vfio-user", "dir": "in", "cmd": "REGION_READ", "id": 7,
     "size": 32, "payload": {"offset": 16, "region": 4, "count": 8, "data": {"len": 0}}},
    {"t": T0 + 0.0021, "channel": "vfio-user", "dir": "in", "cmd": "REGION_READ", "id": 8,
     "size": 32, "payload": {"offset": 24, "region": 4, "count": 8, "data": {"len": 0}}},
    {"t": T0 + 0.0025, "channel": "vfio-user", "dir": "out", "cmd": "REGION_READ", "id": 8,
     "size": 40, "payload": {"offset": 24, "region": 4, "count": 8, "data": {"len": 8}}},
    {"t": T0 + 0.0032, "channel": "vfio-user", "dir": "out", "cmd": "REGION_READ", "id": 7,
     "size": 40, "payload": {"offset": 16, "region": 4, "count": 8, "data": {"len": 8}}},
    [1, 2, 3],  # 10
    # 11: a posted write (no reply); 12-13: an error reply
    {"t": T0 + 0.004, "channel": "vfio-user", "dir": "in", "cmd": "REGION_WRITE", "id": 9,
     "size": 40, "payload": {"offset": 0, "region": 2, "count": 8, "data": {"len": 8}}},
    {"t": T0 + 0.005, "channel": "vfio-user", "dir": "in", "cmd": "DMA_UNMAP", "id": 10,
     "size": 48, "payload": {"argsz": 32, "flags": 0, "address": 0x1000, "size": 0x1000}},
    {"t": T0 + 0.0051, "channel": "vfio-user", "dir": "out", "cmd": "DMA_UNMAP", "id": 10,
     "size": 16, "error": 22},
    # 14-17: two SHMEM_MAPs in flight on the back-end channel, the second refused
    {"t": T0 + 0.006, "channel": "vhost-user-backend", "dir": "in", "cmd": "SHMEM_MAP",
     "nfds": 1, "payload": {"shmid": 0, "fd_offset": 0, "shm_offset": 0, "length": 4096,
                            "flags": 0}},
    {"t": T0 + 0.0062, "channel": "vhost-user-backend", "dir": "in", "cmd": "SHMEM_MAP",
     "nfds": 1, "payload": {"shmid": 0, "fd_offset": 0, "shm_offset": 0x800000,
                            "length": 4096, "flags": 0}},
    {"t": T0 + 0.0065, "channel": "vhost-user-backend", "dir": "out", "cmd": "SHMEM_MAP",
     "size": 20, "payload": {"value": 0}},
    {"t": T0 + 0.007, "channel": "vhost-user-backend", "dir": "out", "cmd": "SHMEM_MAP",
     "size": 20, "payload": {"value": 22}},
    {"t": "soon", "channel": "vfio-user", "dir": "in", "cmd": "VERSION"},  # 18
    # 19: a message the codec refused
    {"t": T0 + 0.008, "channel": "vfio-user", "dir": "in", "cmd": "invalid:99", "id": 11,
     "error": 38},
    # 20-21: a slow reply
    {"t": T0 + 0.5, "channel": "vhost-user-frontend", "dir": "out", "cmd": "GET_VRING_BASE",
     "size": 20, "payload": {"index": 0, "num": 0}},
    {"t": T0 + 1.75, "channel": "vhost-user-frontend", "dir": "in", "cmd": "GET_VRING_BASE",
     "payload": {"index": 0, "num": 5}},
]  # fmt: skip
TRUNCATED = '{"t": 1001.8, "channel": "vfio-u'  # 22: the writer died mid-line


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    lines = [item if isinstance(item, str) else json.dumps(item) for item in FIXTURE]
    path.write_text("\n".join(lines) + "\n" + TRUNCATED)
    return path


def reader(
    capsys: pytest.CaptureFixture[str], trace: Path, *args: str
) -> tuple[dict[int, str], str]:
    """Run ``virtio-emu trace``; its lines keyed by the trace line they show, and stderr."""
    assert main(["trace", str(trace), *args]) == 0
    out, err = capsys.readouterr()
    shown = {int(line[1:].split()[0]): line for line in out.splitlines()}
    return shown, err


def test_replies_pair_with_their_requests_and_show_latency(
    capsys: pytest.CaptureFixture[str], trace: Path
) -> None:
    shown, _ = reader(capsys, trace)
    assert "reply to 1 (500 us)" in shown[2] and "value=0x140000000" in shown[2]
    assert "reply to 3 (200 us)" in shown[4] and "status=0" in shown[4]  # REPLY_ACK
    # vfio-user by id, whatever the order of the replies
    assert "REGION_READ #8 reply to 7 (400 us)" in shown[8]
    assert "REGION_READ #7 reply to 6 (1.20 ms)" in shown[9]
    # vfio-user replies show what they add to the request
    assert shown[9].endswith("[40 B] data=8B")
    # vhost-user by type and order: the oldest SHMEM_MAP in flight gets the first status
    assert "reply to 14 (500 us)" in shown[16]
    assert "reply to 15 (800 us)" in shown[17]
    assert "reply to 20 (1.250 s)" in shown[21] and "index=0 num=5" in shown[21]
    requests = (1, 3, 6, 7, 11, 12, 14, 15, 19, 20)
    assert not any("reply" in shown[n] for n in requests)
    # time since the file's first record; the arrow as in the -v log
    assert shown[21].split()[1:4] == ["1.750000", "vhost-user-frontend", "-->"]
    assert shown[20].split()[3] == "<--"
    assert "[1 fd] shmid=0 fd_offset=0 shm_offset=0x800000 length=0x1000" in shown[15]


def test_refusals_are_marked(capsys: pytest.CaptureFixture[str], trace: Path) -> None:
    shown, _ = reader(capsys, trace)
    marked = {n for n, line in shown.items() if line.startswith("!")}
    assert marked == {13, 17, 19}
    assert "REFUSED error=22 (EINVAL)" in shown[13]
    assert "REFUSED status=22 (EINVAL)" in shown[17]
    assert "REFUSED error=38 (ENOSYS)" in shown[19]
    assert RED not in "".join(shown.values())  # not a terminal: no colour


def test_colour_when_asked(capsys: pytest.CaptureFixture[str], trace: Path) -> None:
    assert main(["trace", str(trace), "--color", "always"]) == 0
    coloured = [line for line in capsys.readouterr().out.splitlines() if RED in line]
    assert [line.split()[1] for line in coloured] == ["13", "17", "19"]


def test_filters(capsys: pytest.CaptureFixture[str], trace: Path) -> None:
    shown, _ = reader(capsys, trace, "--socket", "backend")
    assert sorted(shown) == [14, 15, 16, 17]
    shown, _ = reader(capsys, trace, "--type", "region_read", "--type", "GET_*")
    assert sorted(shown) == [1, 2, 6, 7, 8, 9, 20, 21]
    shown, _ = reader(capsys, trace, "--socket", "vfio", "--type", "Region_Read")
    assert sorted(shown) == [6, 7, 8, 9]
    shown, _ = reader(capsys, trace, "--type", "shmem_map", "--socket", "vfio-user")
    assert shown == {}
    # Pairing sees every record: a filtered reply still names its request and latency.
    shown, _ = reader(capsys, trace, "--type", "shmem_map")
    assert "reply to 15 (800 us)" in shown[17] and shown[17].startswith("!")


def test_json_prints_the_selected_records_unchanged(
    capsys: pytest.CaptureFixture[str], trace: Path
) -> None:
    assert main(["trace", str(trace), "--json", "--type", "SHMEM_MAP"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in out] == FIXTURE[13:17]


def test_malformed_lines_are_reported_and_skipped(
    capsys: pytest.CaptureFixture[str], trace: Path
) -> None:
    shown, err = reader(capsys, trace)
    assert sorted(shown) == [n for n in range(1, 22) if n not in (5, 10, 18)]
    problems = err.splitlines()
    assert [p.split(": skipped: ")[0].rsplit(":", 1)[1] for p in problems] == [
        "5",
        "10",
        "18",
        "22",
    ]
    assert "not JSON" in problems[0] and "not a JSON object" in problems[1]
    assert "no numeric 't'" in problems[2]
    assert "Traceback" not in err


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["trace", str(tmp_path / "none.jsonl")]) == 1
    assert "No such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.000042, "42 us"), (0.0009996, "1.00 ms"), (0.25, "250.00 ms"), (0.9999999, "1.000 s")],
)
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text
