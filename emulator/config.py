"""The emulator's validated configuration (built by ``emulator.cli`` or by tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class EmulatorConfig:
    """Everything the emulator needs to start, already validated."""

    vfio_user_socket: Path
    virtio_id: int
    num_queues: int = 1
    queue_size: int = 128
    config_size: int = 0
    shmem_regions: dict[int, int] = field(default_factory=dict)
    vhost_user_socket: Path | None = None
    shmem_feature_bit: int = 22
    trace: Path | None = None
    backend_timeout: float = 5.0
    #: Seconds to wait at start-up for the back-end's socket; None waits as long as it takes.
    backend_connect_timeout: float | None = None
    max_mappings: int | None = None
    max_mappings_per_region: int = 65536
    monitor_socket: Path | None = None
