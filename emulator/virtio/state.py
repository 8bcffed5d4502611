"""Virtio device state independent of the transport: status machine, features, queues.

The transport turns register accesses into calls here; this module decides what the driver
may change when, and activates or deactivates the ``VirtioDevice``. Every input comes from an
untrusted driver, so invalid requests are refused the way the spec lets a device refuse them
(not latching FEATURES_OK, reading back NO_VECTOR, keeping the old queue size) and logged.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from emulator.virtio.device import QueueConfig, VirtioDevice

logger = logging.getLogger(__name__)

NO_VECTOR = 0xFFFF
"""VIRTIO_MSI_NO_VECTOR: no MSI-X vector assigned (or the assignment was refused)."""


class DeviceStatus(enum.IntFlag):
    """Device status bits (virtio 1.x section 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


DRIVER_STATUS_BITS = (
    DeviceStatus.ACKNOWLEDGE
    | DeviceStatus.DRIVER
    | DeviceStatus.DRIVER_OK
    | DeviceStatus.FEATURES_OK
    | DeviceStatus.FAILED
)
"""The bits a driver may set; DEVICE_NEEDS_RESET is the device's alone."""


class VirtioFeature(enum.IntEnum):
    """Reserved (transport/ring) feature bits, VIRTIO_F_* without the prefix (section 6)."""

    NOTIFY_ON_EMPTY = 24
    ANY_LAYOUT = 27
    INDIRECT_DESC = 28
    EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40
    ADMIN_VQ = 41


class VirtioDeviceId(enum.IntEnum):
    """Virtio device IDs (section 5)."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    BALLOON = 5
    IOMEM = 6
    RPMSG = 7
    SCSI = 8
    NINEP = 9
    MAC80211_WLAN = 10
    RPROC_SERIAL = 11
    CAIF = 12
    MEMORY_BALLOON = 13
    GPU = 16
    CLOCK = 17
    INPUT = 18
    VSOCK = 19
    CRYPTO = 20
    SIGNAL_DIST = 21
    PSTORE = 22
    IOMMU = 23
    MEM = 24
    SOUND = 25
    FS = 26
    PMEM = 27
    RPMB = 28
    MAC80211_HWSIM = 29
    VIDEO_ENCODER = 30
    VIDEO_DECODER = 31
    SCMI = 32
    NITRO_SEC_MOD = 33
    I2C_ADAPTER = 34
    WATCHDOG = 35
    CAN = 36
    PARAM_SERV = 38
    AUDIO_POLICY = 39
    BT = 40
    GPIO = 41
    RDMA = 42
    CAMERA = 43
    ISM = 44
    SPI = 45


def bit(feature: int) -> int:
    """The mask of one feature bit."""
    return 1 << feature


UNSUPPORTED_FEATURES = (
    bit(VirtioFeature.ACCESS_PLATFORM)  # needs a vIOMMU: vhost-user IOTLB messages
    | bit(VirtioFeature.SR_IOV)  # no SR-IOV capability in our config space
    | bit(VirtioFeature.NOTIFICATION_DATA)  # the notify write's value is not forwarded
    | bit(VirtioFeature.RING_RESET)  # no queue_reset register, no per-queue reset message
    | bit(VirtioFeature.ADMIN_VQ)  # no administration virtqueue
)
"""Reserved features this emulator cannot honour, whatever the device offers: the transport
removes them from every ``VirtioDevice``'s offer, and the vhost-user front-end from the
back-end's before it reports them."""


@dataclass(slots=True)
class QueueState:
    """The driver's view of one virtqueue before and after activation."""

    index: int
    max_size: int
    size: int = 0
    msix_vector: int = NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0

    def reset(self) -> None:
        self.size = self.max_size
        self.msix_vector = NO_VECTOR
        self.enabled = False
        self.desc = self.driver = self.device = 0

    def config(self) -> QueueConfig:
        return QueueConfig(
            index=self.index,
            size=self.size,
            msix_vector=self.msix_vector,
            desc=self.desc,
            driver=self.driver,
            device=self.device,
        )


class VirtioState:
    """Status, negotiated features and queue setup of one virtio device.

    ``num_vectors`` bounds the MSI-X vectors a queue or the config may use.
    ``on_needs_reset`` runs when the device sets DEVICE_NEEDS_RESET (the transport raises a
    config interrupt then).
    """

    def __init__(
        self,
        backend: VirtioDevice,
        *,
        device_features: int,
        num_vectors: int,
        on_needs_reset: Callable[[], None],
    ) -> None:
        self.backend = backend
        self.device_features = device_features | bit(VirtioFeature.VERSION_1)
        self.num_vectors = num_vectors
        self._on_needs_reset = on_needs_reset
        self.status = DeviceStatus(0)
        self.driver_features = 0
        self.config_generation = 0
        self.active = False
        self.queues = [
            QueueState(index=i, max_size=backend.max_queue_size) for i in range(backend.num_queues)
        ]
        for queue in self.queues:
            queue.reset()

    # Status machine

    def write_status(self, value: int) -> None:
        """A driver write to device_status. 0 resets; other bits only accumulate."""
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        old = self.status
        requested = DeviceStatus(value) & DRIVER_STATUS_BITS
        new = old | requested
        if requested & ~old & DeviceStatus.FEATURES_OK and not self._features_acceptable(new):
            new &= ~DeviceStatus.FEATURES_OK
        if new & ~old & DeviceStatus.DRIVER_OK and not new & DeviceStatus.FEATURES_OK:
            logger.warning("driver set DRIVER_OK without FEATURES_OK; not latched")
            new &= ~DeviceStatus.DRIVER_OK
        if requested & ~new or old & ~requested & DRIVER_STATUS_BITS:
            # Refused bits, or bits the driver tried to clear (only a write of 0 clears).
            logger.debug("status write %#x: latched %#x (was %#x)", value, new, old)
        self.status = new
        if new & ~old & DeviceStatus.FAILED:
            logger.warning("driver gave up on the device (FAILED)")
        if new & ~old & DeviceStatus.DRIVER_OK:
            self._activate()

    def _features_acceptable(self, status: DeviceStatus) -> bool:
        if not status & DeviceStatus.DRIVER:
            logger.warning("FEATURES_OK before DRIVER; refused")
            return False
        unknown = self.driver_features & ~self.device_features
        if unknown:
            logger.warning("driver acked features %#x the device did not offer", unknown)
            return False
        if not self.driver_features & bit(VirtioFeature.VERSION_1):
            logger.warning("driver did not accept VIRTIO_F_VERSION_1")
            return False
        return True

    def _activate(self) -> None:
        queues = [queue.config() for queue in self.queues if queue.enabled]
        try:
            self.backend.activate(self.driver_features, queues)
        except Exception:
            logger.exception("back-end failed to activate; device needs reset")
            self.set_needs_reset()
            return
        self.active = True
        logger.info(
            "device active: features %#x, queues %s",
            self.driver_features,
            [queue.index for queue in queues],
        )

    def set_needs_reset(self) -> None:
        """The device hit an error it cannot recover from without a driver reset."""
        if self.status & DeviceStatus.DEVICE_NEEDS_RESET:
            return
        self.status |= DeviceStatus.DEVICE_NEEDS_RESET
        self._on_needs_reset()

    def stop(self) -> None:
        """Stop the back-end and drop DRIVER_OK, keeping the setup (bus mastering turned off).

        The driver may set DRIVER_OK again to restart with the same queues.
        """
        self._deactivate()
        self.status &= ~DeviceStatus.DRIVER_OK

    def reset(self) -> None:
        """Back to the initial state; deactivate the back-end if it was running, then reset it."""
        self._deactivate()
        try:
            self.backend.reset()
        except Exception:
            logger.exception("back-end failed to reset")
        self.status = DeviceStatus(0)
        self.driver_features = 0
        for queue in self.queues:
            queue.reset()

    def _deactivate(self) -> None:
        if not self.active:
            return
        self.active = False
        try:
            self.backend.deactivate()
        except Exception:
            logger.exception("back-end failed to deactivate")

    # Features

    @property
    def features_locked(self) -> bool:
        return bool(self.status & DeviceStatus.FEATURES_OK)

    def write_driver_features(self, word: int, value: int) -> None:
        """Set 32-bit word ``word`` of the driver features; frozen once FEATURES_OK is set."""
        if self.features_locked or word not in (0, 1):
            return
        shift = 32 * word
        mask = 0xFFFF_FFFF << shift
        self.driver_features = (self.driver_features & ~mask) | ((value & 0xFFFF_FFFF) << shift)

    def device_features_word(self, word: int) -> int:
        if word not in (0, 1):
            return 0
        return (self.device_features >> (32 * word)) & 0xFFFF_FFFF

    def driver_features_word(self, word: int) -> int:
        if word not in (0, 1):
            return 0
        return (self.driver_features >> (32 * word)) & 0xFFFF_FFFF

    # Config generation

    def bump_config_generation(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFF

    # Queues

    def queue(self, index: int) -> QueueState | None:
        if 0 <= index < len(self.queues):
            return self.queues[index]
        return None

    def _configurable(self, index: int) -> QueueState | None:
        queue = self.queue(index)
        if queue is None:
            return None
        if queue.enabled or self.status & DeviceStatus.DRIVER_OK:
            logger.warning("queue %d: setup write after enable/DRIVER_OK ignored", index)
            return None
        return queue

    def set_queue_size(self, index: int, size: int) -> None:
        """Split rings need a power of two; packed rings (if negotiated) any size."""
        queue = self._configurable(index)
        if queue is None:
            return
        packed = bool(self.driver_features & bit(VirtioFeature.RING_PACKED))
        power_of_two = size > 0 and size & (size - 1) == 0
        if not 0 < size <= queue.max_size or not (power_of_two or packed):
            logger.warning("queue %d: size %d refused (max %d)", index, size, queue.max_size)
            return
        queue.size = size

    def set_queue_vector(self, index: int, vector: int) -> None:
        """A vector outside the MSI-X table reads back as NO_VECTOR, as the driver checks."""
        queue = self._configurable(index)
        if queue is None:
            return
        queue.msix_vector = self.checked_vector(vector)

    def checked_vector(self, vector: int) -> int:
        return vector if 0 <= vector < self.num_vectors else NO_VECTOR

    def set_queue_address(self, index: int, which: str, address: int) -> None:
        """``which`` is ``desc``, ``driver`` or ``device``."""
        queue = self._configurable(index)
        if queue is None:
            return
        setattr(queue, which, address & 0xFFFF_FFFF_FFFF_FFFF)

    def enable_queue(self, index: int, value: int) -> None:
        """Writing 1 enables; 0 is not a valid write without VIRTIO_F_RING_RESET."""
        if value != 1:
            logger.debug("queue %d: queue_enable write %d ignored", index, value)
            return
        queue = self._configurable(index)
        if queue is None:
            return
        queue.enabled = True
