"""``vhost-device-fs``: serve a host directory to a guest as virtio-fs, with a DAX window.

::

    vhost-device-fs --socket-path /tmp/fs.sock --shared-dir /srv/share --tag myfs \\
        --cache-size 64M --control-socket /tmp/fs-ctl.sock

The control socket speaks the library's JSON lines (``vhost_user_backend.control``); its one
command, ``{"cmd": "status"}``, returns the counters, the live DAX window table, the tag and
the shared directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from vhost_user.options import add_shmem_feature_bit
from vhost_user_backend.control import ControlServer
from vhost_user_backend.daemon import VhostUserDaemon
from vhost_user_backend.devices.shmem_reference import parse_size
from vhost_user_backend.devices.virtiofs.device import (
    DEFAULT_CACHE_SIZE,
    VirtioFsDevice,
    check_cache_size,
    handle_command,
)
from vhost_user_backend.errors import DeviceConfigError

log = logging.getLogger("vhost_user_backend.devices.virtiofs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vhost-device-fs",
        description="virtio-fs vhost-user back-end with a DAX window (shared memory region 0).",
    )
    parser.add_argument("--socket-path", required=True, help="vhost-user UNIX socket to listen on")
    parser.add_argument("--shared-dir", required=True, help="the host directory to serve")
    parser.add_argument("--tag", required=True, help="the mount tag the guest uses (<= 36 bytes)")
    parser.add_argument(
        "--cache-size",
        default=str(DEFAULT_CACHE_SIZE >> 20) + "M",
        metavar="SIZE",
        help="DAX window size: a power of two and a multiple of 2 MiB, or 0 for none (default 64M)",
    )
    parser.add_argument(
        "--num-request-queues", type=int, default=1, metavar="N", help="request queues (default 1)"
    )
    add_shmem_feature_bit(parser)
    parser.add_argument("--control-socket", help="JSON-lines control socket path")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cache_size = check_cache_size(parse_size(args.cache_size))
        if not os.path.isdir(args.shared_dir):
            raise DeviceConfigError(f"shared directory {args.shared_dir!r} is not a directory")
        device = VirtioFsDevice(
            args.shared_dir,
            args.tag,
            cache_size=cache_size,
            num_request_queues=args.num_request_queues,
        )
    except DeviceConfigError as exc:
        print(f"vhost-device-fs: {exc}", file=sys.stderr)
        return 2
    # The guest's modes arrive with its umask applied; ours must not apply a second one.
    os.umask(0)
    backend = VhostUserDaemon(device, args.socket_path, shmem_feature_bit=args.shmem_feature_bit)
    server: ControlServer | None = None
    if args.control_socket:
        server = ControlServer(args.control_socket, lambda req: handle_command(device, req))
        server.serve_in_thread()
        log.info("control socket on %s", args.control_socket)
    log.info(
        "serving %s as %r, DAX window %#x bytes, %d request queue(s)",
        args.shared_dir,
        args.tag,
        cache_size,
        args.num_request_queues,
    )
    signal.signal(signal.SIGTERM, lambda *_: backend.stop())
    signal.signal(signal.SIGINT, lambda *_: backend.stop())
    try:
        backend.serve_forever()
    finally:
        if server is not None:
            server.close()
        device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
