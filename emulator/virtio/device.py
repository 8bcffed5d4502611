"""The seam to where a device's virtqueues and device config really live.

The transport owns registers and the status machine; when the driver sets DRIVER_OK it hands
the negotiated features and the enabled queues to a ``VirtioDevice`` (the vhost-user
front-end in production, a fake in unit tests) and forwards device-config accesses and queue
notifications to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """One enabled virtqueue as the driver set it up; addresses are guest physical."""

    index: int
    size: int
    msix_vector: int
    desc: int
    driver: int
    device: int


class VirtioDevice(Protocol):
    """What the transport needs from the device implementation.

    Read-only properties so that plain attributes and properties both satisfy it.
    """

    @property
    def virtio_id(self) -> int:
        """Virtio device ID (spec section 5), e.g. 26 for a file system device."""
        ...

    @property
    def num_queues(self) -> int: ...

    @property
    def max_queue_size(self) -> int: ...

    @property
    def device_features(self) -> int:
        """The 64 feature bits the device offers; the transport adds VIRTIO_F_VERSION_1."""
        ...

    @property
    def config_size(self) -> int:
        """Bytes of device-specific config; 0 means no device config capability."""
        ...

    def read_config(self, offset: int, size: int) -> bytes:
        """Device config bytes; the transport has checked ``offset + size <= config_size``."""
        ...

    def write_config(self, offset: int, data: bytes) -> None:
        """Write device config; the transport has checked the bounds."""
        ...

    def activate(self, driver_features: int, queues: Sequence[QueueConfig]) -> None:
        """The driver set DRIVER_OK: start the enabled ``queues`` with ``driver_features``."""
        ...

    def deactivate(self) -> None:
        """Stop the queues started by a successful ``activate`` (reset or bus mastering off)."""
        ...

    def reset(self) -> None:
        """Every device reset, active or not: drop device state such as shared-memory mappings."""
        ...

    def kick(self, queue: int) -> None:
        """The driver notified ``queue`` (an enabled queue of an active device)."""
        ...


@runtime_checkable
class KickFdSource(Protocol):
    """A ``VirtioDevice`` whose kicks are eventfd writes: the transport lends the fds to the
    server's hot path, which then kicks without calling ``kick``. Optional."""

    def kick_fd(self, queue: int) -> int | None:
        """The eventfd ``kick(queue)`` writes, while it is open; None otherwise."""
        ...
