"""``virtio-emu check-backend``: argparse, the back-end target, the run, the reports.

Exit status: 0 when no check failed (warn and n/a allowed), 1 when at least one failed, 2
when the tool could not run (usage, no connection, the command failed to start).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from conformance import report
from conformance.runner import Options, Runner
from conformance.stimuli import parse_device
from conformance.target import SOCKET_PLACEHOLDER, Target, TargetError
from conformance.verdict import CATALOGUE, Verdict

EXIT_OK, EXIT_FAILED, EXIT_CANNOT_RUN = 0, 1, 2
DEFAULT_TIMEOUT = 3.0

EPILOG = f"""\
back-end:
  --socket PATH        check a back-end that is already listening at PATH; checks that need a
                       fresh back-end (after it exits, or after a destructive check) are n/a
  -- CMD ARGS...       start CMD (its own process group), {SOCKET_PLACEHOLDER} in ARGS replaced by a
                       socket path the tool picks; the tool waits for the socket, restarts CMD
                       whenever a check needs a fresh back-end, and stops it at the end

devices (--device), what makes the back-end send SHMEM_MAP:
  shmem-reference:CONTROL_SOCKET   the reference device's control socket: two maps, one unmap
  virtiofs-dax                     FUSE CREATE, WRITE, SETUPMAPPING, REMOVEMAPPING, RELEASE,
                                   UNLINK on the request queue (a file named
                                   .virtio-emu-check-PID, created and removed again)
  none (default)                   only maps the back-end sends by itself are checked

rings.kick_call knows a request for virtio ids 2 (blk: GET_ID), 4 (rng) and 26 (fs: FUSE
INIT); the virtio id comes from --virtio-id or from --device.

exit status: 0 nothing failed (warn and n/a allowed), 1 at least one check failed,
2 could not run (usage, no connection, CMD failed to start).

example:
  virtio-emu check-backend --device shmem-reference:/tmp/ctl.sock --markdown report.md -- \\
      vhost-device-shmem --socket-path {SOCKET_PLACEHOLDER} --control-socket /tmp/ctl.sock
"""


def _check_list() -> str:
    width = max(len(info.id) for info in CATALOGUE)
    return "\n".join(f"  {info.id:<{width}}  {info.title}" for info in CATALOGUE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtio-emu check-backend",
        description="Check a vhost-user back-end against the vhost-user spec and the shared-"
        "memory rules, in seconds and without a guest: negotiation, config, GET_SHMEM_CONFIG, "
        "every SHMEM_MAP/UNMAP it sends, rings, reset, reconnect.",
        epilog=f"{EPILOG}\nchecks (the report's order; ids are stable; the destructive ones "
        f"run last):\n{_check_list()}\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--socket", metavar="PATH", help="the back-end's vhost-user socket")
    parser.add_argument(
        "--virtio-id",
        type=int,
        metavar="N",
        help="virtio device id (picks the kick request and config size)",
    )
    parser.add_argument(
        "--num-queues",
        type=int,
        metavar="N",
        help="queues to set up (default: 2 for virtio-fs, else 1)",
    )
    parser.add_argument(
        "--device",
        metavar="NAME",
        help="stimulus: shmem-reference:CONTROL_SOCKET, virtiofs-dax or none",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the JSON report")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="write the Markdown report")
    parser.add_argument(
        "--title", metavar="TEXT", help="the Markdown report's heading (default: the tool's name)"
    )
    parser.add_argument(
        "--backend-version",
        metavar="TEXT",
        help="the back-end's version, recorded in both reports (the tool cannot ask for it)",
    )
    parser.add_argument(
        "--hostile",
        action="store_true",
        help="also send a short set of malformed messages (destructive)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"longest wait for any one answer (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--no-color", action="store_true", help="no colours in the table")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the tool does")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command: list[str] | None = None
    if "--" in args_list:
        split = args_list.index("--")
        args_list, command = args_list[:split], args_list[split + 1 :]
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_CANNOT_RUN
    if command == []:
        parser.print_usage(sys.stderr)
        print("check-backend: nothing after --", file=sys.stderr)
        return EXIT_CANNOT_RUN
    if args.socket is None and command is None:
        parser.print_usage(sys.stderr)
        print("check-backend: give --socket PATH or -- CMD ARGS...", file=sys.stderr)
        return EXIT_CANNOT_RUN
    if args.timeout <= 0:
        print("check-backend: --timeout must be positive", file=sys.stderr)
        return EXIT_CANNOT_RUN
    try:
        stimulus = parse_device(args.device)
    except ValueError as exc:
        print(f"check-backend: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    target = Target(args.socket, command, start_timeout=max(10.0, args.timeout))
    options = Options(args.virtio_id, args.num_queues, stimulus, args.hostile, args.timeout)
    runner = Runner(target, options)
    try:
        results = runner.run()
    except TargetError as exc:
        print(f"check-backend: could not run: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    except KeyboardInterrupt:
        print("check-backend: interrupted", file=sys.stderr)
        return EXIT_CANNOT_RUN
    finally:
        target.cleanup()
    info = report.BackendInfo(
        command,
        target.path,
        runner.virtio_id,
        datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        runner.notes,
        version=args.backend_version,
        title=args.title,
    )
    colour = sys.stdout.isatty() and not args.no_color and "NO_COLOR" not in os.environ
    sys.stdout.write(report.table(results, colour=colour))
    for note in runner.notes:
        print(f"note: {note}")
    if args.json is not None:
        args.json.write_text(report.json_text(info, results))
    if args.markdown is not None:
        args.markdown.write_text(report.markdown(info, results))
    failed = any(check.verdict is Verdict.FAIL for check in results)
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
