"""The emulator's own errors; protocol, transport and state errors come from ``wire.errors``.

::

    EmulatorError
     +-- ConfigError            bad command line or region layout; nothing was started
     +-- BackendFailure         the vhost-user back-end refused, answered wrongly or went away
     +-- ShmemError             (emulator.shmem) a shared-memory BAR operation failed
     +-- VfioUserError          (emulator.vfio_user.client) our test client's failures
     +-- MonitorError           (emulator.monitor) a monitor request refused, by class

Code that must survive anything a peer does catches ``ANY_ERROR`` (both roots).
"""

from __future__ import annotations

from wire.errors import WireError


class EmulatorError(Exception):
    """Root of every error the emulator itself raises on purpose."""


class ConfigError(EmulatorError):
    """The configuration (CLI, region layout, back-end shared-memory config) is unusable."""


class BackendFailure(EmulatorError):
    """The vhost-user back-end refused a request, answered wrongly or disconnected."""


#: Everything the emulator raises on purpose, for the places that must survive any of it.
ANY_ERROR = (EmulatorError, WireError)
