"""The QEMU build from the host root has the devices the project depends on (no guest booted)."""

from __future__ import annotations

import pytest

from vm.qemu import HostBinaries, device_help
from vm.toolchain import Toolchain


@pytest.mark.qemu
def test_qemu_has_vfio_user_and_vhost_user_test_devices(toolchain: Toolchain) -> None:
    text = device_help(HostBinaries(toolchain.host_root))
    assert '"vfio-user-pci"' in text
    assert '"vhost-user-test-device-pci"' in text


@pytest.mark.qemu
def test_qemu_is_11_1(toolchain: Toolchain) -> None:
    assert "version 11.1." in str(toolchain.read_manifest()["qemu_version"])
