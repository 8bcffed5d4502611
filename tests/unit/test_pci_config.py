"""PciConfigSpace: identity, writable masks, W1C status, BAR sizing, capability list."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emulator.errors import ConfigError
from emulator.pci.config import (
    CONFIG_SPACE_SIZE,
    PciCapId,
    PciCommand,
    PciConfigSpace,
    PciReg,
    PciStatus,
)


def make() -> PciConfigSpace:
    return PciConfigSpace(
        vendor_id=0x1AF4,
        device_id=0x105A,
        revision=1,
        class_code=0x018000,
        subsystem_vendor_id=0x1AF4,
        subsystem_id=0x1100,
    )


def u16(cfg: PciConfigSpace, offset: int) -> int:
    return int.from_bytes(cfg.read(offset, 2), "little")


def u32(cfg: PciConfigSpace, offset: int) -> int:
    return int.from_bytes(cfg.read(offset, 4), "little")


def w32(cfg: PciConfigSpace, offset: int, value: int) -> None:
    cfg.write(offset, value.to_bytes(4, "little"))


def bar_reg(index: int) -> int:
    return PciReg.BASE_ADDRESS_0 + 4 * index


def test_identity_registers() -> None:
    cfg = make()
    assert u16(cfg, PciReg.VENDOR_ID) == 0x1AF4
    assert u16(cfg, PciReg.DEVICE_ID) == 0x105A
    assert u32(cfg, PciReg.CLASS_REVISION) == 0x01800001
    assert u16(cfg, PciReg.SUBSYSTEM_VENDOR_ID) == 0x1AF4
    assert u16(cfg, PciReg.SUBSYSTEM_ID) == 0x1100
    assert cfg.read(PciReg.INTERRUPT_PIN, 1) == b"\x01"
    assert cfg.read(PciReg.HEADER_TYPE, 1) == b"\x00"


def test_identity_is_read_only() -> None:
    cfg = make()
    before = cfg.read(0, 0x10)
    cfg.write(0, b"\xff" * 4)
    cfg.write(PciReg.CLASS_REVISION, b"\x00" * 4)
    cfg.write(PciReg.INTERRUPT_PIN, b"\x04")
    assert cfg.read(0, 4) == before[:4]
    assert cfg.read(PciReg.CLASS_REVISION, 4) == before[8:12]
    assert cfg.read(PciReg.INTERRUPT_PIN, 1) == b"\x01"


def test_command_register_only_memory_master_intx_disable_writable() -> None:
    cfg = make()
    cfg.write(PciReg.COMMAND, b"\xff\xff")
    assert u16(cfg, PciReg.COMMAND) == PciCommand.MEMORY | PciCommand.MASTER | (
        PciCommand.INTX_DISABLE
    )
    cfg.write(PciReg.COMMAND, b"\x00\x00")
    assert u16(cfg, PciReg.COMMAND) == 0


def test_interrupt_line_is_scratch() -> None:
    cfg = make()
    cfg.write(PciReg.INTERRUPT_LINE, b"\x0b")
    assert cfg.read(PciReg.INTERRUPT_LINE, 1) == b"\x0b"


def test_status_error_bits_are_write_one_to_clear() -> None:
    cfg = make()
    cfg.add_capability(PciCapId.VNDR, b"\x04\x00")
    cfg.set_u16(PciReg.STATUS, cfg.get_u16(PciReg.STATUS) | PciStatus.REC_MASTER_ABORT)
    cfg.set_u16(PciReg.STATUS, cfg.get_u16(PciReg.STATUS) | PciStatus.DETECTED_PARITY)
    # Writing zeros changes nothing; CAP_LIST is read-only even when written with 1.
    cfg.write(PciReg.STATUS, b"\x00\x00")
    assert u16(cfg, PciReg.STATUS) & PciStatus.REC_MASTER_ABORT
    cfg.write(
        PciReg.STATUS, int(PciStatus.REC_MASTER_ABORT | PciStatus.CAP_LIST).to_bytes(2, "little")
    )
    status = u16(cfg, PciReg.STATUS)
    assert not status & PciStatus.REC_MASTER_ABORT
    assert status & PciStatus.DETECTED_PARITY
    assert status & PciStatus.CAP_LIST


def test_bar_sizing_32bit() -> None:
    cfg = make()
    cfg.add_bar(1, 0x1000, is_64bit=False, prefetchable=False)
    assert u32(cfg, bar_reg(1)) == 0
    w32(cfg, bar_reg(1), 0xFFFF_FFFF)
    assert u32(cfg, bar_reg(1)) == 0xFFFF_F000
    w32(cfg, bar_reg(1), 0xFEB0_1234)
    assert u32(cfg, bar_reg(1)) == 0xFEB0_1000
    assert cfg.bar_address(1) == 0xFEB0_1000


def test_bar_sizing_64bit_prefetchable_both_halves() -> None:
    cfg = make()
    cfg.add_bar(2, 0x4000, is_64bit=True, prefetchable=True)
    assert u32(cfg, bar_reg(2)) == 0xC  # 64-bit, prefetchable
    w32(cfg, bar_reg(2), 0xFFFF_FFFF)
    w32(cfg, bar_reg(3), 0xFFFF_FFFF)
    low, high = u32(cfg, bar_reg(2)), u32(cfg, bar_reg(3))
    assert low == 0xFFFF_C00C
    assert high == 0xFFFF_FFFF
    size = ~(((high << 32) | low) & ~0xF) + 1 & (1 << 64) - 1
    assert size == 0x4000
    w32(cfg, bar_reg(2), 0x0000_8000)
    w32(cfg, bar_reg(3), 0x0000_0038)
    assert cfg.bar_address(2) == 0x38_0000_8000


def test_bar_larger_than_4gib_masks_upper_half() -> None:
    cfg = make()
    cfg.add_bar(4, 1 << 34, is_64bit=True, prefetchable=True)
    w32(cfg, bar_reg(4), 0xFFFF_FFFF)
    w32(cfg, bar_reg(5), 0xFFFF_FFFF)
    assert u32(cfg, bar_reg(4)) == 0x0000_000C
    assert u32(cfg, bar_reg(5)) == 0xFFFF_FFFC


def test_unimplemented_bars_and_rom_read_zero() -> None:
    cfg = make()
    cfg.add_bar(2, 0x4000, is_64bit=True, prefetchable=True)
    for index in (0, 1, 4, 5):
        w32(cfg, bar_reg(index), 0xFFFF_FFFF)
        assert u32(cfg, bar_reg(index)) == 0
    w32(cfg, PciReg.ROM_ADDRESS, 0xFFFF_FFFF)
    assert u32(cfg, PciReg.ROM_ADDRESS) == 0


@pytest.mark.parametrize(
    ("index", "size", "is_64bit"),
    [(5, 0x1000, True), (6, 0x1000, False), (0, 0x1800, False), (0, 8, False)],
)
def test_invalid_bars_rejected(index: int, size: int, is_64bit: bool) -> None:
    with pytest.raises(ConfigError):
        make().add_bar(index, size, is_64bit=is_64bit, prefetchable=False)


def test_bar_overlapping_upper_half_rejected() -> None:
    cfg = make()
    cfg.add_bar(2, 0x4000, is_64bit=True, prefetchable=True)
    with pytest.raises(ConfigError):
        cfg.add_bar(3, 0x1000, is_64bit=False, prefetchable=False)


def walk_caps(cfg: PciConfigSpace) -> list[tuple[int, int]]:
    """Walk the list the way Linux's pci_find_capability does: from 0x34, by next pointers."""
    found = []
    assert u16(cfg, PciReg.STATUS) & PciStatus.CAP_LIST
    pos = cfg.read(PciReg.CAPABILITY_LIST, 1)[0]
    while pos:
        assert pos >= 0x40 and pos % 4 == 0
        cap_id, nxt = cfg.read(pos, 2)
        found.append((pos, cap_id))
        pos = nxt
    return found


def test_capability_list_links_every_cap() -> None:
    cfg = make()
    assert not u16(cfg, PciReg.STATUS) & PciStatus.CAP_LIST
    a = cfg.add_capability(PciCapId.MSIX, struct.pack("<HII", 3, 1, 0x801))
    b = cfg.add_capability(PciCapId.VNDR, bytes(14))
    c = cfg.add_capability(PciCapId.VNDR, b"\x05")  # odd length: next cap stays aligned
    d = cfg.add_capability(PciCapId.VNDR, bytes(2))
    assert walk_caps(cfg) == [(a, 0x11), (b, 0x09), (c, 0x09), (d, 0x09)]
    assert (a, b, c, d) == (0x40, 0x4C, 0x5C, 0x60)
    assert cfg.read(a + 2, 10) == struct.pack("<HII", 3, 1, 0x801)


def test_capability_writable_mask_and_read_only_header() -> None:
    cfg = make()
    pos = cfg.add_capability(PciCapId.VNDR, b"\x06\x00\x00\x00", wmask=b"\x00\x00\xff\x00")
    cfg.write(pos, b"\xff\xff\xff\xff\xff\xff")
    assert cfg.read(pos, 6) == bytes([PciCapId.VNDR, 0, 6, 0, 0xFF, 0])


def test_capability_overflow_is_config_error() -> None:
    cfg = make()
    for _ in range(8):
        cfg.add_capability(PciCapId.VNDR, bytes(22))
    with pytest.raises(ConfigError):
        cfg.add_capability(PciCapId.VNDR, bytes(22))


def test_reads_of_any_width_and_past_the_end() -> None:
    cfg = make()
    whole = cfg.read(0, CONFIG_SPACE_SIZE)
    assert len(whole) == CONFIG_SPACE_SIZE
    assert whole[:2] == b"\xf4\x1a"
    assert cfg.read(1, 3) == whole[1:4]
    assert cfg.read(0xFE, 4) == whole[0xFE:] + b"\0\0"
    assert cfg.read(0x100, 8) == bytes(8)
    assert cfg.read(-2, 4) == b"\0\0" + whole[:2]
    assert cfg.read(0, 0) == b""


def test_reset_restores_sealed_image() -> None:
    cfg = make()
    cfg.add_bar(1, 0x1000, is_64bit=False, prefetchable=False)
    cfg.seal()
    sealed = cfg.read(0, CONFIG_SPACE_SIZE)
    w32(cfg, bar_reg(1), 0xFEB0_0000)
    cfg.write(PciReg.COMMAND, b"\x06\x00")
    assert cfg.read(0, CONFIG_SPACE_SIZE) != sealed
    cfg.reset()
    assert cfg.read(0, CONFIG_SPACE_SIZE) == sealed


@given(
    offset=st.integers(-8, CONFIG_SPACE_SIZE + 8),
    data=st.binary(min_size=0, max_size=300),
)
def test_random_writes_never_touch_read_only_bytes(offset: int, data: bytes) -> None:
    cfg = make()
    cfg.add_bar(2, 0x4000, is_64bit=True, prefetchable=True)
    cfg.add_capability(PciCapId.VNDR, bytes(14))
    before = cfg.read(0, CONFIG_SPACE_SIZE)
    cfg.write(offset, data)
    after = cfg.read(0, CONFIG_SPACE_SIZE)
    writable = set(range(0x04, 0x06)) | set(range(0x18, 0x20)) | {0x0C, 0x3C}
    for pos in range(CONFIG_SPACE_SIZE):
        if pos not in writable:
            assert after[pos] == before[pos], hex(pos)
