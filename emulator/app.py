"""Builds the emulator from its configuration and runs it until SIGTERM/SIGINT.

Start-up order matters: the shared-memory BAR's size is fixed once a client has read the
config space, so the back-end (which declares the regions with GET_SHMEM_CONFIG) is asked
first, and only then does the vfio-user socket start listening. The monitor socket listens
just before it, so it is there once the ready line is logged.
"""

from __future__ import annotations

import logging
import signal
import time
from contextlib import ExitStack

from emulator.config import EmulatorConfig
from emulator.counters import Counters
from emulator.loop import EventLoop
from emulator.memory import GuestMemory
from emulator.monitor.commands import MonitorCommands
from emulator.monitor.server import MonitorServer
from emulator.pci.virtio_pci import VirtioPciDevice
from emulator.shmem import SharedMemoryBar, ShmemLayout
from emulator.trace import Tracer
from emulator.vfio_user import hotpath
from emulator.vfio_user.server import VfioUserServer
from emulator.vhost_frontend.frontend import VhostUserFrontend
from emulator.virtio.device import VirtioDevice
from emulator.virtio.standalone import StandaloneDevice

logger = logging.getLogger("emulator")


class Emulator:
    """The running emulator: event loop, guest memory, device, shared memory and server."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self.counters = Counters()
        self._stack = ExitStack()
        self.loop = EventLoop()
        self._stack.callback(self.loop.close)
        self.tracer = Tracer(config.trace)
        self._stack.callback(self.tracer.close)
        self.memory = GuestMemory()
        self._stack.callback(self.memory.close)
        try:
            self._build()
        except BaseException:
            self._stack.close()
            raise

    def _build(self) -> None:
        config = self.config
        hotpath.require()  # before waiting for a back-end: without it nothing can be served
        self.frontend: VhostUserFrontend | None = None
        sizes = dict(config.shmem_regions)
        if config.vhost_user_socket is not None:
            self.frontend = VhostUserFrontend(
                config, self.loop, self.memory, self.tracer, counters=self.counters
            )
            self._stack.callback(self.frontend.close)
            self.frontend.connect_blocking()
            if not sizes:
                sizes = self.frontend.shmem_sizes
            backend: VirtioDevice = self.frontend
        else:
            backend = StandaloneDevice(
                config.virtio_id, config.num_queues, config.queue_size, config.config_size
            )
        layout = ShmemLayout.from_sizes(sizes) if sizes else None
        self.shmem = None
        if layout is not None and layout.regions:
            self.shmem = SharedMemoryBar(
                layout,
                max_mappings=config.max_mappings,
                max_mappings_per_region=config.max_mappings_per_region,
            )
        if self.shmem is not None:
            self._stack.callback(self.shmem.close)
        self.device = VirtioPciDevice(
            backend,
            shmem_layout=layout if self.shmem is not None else None,
            shmem=self.shmem,
        )
        self._stack.callback(self.device.close)
        if self.frontend is not None:
            self.frontend.attach(self.device, self.shmem)
        self.server = VfioUserServer(
            config.vfio_user_socket,
            self.device,
            self.memory,
            self.loop,
            self.tracer,
            counters=self.counters,
        )
        self._stack.callback(self.server.close)
        self.monitor: MonitorServer | None = None
        if config.monitor_socket is not None:
            commands = MonitorCommands(
                device=self.device,
                server=self.server,
                shmem=self.shmem,
                frontend=self.frontend,
                counters=self.counters,
                started=self.started,
            )
            self.monitor = MonitorServer(config.monitor_socket, self.loop, commands.table)
            self._stack.callback(self.monitor.close)

    def run(self) -> None:
        # Signals first: from the ready line on, SIGTERM means a clean stop (launchers send it
        # as soon as they have seen the line).
        self.loop.stop_on_signals(signal.SIGTERM, signal.SIGINT)
        if self.monitor is not None:
            self.monitor.listen()
        self.server.listen()
        self.loop.run()
        logger.info("stopping (%s)", self.loop.stop_reason or "loop ended")

    def close(self) -> None:
        self._stack.close()


def run(config: EmulatorConfig) -> int:
    """Run until a signal; returns the process exit code."""
    emulator = Emulator(config)
    try:
        emulator.run()
    finally:
        emulator.close()
    return 0
