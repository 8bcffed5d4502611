"""Figures 1 and 2: SHMEM_MAP/UNMAP round trips, and the emulator at scale.

A round trip is timed from the back-end library's ``shmem_map`` call to the front-end's reply
arriving back in it (the library waits for the u64 status): one message each way on the
back-end channel, the front-end's checks, the real ``mmap(MAP_FIXED)`` and its bookkeeping.
The headless variant has no QEMU attached, so it is the emulator's own cost; the VM variant
(bench.vm) measures the same calls with a running TCG guest, side by side with QEMU's native
front-end.

Where the time goes: around every call the emulator's process CPU clock and the calling
thread's CPU clock are read (outside the timed window), giving the front-end's share as
figures (``....frontend_cpu``) and the back-end library's CPU in ``details``. The two overlap
in time (each finishes its bookkeeping while the other already runs), so headless the critical
path is split separately on a traced emulator (``traced_map_split``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import socket
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench.procs import emulator_process, memfd, shmem_backend, wait_negotiated, workdir
from bench.report import Report
from emulator.trace import Tracer
from testkit.procfs import fd_count, rss_kib, vma_count
from vhost_user.messages import VhostUserMMap
from vhost_user_backend import daemon
from vhost_user_backend.daemon import VhostUserDaemon

log = logging.getLogger(__name__)

PAGE = 4096
MAP_SIZES = {"4KiB": 4 << 10, "2MiB": 2 << 20, "64MiB": 64 << 20}
#: Region size for the round-trip figures: a power of two (QEMU 11.1 aborts on others).
ROUND_TRIP_REGION = 128 << 20
SCALE_SIZES = (16, 1_024, 16_384, 65_536)
WARMUP = 3


#: Per front-end, per size label, per series: samples in microseconds. Series: ``map`` and
#: ``unmap`` (round trips), ``map.backend_cpu``/``unmap.backend_cpu`` (the calling thread's CPU
#: in the back-end library), and for a front-end whose pid is known ``map.frontend_cpu``/
#: ``unmap.frontend_cpu`` (that process's CPU over the call).
RoundTrips = dict[str, dict[str, dict[str, list[float]]]]

_libc = ctypes.CDLL(None, use_errno=True)


def process_cpu_clock(pid: int) -> Callable[[], int]:
    """A reader of process ``pid``'s CPU clock in nanoseconds (``clock_getcpuclockid``).

    Read from outside around one request, it is what the emulator (single-threaded, idle
    otherwise) spent on it: its wake-up, both recvmsg, decode, the checks, the mmap and the
    reply's sendmsg, with none of the socket hops or scheduling delays. No probe inside the
    emulator is needed, so the figure costs the emulator nothing.
    """
    clock = ctypes.c_int()
    err = _libc.clock_getcpuclockid(pid, ctypes.byref(clock))
    if err:
        raise OSError(err, f"clock_getcpuclockid({pid}): {os.strerror(err)}")
    clock_id = clock.value
    return lambda: time.clock_gettime_ns(clock_id)


def time_map_unmap(
    backend: VhostUserDaemon,
    fd: int,
    length: int,
    shm_offset: int = 0,
    frontend_cpu: Callable[[], int] | None = None,
) -> dict[str, float]:
    """One SHMEM_MAP and one SHMEM_UNMAP of ``length`` bytes of ``fd``: microseconds of round
    trip, of this thread's CPU in the library, and of the front-end's CPU when it can be read.

    The clocks are read outside the timed windows, so the round trips are the same as without.
    """
    wall, cpu = time.perf_counter_ns, time.thread_time_ns
    ours = frontend_cpu or (lambda: 0)
    out: dict[str, float] = {}
    for op, call in (
        ("map", partial(backend.shmem_map, 0, fd, 0, shm_offset, length, writable=True)),
        ("unmap", partial(backend.shmem_unmap, 0, shm_offset, length)),
    ):
        front0 = ours()
        cpu0 = cpu()
        start = wall()
        call()
        end = wall()
        cpu1 = cpu()
        front1 = ours()
        out[op] = (end - start) / 1e3
        out[f"{op}.backend_cpu"] = (cpu1 - cpu0) / 1e3
        if frontend_cpu is not None:
            out[f"{op}.frontend_cpu"] = (front1 - front0) / 1e3
    return out


def round_trips(
    backends: dict[str, VhostUserDaemon],
    reps: int,
    sizes: dict[str, int] = MAP_SIZES,
    *,
    frontend_pids: Mapping[str, int] | None = None,
) -> RoundTrips:
    """Samples per front-end and size, front-ends interleaved rep by rep.

    Interleaving means a burst of load from another engineer's VM hits both sides alike.
    ``frontend_pids`` names the front-ends whose process CPU is read around each call.
    """
    clocks = {name: process_cpu_clock(pid) for name, pid in (frontend_pids or {}).items()}
    fds = {label: memfd(size, f"rt-{label}") for label, size in sizes.items()}
    out: RoundTrips = {name: {label: {} for label in sizes} for name in backends}
    try:
        for rep in range(reps + WARMUP):
            for label, size in sizes.items():
                for name, backend in backends.items():
                    sample = time_map_unmap(backend, fds[label], size, 0, clocks.get(name))
                    if rep >= WARMUP:
                        for series, value in sample.items():
                            out[name][label].setdefault(series, []).append(value)
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def record_round_trips(
    report: Report, results: RoundTrips, prefix: str, *, note: str = ""
) -> dict[str, Any]:
    """Figures ``PREFIX.FRONTEND.OP.SIZE`` (round trips) and ``....frontend_cpu`` (the
    front-end's CPU, where measured); returns the breakdown of each median round trip for
    ``details``: the back-end library's CPU, the front-end's CPU, and the rest (socket hops,
    wake-ups, time spent runnable but not running)."""
    breakdown: dict[str, Any] = {}
    for name, per_size in results.items():
        for label, series in per_size.items():
            for op in ("map", "unmap"):
                key = f"{prefix}.{name}.{op}.{label}"
                report.add(key, series[op], "us", note=note)
                parts = {
                    "round_trip": _median(series[op]),
                    "backend_library_cpu": _median(series[f"{op}.backend_cpu"]),
                }
                front = series.get(f"{op}.frontend_cpu")
                if front is not None:
                    report.add(
                        f"{key}.frontend_cpu",
                        front,
                        "us",
                        note="the emulator's process CPU over the call (its share)",
                    )
                    parts["frontend_cpu"] = _median(front)
                    parts["frontend_share"] = parts["frontend_cpu"] / (parts["round_trip"] or 1)
                parts["rest: socket hops, wake-ups, waiting to run"] = max(
                    0.0,
                    parts["round_trip"]
                    - parts["backend_library_cpu"]
                    - parts.get("frontend_cpu", 0.0),
                )
                breakdown.setdefault(name, {})[f"{op}.{label}"] = {
                    k: round(v, 3) for k, v in parts.items()
                }
    return breakdown


def run_headless_round_trips(report: Report, reps: int) -> None:
    """Figure 1 without a guest: the emulator's own SHMEM_MAP/UNMAP round trip."""
    with workdir("bench-rt-") as wd:
        sock = wd / "backend.sock"
        with (
            shmem_backend(sock, [(0, ROUND_TRIP_REGION)]) as (_, backend),
            emulator_process(wd, ["--virtio-id", "4", "--vhost-user-socket", str(sock)]) as emu,
        ):
            wait_negotiated(backend)
            results = round_trips({"ours": backend}, reps, frontend_pids={"ours": emu.pid})
    report.details["fig1_headless_breakdown_us"] = record_round_trips(
        report, results, "fig1_headless", note="no QEMU attached: the emulator's own cost"
    )
    report.details["fig1_headless_map_split_us"] = traced_map_split(min(reps, 50))


#: Where a traced map's wall time goes, in order along the critical path. The emulator writes
#: one trace record after decoding the request and one before sending the reply; each falls in
#: the step named with it.
SPLIT_STEPS = (
    "library: call to sendmsg (checks, build, encode)",
    "library: sendmsg",
    "hop + emulator: wake-up, recvmsg, decode",
    "emulator: dispatch, checks, mmap, reply built (+ the 'in' trace record)",
    "emulator: sendmsg + hop + library wake-up (+ the 'out' trace record)",
    "library: decode reply, return",
)


class _LibraryStamps:
    """Wall-clock stamps (``time.time_ns``) around the back-end library's socket calls on one
    thread: ``send_with_fds`` and ``recv_with_fds`` as ``vhost_user_backend.daemon`` calls
    them, wrapped for the duration of a ``with`` block (the real calls still run)."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.sends: list[tuple[int, int]] = []
        self.first_recv: list[int] = []
        self._recv_seen = False

    def __enter__(self) -> _LibraryStamps:
        names = vars(daemon)
        self._send, self._recv = names["send_with_fds"], names["recv_with_fds"]
        send, recv = self._send, self._recv

        def stamped_send(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
            mine = threading.get_ident() == self.thread
            start = time.time_ns()
            send(sock, data, fds)
            if mine:
                self.sends.append((start, time.time_ns()))
                self._recv_seen = False

        def stamped_recv(sock: socket.socket, size: int, **kw: Any) -> tuple[bytes, list[int]]:
            got: tuple[bytes, list[int]] = recv(sock, size, **kw)
            if threading.get_ident() == self.thread and not self._recv_seen:
                self.first_recv.append(time.time_ns())
                self._recv_seen = True
            return got

        names["send_with_fds"], names["recv_with_fds"] = stamped_send, stamped_recv
        return self

    def __exit__(self, *exc: object) -> None:
        vars(daemon).update(send_with_fds=self._send, recv_with_fds=self._recv)


def _tracer_cost_us(wd: Path, count: int = 2000) -> float:
    """What one backend-channel trace record costs (the emulator writes the same records)."""
    tracer = Tracer(wd / "cost.jsonl")
    payload = VhostUserMMap(0, 0, 0, 4096, 1)
    start = time.perf_counter_ns()
    for _ in range(count):
        tracer.record("vhost-user-backend", "in", "SHMEM_MAP", nfds=1, payload=payload)
    cost = (time.perf_counter_ns() - start) / count / 1e3
    tracer.close()
    return cost


def traced_map_split(reps: int, sizes: dict[str, int] = MAP_SIZES) -> dict[str, dict[str, float]]:
    """Median wall time of each step of a SHMEM_MAP round trip, per size, headless.

    A separate emulator runs with ``--trace``: its records' times mark when it had decoded the
    request and when it was about to send the reply; the back-end library's socket calls are
    stamped in this process (``_LibraryStamps``). Both clocks are CLOCK_REALTIME on one
    machine. The two trace records (JSON and a write each) lengthen the round trip; what one
    costs, timed apart in this process, is reported next to the steps, not subtracted (under
    load that estimate is too noisy to subtract).
    """
    samples: dict[str, dict[str, list[float]]] = {label: {} for label in sizes}
    with workdir("bench-rt-trace-") as wd:
        trace = wd / "trace.jsonl"
        sock = wd / "backend.sock"
        cost = _tracer_cost_us(wd)
        calls: list[tuple[str, int, int]] = []
        with (
            shmem_backend(sock, [(0, ROUND_TRIP_REGION)]) as (_, backend),
            emulator_process(
                wd, ["--virtio-id", "4", "--vhost-user-socket", str(sock), "--trace", str(trace)]
            ),
        ):
            wait_negotiated(backend)
            fds = {label: memfd(size, f"split-{label}") for label, size in sizes.items()}
            try:
                with _LibraryStamps() as stamps:
                    for _ in range(reps + WARMUP):
                        for label, size in sizes.items():
                            start = time.time_ns()
                            backend.shmem_map(0, fds[label], 0, 0, size, writable=True)
                            calls.append((label, start, time.time_ns()))
                            backend.shmem_unmap(0, 0, size)
            finally:
                for fd in fds.values():
                    os.close(fd)
        records = [json.loads(line) for line in trace.read_text().splitlines()]
    ins = [r["t"] for r in records if _is_map(r, "in")]
    outs = [r["t"] for r in records if _is_map(r, "out")]
    # Every call made one map and one unmap: the library's sends and receives alternate.
    map_sends, map_recvs = stamps.sends[::2], stamps.first_recv[::2]
    if not len(calls) == len(ins) == len(outs) == len(map_sends) == len(map_recvs):
        raise RuntimeError(
            f"traced split: {len(calls)} calls, {len(ins)}/{len(outs)} trace records, "
            f"{len(map_sends)}/{len(map_recvs)} library stamps"
        )
    for index, (label, start, end) in enumerate(calls):
        if index < WARMUP * len(sizes):
            continue
        sent0, sent1 = map_sends[index]
        t_in, t_out = ins[index] * 1e9, outs[index] * 1e9
        steps = (
            sent0 - start,
            sent1 - sent0,
            t_in - sent1,
            t_out - t_in,
            map_recvs[index] - t_out,
            end - map_recvs[index],
        )
        for name, ns in zip(SPLIT_STEPS, steps, strict=True):
            samples[label].setdefault(name, []).append(ns / 1e3)
        samples[label].setdefault("round trip (traced)", []).append((end - start) / 1e3)
    out = {
        label: {name: round(_median(values), 1) for name, values in steps_.items()}
        for label, steps_ in samples.items()
    }
    for per_size in out.values():
        per_size["one trace record, timed apart"] = round(cost, 1)
    return out


def _is_map(record: dict[str, Any], direction: str) -> bool:
    return bool(
        record.get("channel") == "vhost-user-backend"
        and record.get("dir") == direction
        and record.get("cmd") == "SHMEM_MAP"
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
