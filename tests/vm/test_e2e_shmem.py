"""Shared memory end to end: reference back-end -> our emulator -> QEMU 11.1 -> a real guest.

One boot for the module. The back-end declares two regions, 2 MiB and 1 MiB, packed into one
4 MiB BAR (the layout QEMU's own front-end aborts on). Each test uses its own offsets and
unmaps what it mapped, so the tests stay independent; the reset test runs last.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest
from vguest.pattern import PatternKind, crc32c, generate

from vm.scenario import Scenario, ShmemBackend
from vm.toolchain import Toolchain

pytestmark = pytest.mark.vm

MIB = 1 << 20
LENGTH = 64 << 10  # trapped 8-byte reads: ~8k round trips per range, about a second under TCG
REGIONS = ((0, 2 * MIB), (1, 1 * MIB))


@pytest.fixture(scope="module")
def sc(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    backend = ShmemBackend(regions=REGIONS, rng_source="counter")
    with Scenario.run(
        backend,
        name="e2e-shmem",
        toolchain=toolchain,
        workdir=tmp_path_factory.mktemp("e2e-shmem"),
        allow_reboot=True,
    ) as scenario:
        yield scenario


def shm(sc: Scenario, command: str, shmid: int, *args: object, width: int = 8) -> dict[str, object]:
    """``vguest COMMAND BDF --shm SHMID ARGS --width W`` in the guest."""
    argv = [command, sc.bdf(), "--shm", str(shmid), *map(str, args)]
    if command != "verify" or "--crc" not in argv:
        argv += ["--width", str(width)]
    return sc.vguest(*argv)


def guest_crc(sc: Scenario, shmid: int, offset: int, length: int = LENGTH) -> int:
    data = shm(sc, "checksum", shmid, hex(offset), length)
    assert data["exit_code"] == 0, data
    crc = data["crc32c"]
    assert isinstance(crc, int)
    return crc


def expected(pattern: str, seed: int, length: int = LENGTH) -> bytes:
    return (
        bytes(length) if pattern == "zero" else generate(PatternKind[pattern.upper()], seed, length)
    )


@pytest.fixture
def unmap_after(sc: Scenario) -> Iterator[list[tuple[int, int, int]]]:
    """Mappings a test registers here are unmapped afterwards, whatever happened."""
    ranges: list[tuple[int, int, int]] = []
    yield ranges
    for shmid, offset, length in ranges:
        sc.backend_call(cmd="unmap", shmid=shmid, shm_offset=offset, length=length)


def map_range(
    sc: Scenario,
    cleanup: list[tuple[int, int, int]],
    shmid: int,
    offset: int,
    pattern: str,
    *,
    seed: int = 0,
    writable: bool = False,
    length: int = LENGTH,
) -> None:
    sc.backend_ok(
        cmd="map", shmid=shmid, shm_offset=offset, length=length,
        pattern=pattern, seed=seed, writable=writable,
    )  # fmt: skip
    cleanup.append((shmid, offset, length))


def test_guest_sees_the_device_and_the_declared_regions(sc: Scenario) -> None:
    ids = sc.g.run(["lspci", "-n"], check=True).stdout
    assert " 1af4:1044 " in ids  # virtio 1.x (modern-only) rng
    device = sc.guest_device()
    assert device["virtio_id"] == 4
    assert device["findings"] == []
    regions = [(r["shmid"], r["bar"], r["length"]) for r in device["shm_regions"]]
    assert regions == [(0, 4, 2 * MIB), (1, 4, 1 * MIB)]
    bars = {b["index"]: (b["kind"], b["size"]) for b in device["bars"]}
    assert bars[4] == ("mem64 prefetchable", 4 * MIB)  # 3 MiB rounded up to a power of two
    assert {c["bar"] for c in device["virtio_caps"] if c["cfg_type"] in (1, 2, 3, 4)} == {2}


def test_read_only_mapping_shows_the_pattern_and_ignores_guest_writes(
    sc: Scenario, unmap_after: list[tuple[int, int, int]]
) -> None:
    map_range(sc, unmap_after, 0, 0x0, "counter", seed=7)
    verify = shm(sc, "verify", 0, "0x0", LENGTH, "--pattern", "counter", "--seed", 7)
    assert verify["match"] is True, verify
    back = sc.backend_ok(cmd="read", shmid=0, shm_offset=0, length=LENGTH)
    assert guest_crc(sc, 0, 0x0) == back["crc32c"] == crc32c(expected("counter", 7))

    write = shm(sc, "write", 0, "0x8", "0xdeadbeefcafef00d")
    assert write["exit_code"] == 0, write  # the write is posted; the device drops it
    assert shm(sc, "read", 0, "0x8")["value"] == 8  # a read after it: the write was handled
    after = sc.backend_ok(cmd="read", shmid=0, shm_offset=0, length=16)
    assert bytes.fromhex(after["data"]) == expected("counter", 7, 16)


def test_read_write_mapping_carries_guest_writes_to_the_backend(
    sc: Scenario, unmap_after: list[tuple[int, int, int]]
) -> None:
    map_range(sc, unmap_after, 1, 0x10000, "zero", writable=True)
    fill = shm(sc, "fill", 1, "0x10000", LENGTH, "--pattern", "xorshift", "--seed", 42)
    assert fill["exit_code"] == 0, fill
    want = expected("xorshift", 42)
    # The guest's writes are posted; its read comes after them on QEMU's socket (PCI ordering),
    # so once it returns every write has landed in the back-end's memfd.
    assert guest_crc(sc, 1, 0x10000) == crc32c(want)
    back = sc.backend_ok(cmd="read", shmid=1, shm_offset=0x10000, length=LENGTH)
    assert bytes.fromhex(back["data"]) == want
    assert back["crc32c"] == fill["crc32c"] == crc32c(want)

    sc.backend_ok(cmd="write", shmid=1, shm_offset=0x10000, offset=0x100, data="1122334455667788")
    assert shm(sc, "read", 1, "0x10100")["value"] == 0x8877665544332211


def test_unmap_reads_zero_and_the_same_place_maps_again(
    sc: Scenario, unmap_after: list[tuple[int, int, int]]
) -> None:
    sc.backend_ok(cmd="map", shmid=0, shm_offset=0x100000, length=LENGTH, pattern="constant",
                  seed=0x0123456789ABCDEF)  # fmt: skip
    verify = shm(sc, "verify", 0, "0x100000", LENGTH, "--pattern", "constant", "--seed",
                 "0x0123456789abcdef")  # fmt: skip
    assert verify["match"] is True, verify
    sc.backend_ok(cmd="unmap", shmid=0, shm_offset=0x100000, length=LENGTH)
    assert guest_crc(sc, 0, 0x100000) == crc32c(bytes(LENGTH))

    map_range(sc, unmap_after, 0, 0x100000, "xorshift", seed=3)
    verify = shm(sc, "verify", 0, "0x100000", LENGTH, "--pattern", "xorshift", "--seed", 3)
    assert verify["match"] is True, verify


def test_refused_requests_leave_the_guest_view_unchanged(
    sc: Scenario, unmap_after: list[tuple[int, int, int]]
) -> None:
    map_range(sc, unmap_after, 0, 0x40000, "counter", seed=11)
    before = guest_crc(sc, 0, 0x40000)
    refused: dict[str, dict[str, Any]] = {
        "overlap": {"cmd": "map", "shmid": 0, "shm_offset": 0x48000, "length": 0x1000},
        "past the region's end": {
            "cmd": "map",
            "shmid": 1,
            "shm_offset": MIB - 0x1000,
            "length": 0x2000,
        },
        "unknown shmid": {"cmd": "map", "shmid": 7, "shm_offset": 0, "length": 0x1000},
        "unaligned offset": {"cmd": "map", "shmid": 1, "shm_offset": 0x800, "length": 0x1000},
        "partial unmap": {"cmd": "unmap", "shmid": 0, "shm_offset": 0x40000, "length": 0x1000},
        "unmap of a hole": {"cmd": "unmap", "shmid": 1, "shm_offset": 0x80000, "length": 0x1000},
    }
    codes = {what: sc.backend_call(**request) for what, request in refused.items()}
    assert all(not r["ok"] and r["code"] != 0 for r in codes.values()), codes
    assert guest_crc(sc, 0, 0x40000) == before == crc32c(expected("counter", 11))
    assert guest_crc(sc, 1, MIB - 0x2000, 0x2000) == crc32c(bytes(0x2000))
    assert guest_crc(sc, 1, 0x0, 0x2000) == crc32c(bytes(0x2000))
    mappings = sc.backend_ok(cmd="status")["mappings"]
    assert [(m["shmid"], m["shm_offset"]) for m in mappings] == [(0, 0x40000)]


def test_rng_data_plane_delivers_the_backends_bytes(sc: Scenario) -> None:
    """The back-end answers the request queue with a counter: the guest sees it in order."""
    current = sc.g.run(["cat", "/sys/class/misc/hw_random/rng_current"], check=True).stdout
    assert current.strip().startswith("virtio_rng")
    out = sc.g.sh("dd if=/dev/hwrng bs=64 count=1 status=none | od -An -v -tx1", check=True)
    data = bytes.fromhex("".join(out.stdout.split()))
    assert len(data) == 64
    words = struct.unpack("<8Q", data)
    assert list(words) == list(range(words[0], words[0] + 8)), [hex(w) for w in words]


def test_driver_unbind_resets_the_device_and_drops_mappings(
    sc: Scenario, unmap_after: list[tuple[int, int, int]]
) -> None:
    map_range(sc, unmap_after, 1, 0x20000, "counter", seed=5)
    assert guest_crc(sc, 1, 0x20000) == crc32c(expected("counter", 5))
    bdf = sc.bdf()
    sc.g.sh(f"echo {bdf} > /sys/bus/pci/drivers/virtio-pci/unbind", check=True)
    sc.g.sh(f"echo {bdf} > /sys/bus/pci/drivers/virtio-pci/bind", check=True)
    # Read with the driver bound again (memory decoding on): the reset left a hole.
    assert guest_crc(sc, 1, 0x20000) == crc32c(bytes(LENGTH))
    assert sc.g.run(["cat", "/sys/class/misc/hw_random/rng_current"]).stdout.startswith("virtio")
    map_range(sc, unmap_after, 1, 0x20000, "counter", seed=6)
    assert guest_crc(sc, 1, 0x20000) == crc32c(expected("counter", 6))


def test_guest_reset_drops_all_mappings(
    sc: Scenario, unmap_after: list[tuple[int, int, int]]
) -> None:
    map_range(sc, unmap_after, 0, 0x180000, "counter", seed=9)
    map_range(sc, unmap_after, 1, 0x30000, "xorshift", seed=9, writable=True)
    assert guest_crc(sc, 0, 0x180000) == crc32c(expected("counter", 9))
    sc.g.reset()
    assert guest_crc(sc, 0, 0x180000) == crc32c(bytes(LENGTH))
    assert guest_crc(sc, 1, 0x30000) == crc32c(bytes(LENGTH))
    map_range(sc, unmap_after, 0, 0x180000, "counter", seed=10)
    assert guest_crc(sc, 0, 0x180000) == crc32c(expected("counter", 10))
