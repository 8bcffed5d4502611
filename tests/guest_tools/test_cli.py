"""``vguest`` end to end against a fake sysfs tree of real files: JSON output and exit codes."""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from vguest import pattern
from vguest.cli import main
from vguest.pattern import PatternKind

from tests.guest_tools.conftest import GUEST_TOOLS
from tests.guest_tools.testlib import (
    IO,
    MEM,
    SHM1,
    Bar,
    ConfigSpace,
    FakeSysfs,
    virtio_bars,
    well_formed,
)

VIRTIO = "0000:00:04.0"
OTHER = "0000:00:01.0"


@pytest.fixture
def fake(tmp_path: Path) -> FakeSysfs:
    fs = FakeSysfs(tmp_path / "sys")
    fs.add(VIRTIO, well_formed().bytes(), virtio_bars())
    fs.add(
        OTHER,
        ConfigSpace(vendor=0x8086, device=0x100E).bytes(),
        {0: Bar(0x20000, MEM, 0xFEB80000), 1: Bar(0x40, IO, 0xC000)},
        vendor=0x8086,
        device=0x100E,
        class_code=0x020000,
    )
    return fs


def run(capsys: pytest.CaptureFixture[str], fake: FakeSysfs, *argv: str) -> tuple[int, Any]:
    """Run main() with --json; stdout must hold exactly one JSON object."""
    code = main([*argv[:1], "--json", "--sysfs-root", str(fake.root), *argv[1:]])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 1, out
    data = json.loads(lines[0])
    assert data["exit_code"] == code
    assert data["ok"] is (code in (0, 1))
    return code, data


def bar4(fake: FakeSysfs) -> Path:
    return fake.devices[VIRTIO] / "resource4"


def test_list_virtio_only(capsys: pytest.CaptureFixture[str], fake: FakeSysfs) -> None:
    code, data = run(capsys, fake, "list")
    assert code == 0
    [dev] = data["devices"]
    assert (dev["bdf"], dev["vendor"], dev["device"], dev["virtio_id"]) == (
        VIRTIO,
        0x1AF4,
        0x1041,
        1,
    )
    assert [b["index"] for b in dev["bars"]] == [2, 4]
    assert [c["name"] for c in dev["virtio_caps"]] == [
        "COMMON_CFG",
        "NOTIFY_CFG",
        "ISR_CFG",
        "DEVICE_CFG",
        "SHARED_MEMORY_CFG",
        "SHARED_MEMORY_CFG",
    ]
    assert dev["shm_regions"] == [
        {"shmid": 0, "bar": 4, "offset": 0, "length": 0x200000},
        {"shmid": 1, "bar": 4, "offset": 0x200000, "length": 0x100000},
    ]
    assert dev["findings"] == []


def test_list_all_and_by_bdf(capsys: pytest.CaptureFixture[str], fake: FakeSysfs) -> None:
    code, data = run(capsys, fake, "list", "--all")
    assert code == 0
    assert [d["bdf"] for d in data["devices"]] == [OTHER, VIRTIO]
    assert data["devices"][0]["virtio_id"] is None
    assert run(capsys, fake, "list", "00:01.0")[1]["devices"][0]["bdf"] == OTHER
    code, data = run(capsys, fake, "list", "0000:00:09.0")
    assert code == 3 and "no PCI device 0000:00:09.0" in data["error"]


def test_list_reports_hostile_config(capsys: pytest.CaptureFixture[str], fake: FakeSysfs) -> None:
    cs = well_formed()
    cs.buf[cs.last_next] = 0x40
    (fake.devices[VIRTIO] / "config").write_bytes(cs.bytes())
    code, data = run(capsys, fake, "list")
    assert code == 0
    assert [f["message"] for f in data["devices"][0]["findings"]] == [
        "capability list loops back to 0x40"
    ]


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_write_then_read_through_shm(
    capsys: pytest.CaptureFixture[str], fake: FakeSysfs, width: int
) -> None:
    value = 0x1122334455667788 >> (64 - 8 * width)
    code, data = run(
        capsys, fake, "write", VIRTIO, "--shm", "1", "0x18", hex(value), "--width", str(width)
    )
    assert code == 0 and data["region_offset"] == SHM1[0]
    raw = bar4(fake).read_bytes()[SHM1[0] + 0x18 : SHM1[0] + 0x18 + 8]
    assert raw[:width] == value.to_bytes(width, "little") and raw[width:] == bytes(8 - width)
    code, data = run(
        capsys, fake, "read", VIRTIO, "--bar", "4", hex(SHM1[0] + 0x18), "--width", str(width)
    )
    assert (code, data["value"]) == (0, value)


def test_fill_verify_checksum(capsys: pytest.CaptureFixture[str], fake: FakeSysfs) -> None:
    span = ["0x1000", "4K"]
    code, data = run(
        capsys,
        fake,
        "fill",
        VIRTIO,
        "--shm",
        "0",
        *span,
        "--pattern",
        "xorshift",
        "--seed",
        "42",
        "--width",
        "8",
    )
    expected = pattern.generate(PatternKind.XORSHIFT, 42, 4096)
    assert code == 0 and data["crc32c"] == pattern.crc32c(expected)
    assert bar4(fake).read_bytes()[0x1000:0x2000] == expected

    code, data = run(
        capsys,
        fake,
        "verify",
        VIRTIO,
        "--shm",
        "0",
        *span,
        "--pattern",
        "xorshift",
        "--seed",
        "42",
        "--width",
        "2",
    )
    assert (code, data["match"], data["mismatch_offset"]) == (0, True, None)
    code, data = run(capsys, fake, "checksum", VIRTIO, "--shm", "0", *span, "--width", "1")
    assert data["crc32c"] == pattern.crc32c(expected)
    code, data = run(
        capsys, fake, "verify", VIRTIO, "--shm", "0", *span, "--crc", hex(pattern.crc32c(expected))
    )
    assert (code, data["match"]) == (0, True)

    with open(bar4(fake), "r+b") as f:
        f.seek(0x1000 + 0x777)
        f.write(bytes([expected[0x777] ^ 0xFF]))
    code, data = run(
        capsys, fake, "verify", VIRTIO, "--shm", "0", *span, "--pattern", "xorshift", "--seed", "42"
    )
    assert (code, data["match"], data["mismatch_offset"]) == (1, False, 0x777)
    code, data = run(
        capsys, fake, "verify", VIRTIO, "--shm", "0", *span, "--crc", hex(pattern.crc32c(expected))
    )
    assert (code, data["match"]) == (1, False)


def test_any_memory_bar_of_any_device(capsys: pytest.CaptureFixture[str], fake: FakeSysfs) -> None:
    code, _ = run(capsys, fake, "fill", OTHER, "--bar", "0", "0", "0x100", "--pattern", "counter")
    assert code == 0
    assert (fake.devices[OTHER] / "resource0").read_bytes()[:0x100] == pattern.generate(
        PatternKind.COUNTER, 0, 0x100
    )


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["read", VIRTIO, "--shm", "1", "0x100000"], 4, "outside shm 1"),
        (["checksum", VIRTIO, "--shm", "0", "0x1ff000", "0x2000"], 4, "outside shm 0"),
        (["checksum", VIRTIO, "--bar", "4", "0x3ff000", "0x2000"], 4, "outside BAR 4"),
        (
            ["read", VIRTIO, "--shm", "9", "0"],
            4,
            "no shared-memory region with shmid 9 (has: 0, 1)",
        ),
        (["read", OTHER, "--bar", "1", "0"], 4, "BAR 1 is io, not memory"),
        (["read", VIRTIO, "--bar", "3", "0"], 4, "BAR 3 is not implemented"),
        (["read", VIRTIO, "--bar", "6", "0"], 2, "BAR 6 does not exist"),
        (["read", VIRTIO, "--bar", "4", "2"], 2, "multiples of width 4"),
        (["fill", VIRTIO, "--bar", "4", "0", "6", "--width", "4"], 2, "multiples of width 4"),
        (["read", VIRTIO, "--bar", "4", "0", "--width", "3"], 2, "invalid choice"),
        (["write", VIRTIO, "--bar", "4", "0", "0x1ff", "--width", "1"], 2, "does not fit"),
        (["read", "not-a-bdf", "--bar", "4", "0"], 2, "not a PCI address"),
        (["read", VIRTIO, "0"], 2, "one of the arguments --bar --shm is required"),
        (["read", VIRTIO, "--bar", "4", "zz"], 2, "not a number"),
        (["frobnicate"], 2, "invalid choice"),
        (["read", "0000:00:09.0", "--bar", "4", "0"], 3, "no PCI device"),
        (
            ["verify", VIRTIO, "--bar", "4", "0", "8", "--crc", "1", "--pattern", "counter"],
            2,
            "one of --pattern, --crc or --expect",
        ),
        (["fill", VIRTIO, "--bar", "4", "0", "0"], 2, "length > 0"),
    ],
)
def test_errors_and_exit_codes(
    capsys: pytest.CaptureFixture[str], fake: FakeSysfs, argv: list[str], code: int, needle: str
) -> None:
    got, data = run(capsys, fake, *argv)
    assert got == code
    assert needle in data["error"]


def test_shm_region_outside_its_bar_is_refused(
    capsys: pytest.CaptureFixture[str], fake: FakeSysfs
) -> None:
    cs = well_formed()
    shm0 = 0x84  # the fifth capability; its length field is at +12
    assert cs.buf[shm0 + 3] == 8
    cs.buf[shm0 + 12 : shm0 + 16] = (0x500000).to_bytes(4, "little")
    (fake.devices[VIRTIO] / "config").write_bytes(cs.bytes())
    code, data = run(capsys, fake, "read", VIRTIO, "--shm", "0", "0")
    assert code == 4 and "lies outside BAR 4" in data["error"]


def test_bench(capsys: pytest.CaptureFixture[str], fake: FakeSysfs) -> None:
    code, data = run(
        capsys,
        fake,
        "bench",
        VIRTIO,
        "--shm",
        "1",
        "--count",
        "500",
        "--op",
        "both",
        "--widths",
        "8,4",
    )
    assert code == 0 and data["length"] == 4096
    assert [(r["op"], r["width"], r["count"]) for r in data["results"]] == [
        ("read", 4, 500),
        ("read", 8, 500),
        ("write", 4, 500),
        ("write", 8, 500),
    ]
    assert all(r["ops_per_s"] > 0 for r in data["results"])
    assert run(capsys, fake, "bench", VIRTIO, "--bar", "4", "--widths", "3")[0] == 2


def test_watch_device_appears(capsys: pytest.CaptureFixture[str], fake: FakeSysfs) -> None:
    late = "0000:00:07.0"
    timer = threading.Timer(0.2, fake.add, (late, well_formed().bytes(), virtio_bars()))
    timer.start()
    try:
        code, data = run(capsys, fake, "watch", late, "--timeout", "10")
    finally:
        timer.join()
    assert (code, data["appeared"], data["bdf"]) == (0, True, late)
    assert data["elapsed_s"] >= 0.1
    code, data = run(capsys, fake, "watch", "0000:00:08.0", "--timeout", "0.2")
    assert code == 3 and "appeared within 0.2 s" in data["error"]
    assert run(capsys, fake, "watch")[1]["bdf"] == VIRTIO


def test_watch_value(capsys: pytest.CaptureFixture[str], fake: FakeSysfs) -> None:
    def poke() -> None:
        with open(bar4(fake), "r+b") as f:
            f.seek(SHM1[0] + 0x40)
            f.write((0xC0FFEE).to_bytes(4, "little"))

    timer = threading.Timer(0.2, poke)
    timer.start()
    try:
        code, data = run(
            capsys, fake, "watch", VIRTIO, "--shm", "1", "--offset", "0x40", "--timeout", "10"
        )
    finally:
        timer.join()
    assert (code, data["changed"], data["initial"], data["value"]) == (0, True, 0, 0xC0FFEE)
    code, data = run(
        capsys,
        fake,
        "watch",
        VIRTIO,
        "--shm",
        "1",
        "--offset",
        "0x40",
        "--timeout",
        "0.1",
        "--until",
        "1",
    )
    assert (code, data["changed"], data["value"]) == (1, False, 0xC0FFEE)
    assert run(capsys, fake, "watch", VIRTIO, "--offset", "0x40")[0] == 2


def test_text_output(capsys: pytest.CaptureFixture[str], fake: FakeSysfs) -> None:
    assert main(["list", "--sysfs-root", str(fake.root)]) == 0
    out = capsys.readouterr().out
    assert "shm 1: BAR 4 offset 0x200000 length 0x100000" in out
    assert main(["--sysfs-root", str(fake.root), "read", VIRTIO, "--bar", "4", "0"]) == 0
    assert capsys.readouterr().out == "0x00000000\n"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VGUEST_LIB")}
    return {**env, **extra}


def test_module_entry_point_and_missing_library(fake: FakeSysfs) -> None:
    base = [sys.executable, "-m", "vguest", "--json", "--sysfs-root", str(fake.root)]
    ok = subprocess.run(
        [*base, "checksum", VIRTIO, "--shm", "1", "0", "16"],
        capture_output=True,
        text=True,
        env=_env(PYTHONPATH=str(GUEST_TOOLS)),
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["crc32c"] == pattern.crc32c(bytes(16))
    bad = subprocess.run(
        [*base, "read", VIRTIO, "--shm", "1", "0"],
        capture_output=True,
        text=True,
        check=False,
        env=_env(PYTHONPATH=str(GUEST_TOOLS), VGUEST_LIB="/nonexistent.so"),
    )
    assert bad.returncode == 5
    assert "/nonexistent.so not found" in json.loads(bad.stdout)["error"]


def test_make_install(tmp_path: Path, fake: FakeSysfs) -> None:
    dest = tmp_path / "root"
    subprocess.run(["make", "-s", "-C", str(GUEST_TOOLS), "install", f"DESTDIR={dest}"], check=True)
    wrapper = dest / "usr/local/bin/vguest"
    assert os.access(wrapper, os.X_OK)
    assert 'PYTHONPATH=/opt/vguest exec python3 -m vguest "$@"' in wrapper.read_text()
    assert (dest / "opt/vguest/vguest/libvguest.so").is_file()
    # The installed copy alone (no source tree on the path) does a real BAR access.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vguest",
            "--json",
            "--sysfs-root",
            str(fake.root),
            "fill",
            VIRTIO,
            "--shm",
            "0",
            "0",
            "64",
            "--pattern",
            "counter",
            "--seed",
            "5",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env=_env(PYTHONPATH=str(dest / "opt/vguest")),
    )
    assert proc.returncode == 0, proc.stderr
    assert bar4(fake).read_bytes()[:64] == pattern.generate(PatternKind.COUNTER, 5, 64)


# ---- inspection: dump, read --count, verify --expect ----


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


SAMPLE = bytes(range(0x20, 0x60)) + b"\x00\xff\x7f\x80" * 4  # printable, then not


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_dump_is_hexdump_c(capsys: pytest.CaptureFixture[str], fake: FakeSysfs, width: int) -> None:
    poke(bar4(fake), SHM1[0] + 0x100, SAMPLE)
    code, data = run(capsys, fake, "dump", VIRTIO, "--shm", "1", "0x108", "72", "--width", "8")
    assert code == 0 and bytes.fromhex(data["data"]) == SAMPLE[8:80]
    argv = ["--sysfs-root", str(fake.root), "dump", VIRTIO, "--bar", "4", hex(SHM1[0] + 0x108)]
    assert main([*argv, "72", "--width", str(width)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "00200108  28 29 2a 2b 2c 2d 2e 2f  30 31 32 33 34 35 36 37  |()*+,-./01234567|"
    )
    assert lines[4] == ("00200148  00 ff 7f 80 00 ff 7f 80                           |........|")
    assert lines[5:] == ["00200150"]


def test_dump_matches_the_hexdump_tool(capsys: pytest.CaptureFixture[str], fake: FakeSysfs) -> None:
    hexdump = shutil.which("hexdump")
    if hexdump is None:
        pytest.skip("no hexdump(1) on this machine")
    resource = fake.devices[OTHER] / "resource0"
    poke(resource, 0x30, SAMPLE)
    argv = ["--sysfs-root", str(fake.root), "dump", OTHER, "--bar", "0", "0x2e", "0x56"]
    assert main([*argv, "--width", "2"]) == 0
    ours = capsys.readouterr().out
    theirs = subprocess.run(
        [hexdump, "-C", "-v", "-s", "0x2e", "-n", "0x56", str(resource)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert ours == theirs


def test_read_count(capsys: pytest.CaptureFixture[str], fake: FakeSysfs) -> None:
    poke(bar4(fake), SHM1[0] + 0x40, bytes(range(1, 17)))
    code, data = run(capsys, fake, "read", VIRTIO, "--shm", "1", "0x40", "--count", "4")
    assert code == 0
    assert data["values"] == [0x04030201, 0x08070605, 0x0C0B0A09, 0x100F0E0D]
    assert (data["value"], data["count"], data["width"]) == (0x04030201, 4, 4)
    code, data = run(
        capsys, fake, "read", VIRTIO, "--shm", "1", "0x40", "--count", "2", "--width", "8"
    )
    assert data["values"] == [0x0807060504030201, 0x100F0E0D0C0B0A09]
    code, data = run(capsys, fake, "read", VIRTIO, "--shm", "1", "0x40")  # one word, as before
    assert (data["value"], data["values"], data["count"]) == (0x04030201, [0x04030201], 1)
    argv = ["--sysfs-root", str(fake.root), "read", VIRTIO, "--bar", "4", hex(SHM1[0] + 0x4E)]
    assert main([*argv, "--count", "3", "--width", "2"]) == 0
    assert capsys.readouterr().out == "0x100f\n0x0000\n0x0000\n"
    code, data = run(capsys, fake, "read", VIRTIO, "--shm", "1", "0xffff8", "--count", "3")
    assert code == 4 and "outside shm 1" in data["error"]
    code, data = run(capsys, fake, "read", VIRTIO, "--shm", "1", "0", "--count", "0")
    assert code == 2 and "--count 0" in data["error"]


def test_verify_expect(capsys: pytest.CaptureFixture[str], fake: FakeSysfs, tmp_path: Path) -> None:
    golden = pattern.generate(PatternKind.XORSHIFT, 9, 0x1000)
    expect = tmp_path / "golden.bin"
    expect.write_bytes(golden)
    poke(bar4(fake), 0x3000, golden)
    where = ["verify", VIRTIO, "--shm", "0", "0x3000"]
    code, data = run(capsys, fake, *where, "--expect", str(expect), "--width", "8")
    assert (code, data["match"], data["length"], data["mismatch_offset"]) == (0, True, 0x1000, None)
    assert data["expect"] == str(expect)
    code, data = run(capsys, fake, *where, "0x800", "--expect", str(expect))  # a prefix
    assert (code, data["match"], data["length"]) == (0, True, 0x800)

    poke(bar4(fake), 0x3000 + 0x6A5, bytes([golden[0x6A5] ^ 0x10]))
    code, data = run(capsys, fake, *where, "--expect", str(expect), "--width", "4")
    assert (code, data["match"], data["mismatch_offset"]) == (1, False, 0x6A5)
    word = slice(0x6A4, 0x6A8)
    assert data["expected"] == int.from_bytes(golden[word], "little")
    assert data["actual"] == data["expected"] ^ (0x10 << 8)
    argv = ["--sysfs-root", str(fake.root), *where, "--expect", str(expect), "--width", "1"]
    assert main(argv) == 1
    assert capsys.readouterr().out == (
        f"mismatch at +0x6a5: expected {golden[0x6A5]:#x}, got {golden[0x6A5] ^ 0x10:#x}\n"
    )
    code, data = run(capsys, fake, *where, "0x6a4", "--expect", str(expect))  # before it
    assert (code, data["match"]) == (0, True)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["0x2000", "--expect", "{file}"], "has 4096 bytes, fewer than 8192"),
        (["--expect", "{file}", "--pattern", "counter"], "one of --pattern, --crc or --expect"),
        (["--expect", "{file}", "--crc", "1"], "one of --pattern, --crc or --expect"),
        (["--expect", "{missing}"], "cannot read --expect"),
        (["--pattern", "counter"], "LENGTH is required"),
        (["--expect", "{odd}"], "length 0x13 must be multiples of width 4"),
    ],
)
def test_verify_expect_usage_errors(
    capsys: pytest.CaptureFixture[str],
    fake: FakeSysfs,
    tmp_path: Path,
    extra: list[str],
    needle: str,
) -> None:
    files = {"file": tmp_path / "4k.bin", "odd": tmp_path / "odd.bin", "missing": tmp_path / "no"}
    files["file"].write_bytes(bytes(0x1000))
    files["odd"].write_bytes(bytes(0x13))
    argv = [arg.format(**files) for arg in extra]
    code, data = run(capsys, fake, "verify", VIRTIO, "--shm", "0", "0", *argv)
    assert code == 2 and needle in data["error"]
