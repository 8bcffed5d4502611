"""The capability parser against hand-made config spaces, well-formed and hostile."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vguest import caps, sysfs
from vguest.caps import VIRTIO_PCI_CAP, Severity
from vguest.errors import AccessError, UsageError

from tests.guest_tools.testlib import (
    BAR4_FLAGS,
    IO,
    SHM0,
    SHM1,
    Bar,
    ConfigSpace,
    resource_text,
    virtio_bars,
    well_formed,
)


def resources(bars: dict[int, Bar] | None = None) -> list[sysfs.Resource]:
    return sysfs.parse_resources(resource_text(virtio_bars() if bars is None else bars))


def messages(report: caps.CapReport) -> list[str]:
    return [f.message for f in report.findings]


def test_well_formed_device() -> None:
    report = caps.parse(well_formed().bytes(), resources())
    assert report.findings == ()
    assert report.ok
    assert [c.name for c in report.caps] == ["VNDR"] * 6 + ["MSIX"]
    assert [v.cfg_type for v in report.virtio] == [1, 2, 3, 4, 8, 8]
    common, notify, isr, device = report.virtio[:4]
    assert (common.bar, common.offset, common.length) == (2, 0, 0x38)
    assert (notify.offset, notify.notify_off_multiplier) == (0x3000, 4)
    assert (isr.offset, device.offset, device.length) == (0x1000, 0x2000, 0x100)
    assert report.shm_regions == (
        caps.ShmRegion(0, 4, *SHM0),
        caps.ShmRegion(1, 4, *SHM1),
    )
    assert report.shm_region(1) == caps.ShmRegion(1, 4, *SHM1)
    assert report.shm_region(2) is None
    assert report.virtio[4].cap_len == 24


def test_shared_memory_offsets_and_lengths_are_64_bit() -> None:
    cs = well_formed()
    cs.shm(7, 4, 0x1_0000_0000, 0x2_0000_1000)
    bars = virtio_bars()
    bars[4] = Bar(0x4_0000_0000, BAR4_FLAGS)
    report = caps.parse(cs.bytes(), resources(bars))
    assert report.shm_region(7) == caps.ShmRegion(7, 4, 0x1_0000_0000, 0x2_0000_1000)
    assert report.ok, messages(report)


def test_capability_loop_is_reported_and_walk_stops() -> None:
    cs = well_formed()
    cs.buf[cs.last_next] = 0x50  # the MSI-X cap points back to the second cap
    report = caps.parse(cs.bytes(), resources())
    assert len(report.caps) == 7
    assert any("loops back to 0x50" in m for m in messages(report))
    assert not report.ok


def test_self_loop() -> None:
    cs = ConfigSpace()
    off = cs.virtio(1, 2, 0, 0x38)
    cs.buf[off + 1] = off
    report = caps.parse(cs.bytes(), resources())
    assert len(report.caps) == 1
    assert any("loops" in m for m in messages(report))


@pytest.mark.parametrize("pointer", [0x00 + 0x04, 0x3C, 0x10])
def test_pointer_into_header(pointer: int) -> None:
    cs = well_formed()
    cs.buf[0x40 + 1] = pointer
    report = caps.parse(cs.bytes(), resources())
    assert len(report.caps) == 1
    assert any(f"{pointer:#04x} points into the header" in m for m in messages(report))


def test_reserved_pointer_bits_warn() -> None:
    cs = well_formed()
    cs.buf[0x34] |= 0x2
    report = caps.parse(cs.bytes(), resources())
    assert [f.severity for f in report.findings] == [Severity.WARNING]
    assert len(report.virtio) == 6


def test_unprivileged_64_byte_config() -> None:
    report = caps.parse(well_formed().bytes()[:64], resources())
    assert report.caps == ()
    assert len(report.findings) == 1
    assert "run as root" in report.findings[0].message


def test_short_config() -> None:
    report = caps.parse(b"\xf4\x1a", resources())
    assert messages(report) == ["config space is 2 bytes, the header needs 64"]


def test_cap_running_past_end_of_config_space() -> None:
    cs = ConfigSpace()
    cs.virtio(1, 2, 0, 0x38)
    cs.next_free = 0xF8
    cs.virtio(3, 2, 0x1000, 1)  # 16 bytes at 0xf8 end at 0x108
    report = caps.parse(cs.bytes()[:256], resources())
    assert any("runs past the end" in m for m in messages(report))
    truncated = caps.parse(cs.bytes()[:0xFA], resources())
    assert any("truncated" in m for m in messages(truncated))


def test_cap_len_too_short() -> None:
    cs = well_formed()
    cs.virtio(1, 2, 0, 0x38, cap_len=12)
    cs.virtio(8, 4, 0, 0x1000, cap_id=5)  # shared memory needs 24 bytes
    cs.virtio(2, 2, 0x3000, 0x10)  # notify needs 20 bytes
    report = caps.parse(cs.bytes(), resources())
    assert len(report.virtio) == 6
    assert any("cap_len 12 is shorter than 16" in m for m in messages(report))
    assert any("shared memory cap_len 16" in m for m in messages(report))
    assert any("notify cap_len 16" in m for m in messages(report))


def test_regions_outside_their_bar() -> None:
    cs = ConfigSpace()
    cs.virtio(1, 2, 0, 0x38)
    cs.notify(2, 0x3000, 0x1000, 4)
    cs.virtio(3, 2, 0x1000, 0x1)
    cs.shm(2, 4, 0x300000, 0x100001)  # one byte past the 4 MiB BAR
    cs.shm(3, 4, 0xFFFF_FFFF_FFFF_F000, 0x2000)  # would overflow 64 bits
    cs.virtio(4, 3, 0, 0x100)  # BAR 3 not implemented
    cs.virtio(4, 7, 0, 0x100)  # there is no BAR 7
    cs.shm(4, 1, 0, 0x10)  # an I/O BAR
    bars = virtio_bars()
    bars[1] = Bar(0x40, IO, 0xC000)
    report = caps.parse(cs.bytes(), resources(bars))
    text = "\n".join(messages(report))
    assert text.count("lies outside BAR 4") == 2
    assert "BAR 3, which is not implemented" in text
    assert "names BAR 7" in text
    assert "BAR 1, which is not memory" in text


def test_without_resources_only_structure_is_checked() -> None:
    cs = well_formed()
    cs.shm(2, 4, 0x10_0000_0000, 0x1000)
    assert caps.parse(cs.bytes()).ok


def test_device_level_checks() -> None:
    cs = ConfigSpace()
    cs.notify(2, 0x3000, 0x1000, 3)
    cs.shm(1, 4, 0, 0x200000)
    cs.shm(1, 4, 0x100000, 0x100000)
    report = caps.parse(cs.bytes(), resources())
    text = "\n".join(str(f) for f in report.findings)
    assert "no COMMON_CFG capability" in text
    assert "no ISR_CFG capability" in text
    assert "not 0 or a power of 2" in text
    assert "shmid 1 already used by cap@0x54" in text
    assert "warning: cap@0x6c: shmid 1 overlaps shmid 1 in BAR 4" in text


def test_non_virtio_vendor_caps_are_not_decoded() -> None:
    cs = well_formed()
    struct.pack_into("<H", cs.buf, 0, 0x8086)
    report = caps.parse(cs.bytes(), resources())
    assert report.virtio == () and report.findings == ()
    assert len(report.caps) == 7


def test_no_capability_list() -> None:
    cs = well_formed()
    cs.buf[0x06] &= ~0x10
    report = caps.parse(cs.bytes(), resources())
    assert report.caps == ()
    assert "no COMMON_CFG capability" in messages(report)


def test_unknown_cfg_type_is_kept() -> None:
    cs = well_formed()
    cs.virtio(42, 9, 0, 0)
    report = caps.parse(cs.bytes(), resources())
    assert report.ok
    assert report.virtio[-1].name == "CFG_TYPE_42"


@settings(max_examples=300, deadline=None)
@given(config=st.binary(min_size=0, max_size=300), virtio=st.booleans())
def test_random_config_never_raises(config: bytes, virtio: bool) -> None:
    report = caps.parse(config, resources(), virtio=virtio)
    assert len(report.caps) <= 48
    assert all(isinstance(f, caps.Finding) for f in report.findings)


@settings(max_examples=200, deadline=None)
@given(offsets=st.lists(st.integers(0, 255), min_size=1, max_size=64))
def test_random_pointer_chains_terminate(offsets: list[int]) -> None:
    cs = well_formed()
    for i, value in enumerate(offsets):
        cs.buf[0x34 if i == 0 else 0x40 + ((i * 4) % 0xC0) + 1] = value
    report = caps.parse(cs.bytes(), resources())
    assert len({c.offset for c in report.caps}) == len(report.caps)


def test_parse_resources() -> None:
    res = resources()
    assert len(res) == 13
    assert (res[2].size, res[2].kind) == (0x4000, "mem64")
    assert (res[4].size, res[4].kind, res[4].start) == (0x400000, "mem64 prefetchable", 0x800000000)
    assert res[0].kind == "unused"
    with pytest.raises(AccessError, match="expected 3 fields"):
        sysfs.parse_resources("0x0 0x1\n")
    with pytest.raises(AccessError, match="not hex"):
        sysfs.parse_resources("0x0 0xzz 0x0\n")


@pytest.mark.parametrize(
    ("text", "bdf"),
    [
        ("0000:00:04.0", "0000:00:04.0"),
        ("00:1F.7", "0000:00:1f.7"),
        (" 0001:ab:00.1 ", "0001:ab:00.1"),
    ],
)
def test_normalize_bdf(text: str, bdf: str) -> None:
    assert sysfs.normalize_bdf(text) == bdf


@pytest.mark.parametrize("text", ["", "00:04", "0000:00:20.0", "00:04.8", "../../etc", "0:0:0.0"])
def test_bad_bdf(text: str) -> None:
    with pytest.raises(UsageError):
        sysfs.normalize_bdf(text)


def test_enum_names_follow_the_spec() -> None:
    assert int(VIRTIO_PCI_CAP.SHARED_MEMORY_CFG) == 8
    assert int(VIRTIO_PCI_CAP.PCI_CFG) == 5
