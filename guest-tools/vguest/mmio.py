"""Typed layer over libvguest: a mapped window of a BAR (or any file) with exact-width access.

A ``Mapping`` covers ``[offset, offset + length)`` of a file; every method takes offsets
relative to the window. Arguments are checked here so errors name the problem; the C
helper checks them again so a bad call can never fault.
"""

import errno
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from vguest import _native
from vguest.errors import AccessError, UsageError
from vguest.pattern import MASK64, PatternKind

VALID_WIDTHS = (1, 2, 4, 8)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of a verify: on mismatch, the first differing byte and its access's values."""

    ok: bool
    mismatch_offset: int | None = None
    expected: int | None = None
    actual: int | None = None


@dataclass(frozen=True, slots=True)
class BenchResult:
    """One timed loop of ``count`` accesses of ``width`` bytes."""

    op: str
    width: int
    count: int
    elapsed_ns: int

    @property
    def ops_per_s(self) -> float:
        return self.count * 1e9 / self.elapsed_ns if self.elapsed_ns else 0.0

    @property
    def ns_per_op(self) -> float:
        return self.elapsed_ns / self.count if self.count else 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.ops_per_s * self.width


def check_width(width: int) -> None:
    if width not in VALID_WIDTHS:
        raise UsageError(f"width {width} is not one of 1, 2, 4, 8")


def _raise_for(rc: int, what: str) -> None:
    if rc >= 0:
        return
    code = -rc
    if code in (errno.EACCES, errno.EPERM):
        raise AccessError(f"{what}: permission denied ({os.strerror(code)}); run as root?")
    raise AccessError(f"{what}: {os.strerror(code)}")


class Mapping:
    """A mapped window; close it (or use ``with``) to unmap."""

    def __init__(self, ffi: Any, lib: Any, handle: Any, name: str) -> None:
        self._ffi = ffi
        self._lib = lib
        self._m = handle
        self.name = name
        self.offset = int(handle.offset)
        self.length = int(handle.len)
        self.writable = bool(handle.writable)

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], offset: int, length: int, *, writable: bool
    ) -> "Mapping":
        """Map ``[offset, offset + length)`` of ``path`` (a sysfs resource file or any file)."""
        _check_window(offset, length)
        ffi, lib = _native.load()
        handle = ffi.new("struct vg_map *")
        rc = lib.vg_map_path(os.fsencode(path), offset, length, int(writable), handle)
        _raise_for(rc, f"cannot map {os.fspath(path)} [{offset:#x}, +{length:#x})")
        return cls(ffi, lib, handle, os.fspath(path))

    @classmethod
    def from_fd(cls, fd: int, offset: int, length: int, *, writable: bool) -> "Mapping":
        """Map a window of an open file descriptor (a memfd in tests); the fd stays ours."""
        _check_window(offset, length)
        ffi, lib = _native.load()
        handle = ffi.new("struct vg_map *")
        rc = lib.vg_map_fd(fd, offset, length, int(writable), handle)
        _raise_for(rc, f"cannot map fd {fd} [{offset:#x}, +{length:#x})")
        return cls(ffi, lib, handle, f"fd {fd}")

    def close(self) -> None:
        if self._m is not None:
            self._lib.vg_unmap(self._m)
            self._m = None

    def __enter__(self) -> "Mapping":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check(self, off: int, length: int, width: int, *, write: bool = False) -> Any:
        if self._m is None:
            raise AccessError(f"{self.name}: mapping is closed")
        check_width(width)
        if off < 0 or length < 0:
            raise UsageError("offset and length must not be negative")
        if (self.offset + off) % width or length % width:
            raise UsageError(
                f"offset {off:#x} and length {length:#x} must be multiples of width {width}"
            )
        if off + length > self.length:
            raise AccessError(
                f"range [{off:#x}, {off + length:#x}) is outside the mapped "
                f"{self.length:#x} bytes of {self.name}"
            )
        if write and not self.writable:
            raise AccessError(f"{self.name} is mapped read-only")
        return self._m

    def read(self, off: int, width: int) -> int:
        m = self._check(off, width, width)
        out = self._ffi.new("uint64_t *")
        _raise_for(self._lib.vg_read(m, off, width, out), f"read {self.name}")
        return int(out[0])

    def write(self, off: int, width: int, value: int) -> None:
        m = self._check(off, width, width, write=True)
        if not 0 <= value < 1 << (8 * width):
            raise UsageError(f"value {value:#x} does not fit in {width} bytes")
        _raise_for(self._lib.vg_write(m, off, width, value), f"write {self.name}")

    def read_bytes(self, off: int, length: int, width: int) -> bytes:
        m = self._check(off, length, width)
        buf = self._ffi.new("uint8_t[]", length or 1)
        _raise_for(self._lib.vg_read_buf(m, off, length, width, buf), f"read {self.name}")
        return bytes(self._ffi.buffer(buf, length))

    def write_bytes(self, off: int, data: bytes, width: int) -> None:
        m = self._check(off, len(data), width, write=True)
        rc = self._lib.vg_write_buf(m, off, len(data), width, data)
        _raise_for(rc, f"write {self.name}")

    def fill(self, off: int, length: int, width: int, kind: PatternKind, seed: int) -> None:
        m = self._check(off, length, width, write=True)
        _check_seed(seed)
        rc = self._lib.vg_fill(m, off, length, width, int(kind), seed)
        _raise_for(rc, f"fill {self.name}")

    def verify(
        self, off: int, length: int, width: int, kind: PatternKind, seed: int
    ) -> VerifyResult:
        m = self._check(off, length, width)
        _check_seed(seed)
        where, expected, actual = (self._ffi.new("uint64_t *") for _ in range(3))
        rc = self._lib.vg_verify(m, off, length, width, int(kind), seed, where, expected, actual)
        _raise_for(rc, f"verify {self.name}")
        if rc == 0:
            return VerifyResult(ok=True)
        return VerifyResult(False, int(where[0]), int(expected[0]), int(actual[0]))

    def crc32c(self, off: int, length: int, width: int) -> int:
        m = self._check(off, length, width)
        out = self._ffi.new("uint32_t *")
        _raise_for(self._lib.vg_crc32c(m, off, length, width, out), f"checksum {self.name}")
        return int(out[0])

    def bench_read(self, off: int, length: int, width: int, count: int) -> BenchResult:
        m = self._check(off, length, width)
        _check_bench(length, count)
        out = self._ffi.new("uint64_t *")
        rc = self._lib.vg_bench_read(m, off, length, width, count, out)
        _raise_for(rc, f"bench {self.name}")
        return BenchResult("read", width, count, int(out[0]))

    def bench_write(
        self, off: int, length: int, width: int, count: int, value: int = 0
    ) -> BenchResult:
        m = self._check(off, length, width, write=True)
        _check_bench(length, count)
        if not 0 <= value < 1 << (8 * width):
            raise UsageError(f"value {value:#x} does not fit in {width} bytes")
        out = self._ffi.new("uint64_t *")
        rc = self._lib.vg_bench_write(m, off, length, width, count, value, out)
        _raise_for(rc, f"bench {self.name}")
        return BenchResult("write", width, count, int(out[0]))


def _check_window(offset: int, length: int) -> None:
    if offset < 0 or length <= 0 or offset + length > MASK64:
        raise UsageError(f"bad window offset {offset:#x} length {length:#x}")


def _check_seed(seed: int) -> None:
    if not 0 <= seed <= MASK64:
        raise UsageError(f"seed {seed:#x} does not fit in 64 bits")


def _check_bench(length: int, count: int) -> None:
    if length <= 0 or count < 0 or count > MASK64:
        raise UsageError("bench needs a non-empty range and a count of at least 0")


def c_generate(kind: PatternKind, seed: int, length: int) -> bytes:
    """The C helper's pattern bytes (to compare with ``vguest.pattern.generate``)."""
    _check_seed(seed)
    if length < 0:
        raise UsageError(f"negative length {length}")
    ffi, lib = _native.load()
    buf = ffi.new("uint8_t[]", length or 1)
    _raise_for(lib.vg_pattern_generate(int(kind), seed, buf, length), "generate")
    return bytes(ffi.buffer(buf, length))


def c_crc32c(data: bytes, crc: int = 0) -> int:
    """The C helper's CRC-32C of a buffer (to compare with ``vguest.pattern.crc32c``)."""
    _, lib = _native.load()
    return int(lib.vg_crc32c_buf(crc & 0xFFFFFFFF, data, len(data)))
