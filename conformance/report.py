"""The report three ways: a terminal table, Markdown with the evidence, and stable JSON.

JSON format 1 is the contract CI relies on: ``tool``, ``format``, ``backend`` (command,
socket, virtio id), ``checks`` (id, group, title, verdict, detail, spec, sent, received) and
``summary`` (a count per verdict). Fields may be added, never renamed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from conformance.verdict import Check, Verdict

TOOL = "virtio-emu check-backend"
FORMAT = 1
_COLOURS = {Verdict.PASS: "32", Verdict.FAIL: "31", Verdict.WARN: "33", Verdict.NA: "2"}


@dataclass(frozen=True)
class BackendInfo:
    command: list[str] | None
    socket: str
    virtio_id: int | None
    date: str
    notes: list[str] = field(default_factory=list)
    version: str | None = None
    title: str | None = None


def tool_version() -> str:
    try:
        return metadata.version("virtio-shmem-emu")
    except metadata.PackageNotFoundError:
        return "unknown"


def summary(checks: Sequence[Check]) -> dict[str, int]:
    counts = {str(v): 0 for v in Verdict}
    for check in checks:
        counts[str(check.verdict)] += 1
    return counts


def to_json(info: BackendInfo, checks: Sequence[Check]) -> dict[str, Any]:
    return {
        "tool": TOOL,
        "format": FORMAT,
        "backend": {
            "command": info.command,
            "socket": info.socket,
            "virtio_id": info.virtio_id,
            "version": info.version,
        },
        "checks": [check.to_json() for check in checks],
        "summary": summary(checks),
    }


def json_text(info: BackendInfo, checks: Sequence[Check]) -> str:
    return json.dumps(to_json(info, checks), indent=2) + "\n"


def table(checks: Sequence[Check], *, colour: bool, width: int | None = None) -> str:
    """group, check, verdict, one-line detail; the detail is cut to the terminal's width."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    names = [c.id.split(".", 1)[1] for c in checks]
    w_group = max(len("group"), *(len(c.group) for c in checks))
    w_name = max(len("check"), *(len(n) for n in names))
    w_verdict = 7
    room = max(20, width - w_group - w_name - w_verdict - 6)
    lines = [f"{'group':<{w_group}}  {'check':<{w_name}}  {'verdict':<{w_verdict}}  detail"]
    for check, name in zip(checks, names, strict=True):
        detail = " ".join(check.detail.split())
        if len(detail) > room:
            detail = detail[: room - 1] + "…"
        verdict = f"{check.verdict:<{w_verdict}}"
        if colour:
            verdict = f"\x1b[{_COLOURS[check.verdict]}m{verdict}\x1b[0m"
        lines.append(f"{check.group:<{w_group}}  {name:<{w_name}}  {verdict}  {detail}")
    counts = summary(checks)
    lines.append(", ".join(f"{n} {v}" for v, n in counts.items()))
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def markdown(info: BackendInfo, checks: Sequence[Check]) -> str:
    """A header (back-end, virtio id, date, notes), the table, then every failure and warning
    with what was sent and received and the spec sentence."""
    command = " ".join(info.command) if info.command else "(already running)"
    out = [
        f"# {info.title or f'{TOOL} report'}",
        "",
        f"- back-end: `{command}`",
        *([f"- back-end version: {info.version}"] if info.version else []),
        f"- socket: `{info.socket}`",
        f"- virtio id: {info.virtio_id if info.virtio_id is not None else 'unknown'}",
        f"- date: {info.date}",
        f"- tool: {TOOL} (virtio-shmem-emu {tool_version()})",
    ]
    out += [f"- note: {_cell(note)}" for note in info.notes]
    counts = summary(checks)
    out += ["", "Summary: " + ", ".join(f"{n} {v}" for v, n in counts.items()), ""]
    out += ["| group | check | verdict | detail |", "|---|---|---|---|"]
    for c in checks:
        name = c.id.split(".", 1)[1]
        out.append(f"| {c.group} | {name} | {c.verdict} | {_cell(c.detail)} |")
    flagged = [c for c in checks if c.verdict in (Verdict.FAIL, Verdict.WARN)]
    if flagged:
        out += ["", "## Failures and warnings"]
    for c in flagged:
        out += ["", f"### {c.id}: {c.verdict}", "", _cell(c.detail), "", f"Spec: {c.spec}"]
        if c.sent is not None:
            out += ["", f"Sent: `{c.sent}`"]
        if c.received is not None:
            out += ["", f"Received: `{c.received}`"]
    return "\n".join(out) + "\n"
