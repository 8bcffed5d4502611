"""The back-end library's own errors; protocol, transport and state errors come from
``wire.errors`` (a front-end that breaks the protocol raises ``RemoteProtocolError`` here too).

::

    DaemonError
     +-- DeviceConfigError   a device's command line or declared layout is unusable
     +-- ChannelFailed       a back-end channel request got no answer (timeout, broken channel)
     +-- FrontendRefused     the front-end answered a back-end request with a non-zero status
"""

from __future__ import annotations

from vhost_user.messages import BackendReq


class DaemonError(Exception):
    """Root of the errors the back-end library raises on purpose."""


class DeviceConfigError(DaemonError):
    """A device's configuration (sizes, region ids) is unusable; nothing was started."""


class ChannelFailed(DaemonError):
    """A request on the back-end channel could not complete: timeout or broken channel."""


class FrontendRefused(DaemonError):
    """The front-end answered a back-end request (SHMEM_MAP/UNMAP, CONFIG_CHANGE_MSG) with the
    non-zero status ``code`` (an errno from our emulator, 1 from QEMU)."""

    def __init__(self, req: BackendReq, code: int) -> None:
        super().__init__(f"front-end refused {req.name}: status {code}")
        self.request = req
        self.code = code
