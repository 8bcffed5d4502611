"""Command line: argparse -> a validated, frozen ``EmulatorConfig`` -> ``emulator.app.run``.

Option names mirror the properties of QEMU's ``vhost-user-test-device`` so a user can move a
back-end between QEMU's own front-end and this one without relearning anything.

``virtio-emu trace FILE ...`` reads a ``--trace`` file (``emulator.trace_reader``),
``virtio-emu monitor PATH COMMAND ...`` talks to a ``--monitor-socket``
(``emulator.monitor.cli``) and ``virtio-emu check-backend ...`` checks a vhost-user back-end
(``conformance.cli``, the one import of ``conformance`` the emulator has). Each is
dispatched on the first word before the emulator's parser runs, not as an argparse subcommand:
the emulator's options stay top-level and required, every existing invocation is parsed exactly
as before (a subparser would demand a command or make the required options conditional), and
each keeps its own small parser and ``--help``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from conformance.cli import main as check_backend_main
from emulator import trace_reader
from emulator.app import run
from emulator.config import EmulatorConfig
from emulator.errors import ANY_ERROR, ConfigError
from emulator.monitor import cli as monitor_cli
from vhost_user.messages import (
    SHMEM_FEATURE_BIT_DRAFT,
    SHMEM_FEATURE_BIT_RUST_VMM,
    SHMEM_FEATURE_BIT_UPSTREAM,
)

SHMEM_FEATURE_BITS = (
    SHMEM_FEATURE_BIT_UPSTREAM,
    SHMEM_FEATURE_BIT_DRAFT,
    SHMEM_FEATURE_BIT_RUST_VMM,
)


def parse_size(text: str) -> int:
    """``4096``, ``0x1000``, ``4K``, ``2M``, ``1G`` (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1
    if text and text[-1] in units:
        scale = units[text[-1]]
        text = text[:-1]
    try:
        return int(text, 0) * scale
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from exc


def parse_shmem_region(text: str) -> tuple[int, int]:
    """``SHMID:SIZE`` as used by ``--shmem-region``."""
    shmid, sep, size = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected SHMID:SIZE, got {text!r}")
    try:
        return int(shmid, 0), parse_size(size)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad shmid in {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtio-emu",
        description="A virtio 1.x PCI device over vfio-user, fronting a vhost-user back-end, "
        "with guest-visible shared-memory regions.",
        epilog="virtio-emu trace FILE [--socket NAME] [--type NAME] [--follow] [--json]: "
        "show a --trace file as a timeline (see virtio-emu trace --help). "
        "virtio-emu monitor PATH COMMAND [NAME=VALUE...]: ask a --monitor-socket "
        "(see virtio-emu monitor --help). "
        "virtio-emu check-backend (--socket PATH | -- CMD ARGS...) [options]: check a vhost-user "
        "back-end against the spec, no guest needed (see virtio-emu check-backend --help).",
    )
    parser.add_argument(
        "--vfio-user-socket",
        type=Path,
        required=True,
        metavar="PATH",
        help="listen here for the vfio-user client (QEMU's vfio-user-pci)",
    )
    parser.add_argument(
        "--virtio-id",
        type=int,
        required=True,
        metavar="N",
        help="virtio device id (PCI device id is 0x1040 + N)",
    )
    parser.add_argument("--num-queues", type=int, default=1, metavar="N")
    parser.add_argument("--queue-size", type=int, default=128, metavar="N")
    parser.add_argument(
        "--config-size",
        type=int,
        default=0,
        metavar="N",
        help="bytes of device config space (read from the back-end)",
    )
    parser.add_argument(
        "--shmem-region",
        type=parse_shmem_region,
        action="append",
        default=[],
        metavar="SHMID:SIZE",
        help="a shared-memory region (repeatable); overrides GET_SHMEM_CONFIG",
    )
    parser.add_argument(
        "--vhost-user-socket",
        type=Path,
        metavar="PATH",
        help="connect to this vhost-user back-end (retries until it is up)",
    )
    parser.add_argument(
        "--shmem-feature-bit",
        type=int,
        choices=SHMEM_FEATURE_BITS,
        default=SHMEM_FEATURE_BIT_UPSTREAM,
        help="protocol feature bit for shared memory: 22 (upstream QEMU, the default), 20 (the "
        "draft patches; upstream's GET_VRING_BASE_INFLIGHT) or 21 (only for back-ends built on "
        "rust-vmm vhost <= 0.16; upstream's GPA_ADDRESSES)",
    )
    parser.add_argument(
        "--backend-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for each back-end reply",
    )
    parser.add_argument(
        "--backend-connect-timeout",
        type=float,
        metavar="SECONDS",
        help="give up (exit status 1) when the vhost-user back-end's socket does not accept a "
        "connection within this many seconds of start-up (default: wait as long as it takes)",
    )
    parser.add_argument(
        "--max-mappings",
        type=int,
        metavar="N",
        help="cap on live shared-memory mappings in the whole BAR (default: what "
        "vm.max_map_count leaves room for, two VMAs per mapping)",
    )
    parser.add_argument(
        "--max-mappings-per-region",
        type=int,
        default=65536,
        metavar="N",
        help="cap on live mappings in one region (default 65536)",
    )
    parser.add_argument(
        "--monitor-socket",
        type=Path,
        metavar="PATH",
        help="answer monitor commands (JSON lines, mode 0600) on this socket; "
        "see virtio-emu monitor --help",
    )
    parser.add_argument(
        "--trace",
        type=Path,
        metavar="FILE",
        help="append one JSON line per message (both directions)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="one DEBUG line per message",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    regions: dict[int, int] = {}
    for shmid, size in args.shmem_region:
        if shmid in regions:
            raise ConfigError(f"--shmem-region {shmid} given twice")
        regions[shmid] = size
    if not 0 <= args.virtio_id <= 0x3F:
        raise ConfigError(f"--virtio-id {args.virtio_id} is outside 0..63 (PCI ids 0x1040..0x107f)")
    if not 1 <= args.num_queues <= 1024:
        raise ConfigError(f"--num-queues {args.num_queues} is outside 1..1024")
    size = args.queue_size
    if not 1 <= size <= 32768 or size & (size - 1):
        raise ConfigError(f"--queue-size {size} must be a power of two in 1..32768")
    if not 0 <= args.config_size <= 0x1000:
        raise ConfigError(f"--config-size {args.config_size} is outside 0..4096")
    if args.backend_timeout <= 0:
        raise ConfigError("--backend-timeout must be positive")
    if args.backend_connect_timeout is not None and args.backend_connect_timeout <= 0:
        raise ConfigError("--backend-connect-timeout must be positive")
    if args.max_mappings is not None and args.max_mappings < 1:
        raise ConfigError("--max-mappings must be at least 1")
    if args.max_mappings_per_region < 1:
        raise ConfigError("--max-mappings-per-region must be at least 1")
    return EmulatorConfig(
        vfio_user_socket=args.vfio_user_socket,
        virtio_id=args.virtio_id,
        num_queues=args.num_queues,
        queue_size=size,
        config_size=args.config_size,
        shmem_regions=regions,
        vhost_user_socket=args.vhost_user_socket,
        shmem_feature_bit=args.shmem_feature_bit,
        trace=args.trace,
        backend_timeout=args.backend_timeout,
        backend_connect_timeout=args.backend_connect_timeout,
        max_mappings=args.max_mappings,
        max_mappings_per_region=args.max_mappings_per_region,
        monitor_socket=args.monitor_socket,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["trace"]:
        return trace_reader.main(argv[1:])
    if argv[:1] == ["monitor"]:
        return monitor_cli.main(argv[1:])
    if argv[:1] == ["check-backend"]:
        return check_backend_main(argv[1:])
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return run(config_from_args(args))
    except ANY_ERROR as exc:
        logging.getLogger("emulator").error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
