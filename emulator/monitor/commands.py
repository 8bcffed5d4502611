"""What the monitor's commands do, given the emulator's parts; no sockets here.

Queries read the parts' state as it is between two loop wake-ups (the monitor runs on the
emulator's loop, so nothing changes under a query). Actions do what the guest or the
back-end could have caused, for fault injection in users' own tests:

- ``device-reset``: as if the driver wrote 0 to device_status (the back-end gets
  GET_VRING_BASE for running rings and RESET_DEVICE, every mapping is dropped);
- ``drop-mappings``: the BAR forgets its mappings (all, or one region's) without telling the
  back-end, whose later SHMEM_UNMAP is then refused as ``not-mapped``;
- ``disconnect-backend``: the back-end connection is closed as if it had failed: the device
  reports DEVICE_NEEDS_RESET and the connection reconnects every ``RECONNECT_INTERVAL`` s.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from emulator.counters import Counters
from emulator.monitor.protocol import ErrorClass, MonitorError
from emulator.pci.device import RegionIndex
from emulator.pci.virtio_pci import VirtioPciDevice
from emulator.shmem import SharedMemoryBar, SharedMemoryRegion, ShmemError
from emulator.vfio_user.server import VfioUserServer
from emulator.vhost_frontend.frontend import VhostUserFrontend
from emulator.virtio.state import DeviceStatus, VirtioFeature
from vhost_user.messages import VHOST_USER_F_PROTOCOL_FEATURES, VhostUserProtocolFeature

logger = logging.getLogger(__name__)

Arguments = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Command:
    """One monitor command: what it does, and the optional arguments it takes (name -> type)."""

    name: str
    run: Callable[[Arguments], object]
    arguments: dict[str, type]
    help: str


class MonitorCommands:
    """The commands of one emulator. ``frontend`` is None for a standalone device and
    ``shmem`` when the device has no shared memory; ``started`` is ``time.monotonic()`` at
    start-up."""

    def __init__(
        self,
        *,
        device: VirtioPciDevice,
        server: VfioUserServer,
        shmem: SharedMemoryBar | None,
        frontend: VhostUserFrontend | None,
        counters: Counters,
        started: float,
    ) -> None:
        self.device = device
        self.server = server
        self.shmem = shmem
        self.frontend = frontend
        self.counters = counters
        self.started = started
        commands = (
            Command("query-status", self.query_status, {}, "device status, features, peers"),
            Command("query-regions", self.query_regions, {}, "shared-memory layout in BAR 4"),
            Command(
                "query-mappings", self.query_mappings, {"shmid": int}, "live mappings per region"
            ),
            Command("query-counters", self.query_counters, {}, "messages, refusals, accesses"),
            Command("device-reset", self.device_reset, {}, "reset as the driver would"),
            Command(
                "drop-mappings", self.drop_mappings, {"shmid": int}, "forget mappings (all/one)"
            ),
            Command(
                "disconnect-backend", self.disconnect_backend, {}, "drop the back-end connection"
            ),
        )
        self.table = {command.name: command for command in commands}

    # -- queries -------------------------------------------------------------------------

    def query_status(self, _args: Arguments) -> dict[str, Any]:
        state = self.device.state
        frontend = self.frontend
        backend: dict[str, Any] | None = None
        if frontend is not None:
            connection = frontend.backend
            backend = {
                "socket": str(connection.path),
                "connected": connection.connected,
                "connections": connection.connections,
                "features_offered": features(connection.features, vhost_user=True),
                "protocol_features": protocol_features(
                    connection.protocol_features, connection.shmem_mask
                ),
            }
        return {
            "virtio_id": self.device.backend.virtio_id,
            "status": {
                "value": int(state.status),
                "bits": flag_names(DeviceStatus, int(state.status)),
            },
            "active": state.active,
            "device_features": features(state.device_features),
            "driver_features": features(state.driver_features),
            "vfio_user": {
                "socket": str(self.server.path),
                "connected": self.server.connected,
                "clients_served": self.server.clients_served,
            },
            "backend": backend,
            "uptime": round(time.monotonic() - self.started, 3),
        }

    def query_regions(self, _args: Arguments) -> dict[str, Any]:
        regions = self.shmem.regions if self.shmem is not None else ()
        return {
            "bar": int(RegionIndex.BAR4),
            "bar_size": self.device.region_info(RegionIndex.BAR4).size,
            "max_mappings": self.shmem.max_mappings if self.shmem is not None else 0,
            "regions": [
                {
                    "shmid": region.shmid,
                    "bar_offset": region.bar_offset,
                    "size": region.size,
                    "max_mappings": region.max_mappings,
                }
                for region in regions
            ],
        }

    def query_mappings(self, args: Arguments) -> dict[str, Any]:
        regions: Iterable[SharedMemoryRegion] = self.shmem.regions if self.shmem is not None else ()
        if "shmid" in args:
            regions = (self._region(args["shmid"]),)
        return {
            "regions": [
                {
                    "shmid": region.shmid,
                    "bar_offset": region.bar_offset,
                    "size": region.size,
                    "mappings": [
                        {
                            "shm_offset": info.shm_offset,
                            "length": info.length,
                            "fd_offset": info.fd_offset,
                            "access": "RW" if info.writable else "RO",
                            "kind": info.kind.value,
                            "fd_size": info.fd_size,
                        }
                        for info in region.mappings()
                    ],
                }
                for region in regions
            ]
        }

    def query_counters(self, _args: Arguments) -> dict[str, Any]:
        return self.counters.snapshot()

    # -- actions -------------------------------------------------------------------------

    def device_reset(self, _args: Arguments) -> dict[str, Any]:
        logger.info("monitor: device-reset")
        self.device.driver_reset()
        return {}

    def drop_mappings(self, args: Arguments) -> dict[str, Any]:
        if "shmid" in args:
            regions: tuple[SharedMemoryRegion, ...] = (self._region(args["shmid"]),)
        else:
            regions = self._shmem().regions
        dropped = sum(len(region) for region in regions)
        logger.info("monitor: drop-mappings: %d mapping(s)", dropped)
        try:
            for region in regions:
                region.reset()
        except ShmemError as exc:
            raise MonitorError(ErrorClass.GENERIC_ERROR, str(exc)) from exc
        return {"dropped": dropped}

    def disconnect_backend(self, _args: Arguments) -> dict[str, Any]:
        if self.frontend is None:
            raise MonitorError(
                ErrorClass.NOT_AVAILABLE, "no vhost-user back-end: the device is standalone"
            )
        connection = self.frontend.backend
        was_connected = connection.connected
        connection.disconnect("monitor: disconnect-backend")
        return {"disconnected": was_connected}

    # -- helpers -------------------------------------------------------------------------

    def _shmem(self) -> SharedMemoryBar:
        if self.shmem is None:
            raise MonitorError(ErrorClass.NOT_AVAILABLE, "the device has no shared memory")
        return self.shmem

    def _region(self, shmid: int) -> SharedMemoryRegion:
        region = self._shmem().region(shmid)
        if region is None:
            raise MonitorError(ErrorClass.INVALID_ARGUMENTS, f"no shared memory region {shmid}")
        return region


def _bits(value: int) -> list[int]:
    return [bit for bit in range(value.bit_length()) if value >> bit & 1]


def flag_names(flags: type[enum.IntFlag], value: int) -> list[str]:
    """The names of the bits set in ``value``; unknown ones as ``bit N``."""
    return [flags(1 << bit).name or f"bit {bit}" for bit in _bits(value)]


def features(value: int, *, vhost_user: bool = False) -> dict[str, Any]:
    """Virtio feature bits with the transport's names (``VERSION_1``); device-specific bits,
    whose names depend on the device type, as ``bit N``. ``vhost_user`` adds bit 30, the
    vhost-user ``PROTOCOL_FEATURES`` bit."""
    names = []
    for bit in _bits(value):
        if vhost_user and bit == VHOST_USER_F_PROTOCOL_FEATURES:
            names.append("PROTOCOL_FEATURES")
        elif bit in _VIRTIO_FEATURE_BITS:
            names.append(VirtioFeature(bit).name)
        else:
            names.append(f"bit {bit}")
    return {"value": value, "names": names}


def protocol_features(value: int, shmem_mask: int) -> dict[str, Any]:
    """vhost-user protocol features by name; the shared-memory bit is ``SHMEM`` at whichever
    bit ``--shmem-feature-bit`` chose (20 and 21 have other names upstream)."""
    names = [
        "SHMEM"
        if 1 << bit == shmem_mask
        else VhostUserProtocolFeature(1 << bit).name or f"bit {bit}"
        for bit in _bits(value)
    ]
    return {"value": value, "names": names}


_VIRTIO_FEATURE_BITS = frozenset(int(feature) for feature in VirtioFeature)
