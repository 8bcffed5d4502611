"""Discovery: pyudev on the machine's real /sys, directory scans on fake trees."""

import re
import time
from pathlib import Path

import pytest
from vguest import discovery, sysfs
from vguest.errors import DeviceMissing, EnvironmentProblem

from tests.guest_tools.testlib import ConfigSpace, FakeSysfs, virtio_bars, well_formed


def _udev_or_skip() -> None:
    try:
        discovery.load_pyudev()
    except EnvironmentProblem as exc:
        pytest.skip(str(exc))
    if not sysfs.devices_dir("/sys").is_dir():
        pytest.skip("no PCI bus in /sys")


def test_pyudev_sees_what_sysfs_shows() -> None:
    _udev_or_skip()
    via_udev = [d.bdf for d in discovery.enumerate_udev()]
    assert via_udev == [d.bdf for d in sysfs.scan("/sys")]
    assert all(d.is_virtio for d in discovery.list_devices("/sys"))


def test_waiting_on_the_real_root_times_out() -> None:
    _udev_or_skip()
    start = time.monotonic()
    with pytest.raises(DeviceMissing, match=re.escape("ffff:ff:1f.7")):
        discovery.wait_for_device("/sys", bdf="ffff:ff:1f.7", timeout=0.3)
    assert 0.25 <= time.monotonic() - start < 5


def test_fake_tree_filters(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path)
    fs.add("0000:00:04.0", well_formed().bytes(), virtio_bars())
    fs.add("0000:00:05.0", ConfigSpace(device=0x1000).bytes(), {}, device=0x1000)  # legacy
    fs.add("0000:00:06.0", ConfigSpace(device=0x107F).bytes(), {}, device=0x107F)
    (tmp_path / "bus/pci/devices/not-a-device").mkdir()
    assert not discovery.uses_udev(tmp_path)
    assert [d.bdf for d in discovery.list_devices(tmp_path)] == ["0000:00:04.0", "0000:00:06.0"]
    assert len(discovery.list_devices(tmp_path, include_all=True)) == 3
    assert [d.bdf for d in discovery.list_devices(tmp_path, bdf="00:05.0")] == ["0000:00:05.0"]
    assert discovery.wait_for_device(tmp_path, timeout=0).bdf == "0000:00:04.0"
    assert discovery.list_devices(tmp_path / "empty") == []


def test_half_created_device_is_not_present_yet(tmp_path: Path) -> None:
    (sysfs.devices_dir(tmp_path) / "0000:00:07.0").mkdir(parents=True)
    with pytest.raises(DeviceMissing):
        discovery.wait_for_device(tmp_path, bdf="0000:00:07.0", timeout=0.1)
    with pytest.raises(DeviceMissing):
        discovery.wait_for_device(tmp_path, timeout=0.1)
