"""Pure-Python reference of the fill pattern and the checksum used by libvguest.

Host-side tests and back-ends produce and check data with these functions; the C
helper (native/vguest.c) implements the same definitions and tests keep them equal.

Pattern: a stream of 64-bit little-endian words ``w[0], w[1], ...``; byte ``j`` of a
range (counted from the range's start) is byte ``j % 8`` of ``w[j // 8]``:

- ``CONSTANT`` (0): ``w[i] = seed``
- ``COUNTER``  (1): ``w[i] = (seed + i) mod 2**64``
- ``XORSHIFT`` (2): ``s = seed or 0x9E3779B97F4A7C15``; ``w[i]`` is ``s`` after ``i + 1``
  xorshift64 steps (``s ^= s << 13; s ^= s >> 7; s ^= s << 17``, all mod 2**64)

The access width used to write or read a pattern never changes its bytes.

Checksum: CRC-32C (Castagnoli; reflected polynomial 0x82F63B78, initial value and
final xor 0xFFFFFFFF) over the bytes in address order; ``crc32c(b"123456789")`` is
``0xE3069283``.
"""

import struct
from enum import IntEnum

MASK64 = (1 << 64) - 1
XORSHIFT_ZERO_SEED = 0x9E3779B97F4A7C15
CRC32C_POLY = 0x82F63B78


class PatternKind(IntEnum):
    """Pattern generators; numbers are the ``kind`` argument of the C helper."""

    CONSTANT = 0
    COUNTER = 1
    XORSHIFT = 2


def _xorshift64(s: int) -> int:
    s ^= (s << 13) & MASK64
    s ^= s >> 7
    s ^= (s << 17) & MASK64
    return s


def words(kind: PatternKind, seed: int, count: int) -> list[int]:
    """The first ``count`` 64-bit words of a pattern."""
    if not 0 <= seed <= MASK64:
        raise ValueError(f"seed {seed:#x} does not fit in 64 bits")
    kind = PatternKind(kind)
    if kind is PatternKind.CONSTANT:
        return [seed] * count
    if kind is PatternKind.COUNTER:
        return [(seed + i) & MASK64 for i in range(count)]
    out: list[int] = []
    s = seed or XORSHIFT_ZERO_SEED
    for _ in range(count):
        s = _xorshift64(s)
        out.append(s)
    return out


def generate(kind: PatternKind, seed: int, length: int) -> bytes:
    """The first ``length`` bytes of a pattern."""
    if length < 0:
        raise ValueError(f"negative length {length}")
    count = (length + 7) // 8
    return struct.pack(f"<{count}Q", *words(kind, seed, count))[:length]


def _make_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ CRC32C_POLY if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_TABLE = _make_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data``; pass a previous result as ``crc`` to continue it."""
    table = _TABLE
    c = crc ^ 0xFFFFFFFF
    for b in bytes(data):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def first_mismatch(expected: bytes, actual: bytes) -> int | None:
    """Offset of the first differing byte (a length difference counts), or None."""
    if expected == actual:
        return None
    for i, (a, b) in enumerate(zip(expected, actual, strict=False)):
        if a != b:
            return i
    return min(len(expected), len(actual))
