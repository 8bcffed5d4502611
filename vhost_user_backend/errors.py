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
from vhost_user.shmem import describe_status


class DaemonError(Exception):
    """Root of the errors the back-end library raises on purpose."""


class DeviceConfigError(DaemonError):
    """A device's configuration (sizes, region ids) is unusable; nothing was started."""


class ChannelFailed(DaemonError):
    """A request on the back-end channel could not complete: timeout or broken channel."""


class FrontendRefused(DaemonError):
    """The front-end answered a back-end request (SHMEM_MAP/UNMAP, CONFIG_CHANGE_MSG) with the
    non-zero status ``code``: an errno from our emulator, 1 from QEMU (for every refusal).

    ``meaning`` says what the status means for that request (``vhost_user.shmem``), e.g.
    ``EEXIST: overlaps a live mapping``; ``what`` names the request's target (shmid, range).
    """

    def __init__(self, req: BackendReq, code: int, what: str = "") -> None:
        self.request = req
        self.code = code
        self.meaning = describe_status(req.name, code)
        target = f" {what}" if what else ""
        super().__init__(f"front-end refused {req.name}{target}: {self.meaning}")
