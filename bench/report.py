"""Benchmark results: figures as min/median/max over repeated samples, ratios, the table.

Every figure keeps its raw samples' summary, so a reader can tell noise (a wide min..max on a
shared machine) from a real difference. Ratios are always taken between medians measured in the
same run, side by side; comparing against numbers from another run would hide the machine load.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vm.qemu import HostBinaries
from vm.toolchain import ensure_toolchain

log = logging.getLogger(__name__)

SHARED_MACHINE_NOTE = (
    "numbers were taken on a shared 2-core machine (other engineers boot VMs on the same cores); "
    "guests run under TCG, not KVM"
)


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured quantity: its samples' min/median/max and what it is compared with."""

    key: str
    unit: str
    minimum: float
    median: float
    maximum: float
    count: int
    target: str = ""
    met: bool | None = None
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "unit": self.unit,
            "min": self.minimum,
            "median": self.median,
            "max": self.maximum,
            "n": self.count,
        }
        if self.target:
            data["target"] = self.target
            data["met"] = self.met
        if self.note:
            data["note"] = self.note
        return data


@dataclass
class Report:
    """Everything one ``python -m bench`` run measured, in the order it was measured."""

    mode: str
    figures: dict[str, Figure] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def add(
        self,
        key: str,
        samples: Sequence[float],
        unit: str,
        *,
        target: str = "",
        met: bool | None = None,
        note: str = "",
    ) -> Figure:
        """Record ``samples`` (at least one) under ``key``; later calls replace earlier ones."""
        if not samples:
            raise ValueError(f"{key}: no samples")
        values = sorted(float(s) for s in samples)
        figure = Figure(
            key,
            unit,
            values[0],
            statistics.median(values),
            values[-1],
            len(values),
            target,
            met,
            note,
        )
        self.figures[key] = figure
        return figure

    def ratio(
        self,
        key: str,
        numerator: str,
        denominator: str,
        *,
        target: str = "",
        limit: float | None = None,
        at_most: bool = True,
        note: str = "",
    ) -> Figure | None:
        """Median of ``numerator`` over median of ``denominator`` (both already recorded).

        The min and max are the extreme ratios the two ranges allow, so the spread stays honest.
        ``limit`` with ``at_most`` checks ``ratio <= limit`` (else ``>=``).
        """
        top = self.figures.get(numerator)
        bottom = self.figures.get(denominator)
        if top is None or bottom is None or bottom.median == 0 or bottom.minimum <= 0:
            return None
        value = top.median / bottom.median
        met = (
            None if limit is None or not target else (value <= limit if at_most else value >= limit)
        )
        figure = Figure(
            key,
            "ratio",
            top.minimum / bottom.maximum,
            value,
            top.maximum / bottom.minimum,
            min(top.count, bottom.count),
            target,
            met,
            note or f"{numerator} / {denominator}",
        )
        self.figures[key] = figure
        return figure

    def as_json(self, machine: dict[str, Any]) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "duration_s": round(time.time() - self.started, 1),
            "note": SHARED_MACHINE_NOTE,
            "machine": machine,
            "figures": {key: fig.as_json() for key, fig in self.figures.items()},
            "details": self.details,
            "errors": self.errors,
        }

    def write(self, path: Path, machine: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_json(machine), indent=2, sort_keys=False) + "\n")

    def table(self) -> str:
        """A fixed-width text table: one line per figure, targets and whether they were met."""
        rows = [("figure", "unit", "min", "median", "max", "n", "target", "met")]
        for fig in self.figures.values():
            met = "" if fig.met is None else ("yes" if fig.met else "NO")
            rows.append(
                (
                    fig.key,
                    fig.unit,
                    _num(fig.minimum),
                    _num(fig.median),
                    _num(fig.maximum),
                    str(fig.count),
                    fig.target,
                    met,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = []
        for index, row in enumerate(rows):
            cells = [
                cell.ljust(widths[i]) if i in (0, 1, 6) else cell.rjust(widths[i])
                for i, cell in enumerate(row)
            ]
            lines.append("  ".join(cells).rstrip())
            if index == 0:
                lines.append("  ".join("-" * w for w in widths))
        for key, error in self.errors.items():
            lines.append(f"ERROR {key}: {error}")
        return "\n".join(lines)


def _num(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e5:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.3f}"
    return f"{value:.4g}"


def _command(argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=30, check=False, env=env
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable: {exc}"
    return (
        (proc.stdout or proc.stderr).strip().splitlines()[0] if proc.stdout or proc.stderr else ""
    )


def machine_info(with_vm_toolchain: bool) -> dict[str, Any]:
    """Host, load and versions, so numbers can be read against the machine they came from."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    repo = Path(__file__).resolve().parents[1]
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "git_commit": _command(["git", "-C", str(repo), "rev-parse", "HEAD"]),
        "max_map_count": _read_int("/proc/sys/vm/max_map_count"),
    }
    if with_vm_toolchain:
        try:
            toolchain = ensure_toolchain()
            binaries = HostBinaries(toolchain.host_root)
            manifest = toolchain.read_manifest()
            info["qemu"] = _command(binaries.qemu_argv("--version"), binaries.env())
            info["qemu_storage_daemon"] = _command(
                binaries.storage_daemon_argv("--version"), binaries.env()
            )
            info["guest_kernel"] = manifest.get("kernel_release")
            info["accel"] = "tcg (the benchmarks boot every guest with accel=tcg)"
        except Exception as exc:  # versions are informative; a missing toolchain is reported
            info["vm_toolchain_error"] = str(exc)
    return info


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None
