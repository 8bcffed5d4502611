"""``virtio-emu trace FILE``: the ``--trace`` file as a readable, filterable timeline.

One line per record: its line number in the file, the time since the file's first record, the
socket (``vfio-user``, ``vhost-user-frontend``, ``vhost-user-backend``), an arrow (``-->`` a
message the emulator received, ``<--`` one it sent, as in its ``-v`` log), the message name and
a summary of sizes, fds and payload fields. Replies are paired with their requests: on
vfio-user by message id, on vhost-user by request type and order on the socket (the oldest
unanswered request of that type), so a REPLY_ACK status pairs too; the reply line names the
request's line and the latency. Refusals (a vfio-user error reply, a message the codec refused,
a non-zero REPLY_ACK or SHMEM_MAP/UNMAP status) are marked ``!`` and red on a terminal.

Pairing and relative times always see every record; the filters only choose what is printed.
A line that is not a trace record is reported on stderr with its number and skipped.
"""

from __future__ import annotations

import argparse
import errno
import fnmatch
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from vhost_user.messages import BACKEND_SPECS, FRONTEND_SPECS, BackendReq, FrontendReq

PROG = "virtio-emu trace"
ARROWS = {"in": "-->", "out": "<--"}
#: Unanswered requests kept per (socket, type): bounds memory when a peer never acks.
PENDING_PER_TYPE = 64
RED, RESET = "\x1b[31;1m", "\x1b[0m"


@dataclass(frozen=True, slots=True)
class Entry:
    """One valid trace record, with the line it came from."""

    line: int
    t: float
    channel: str
    direction: str
    cmd: str
    record: dict[str, Any]
    text: str

    @property
    def msg_id(self) -> int | None:
        value = self.record.get("id")
        return value if isinstance(value, int) else None


@dataclass(frozen=True, slots=True)
class Shown:
    """An entry as the timeline shows it: its request if it is a reply, its refusal if any."""

    entry: Entry
    request: Entry | None
    refusal: str | None


def parse_line(line: int, text: str) -> Entry:
    """The record on ``text``; ``ValueError`` says why it is not one."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    t, channel, direction, cmd = (record.get(k) for k in ("t", "channel", "dir", "cmd"))
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise ValueError("no numeric 't'")
    if not isinstance(channel, str) or not isinstance(cmd, str):
        raise ValueError("no 'channel' or 'cmd' string")
    if direction not in ARROWS:
        raise ValueError(f"'dir' is {direction!r}, not 'in' or 'out'")
    for key in ("id", "size", "nfds", "error"):
        if key in record and (isinstance(record[key], bool) or not isinstance(record[key], int)):
            raise ValueError(f"{key!r} is not an integer")
    return Entry(line, float(t), channel, direction, cmd, record, text.rstrip("\n"))


class Timeline:
    """Pairs replies with requests and finds refusals, one entry at a time (so it can follow)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self._by_id: dict[tuple[str, int], Entry] = {}
        self._by_type: dict[tuple[str, str], deque[Entry]] = {}

    def add(self, entry: Entry) -> Shown:
        if self.start is None:
            self.start = entry.t
        request = self._pair(entry)
        return Shown(entry, request, refusal(entry, request))

    def _pair(self, entry: Entry) -> Entry | None:
        if entry.msg_id is not None:  # vfio-user: the id names the request
            key = (entry.channel, entry.msg_id)
            pending = self._by_id.get(key)
            if pending is not None and pending.direction != entry.direction:
                del self._by_id[key]
                return pending if pending.cmd == entry.cmd else None
            self._by_id[key] = entry  # a request; one with this id before it got no reply
            return None
        queue = self._by_type.setdefault((entry.channel, entry.cmd), deque(maxlen=PENDING_PER_TYPE))
        if queue and queue[0].direction != entry.direction:
            return queue.popleft()
        queue.append(entry)
        return None


def _ack_only(channel: str, cmd: str) -> bool:
    """Whether the reply to ``cmd`` on ``channel`` is a REPLY_ACK-style u64 status."""
    try:
        if channel == "vhost-user-frontend":
            return not FRONTEND_SPECS[FrontendReq[cmd]].reply
        if channel == "vhost-user-backend":
            return not BACKEND_SPECS[BackendReq[cmd]].reply
    except KeyError:
        pass
    return False


def _errno_text(code: int) -> str:
    return f"{code} ({errno.errorcode[code]})" if code in errno.errorcode else str(code)


def refusal(entry: Entry, request: Entry | None) -> str | None:
    """What marks ``entry`` as a refusal, or None."""
    code = entry.record.get("error")
    if code:
        return f"error={_errno_text(code)}"
    if entry.cmd.startswith("invalid:"):
        return "invalid message"
    payload = entry.record.get("payload")
    if request is not None and _ack_only(entry.channel, entry.cmd) and isinstance(payload, dict):
        status = payload.get("value")
        if isinstance(status, int) and status:
            return f"status={_errno_text(status)}"
    return None


# -- rendering ---------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """Microseconds below 1 ms, then milliseconds, then seconds (rounded before choosing)."""
    if round(seconds * 1e6) < 1000:
        return f"{seconds * 1e6:.0f} us"
    if round(seconds * 1e3, 2) < 1000:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def _value(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value) if 0 <= value < 10 else hex(value)
    if isinstance(value, dict):
        if set(value) == {"len"}:
            return f"{value['len']}B"
        return "{" + summary(value) + "}"
    if isinstance(value, list):
        items = list(value)
        while items and items[-1] in (0, None):  # fixed arrays padded with zeros
            items.pop()
        shown = ", ".join(_value(v) for v in items[:4])
        return f"[{shown}{f', ...+{len(items) - 4}' if len(items) > 4 else ''}]"
    text = str(value)
    return text if len(text) <= 48 else text[:45] + "..."


def summary(payload: dict[str, Any]) -> str:
    """Payload fields as ``name=value``; empty data and ``argsz`` left out."""
    return " ".join(
        f"{k}={_value(v)}" for k, v in payload.items() if k != "argsz" and v != {"len": 0}
    )


def render(shown: Shown, start: float, *, colour: bool) -> str:
    entry, record = shown.entry, shown.entry.record
    parts = [f"{entry.t - start:11.6f}", f"{entry.channel:<19}", ARROWS[entry.direction], entry.cmd]
    if entry.msg_id is not None:
        parts.append(f"#{entry.msg_id}")
    if shown.request is not None:
        latency = duration(max(entry.t - shown.request.t, 0.0))
        parts.append(f"reply to {shown.request.line} ({latency})")
    if shown.refusal:
        parts.append(f"REFUSED {shown.refusal}")
    wire = [f"{record['size']} B"] if "size" in record else []
    nfds = record.get("nfds", 0)
    wire += [f"{nfds} fd{'s' if nfds > 1 else ''}"] if nfds else []
    if wire:
        parts.append(f"[{', '.join(wire)}]")
    payload = record.get("payload")
    asked = shown.request.record.get("payload") if shown.request is not None else None
    if shown.request is not None and _ack_only(entry.channel, entry.cmd):
        if not shown.refusal and isinstance(payload, dict):
            parts.append(f"status={_value(payload.get('value'))}")
    elif isinstance(payload, dict):
        if isinstance(asked, dict) and entry.msg_id is not None:
            # vfio-user replies echo the request's fields: show what the reply adds
            payload = {k: v for k, v in payload.items() if k not in asked or asked[k] != v}
        parts.append(summary(payload))
    elif payload is not None:
        parts.append(_value(payload))
    text = f"{'!' if shown.refusal else ' '}{entry.line:>6} " + " ".join(p for p in parts if p)
    return f"{RED}{text}{RESET}" if colour and shown.refusal else text


# -- reading -----------------------------------------------------------------------------------


def lines(stream: IO[bytes], *, follow: bool, poll: float) -> Iterator[tuple[int, str]]:
    """Numbered lines; with ``follow``, wait for more at the end (a partial line waits too)."""
    number, partial = 0, b""
    while True:
        chunk = stream.readline()
        if chunk:
            partial += chunk
            if partial.endswith(b"\n"):
                number += 1
                yield number, partial.decode("utf-8", "replace")
                partial = b""
            continue
        if not follow:
            if partial:
                yield number + 1, partial.decode("utf-8", "replace")
            return
        time.sleep(poll)


def selected(entry: Entry, sockets: Sequence[str], types: Sequence[str]) -> bool:
    channel, cmd = entry.channel.lower(), entry.cmd.lower()
    if sockets and not any(s in channel for s in sockets):
        return False
    return not types or any(fnmatch.fnmatchcase(cmd, t) for t in types)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Show a --trace file as a timeline: replies paired with their requests, "
        "latency on the reply line, refusals marked '!' (red on a terminal). Arrows as in the "
        "-v log: '-->' received by the emulator, '<--' sent by it.",
    )
    parser.add_argument("file", type=Path, metavar="FILE", help="the file --trace wrote")
    parser.add_argument(
        "--socket",
        action="append",
        default=[],
        metavar="NAME",
        help="only this socket (repeatable; part of the name is enough: vfio, frontend, backend)",
    )
    parser.add_argument(
        "--type",
        action="append",
        default=[],
        metavar="NAME",
        help="only messages of this name (repeatable, case-insensitive, globs: 'shmem_*')",
    )
    parser.add_argument(
        "-f", "--follow", action="store_true", help="keep reading as the file grows (Ctrl-C stops)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the selected records as JSON lines, unchanged"
    )
    parser.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour refusals (auto: when stdout is a terminal and NO_COLOR is unset)",
    )
    parser.add_argument(
        "--poll", type=float, default=0.1, metavar="SECONDS", help=argparse.SUPPRESS
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    colour = args.color == "always" or (
        args.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    )
    sockets = [s.lower() for s in args.socket]
    types = [t.lower() for t in args.type]
    try:
        stream = args.file.open("rb")
    except OSError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    timeline = Timeline()
    try:
        with stream:
            for number, text in lines(stream, follow=args.follow, poll=args.poll):
                if not text.strip():
                    continue
                try:
                    entry = parse_line(number, text)
                except ValueError as exc:
                    print(f"{PROG}: {args.file}:{number}: skipped: {exc}", file=sys.stderr)
                    continue
                shown = timeline.add(entry)
                if not selected(entry, sockets, types):
                    continue
                start = timeline.start if timeline.start is not None else entry.t
                out = entry.text if args.json else render(shown, start, colour=colour)
                print(out, flush=args.follow)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (no flush error at exit)
    return 0
