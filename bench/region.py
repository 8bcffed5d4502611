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


def measure_cpu(count: int, rounds: int) -> dict[str, list[float]]:
    """Per round: server CPU and client wall time per 8-byte read and per posted 8-byte write.

    The client is its own process (bench.region_client), so the server thread's CPU clock
    counts nothing but the emulator's work, syscalls included.
    """
    out: dict[str, list[float]] = {
        "read_cpu_us": [],
        "read_wall_us": [],
        "write_cpu_us": [],
        "write_wall_us": [],
        "pipelined_cpu_us": [],
    }
    with workdir("bench-region-") as wd, in_process_emulator(wd) as emulator:
        thread: threading.Thread = emulator.thread  # type: ignore[attr-defined]
        client = subprocess.Popen(
            [sys.executable, "-m", "bench.region_client", str(emulator.config.vfio_user_socket)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdin is not None and client.stdout is not None
        try:
            if client.stdout.readline().strip() != "ready":
                raise RuntimeError("bench.region_client did not start")

            def command(op: str, n: int) -> tuple[float, float]:
                assert client.stdin is not None and client.stdout is not None
                cpu0 = _thread_cpu_ns(thread)
                client.stdin.write(f"{op} {n}\n")
                client.stdin.flush()
                wall = int(client.stdout.readline())
                return (_thread_cpu_ns(thread) - cpu0) / 1e3, wall / 1e3

            command("read", 500)  # warm up
            for _ in range(rounds):
                cpu, wall = command("read", count)
                out["read_cpu_us"].append(cpu / count)
                out["read_wall_us"].append(wall / count)
                cpu, wall = command("write", count)
                out["write_cpu_us"].append(cpu / (count + 1))
                out["write_wall_us"].append(wall / (count + 1))
                batch = min(count, 2000)
                cpu, _ = command("pipelined", batch)
                out["pipelined_cpu_us"].append(cpu / batch)
        finally:
            client.stdin.close()
            client.wait(30)
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


def run(report: Report, *, count: int, rounds: int, profile_count: int) -> None:
    cpu = measure_cpu(count, rounds)
    report.add(
        "fig3.inproc.region_read_cpu",
        cpu["read_cpu_us"],
        "us",
        target=f"< {TARGET_US:g} us",
        met=sorted(cpu["read_cpu_us"])[len(cpu["read_cpu_us"]) // 2] < TARGET_US,
        note="server thread CPU per 8-byte BAR 4 REGION_READ",
    )
    report.add(
        "fig3.inproc.region_read_round_trip",
        cpu["read_wall_us"],
        "us",
        note="client wall time per lockstep read, same process, no QEMU",
    )
    report.add(
        "fig3.inproc.posted_write_cpu",
        cpu["write_cpu_us"],
        "us",
        note="server thread CPU per posted 8-byte REGION_WRITE",
    )
    report.add("fig3.inproc.posted_write_wall", cpu["write_wall_us"], "us")
    report.add(
        "fig3.inproc.region_read_cpu_pipelined",
        cpu["pipelined_cpu_us"],
        "us",
        note="same reads sent back to back: the Python path without the sleep and wake-up",
    )
    stages = stage_breakdown(max(count, 2000))
    median_cpu = report.figures["fig3.inproc.region_read_cpu"].median
    stages["rest: event loop wake-up, _on_readable, folding C's counts"] = max(
        0.0, median_cpu - sum(stages.values())
    )
    report.details["fig3_region_read_stages_us"] = {k: round(v, 3) for k, v in stages.items()}
    report.details["fig3_region_read_profile"] = profile_server(profile_count)
