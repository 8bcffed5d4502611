"""``python -m bench [--short] [--no-vm] [--only SECTION ...] [--pin] [--output FILE]``.

Runs every benchmark, prints one table and writes the JSON report (default
``bench/results/latest.json``). A failing section is recorded under ``errors`` and the rest
still run, so one broken piece never hides the other numbers. ``--short`` runs everything
with small counts (what the test suite does); the full run takes several minutes, most of
it in the guests.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import region, shmem, vm
from bench.report import Report, machine_info

log = logging.getLogger("bench")

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.json"


def host_sections(short: bool) -> list[tuple[str, Callable[[Report], None]]]:
    """The benchmarks that need no guest, with their loop sizes for this mode."""
    if short:
        return [
            ("fig1.headless", lambda r: shmem.run_headless_round_trips(r, reps=5)),
            ("fig2.scale", lambda r: shmem.run_scale(r, sizes=(16, 1_024), probes=50)),
            ("fig3.inproc", lambda r: region.run(r, count=500, rounds=2, profile_count=300)),
        ]
    return [
        ("fig1.headless", lambda r: shmem.run_headless_round_trips(r, reps=200)),
        ("fig2.scale", lambda r: shmem.run_scale(r, probes=500, repeats=3)),
        ("fig3.inproc", lambda r: region.run(r, count=10_000, rounds=5, profile_count=5_000)),
    ]


def vm_sections(short: bool, pin: bool = False) -> list[tuple[str, Callable[[Report], None]]]:
    counts = vm.SHORT if short else vm.FULL
    sections: list[tuple[str, Callable[[Report], None]]] = [
        (name, lambda r, run=run: run(r, counts))  # type: ignore[misc]
        for name, run in vm.SECTIONS
    ]
    if pin:
        shmem = ("vm.shmem_boot", lambda r: vm.run_shmem_boot(r, counts, pin=True))
        sections = [shmem if name == shmem[0] else (name, run) for name, run in sections]
    return sections


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--short", action="store_true", help="small counts (the test suite)")
    parser.add_argument("--no-vm", action="store_true", help="skip everything that boots a guest")
    parser.add_argument(
        "--only", action="append", default=[], metavar="PREFIX", help="run matching sections"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="vm.shmem_boot: QEMU's vCPU threads on one CPU, everything else on the other",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, metavar="FILE")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    report = Report("short" if args.short else "full")
    sections = host_sections(args.short)
    if not args.no_vm:
        sections += vm_sections(args.short, args.pin)
    if args.only:
        sections = [s for s in sections if any(s[0].startswith(p) for p in args.only)]
    for name, run in sections:
        start = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            run(report)
        except Exception as exc:
            log.error("section %s failed: %s", name, exc)
            report.errors[name] = "".join(traceback.format_exception(exc))[-4000:]
        report.details.setdefault("section_seconds", {})[name] = round(time.monotonic() - start, 1)
    report.write(args.output, machine_info(with_vm_toolchain=not args.no_vm))
    print(report.table())
    print(f"\nJSON: {args.output}")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
