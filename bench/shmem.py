"""Figures 1 and 2: SHMEM_MAP/UNMAP round trips, and the emulator at scale.

A round trip is timed from the back-end library's ``shmem_map`` call to the front-end's reply
arriving back in it (the library waits for the u64 status): one message each way on the
back-end channel, the front-end's checks, the real ``mmap(MAP_FIXED)`` and its bookkeeping.
The headless variant has no QEMU attached, so it is the emulator's own cost; the VM variant
(bench.vm) measures the same calls with a running TCG guest, side by side with QEMU's native
front-end.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from bench.procs import emulator_process, memfd, shmem_backend, wait_negotiated, workdir
from bench.report import Report
from testkit.procfs import fd_count, rss_kib, vma_count
from vhost_user_backend.daemon import VhostUserDaemon

log = logging.getLogger(__name__)

PAGE = 4096
MAP_SIZES = {"4KiB": 4 << 10, "2MiB": 2 << 20, "64MiB": 64 << 20}
#: Region size for the round-trip figures: a power of two (QEMU 11.1 aborts on others).
ROUND_TRIP_REGION = 128 << 20
SCALE_SIZES = (16, 1_024, 16_384, 65_536)
WARMUP = 3


def time_map_unmap(
    backend: VhostUserDaemon, fd: int, length: int, shm_offset: int = 0
) -> tuple[float, float]:
    """One SHMEM_MAP and one SHMEM_UNMAP of ``length`` bytes of ``fd``, in microseconds."""
    clock = time.perf_counter_ns
    start = clock()
    backend.shmem_map(0, fd, 0, shm_offset, length, writable=True)
    mapped = clock()
    backend.shmem_unmap(0, shm_offset, length)
    done = clock()
    return (mapped - start) / 1e3, (done - mapped) / 1e3


def round_trips(
    backends: dict[str, VhostUserDaemon], reps: int, sizes: dict[str, int] = MAP_SIZES
) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """``{front-end: {size: (map_us, unmap_us)}}``, front-ends interleaved rep by rep.

    Interleaving means a burst of load from another engineer's VM hits both sides alike.
    """
    fds = {label: memfd(size, f"rt-{label}") for label, size in sizes.items()}
    out: dict[str, dict[str, tuple[list[float], list[float]]]] = {
        name: {label: ([], []) for label in sizes} for name in backends
    }
    try:
        for rep in range(reps + WARMUP):
            for label, size in sizes.items():
                for name, backend in backends.items():
                    map_us, unmap_us = time_map_unmap(backend, fds[label], size)
                    if rep >= WARMUP:
                        out[name][label][0].append(map_us)
                        out[name][label][1].append(unmap_us)
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def record_round_trips(
    report: Report,
    results: dict[str, dict[str, tuple[list[float], list[float]]]],
    prefix: str,
    *,
    note: str = "",
) -> None:
    for name, per_size in results.items():
        for label, (maps, unmaps) in per_size.items():
            report.add(f"{prefix}.{name}.map.{label}", maps, "us", note=note)
            report.add(f"{prefix}.{name}.unmap.{label}", unmaps, "us", note=note)


def run_headless_round_trips(report: Report, reps: int) -> None:
    """Figure 1 without a guest: the emulator's own SHMEM_MAP/UNMAP round trip."""
    with workdir("bench-rt-") as wd:
        sock = wd / "backend.sock"
        with (
            shmem_backend(sock, [(0, ROUND_TRIP_REGION)]) as (_, backend),
            emulator_process(wd, ["--virtio-id", "4", "--vhost-user-socket", str(sock)]),
        ):
            wait_negotiated(backend)
            results = round_trips({"ours": backend}, reps)
    record_round_trips(
        report, results, "fig1_headless", note="no QEMU attached: the emulator's own cost"
    )


def _timed(op: Callable[[], None]) -> float:
    start = time.perf_counter_ns()
    op()
    return (time.perf_counter_ns() - start) / 1e3


def run_scale(
    report: Report, sizes: Sequence[int] = SCALE_SIZES, probes: int = 500, repeats: int = 1
) -> None:
    """Figure 2: live 4 KiB mappings in one region, grown through ``sizes``.

    The mappings are consecutive pages of one memfd at consecutive BAR offsets, so the kernel
    merges their VMAs (vm.max_map_count is 65,530 here) and the emulator keeps no received fd
    (the mapping holds the file); the BAR-wide cap is raised to fit (the emulator's
    --max-mappings). At each
    size the per-op cost is measured at steady state: unmap a random live mapping, map it back.
    """
    top = max(sizes)
    region = max(PAGE, 1 << (top * PAGE - 1).bit_length())
    acc = _ScaleSamples(
        {s: {"map": [], "unmap": [], "rss": [], "fds": [], "vmas": [], "fill": []} for s in sizes}
    )
    for repeat in range(repeats):
        with workdir("bench-scale-") as wd:
            _scale_once(wd, region, sizes, probes, repeat=repeat, acc=acc)
    per_size, base, teardown = acc.per_size, acc.base, acc.teardown
    report.add("fig2.baseline.rss", base["rss"], "KiB", note="emulator RSS, back-end connected")
    report.add("fig2.baseline.fds", base["fds"], "fds")
    for size in sizes:
        data = per_size[size]
        report.add(f"fig2.{size}.map", data["map"], "us", note="steady state, random slot")
        report.add(f"fig2.{size}.unmap", data["unmap"], "us", note="steady state, random slot")
        report.add(f"fig2.{size}.fill_map", data["fill"], "us", note="growing to this size")
        report.add(f"fig2.{size}.rss", data["rss"], "KiB")
        growth = [
            (rss - rss0) * 1024 / size for rss, rss0 in zip(data["rss"], base["rss"], strict=True)
        ]
        report.add(
            f"fig2.{size}.rss_per_mapping",
            growth,
            "B",
            target="< 1024 B" if size >= 1024 else "",
            met=max(growth) < 1024 if size >= 1024 else None,
            note="(RSS - baseline) / live mappings; VMAs are kernel memory, not in RSS",
        )
        report.add(f"fig2.{size}.fds", data["fds"], "fds")
        report.add(f"fig2.{size}.vmas", data["vmas"], "VMAs", note="lines in /proc/PID/maps")
    report.add(f"fig2.teardown_unmap_from_{top}", teardown, "us")
    small = min(sizes)
    for op in ("map", "unmap"):
        report.ratio(
            f"fig2.ratio.{op}.{top}_vs_{small}",
            f"fig2.{top}.{op}",
            f"fig2.{small}.{op}",
            target="<= 2.0" if top >= 65_536 else "",
            limit=2.0,
        )


@dataclass
class _ScaleSamples:
    """What the scale runs collect, per size and at zero mappings."""

    per_size: dict[int, dict[str, list[float]]]
    base: dict[str, list[float]] = field(default_factory=lambda: {"rss": [], "fds": [], "vmas": []})
    teardown: list[float] = field(default_factory=list)


def _scale_once(
    wd: Path, region: int, sizes: Sequence[int], probes: int, *, repeat: int, acc: _ScaleSamples
) -> None:
    per_size, base, teardown = acc.per_size, acc.base, acc.teardown
    sock = wd / "backend.sock"
    top = max(sizes)
    with (
        shmem_backend(sock, [(0, region)]) as (_, backend),
        emulator_process(
            wd,
            ["--virtio-id", "4", "--vhost-user-socket", str(sock)],
            max_mappings=top + 1024,
        ) as emu,
    ):
        wait_negotiated(backend)
        fd = memfd(region, "scale")
        try:
            base["rss"].append(rss_kib(emu.pid))
            base["fds"].append(fd_count(emu.pid))
            base["vmas"].append(vma_count(emu.pid))

            def map_slot(slot: int) -> None:
                backend.shmem_map(0, fd, slot * PAGE, slot * PAGE, PAGE, writable=True)

            def unmap_slot(slot: int) -> None:
                backend.shmem_unmap(0, slot * PAGE, PAGE)

            live = 0
            rng = random.Random(repeat)
            for size in sorted(sizes):
                fill = [_timed(partial(map_slot, slot)) for slot in range(live, size)]
                live = size
                data = per_size[size]
                data["fill"].extend(fill)
                data["rss"].append(rss_kib(emu.pid))
                data["fds"].append(fd_count(emu.pid))
                data["vmas"].append(vma_count(emu.pid))
                for _ in range(probes):
                    slot = rng.randrange(size)
                    data["unmap"].append(_timed(partial(unmap_slot, slot)))
                    data["map"].append(_timed(partial(map_slot, slot)))
                log.info(
                    "scale %d: map %.0f us, rss %d KiB, %d fds, %d VMAs",
                    size,
                    sorted(data["map"])[len(data["map"]) // 2],
                    data["rss"][-1],
                    data["fds"][-1],
                    data["vmas"][-1],
                )
            teardown.extend(_timed(partial(unmap_slot, slot)) for slot in range(live))
        finally:
            os.close(fd)
