"""Finding PCI devices: pyudev on the real /sys, a directory scan on any other root.

pyudev needs libudev at run time, so it is imported only when used; without it,
listing falls back to scanning sysfs (with a warning) and waiting polls sysfs.
A fake sysfs root (tests) is always scanned: libudev only knows the real one.
"""

import logging
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from vguest import sysfs
from vguest.errors import AccessError, DeviceMissing, EnvironmentProblem
from vguest.sysfs import SysfsPciDevice

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05


def load_pyudev() -> ModuleType:
    """Import pyudev and check libudev loads; ``EnvironmentProblem`` otherwise."""
    try:
        import pyudev  # noqa: PLC0415 (needs libudev: import on use)

        pyudev.Context()
        module: ModuleType = pyudev
    except (ImportError, OSError) as exc:
        raise EnvironmentProblem(
            f"pyudev is unavailable ({exc}); install python3-pyudev and libudev1"
        ) from exc
    return module


def uses_udev(sysfs_root: str | Path) -> bool:
    """True when the root is the system's /sys, which is what libudev enumerates."""
    return Path(sysfs_root).resolve() == Path("/sys").resolve()


def _matches(dev: SysfsPciDevice, bdf: str | None, include_all: bool) -> bool:
    if bdf is not None:
        return dev.bdf == bdf
    return include_all or dev.is_virtio


def enumerate_udev() -> list[SysfsPciDevice]:
    """Every PCI device libudev knows (subsystem "pci"), sorted by BDF."""
    pyudev = load_pyudev()
    context: Any = pyudev.Context()
    out = [sysfs.device_at(Path(d.sys_path)) for d in context.list_devices(subsystem="pci")]
    return sorted(out, key=lambda d: d.bdf)


def list_devices(
    sysfs_root: str | Path, *, bdf: str | None = None, include_all: bool = False
) -> list[SysfsPciDevice]:
    """Virtio devices (or every device, or the one ``bdf``), sorted by BDF."""
    if bdf is not None:
        bdf = sysfs.normalize_bdf(bdf)
    devices: list[SysfsPciDevice] | None = None
    if uses_udev(sysfs_root):
        try:
            devices = enumerate_udev()
        except EnvironmentProblem as exc:
            log.warning("%s; scanning %s instead", exc, sysfs.devices_dir(sysfs_root))
    if devices is None:
        devices = sysfs.scan(sysfs_root)
    return [d for d in devices if _matches(d, bdf, include_all)]


def wait_for_device(
    sysfs_root: str | Path, *, bdf: str | None = None, timeout: float
) -> SysfsPciDevice:
    """Return the device (``bdf``, or any virtio one) once present; ``DeviceMissing`` on timeout."""
    if bdf is not None:
        bdf = sysfs.normalize_bdf(bdf)
    deadline = time.monotonic() + max(timeout, 0.0)
    monitor = _start_monitor() if uses_udev(sysfs_root) else None
    found = _present(sysfs_root, bdf)
    while found is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            what = bdf or "virtio PCI device"
            raise DeviceMissing(f"no {what} appeared within {timeout:g} s")
        if monitor is not None:
            event = monitor.poll(timeout=remaining)
            if event is not None:
                log.debug("uevent %s %s", event.action, event.sys_name)
        else:
            time.sleep(min(POLL_INTERVAL_S, remaining))
        found = _present(sysfs_root, bdf)
    return found


def _present(sysfs_root: str | Path, bdf: str | None) -> SysfsPciDevice | None:
    """The wanted device once its directory and attributes are readable, else None."""
    try:
        if bdf is not None:
            return sysfs.get_device(sysfs_root, bdf)
        virtio = [d for d in sysfs.scan(sysfs_root) if d.is_virtio]
    except (DeviceMissing, AccessError) as exc:
        log.debug("not there yet: %s", exc)
        return None
    return virtio[0] if virtio else None


def _start_monitor() -> Any:
    """A started udev monitor for PCI uevents, or None (then sysfs is polled)."""
    try:
        pyudev = load_pyudev()
        monitor = pyudev.Monitor.from_netlink(pyudev.Context())
        monitor.filter_by(subsystem="pci")
        monitor.start()
    except (EnvironmentProblem, OSError) as exc:
        log.warning("no udev monitor (%s); polling sysfs", exc)
        return None
    return monitor
