"""A device with no vhost-user back-end: config space in memory, queues accepted and idle.

Used when the emulator runs without ``--vhost-user-socket`` (to test a guest's view of the
transport and the shared-memory BAR on their own) and by transport-level tests.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from emulator.virtio.device import QueueConfig

logger = logging.getLogger(__name__)


class StandaloneDevice:
    """Implements ``VirtioDevice`` with no data plane; records what the driver did."""

    def __init__(
        self, virtio_id: int, num_queues: int, max_queue_size: int, config_size: int
    ) -> None:
        self.virtio_id = virtio_id
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self.config_size = config_size
        self.device_features = 0
        self.config = bytearray(config_size)
        self.active_queues: tuple[QueueConfig, ...] = ()
        self.driver_features = 0
        self.kicks = [0] * num_queues

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(self.config[offset : offset + size])

    def write_config(self, offset: int, data: bytes) -> None:
        self.config[offset : offset + len(data)] = data

    def activate(self, driver_features: int, queues: Sequence[QueueConfig]) -> None:
        self.driver_features = driver_features
        self.active_queues = tuple(queues)
        logger.info("driver ready: features %#x, %d queue(s)", driver_features, len(queues))

    def deactivate(self) -> None:
        self.active_queues = ()

    def reset(self) -> None:
        self.driver_features = 0

    def kick(self, queue: int) -> None:
        if 0 <= queue < self.num_queues:
            self.kicks[queue] += 1

    def kick_fd(self, queue: int) -> int | None:
        """None: every kick is counted here, on the Python path."""
        return None
