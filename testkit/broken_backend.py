"""A vhost-user back-end that is correct except for the breaks it is told to make.

``virtio-emu check-backend`` is proven on it: each break makes exactly one check fail, and with
none it passes every check that applies::

    python -m testkit.broken_backend --socket PATH [--break NAME[,NAME...]]

The device is virtio-rng compatible (virtio id 4, one queue it fills with bytes), has 16 bytes
of device config (``CONFIG``), declares two 1 MiB shared-memory regions (shmid 0 and 1) and,
each time its queues start after a connect or a reset, sends two read-only SHMEM_MAPs of one
sealed memfd into region 0, from a thread of its own (hooks must not wait for the front-end):
[0, 64 KiB) and [64 KiB, 128 KiB). No stimulus is needed.

The breaks (``BREAKS``), each the smallest change on the library that puts it on the wire:

- ``wrong-bit``: the daemon's ``shmem_feature_bit`` is 20 (the draft patches' SHMEM, upstream's
  GET_VRING_BASE_INFLIGHT) instead of 22; it is used consistently, as such a back-end would.
- ``reply-without-need-reply``: once REPLY_ACK is acked (from the request after the
  SET_PROTOCOL_FEATURES that acks it), every SET_* request without a reply of its own is acked
  (u64 status) whether or not it set NEED_REPLY: REPLY_ACK misread as "always ack". The stray
  replies carry the right request number, the REPLY flag and version 1.
- ``overlapping-maps``: the second map goes to [32 KiB, 96 KiB), overlapping the first.
- ``no-shmem-config-reply``: GET_SHMEM_CONFIG is read and never answered; the connection
  stays in step and every later request is answered.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from vhost_user.codec import VhostUserMessage, reply_to, spec_for
from vhost_user.messages import (
    SHMEM_FEATURE_BIT_DRAFT,
    SHMEM_FEATURE_BIT_UPSTREAM,
    FrontendReq,
    Payload,
    VhostUserProtocolFeature,
    VhostUserU64,
    errno_of,
)
from vhost_user_backend.daemon import VIRTIO_F_VERSION_1, VhostUserDaemon, VhostUserDevice
from vhost_user_backend.errors import ChannelFailed, DaemonError, FrontendRefused
from vhost_user_backend.vring import Vring
from wire.errors import StateError, WireError

log = logging.getLogger(__name__)

#: break name -> the one check-backend check id it makes fail
BREAKS: dict[str, str] = {
    "wrong-bit": "negotiation.shmem_bit",
    "reply-without-need-reply": "negotiation.reply_ack",
    "overlapping-maps": "shmem.map_rules",
    "no-shmem-config-reply": "shmem.get_shmem_config",
}

VIRTIO_ID = 4
REGION_SIZE = 1 << 20
REGION_SIZES = (REGION_SIZE, REGION_SIZE)
MAP_LENGTH = 64 << 10
#: Device config space: distinct bytes, so an offset the back-end ignored shows.
CONFIG = bytes(range(0x40, 0x50))


def mapping_plan(*, overlapping: bool) -> tuple[tuple[int, int, int, int], ...]:
    """The maps sent per activation: (shmid, fd_offset, shm_offset, length)."""
    second = MAP_LENGTH // 2 if overlapping else MAP_LENGTH
    return ((0, 0, 0, MAP_LENGTH), (0, MAP_LENGTH, second, MAP_LENGTH))


class BrokenDevice(VhostUserDevice):
    """virtio id 4, one queue, two regions; maps its memfd whenever its queues start anew."""

    features = VIRTIO_F_VERSION_1
    num_queues = 1

    def __init__(self, *, overlapping: bool = False) -> None:
        self.plan = mapping_plan(overlapping=overlapping)
        self.memfd = os.memfd_create("broken-backend", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        try:
            size = 2 * MAP_LENGTH
            os.ftruncate(self.memfd, size)
            os.pwrite(self.memfd, bytes(i & 0xFF for i in range(size)), 0)
            fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        except BaseException:
            os.close(self.memfd)
            raise
        self.daemon: VhostUserDaemon | None = None
        #: This activation's maps were scheduled; cleared by every reset.
        self._mapped = False
        self._cond = threading.Condition()
        self._due = 0
        self._closing = False
        self._thread = threading.Thread(target=self._mapper, name="broken-mapper", daemon=True)
        self._thread.start()

    def shmem_sizes(self) -> Sequence[int]:
        return REGION_SIZES

    def get_config(self, offset: int, size: int) -> bytes:
        return CONFIG.ljust(offset + size, b"\0")[offset : offset + size]

    def handle_queue(self, index: int, vring: Vring) -> None:
        used = 0
        while (chain := vring.pop()) is not None:
            data = bytes(i & 0xFF for i in range(chain.writable_len))
            vring.push(chain.head, chain.write(vring.memory, data))
            used += 1
        if used:
            vring.notify()

    def on_connect(self, backend: VhostUserDaemon) -> None:
        self.daemon = backend

    def on_queues_started(self) -> None:
        with self._cond:
            if self._mapped:
                return
            self._mapped = True
            self._due += 1
            self._cond.notify()

    def reset(self) -> None:
        """The front-end dropped our mappings: map again when the queues next start."""
        with self._cond:
            self._mapped = False

    def _mapper(self) -> None:
        while True:
            with self._cond:
                while not self._due and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                self._due -= 1
            self._map_all()

    def _map_all(self) -> None:
        daemon = self.daemon
        if daemon is None:
            return
        for shmid, fd_offset, shm_offset, length in self.plan:
            what = f"shmid {shmid} [{shm_offset:#x}, +{length:#x})"
            try:
                daemon.shmem_map(shmid, self.memfd, fd_offset, shm_offset, length, writable=False)
            except FrontendRefused as exc:
                log.warning("map of %s refused: %s", what, exc.meaning)
                continue
            except (ChannelFailed, StateError) as exc:
                log.warning("maps not sent: %s", exc)
                return
            log.info("mapped %s", what)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(5)
        os.close(self.memfd)


class BrokenDaemon(VhostUserDaemon):
    """The library's daemon with the reply breaks; the others are its own options or the
    device's."""

    def __init__(self, device: BrokenDevice, socket_path: str, breaks: frozenset[str]) -> None:
        bit = SHMEM_FEATURE_BIT_DRAFT if "wrong-bit" in breaks else SHMEM_FEATURE_BIT_UPSTREAM
        super().__init__(device, socket_path, shmem_feature_bit=bit)
        self.breaks = breaks
        #: REPLY_ACK was acked before the request being handled arrived.
        self._acking = False

    def _dispatch(self, msg: VhostUserMessage) -> None:
        self._acking = bool(self.acked_protocol_features & VhostUserProtocolFeature.REPLY_ACK)
        super()._dispatch(msg)

    def _finish(
        self, msg: VhostUserMessage, result: Payload | None, error: WireError | DaemonError | None
    ) -> None:
        req = msg.request
        if req is FrontendReq.GET_SHMEM_CONFIG and "no-shmem-config-reply" in self.breaks:
            self._conn_log.info("GET_SHMEM_CONFIG left unanswered (no-shmem-config-reply)")
            return
        if (
            "reply-without-need-reply" in self.breaks
            and not msg.need_reply
            and isinstance(req, FrontendReq)
            and req.name.startswith("SET_")
            and not spec_for(req).reply
            and self._acking
        ):
            code = 0 if error is None else errno_of(error)
            self._send(reply_to(msg, VhostUserU64(code)))
            return
        super()._finish(msg, result, error)


def parse_breaks(text: str) -> frozenset[str]:
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(names - BREAKS.keys())
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown break {', '.join(unknown)} (known: {', '.join(BREAKS)})"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m testkit.broken_backend",
        description="A vhost-user back-end (virtio id 4, two shared-memory regions) that is "
        "correct except for the named breaks: check-backend's test fixture.",
    )
    parser.add_argument(
        "--socket", "--socket-path", dest="socket", required=True, help="socket to listen on"
    )
    parser.add_argument(
        "--break",
        dest="breaks",
        type=parse_breaks,
        default=frozenset(),
        metavar="NAME[,NAME...]",
        help=f"what to get wrong: {', '.join(BREAKS)} (default: nothing)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    device = BrokenDevice(overlapping="overlapping-maps" in args.breaks)
    try:
        daemon = BrokenDaemon(device, args.socket, args.breaks)
        log.info("breaks: %s", ", ".join(sorted(args.breaks)) or "none")
        signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
        signal.signal(signal.SIGINT, lambda *_: daemon.stop())
        daemon.serve_forever()
    finally:
        device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
