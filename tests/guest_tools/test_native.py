"""libvguest against real file mappings (a memfd or a tmpfile stands in for resource<N>)."""

import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vguest import pattern
from vguest.errors import AccessError, UsageError
from vguest.mmio import Mapping, c_crc32c, c_generate
from vguest.pattern import PatternKind

SIZE = 0x10000
WIDTHS = (1, 2, 4, 8)
FMT = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("vguest-test-bar", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    yield fd
    os.close(fd)


@pytest.fixture
def bar_file(tmp_path: Path) -> Path:
    path = tmp_path / "resource4"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


@pytest.mark.parametrize("width", WIDTHS)
def test_write_is_exact_width_and_little_endian(memfd: int, width: int) -> None:
    os.pwrite(memfd, b"\xaa" * 32, 0x100)
    value = 0x8877665544332211 & ((1 << (8 * width)) - 1)
    with Mapping.from_fd(memfd, 0, SIZE, writable=True) as m:
        m.write(0x108, width, value)
        assert m.read(0x108, width) == value
    data = os.pread(memfd, 32, 0x100)
    assert struct.unpack_from(FMT[width], data, 8)[0] == value
    assert data[:8] == b"\xaa" * 8
    assert data[8 + width :] == b"\xaa" * (24 - width)


@pytest.mark.parametrize("width", WIDTHS)
def test_read_sees_file_bytes(bar_file: Path, width: int) -> None:
    with open(bar_file, "r+b") as f:
        f.seek(0x2000)
        f.write(bytes(range(16)))
    with Mapping.open(bar_file, 0, SIZE, writable=False) as m:
        got = m.read(0x2000 + width, width)
        assert got == int.from_bytes(bytes(range(width, 2 * width)), "little")
        assert m.read_bytes(0x2000, 16, width) == bytes(range(16))


def test_window_at_unaligned_file_offset(bar_file: Path) -> None:
    bar_file.write_bytes(bytes(i & 0xFF for i in range(SIZE)))
    with Mapping.open(bar_file, 0x1008, 0x100, writable=True) as m:
        assert m.read(0, 1) == 0x08
        assert m.read(0xF8, 8) == int.from_bytes(bytes(range(0x00, 0x08)), "little")
        m.write_bytes(0x10, b"\x01\x02\x03\x04", 2)
    assert bar_file.read_bytes()[0x1018:0x101C] == b"\x01\x02\x03\x04"


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kind", list(PatternKind))
def test_fill_verify_checksum_match_python(memfd: int, width: int, kind: PatternKind) -> None:
    seed = 0x0123456789ABCDEF
    length = 0x1000
    with Mapping.from_fd(memfd, 0, SIZE, writable=True) as m:
        m.fill(0x200, length, width, kind, seed)
        assert m.verify(0x200, length, width, kind, seed).ok
        crc = m.crc32c(0x200, length, width)
    expected = pattern.generate(kind, seed, length)
    assert os.pread(memfd, length, 0x200) == expected
    assert os.pread(memfd, 0x200, 0) == bytes(0x200)
    assert crc == pattern.crc32c(expected)


def test_width_does_not_change_the_pattern(memfd: int) -> None:
    with Mapping.from_fd(memfd, 0, SIZE, writable=True) as m:
        m.fill(0, 0x400, 1, PatternKind.XORSHIFT, 7)
        for width in WIDTHS:
            assert m.verify(0, 0x400, width, PatternKind.XORSHIFT, 7).ok
            assert not m.verify(0, 0x400, width, PatternKind.XORSHIFT, 8).ok


@pytest.mark.parametrize("width", WIDTHS)
def test_mismatch_reports_first_differing_byte(memfd: int, width: int) -> None:
    with Mapping.from_fd(memfd, 0, SIZE, writable=True) as m:
        m.fill(0x100, 0x800, width, PatternKind.COUNTER, 1)
        good = os.pread(memfd, 0x800, 0x100)
        os.pwrite(memfd, bytes([good[0x123] ^ 0x40]), 0x100 + 0x123)
        os.pwrite(memfd, bytes([good[0x300] ^ 0x01]), 0x100 + 0x300)
        res = m.verify(0x100, 0x800, width, PatternKind.COUNTER, 1)
    assert not res.ok
    assert res.mismatch_offset == 0x123
    start = 0x123 - 0x123 % width
    assert res.expected == int.from_bytes(good[start : start + width], "little")
    assert res.actual is not None and res.expected is not None
    assert res.actual ^ res.expected == 0x40 << (8 * (0x123 % width))


def test_bench_loops_touch_memory(memfd: int) -> None:
    with Mapping.from_fd(memfd, 0, SIZE, writable=True) as m:
        w = m.bench_write(0x40, 0x40, 4, 1000, 0xDEADBEEF)
        r = m.bench_read(0x40, 0x40, 8, 1000)
    assert os.pread(memfd, 0x48, 0x38) == bytes(8) + b"\xef\xbe\xad\xde" * 16
    assert (w.op, w.width, w.count, r.op, r.width) == ("write", 4, 1000, "read", 8)
    assert w.elapsed_ns > 0 and r.elapsed_ns > 0 and r.ops_per_s > 0


def test_errors_are_exceptions_not_faults(memfd: int, bar_file: Path, tmp_path: Path) -> None:
    with Mapping.from_fd(memfd, 0, 0x100, writable=False) as m:
        with pytest.raises(AccessError, match="outside"):
            m.read(0x100, 1)
        with pytest.raises(AccessError, match="outside"):
            m.verify(0xF0, 0x20, 1, PatternKind.COUNTER, 0)
        with pytest.raises(UsageError, match="multiples"):
            m.read(0x2, 4)
        with pytest.raises(UsageError, match="width"):
            m.read(0, 3)
        with pytest.raises(AccessError, match="read-only"):
            m.write(0, 4, 1)
    with pytest.raises(AccessError, match="closed"):
        m.read(0, 1)
    with pytest.raises(AccessError, match="Numerical result out of range"):
        Mapping.open(bar_file, SIZE - 0x10, 0x20, writable=False)
    with pytest.raises(AccessError, match="No such file"):
        Mapping.open(tmp_path / "missing", 0, 8, writable=False)
    with pytest.raises(UsageError):
        Mapping.open(bar_file, 0, 0, writable=False)
    with Mapping.from_fd(memfd, 0, 0x100, writable=True) as m:
        with pytest.raises(UsageError, match="fit"):
            m.write(0, 2, 0x10000)
        with pytest.raises(UsageError, match="64 bits"):
            m.fill(0, 0x10, 4, PatternKind.COUNTER, 1 << 64)


def test_read_only_file_refuses_writable_mapping(tmp_path: Path) -> None:
    path = tmp_path / "ro"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(AccessError, match="permission denied"):
            Mapping.from_fd(fd, 0, 4096, writable=True)
    finally:
        os.close(fd)


# ---- C and Python definitions agree ----


def test_reference_vectors() -> None:
    assert pattern.crc32c(b"123456789") == 0xE3069283
    assert c_crc32c(b"123456789") == 0xE3069283
    assert pattern.crc32c(b"") == 0
    assert pattern.generate(PatternKind.XORSHIFT, 1, 8) == struct.pack("<Q", 0x40822041)
    assert pattern.generate(PatternKind.COUNTER, (1 << 64) - 1, 16) == bytes(8 * [0xFF] + 8 * [0])
    assert pattern.generate(PatternKind.CONSTANT, 0x0102, 4) == b"\x02\x01\x00\x00"


@pytest.mark.parametrize("kind", list(PatternKind))
@pytest.mark.parametrize("seed", [0, 1, 0xFFFFFFFFFFFFFFFF, 0x9E3779B97F4A7C15])
def test_c_and_python_patterns_agree(kind: PatternKind, seed: int) -> None:
    for length in (0, 1, 7, 8, 9, 4096 + 3):
        assert c_generate(kind, seed, length) == pattern.generate(kind, seed, length)


@settings(max_examples=50, deadline=None)
@given(
    data=st.binary(max_size=300),
    split=st.integers(0, 300),
    kind=st.sampled_from(list(PatternKind)),
    seed=st.integers(0, (1 << 64) - 1),
    length=st.integers(0, 100),
)
def test_c_and_python_agree_on_random_input(
    data: bytes, split: int, kind: PatternKind, seed: int, length: int
) -> None:
    assert c_crc32c(data) == pattern.crc32c(data)
    head, tail = data[:split], data[split:]
    assert pattern.crc32c(tail, pattern.crc32c(head)) == pattern.crc32c(data)
    assert c_crc32c(tail, c_crc32c(head)) == c_crc32c(data)
    assert c_generate(kind, seed, length) == pattern.generate(kind, seed, length)


def test_first_mismatch() -> None:
    assert pattern.first_mismatch(b"abc", b"abc") is None
    assert pattern.first_mismatch(b"abc", b"abd") == 2
    assert pattern.first_mismatch(b"abc", b"ab") == 2


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs binutils")
def test_library_has_no_python_dependency(libvguest: Path) -> None:
    out = subprocess.run(
        ["readelf", "-d", str(libvguest)], capture_output=True, text=True, check=True
    ).stdout
    needed = [line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
    assert needed == ["libc.so.6"]
