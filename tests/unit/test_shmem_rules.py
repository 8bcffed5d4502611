"""The shared-memory rules both roles apply, in the same words, and the meaning of every status
our emulator can answer a SHMEM_MAP/UNMAP with."""

from __future__ import annotations

import errno

import pytest

from emulator.errors import ConfigError
from emulator.shmem import MappingRefused, ShmemLayout
from emulator.shmem.region import RefusalReason
from vhost_user.messages import BackendReq
from vhost_user.shmem import STATUS_MEANINGS, RegionRule, describe_status
from vhost_user_backend.daemon import VhostUserDaemon, VhostUserDevice, checked_regions
from vhost_user_backend.errors import DeviceConfigError, FrontendRefused

MIB = 1 << 20


class Declares(VhostUserDevice):
    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    def shmem_sizes(self) -> list[int]:
        return self.sizes


@pytest.mark.parametrize(
    ("sizes", "rule"),
    [
        ([6 << 10], RegionRule.PAGE_MULTIPLE),
        ([MIB, 1000], RegionRule.PAGE_MULTIPLE),
        ([0] * 256 + [4096], RegionRule.SHMID),
        ([1 << 62, 1 << 62, 4096], RegionRule.BAR_SIZE),
        ([4096.0], RegionRule.INTEGER),
    ],
    ids=["6K", "1000", "shmid-256", "past-a-64-bit-BAR", "float"],
)
def test_a_layout_is_refused_in_the_same_words_by_the_library_and_the_emulator(
    sizes: list[int], rule: RegionRule
) -> None:
    with pytest.raises(DeviceConfigError) as library:
        VhostUserDaemon(Declares(sizes), "/nonexistent/never-bound.sock")
    with pytest.raises(ConfigError) as emulator:
        ShmemLayout.from_sizes(dict(enumerate(sizes)))
    assert str(library.value) == str(emulator.value)
    assert str(library.value).endswith(f"(rule {rule})")
    if rule is not RegionRule.BAR_SIZE:
        assert str(library.value).startswith("shared memory region ")


def test_the_wording_names_the_region_and_the_rule() -> None:
    with pytest.raises(DeviceConfigError) as info:
        VhostUserDaemon(Declares([MIB, 0, 6 << 10]), "/nonexistent/never-bound.sock")
    assert str(info.value) == (
        "shared memory region 2: size 0x1800 is not a non-negative multiple of 4096 "
        "(rule page-multiple)"
    )


def test_a_good_layout_is_taken_and_unused_shmids_are_left_out() -> None:
    assert checked_regions(Declares([MIB, 0, 2 * MIB])) == {0: MIB, 2: 2 * MIB}


@pytest.mark.parametrize("reason", list(RefusalReason))
def test_every_refusal_of_our_emulator_has_a_meaning(reason: RefusalReason) -> None:
    code = MappingRefused(reason, "x").errno
    assert code in STATUS_MEANINGS["SHMEM_MAP"] or code in STATUS_MEANINGS["SHMEM_UNMAP"]


@pytest.mark.parametrize(
    ("request_name", "code", "text"),
    [
        ("SHMEM_MAP", errno.EEXIST, "EEXIST: overlaps a live mapping"),
        ("SHMEM_MAP", errno.EINVAL, "EINVAL: outside the region or not page-aligned"),
        ("SHMEM_UNMAP", errno.ENOENT, "ENOENT: no mapping exactly there"),
        ("SHMEM_MAP", errno.ENOTSUP, "ENOTSUP: no shared memory there"),
        ("SHMEM_MAP", 1, "refused (status 1: QEMU's answer to every refusal"),
        ("CONFIG_CHANGE_MSG", errno.EIO, "EIO: Input/output error"),
        ("SHMEM_MAP", 4242, "status 4242"),
    ],
)
def test_describe_status(request_name: str, code: int, text: str) -> None:
    assert describe_status(request_name, code).startswith(text)


def test_frontend_refused_carries_the_meaning() -> None:
    exc = FrontendRefused(BackendReq.SHMEM_UNMAP, errno.ENOENT, "of shmid 1 [0x0, +0x1000)")
    assert str(exc) == (
        "front-end refused SHMEM_UNMAP of shmid 1 [0x0, +0x1000): ENOENT: no mapping exactly "
        "there (a hole, part of a mapping, or several)"
    )
    assert exc.code == errno.ENOENT and exc.request is BackendReq.SHMEM_UNMAP
