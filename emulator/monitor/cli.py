"""``virtio-emu monitor PATH COMMAND [NAME=VALUE ...]``: one monitor command from the shell.

``COMMAND`` is any command the monitor offers (its greeting lists them; an unknown one prints
the list), with arguments as ``NAME=VALUE`` (a number, decimal or ``0x`` hex, or JSON, else
a string); the result is printed as JSON. Two commands of this program's own read
``query-mappings`` and show it: ``mappings`` as an aligned text table and ``map --png FILE``
as a picture (``emulator.monitor.draw``). Exit status 0, or 1 when the monitor refused the
command or could not be reached (the reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emulator.monitor.client import MonitorClient
from emulator.monitor.protocol import ErrorClass, MonitorError

PROG = "virtio-emu monitor"
TABLE_COLUMNS = ("SHMID", "SHM_OFFSET", "LENGTH", "FD_OFFSET", "ACCESS", "KIND", "FD_SIZE")
#: Columns whose values are numbers: right-aligned.
_NUMERIC = {"SHMID", "SHM_OFFSET", "LENGTH", "FD_OFFSET", "FD_SIZE"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Send one command to a running virtio-emu's --monitor-socket and print "
        "the result as JSON. 'mappings' prints the live mapping table as text; "
        "'map --png FILE' draws each shared-memory region with its mappings.",
        epilog="examples: query-status | query-counters | drop-mappings shmid=0 | "
        "device-reset | disconnect-backend | mappings | map --png map.png",
    )
    parser.add_argument("socket", type=Path, metavar="PATH", help="the --monitor-socket")
    parser.add_argument("command", metavar="COMMAND", help="a monitor command, mappings or map")
    parser.add_argument(
        "arguments", nargs="*", metavar="NAME=VALUE", help="the command's arguments"
    )
    parser.add_argument(
        "--png", type=Path, metavar="FILE", help="map: write the picture here (required)"
    )
    parser.add_argument(
        "--width",
        type=int,
        default=1000,
        metavar="PX",
        help="map: the picture's width (default 1000; its height is 70 + 110 per region)",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    return parser


def parse_argument(text: str) -> tuple[str, Any]:
    """``NAME=VALUE``: VALUE as an int (``0x`` too), else as JSON, else as a string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, int(value, 0)
    except ValueError:
        pass
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def mapping_table(reply: dict[str, Any]) -> str:
    """``query-mappings`` as an aligned table, one row per mapping, then one line per region."""
    rows = [
        (
            str(region["shmid"]),
            f"{m['shm_offset']:#x}",
            f"{m['length']:#x}",
            f"{m['fd_offset']:#x}",
            m["access"],
            m["kind"],
            "-" if m["fd_size"] is None else f"{m['fd_size']:#x}",
        )
        for region in reply["regions"]
        for m in region["mappings"]
    ]
    widths = [
        max(len(cell) for cell in column) for column in zip(TABLE_COLUMNS, *rows, strict=True)
    ]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(width) if column in _NUMERIC else cell.ljust(width)
            for column, cell, width in zip(TABLE_COLUMNS, cells, widths, strict=True)
        )
        return "  ".join(padded).rstrip()

    out = [line(TABLE_COLUMNS), *(line(row) for row in rows)]
    if not rows:
        out.append("(no mappings)")
    for region in reply["regions"]:
        mapped = sum(m["length"] for m in region["mappings"])
        out.append(
            f"shmid {region['shmid']}: {region['size']:#x} bytes at BAR offset "
            f"{region['bar_offset']:#x}, {len(region['mappings'])} mapping(s), "
            f"{mapped:#x} bytes mapped"
        )
    if not reply["regions"]:
        out.append("no shared memory")
    return "\n".join(out)


def run(args: argparse.Namespace, client: MonitorClient) -> int:
    arguments = dict(parse_argument(text) for text in args.arguments)
    if args.command == "mappings":
        print(mapping_table(client.execute("query-mappings", **arguments)))
        return 0
    if args.command == "map":
        from emulator.monitor.draw import draw_map  # noqa: PLC0415 (Pillow only for pictures)

        reply = client.execute("query-mappings", **arguments)
        draw_map(reply["regions"], args.png, width=args.width)
        print(f"{args.png}: {len(reply['regions'])} region(s)")
        return 0
    try:
        result = client.execute(args.command, **arguments)
    except MonitorError as exc:
        if exc.error_class == ErrorClass.COMMAND_NOT_FOUND:
            offered = ", ".join([*client.commands, "mappings", "map"])
            raise MonitorError(exc.error_class, f"{exc.desc}; commands: {offered}") from exc
        raise
    print(json.dumps(result, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "map" and args.png is None:
        parser.error("map needs --png FILE")
    if args.png is not None and args.command != "map":
        parser.error("--png goes with map")
    try:
        for text in args.arguments:
            parse_argument(text)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        client = MonitorClient(args.socket, timeout=args.timeout)
    except (OSError, ValueError) as exc:
        print(f"{PROG}: cannot talk to {args.socket}: {exc}", file=sys.stderr)
        return 1
    with client:
        try:
            return run(args, client)
        except MonitorError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
        except (OSError, ValueError) as exc:  # the connection broke, a bad reply, the PNG
            print(f"{PROG}: {exc}", file=sys.stderr)
    return 1
