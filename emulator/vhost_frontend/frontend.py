"""The adapter: a ``VirtioDevice`` whose queues and config live in a vhost-user back-end.

crosvm's vhost_user_frontend ``mod.rs`` in Python. The transport calls ``read_config``,
``activate``, ``kick`` and the rest; each becomes typed calls on the ``BackendConnection``.
The guest's DRIVER_OK activates the back-end in crosvm's order: SET_FEATURES, SET_MEM_TABLE,
then per queue NUM, ADDR, BASE, CALL, KICK, and ENABLE when protocol features were acked.
Call fds are the MSI-X eventfds QEMU gave us, so the back-end interrupts the guest without
passing through Python; a vector without one gets an eventfd of ours that we relay. Guest
memory changes re-send the memory table; MSI-X eventfd changes re-send the call fds.

A device reset drops the shared-memory mappings in the transport (``VirtioPciDevice``) before
the back-end hears of it, so a back-end that maps again in answer keeps its mapping.
A back-end that goes away takes its mappings with it; the device reports
DEVICE_NEEDS_RESET and the connection reconnects in the background while the vfio-user side
stays up.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Protocol

from emulator.config import EmulatorConfig
from emulator.counters import Counters
from emulator.errors import ANY_ERROR, BackendFailure
from emulator.loop import EventLoop
from emulator.memory import GuestMemory
from emulator.pci.interrupts import IrqEventfds
from emulator.shmem import SharedMemoryBar
from emulator.trace import Tracer
from emulator.vhost_frontend.channel import SharedMemory
from emulator.vhost_frontend.connection import PROTOCOL_FEATURES_BIT, BackendConnection
from emulator.virtio.device import QueueConfig
from emulator.virtio.state import UNSUPPORTED_FEATURES
from vhost_user.messages import (
    VHOST_MEMORY_BASELINE_NREGIONS,
    VHOST_USER_MAX_CONFIG_SIZE,
    VhostUserMemoryRegion,
    shmem_feature,
)
from vhost_user.messages import VhostUserProtocolFeature as PF
from wire.unix import close_fds

logger = logging.getLogger(__name__)

#: The addresses in SET_MEM_TABLE (userspace_addr) and SET_VRING_ADDR are ours to choose: the
#: back-end only translates ring addresses through the table. We use GPA + this base, not where
#: we happen to mmap a region: QEMU re-sends DMA maps while a device runs (SeaBIOS drives
#: virtio-blk before the PAM split), each re-map lands elsewhere, and libvhost-user drops the
#: connection ("remapping queue 0 during setmemtable") when the rings' addresses stop resolving.
FRONTEND_ADDRESS_BASE = 1 << 48


class TransportDevice(Protocol):
    """What the front-end needs from the virtio transport (``VirtioPciDevice``)."""

    msix: IrqEventfds

    def config_changed(self) -> None: ...

    def set_needs_reset(self) -> None: ...

    def queue_interrupt(self, queue: int) -> None: ...

    def disarm_kicks(self) -> None: ...


class VhostUserFrontend:
    """Implements ``VirtioDevice`` (and the channel's ``ChannelHandler``) by forwarding to a
    vhost-user back-end."""

    def __init__(
        self,
        config: EmulatorConfig,
        loop: EventLoop,
        memory: GuestMemory,
        tracer: Tracer,
        *,
        counters: Counters | None = None,
    ) -> None:
        assert config.vhost_user_socket is not None
        self.loop = loop
        self.memory = memory
        self.virtio_id = config.virtio_id
        self.num_queues = config.num_queues
        self.max_queue_size = config.queue_size
        self.config_size = min(config.config_size, VHOST_USER_MAX_CONFIG_SIZE)
        self.connect_timeout = config.backend_connect_timeout
        self.backend = BackendConnection(
            config.vhost_user_socket,
            loop,
            tracer,
            timeout=config.backend_timeout,
            num_queues=config.num_queues,
            shmem_mask=shmem_feature(config.shmem_feature_bit),
            handler=self,
            on_lost=self._backend_lost,
            counters=counters,
        )
        self._device: TransportDevice | None = None
        self._shmem: SharedMemoryBar | None = None
        self._active: tuple[QueueConfig, ...] = ()
        self._kick_fds: dict[int, int] = {}
        self._call_fds: dict[int, int | None] = {}
        self._own_call_fds: dict[int, int] = {}
        #: The back-end's config space as last read; a guest driver reads it a few bytes at a
        #: time, so like QEMU we ask once and again only after CONFIG_CHANGE_MSG or a write.
        self._config: bytes | None = None
        memory.on_change(self._memory_changed)

    # -- VirtioDevice -----------------------------------------------------------------------

    @property
    def device_features(self) -> int:
        return self.backend.features & ~PROTOCOL_FEATURES_BIT & ~UNSUPPORTED_FEATURES

    @property
    def connected(self) -> bool:
        return self.backend.connected

    @property
    def shmem_sizes(self) -> dict[int, int]:
        """shmid -> size as the back-end declared them (GET_SHMEM_CONFIG)."""
        return self.backend.shmem_sizes

    def read_config(self, offset: int, size: int) -> bytes:
        if not self.backend.has(PF.CONFIG) or offset + size > self.config_size:
            return bytes(size)
        if self._config is None:
            self._config = self.backend.get_config(self.config_size)
        return self._config[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        if not self.backend.has(PF.CONFIG) or offset + len(data) > self.config_size:
            return
        self._config = None
        self.backend.set_config(offset, data)

    def activate(self, driver_features: int, queues: Sequence[QueueConfig]) -> None:
        """DRIVER_OK: hand guest memory and the enabled rings to the back-end."""
        if not self.backend.connected:
            raise BackendFailure(f"no vhost-user back-end connected at {self.backend.path}")
        features = driver_features
        if self.backend.features & PROTOCOL_FEATURES_BIT:
            features |= PROTOCOL_FEATURES_BIT
        self.backend.set_features(features)
        self._send_mem_table()
        self._close_queue_fds()  # a re-activation must not leak the previous kick fds
        self._active = tuple(queues)
        for queue in queues:
            self._start_queue(queue)
        logger.info("back-end activated with %d queue(s)", len(queues))

    def deactivate(self) -> None:
        """Stop the rings (device reset or bus mastering off); ``reset`` follows a reset."""
        queues, self._active = self._active, ()
        if self.backend.connected:
            try:
                for queue in queues:
                    self.backend.get_vring_base(queue.index)
            except ANY_ERROR as exc:
                logger.warning("back-end did not stop its rings cleanly: %s", exc)
        self._close_queue_fds()

    def reset(self) -> None:
        """Every device reset, even before DRIVER_OK: reset the back-end (RESET_DEVICE).

        The transport has dropped the shared-memory mappings already, before ``deactivate``
        and this: what the back-end maps in answer (served while we wait) stays mapped.
        """
        self._config = None
        if self.backend.connected and self.backend.has(PF.RESET_DEVICE):
            try:
                self.backend.reset_device()
            except ANY_ERROR as exc:
                logger.warning("back-end did not reset cleanly: %s", exc)

    def kick(self, queue: int) -> None:
        fd = self._kick_fds.get(queue)
        if fd is not None:
            os.eventfd_write(fd, 1)

    def kick_fd(self, queue: int) -> int | None:
        """The transport lends it to the server's hot path, which writes it itself."""
        return self._kick_fds.get(queue)

    # -- ChannelHandler ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._device is not None

    @property
    def shared_memory(self) -> SharedMemory | None:
        return self._shmem if self.backend.has_shmem else None

    def config_changed(self) -> None:
        self._config = None
        if self._device is not None:
            self._device.config_changed()

    # -- wiring ------------------------------------------------------------------------------

    def connect_blocking(self) -> None:
        """Connect at start-up, waiting up to ``--backend-connect-timeout`` (or as long as it
        takes) for the back-end to come up."""
        self.backend.connect_blocking(self.connect_timeout)

    def attach(self, device: TransportDevice, shmem: SharedMemoryBar | None) -> None:
        """Late binding: the transport is built after the back-end declared its regions."""
        self._device = device
        self._shmem = shmem
        device.msix.on_change(self._vectors_changed)

    def _drop_mappings(self) -> None:
        """The back-end is gone: so are its mappings (a device reset drops them in the
        transport)."""
        if self._shmem is not None and len(self._shmem):
            logger.info("back-end gone: dropping %d shared-memory mapping(s)", len(self._shmem))
            self._shmem.reset()

    def close(self) -> None:
        was_connected = self.backend.connected
        self.backend.close()
        self._config = None
        if was_connected:
            self._forget_backend_state()

    def _backend_lost(self) -> None:
        """The connection dropped (it reconnects by itself): what the back-end held is gone."""
        self._config = None
        self._forget_backend_state()
        if self._device is not None:
            self._device.set_needs_reset()

    def _forget_backend_state(self) -> None:
        self._close_queue_fds()
        self._active = ()
        self._drop_mappings()

    # -- activation ------------------------------------------------------------------------

    def _send_mem_table(self) -> None:
        regions: list[VhostUserMemoryRegion] = []
        fds: list[int] = []
        for region in self.memory:
            if region.fd is None or region.host_addr is None:
                continue
            regions.append(
                VhostUserMemoryRegion(
                    region.gpa, region.size, FRONTEND_ADDRESS_BASE + region.gpa, region.fd_offset
                )
            )
            fds.append(region.fd)
        if len(regions) > VHOST_MEMORY_BASELINE_NREGIONS:
            raise BackendFailure(
                f"guest memory has {len(regions)} fd-backed regions; vhost-user takes at most "
                f"{VHOST_MEMORY_BASELINE_NREGIONS}"
            )
        self.backend.set_mem_table(regions, fds)

    def _start_queue(self, queue: QueueConfig) -> None:
        index = queue.index
        self.backend.set_vring_num(index, queue.size)
        desc, used, avail = (self._frontend_address(*area) for area in _ring_areas(queue))
        self.backend.set_vring_addr(index, desc, used, avail)
        self.backend.set_vring_base(index, 0)
        self._send_call_fd(queue)
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._kick_fds[index] = kick
        self.backend.set_vring_kick(index, kick)
        if self.backend.features & PROTOCOL_FEATURES_BIT:
            self.backend.set_vring_enable(index, True)

    def _rings_mapped(self) -> bool:
        return all(
            self._in_backed_memory(gpa, size)
            for queue in self._active
            for _, gpa, size in _ring_areas(queue)
        )

    def _in_backed_memory(self, gpa: int, size: int) -> bool:
        region = self.memory.find(gpa, size)
        return region is not None and region.fd is not None and region.host_addr is not None

    def _frontend_address(self, what: str, gpa: int, size: int) -> int:
        """The address the back-end is told for guest-physical ``gpa`` (see the base above)."""
        if not self._in_backed_memory(gpa, size):
            raise BackendFailure(f"the {what} at {gpa:#x} is not in fd-backed guest memory")
        return FRONTEND_ADDRESS_BASE + gpa

    def _send_call_fd(self, queue: QueueConfig) -> None:
        """Give the back-end the queue's MSI-X eventfd, or one of ours that we relay."""
        assert self._device is not None
        fd = self._device.msix.eventfd(queue.msix_vector)
        if fd is None:
            fd = self._own_call_fds.get(queue.index)
            if fd is None:
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._own_call_fds[queue.index] = fd
                self.loop.add_reader(fd, lambda: self._relay_call(queue.index))
        self._call_fds[queue.index] = fd
        self.backend.set_vring_call(queue.index, fd)

    def _relay_call(self, index: int) -> None:
        fd = self._own_call_fds.get(index)
        if fd is None:
            return
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)
            if self._device is not None:
                self._device.queue_interrupt(index)

    def _vectors_changed(self) -> None:
        """QEMU replaced MSI-X eventfds: point the running rings at the new ones."""
        if not self._active or not self.backend.connected or self._device is None:
            return
        for queue in self._active:
            wanted = self._device.msix.eventfd(queue.msix_vector)
            if wanted is None:
                wanted = self._own_call_fds.get(queue.index)
            if wanted != self._call_fds.get(queue.index):
                try:
                    self._send_call_fd(queue)
                except ANY_ERROR as exc:
                    logger.warning("could not update the call fd of queue %d: %s", queue.index, exc)

    def _memory_changed(self) -> None:
        if not self._active or not self.backend.connected:
            return
        if not self._rings_mapped():
            # QEMU unmaps a range before mapping its pieces again; a table without the rings
            # makes libvhost-user back-ends drop the connection, so wait for the next change.
            logger.debug("memory table not re-sent: the rings are not in fd-backed memory yet")
            return
        try:
            self._send_mem_table()
        except ANY_ERROR as exc:
            logger.warning("could not re-send the memory table: %s", exc)
            if self._device is not None:
                self._device.set_needs_reset()

    def _close_queue_fds(self) -> None:
        if self._device is not None:
            self._device.disarm_kicks()  # nobody writes them once they are closed
        close_fds(list(self._kick_fds.values()))
        self._kick_fds.clear()
        for fd in self._own_call_fds.values():
            self.loop.remove_reader(fd)
        close_fds(list(self._own_call_fds.values()))
        self._own_call_fds.clear()
        self._call_fds.clear()


def _ring_areas(queue: QueueConfig) -> tuple[tuple[str, int, int], ...]:
    """The split ring's three areas, in SET_VRING_ADDR order: descriptors, used, available."""
    return (
        ("descriptor table", queue.desc, 16 * queue.size),
        ("used ring", queue.device, 6 + 8 * queue.size),
        ("available ring", queue.driver, 6 + 2 * queue.size),
    )
