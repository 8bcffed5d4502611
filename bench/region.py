"""Figure 3, host side: the emulator's own CPU time per REGION_READ/WRITE, and where it goes.

The emulator runs in this process on a thread of its own (its event loop, its server, a real
mmap'ed memfd in BAR 4); a QEMU-like ``VfioUserClient`` drives it in lockstep over a real UNIX
socket. The server thread's CPU clock (``pthread_getcpuclockid``) gives its CPU time per message
without counting the client. A BAR 4 read is served by the C hot path (emulator/hotpath/): the
per-stage breakdown times its one call, ``HotPath.drain`` on a socket holding one request
(recvmsg, the checks, process_vm_readv into the reply, send, and cffi's call overhead), with
the same BAR; the rest of the per-message CPU time is Python's: the event loop's wake-up,
``_on_readable`` and folding C's counts into the monitor's. A cProfile of the server thread
lists the heaviest functions (the C part shows as one builtin, ``hp_drain``).

The floor (``bench/floor.c``, a minimal C server answering from the same kind of mapping) is
driven by the same client, loop and counts over the same kind of socket, its rounds interleaved
with ours, and its own thread CPU clock read around each batch as ours is: the ratios
``fig3.ratio.ours_vs_floor.*`` say how far the emulator is from what the work itself costs.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import pstats
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import floor
from bench.procs import REPO, memfd, workdir
from bench.report import Report
from emulator.app import Emulator
from emulator.config import EmulatorConfig
from emulator.pci.device import RegionIndex
from emulator.vfio_user import messages as m
from emulator.vfio_user.client import VfioUserClient
from emulator.vfio_user.codec import Message, encode
from emulator.vfio_user.hotpath import STATUS_MASK, Drain, HotPath

BAR4 = RegionIndex.BAR4
RAM_SIZE = 16 << 20
REGION_SIZE = 1 << 20
MAPPED = 64 << 10
TARGET_US = 10.0
#: The issue's target: emulator CPU per REGION_READ at most twice the C floor's.
FLOOR_RATIO_TARGET = 2.0


@contextlib.contextmanager
def in_process_emulator(wd: Path, profile: cProfile.Profile | None = None) -> Iterator[Emulator]:
    """A standalone emulator (shared-memory region 0 of 1 MiB, 64 KiB mapped) on a thread."""
    config = EmulatorConfig(
        vfio_user_socket=wd / "emu.sock", virtio_id=4, shmem_regions={0: REGION_SIZE}
    )
    emulator = Emulator(config)
    try:
        assert emulator.shmem is not None
        fd = memfd(MAPPED, "bar4")
        emulator.shmem.map(0, fd, 0, 0, MAPPED, writable=True)
        emulator.server.listen()
        run: Callable[[], None] = emulator.loop.run
        if profile is not None:
            prof = profile

            def run() -> None:
                prof.runcall(emulator.loop.run)

        thread = threading.Thread(target=run, name="emulator-loop", daemon=True)
        thread.start()
        emulator.thread = thread  # type: ignore[attr-defined]
        try:
            yield emulator
        finally:
            emulator.loop.stop("benchmark done")
            thread.join(10)
    finally:
        emulator.close()


def _thread_cpu_ns(thread: threading.Thread) -> int:
    assert thread.ident is not None
    return time.clock_gettime_ns(time.pthread_getcpuclockid(thread.ident))


def _client(emulator: Emulator) -> tuple[VfioUserClient, int]:
    ram = memfd(RAM_SIZE, "ram")
    client = VfioUserClient.connect(str(emulator.config.vfio_user_socket))
    client.startup(ram, RAM_SIZE)
    return client, ram


#: Per side, per round: what ``measure_cpu`` collects.
CPU_SERIES = ("read_cpu_us", "read_wall_us", "write_cpu_us", "write_wall_us", "pipelined_cpu_us")


@contextlib.contextmanager
def _client_process(path: Path) -> Iterator[Callable[[str, int], int]]:
    """``bench.region_client`` connected to ``path``: a function that runs ``op n`` in it and
    returns the client's wall time in nanoseconds."""
    client = subprocess.Popen(
        [sys.executable, "-m", "bench.region_client", str(path)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None
    stdin, stdout = client.stdin, client.stdout

    def command(op: str, n: int) -> int:
        stdin.write(f"{op} {n}\n")
        stdin.flush()
        return int(stdout.readline())

    try:
        if stdout.readline().strip() != "ready":
            raise RuntimeError(f"bench.region_client did not start on {path}")
        yield command
    finally:
        stdin.close()
        client.wait(30)
        stdout.close()


def measure_cpu(
    count: int, rounds: int, floor_binary: Path | None = None
) -> dict[str, dict[str, list[float]]]:
    """Per side (``ours``, and ``floor`` given its binary), per round: server CPU and client
    wall time per 8-byte read and per posted 8-byte write, and CPU per pipelined read.

    Each client is its own process (bench.region_client), so a server's CPU clock counts
    nothing but its work, syscalls included: the emulator thread's clock read from here, the
    floor's own thread clock read by the floor. The two sides alternate round by round, so a
    burst of load from another engineer's VM hits both alike.
    """
    out: dict[str, dict[str, list[float]]] = {}
    with (
        workdir("bench-region-") as wd,
        in_process_emulator(wd) as emulator,
        contextlib.ExitStack() as stack,
    ):
        thread: threading.Thread = emulator.thread  # type: ignore[attr-defined]
        sides: dict[str, tuple[Callable[[], int], Callable[[str, int], int]]] = {
            "ours": (
                lambda: _thread_cpu_ns(thread),
                stack.enter_context(_client_process(emulator.config.vfio_user_socket)),
            )
        }
        if floor_binary is not None:
            server = stack.enter_context(
                floor.serving(floor_binary, wd / "floor.sock", REGION_SIZE, MAPPED)
            )
            sides["floor"] = (server.cpu_ns, stack.enter_context(_client_process(server.path)))
        for side, (_, run) in sides.items():
            out[side] = {series: [] for series in CPU_SERIES}
            run("read", 500)  # warm up

        def command(side: str, op: str, n: int) -> tuple[float, float]:
            cpu_ns, run = sides[side]
            cpu0 = cpu_ns()
            wall = run(op, n)
            return (cpu_ns() - cpu0) / 1e3, wall / 1e3

        for _ in range(rounds):
            for side, series in out.items():
                cpu, wall = command(side, "read", count)
                series["read_cpu_us"].append(cpu / count)
                series["read_wall_us"].append(wall / count)
                cpu, wall = command(side, "write", count)
                series["write_cpu_us"].append(cpu / (count + 1))
                series["write_wall_us"].append(wall / (count + 1))
                batch = min(count, 2000)
                cpu, _ = command(side, "pipelined", batch)
                series["pipelined_cpu_us"].append(cpu / batch)
    return out


def profile_server(count: int, top: int = 15) -> list[dict[str, Any]]:
    """cProfile of the server thread over ``count`` reads: the heaviest functions by own time."""
    profile = cProfile.Profile()
    with workdir("bench-prof-") as wd, in_process_emulator(wd, profile) as emulator:
        client, ram = _client(emulator)
        try:
            for i in range(count):
                client.region_read(BAR4, (i * 8) & 0xFFF, 8)
        finally:
            client.close()
            os.close(ram)
    stats = pstats.Stats(profile, stream=io.StringIO())
    rows = []
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in raw.values()) or 1.0
    for (filename, line, name), (_, calls, tottime, cumtime, _) in sorted(
        raw.items(), key=lambda item: item[1][2], reverse=True
    )[:top]:
        rows.append(
            {
                "function": f"{_short(filename)}:{line}({name})",
                "calls": calls,
                "own_us_per_read": round(tottime / count * 1e6, 3),
                "cum_us_per_read": round(cumtime / count * 1e6, 3),
                "own_share": round(tottime / total, 3),
            }
        )
    return rows


def _short(filename: str) -> str:
    for marker in ("/emulator/", "/lib/python"):
        if marker in filename:
            return filename[filename.index(marker) + 1 :]
    return filename


def stage_breakdown(count: int) -> dict[str, float]:
    """Microseconds per REGION_READ in the C hot path's one call, timed alone."""
    with workdir("bench-stage-") as wd, in_process_emulator(wd) as emulator:
        shmem = emulator.shmem
        assert shmem is not None
        request, _ = encode(Message(m.Command.REGION_READ, 7, m.RegionAccess(0x40, BAR4, 8)))
        hot = HotPath(max_msg_size=m.DEFAULT_MAX_MSG_SIZE, max_fds=m.MAX_MAX_MSG_FDS)
        client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with client, server:
            hot.attach(server.fileno())
            hot.set_shmem(BAR4, shmem.host_address, shmem.bar_size, shmem.max_access)
            hot.set_negotiated(m.DEFAULT_MAX_DATA_XFER_SIZE)
            spent = 0
            for _ in range(count):
                client.send(request)
                start = time.perf_counter_ns()
                status = hot.drain()
                spent += time.perf_counter_ns() - start
                assert status & STATUS_MASK == Drain.IDLE and len(client.recv(64)) == 40
            hot.detach()
    return {"C drain (recvmsg, checks, process_vm_readv, reply, send)": spent / count / 1e3}


#: (figure suffix, series, note) for each side's per-message figures.
_CPU_FIGURES = (
    ("region_read_cpu", "read_cpu_us", "server thread CPU per 8-byte BAR 4 REGION_READ"),
    (
        "region_read_round_trip",
        "read_wall_us",
        "client wall time per lockstep 8-byte REGION_READ (client in its own process, no QEMU)",
    ),
    ("posted_write_cpu", "write_cpu_us", "server thread CPU per posted 8-byte REGION_WRITE"),
    ("posted_write_wall", "write_wall_us", ""),
    (
        "region_read_cpu_pipelined",
        "pipelined_cpu_us",
        "same reads sent back to back: the path without the sleep and wake-up",
    ),
)
#: The figures compared with the floor: ours / floor, each a median of the same run.
_FLOOR_RATIOS = {
    "region_read_cpu": (f"<= {FLOOR_RATIO_TARGET:g}", FLOOR_RATIO_TARGET),
    "region_read_round_trip": ("", None),
    "region_read_cpu_pipelined": ("", None),
}


def _floor_binary(report: Report, stack: contextlib.ExitStack) -> Path | None:
    """The floor, built into a work directory that ``stack`` removes; None (and an error in
    the report, ``fig3.floor``) when it cannot be built."""
    try:
        return floor.build(stack.enter_context(workdir("bench-floor-")))
    except floor.FloorUnavailable as exc:
        report.errors["fig3.floor"] = str(exc)
        return None


def run(report: Report, *, count: int, rounds: int, profile_count: int) -> None:
    with contextlib.ExitStack() as stack:
        binary = _floor_binary(report, stack)
        cpu = measure_cpu(count, rounds, binary)
        if binary is not None:
            report.details["fig3_floor_copy_ns"] = {
                **floor.copy_cost(binary, max(count, 100_000), MAPPED),
                "note": "thread CPU per 8-byte copy from a MAP_SHARED memfd: the floor's memcpy "
                "vs the process_vm_readv the emulator uses (no SIGBUS past a file's end)",
            }
    for side, prefix in (("ours", "fig3.inproc"), ("floor", "fig3.floor")):
        if side not in cpu:
            continue
        for suffix, series, note in _CPU_FIGURES:
            samples = cpu[side][series]
            target, met = "", None
            if side == "ours" and suffix == "region_read_cpu":
                target = f"< {TARGET_US:g} us"
                met = sorted(samples)[len(samples) // 2] < TARGET_US
            where = "C floor (bench/floor.c)" if side == "floor" else "emulator"
            report.add(
                f"{prefix}.{suffix}",
                samples,
                "us",
                target=target,
                met=met,
                note=f"{where}: {note}" if note else "",
            )
    if "floor" in cpu:
        for suffix, (target, limit) in _FLOOR_RATIOS.items():
            report.ratio(
                f"fig3.ratio.ours_vs_floor.{suffix}",
                f"fig3.inproc.{suffix}",
                f"fig3.floor.{suffix}",
                target=target,
                limit=limit,
                note="emulator / C floor, same client and loop, rounds interleaved",
            )
    stages = stage_breakdown(max(count, 2000))
    median_cpu = report.figures["fig3.inproc.region_read_cpu"].median
    stages["rest: event loop wake-up, _on_readable, folding C's counts"] = max(
        0.0, median_cpu - sum(stages.values())
    )
    report.details["fig3_region_read_stages_us"] = {k: round(v, 3) for k, v in stages.items()}
    report.details["fig3_region_read_profile"] = profile_server(profile_count)
