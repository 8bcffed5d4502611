"""Figure 3, host side: the emulator's own CPU time per REGION_READ/WRITE, and where it goes.

The emulator runs in this process on a thread of its own (its event loop, its server, a real
mmap'ed memfd in BAR 4); a QEMU-like ``VfioUserClient`` drives it in lockstep over a real UNIX
socket. The server thread's CPU clock (``pthread_getcpuclockid``) gives its CPU time per message
without counting the client. The per-stage breakdown times each step of the path on its own,
with the same objects: recvmsg, decode, device dispatch (BAR -> region -> mapping lookup and
copy), reply construction, encode, sendmsg; the rest of the per-message CPU time is the loop,
the server's dispatch and checks. A cProfile of the server thread lists the heaviest functions.
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
from emulator.vfio_user.codec import Message, Role, VfioUserDecoder, encode
from wire.unix import recv_with_fds, send_with_fds

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


def _per_op_us(op: Callable[[], object], count: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(count):
        op()
    return (time.perf_counter_ns() - start) / count / 1e3


def stage_breakdown(count: int) -> dict[str, float]:
    """Microseconds per REGION_READ for each stage of the server's path, timed separately."""
    stages: dict[str, float] = {}
    with workdir("bench-stage-") as wd, in_process_emulator(wd) as emulator:
        assert emulator.shmem is not None
        shmem = emulator.shmem
        device = emulator.device
        request = Message(m.Command.REGION_READ, 7, m.RegionAccess(0x40, BAR4, 8))
        wire, _ = encode(request)
        decoder = VfioUserDecoder(Role.SERVER)

        def decode() -> Message | None:
            decoder.feed(wire, ())
            return decoder.next_message()

        message = decode()
        assert message is not None
        reply = message.reply(m.RegionAccess(0x40, BAR4, 8, bytes(8)))
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with left, right:

            def send_then_recv() -> None:
                send_with_fds(left, wire, ())
                recv_with_fds(right, 1 << 20)

            round_trip = _per_op_us(send_then_recv, count)

            def send_only() -> None:
                send_with_fds(left, wire, ())

            def drain() -> None:
                with contextlib.suppress(BlockingIOError):
                    while right.recv(1 << 20, socket.MSG_DONTWAIT):
                        pass

            sends = 0.0
            batches = max(1, count // 100)
            for _ in range(batches):
                sends += _per_op_us(send_only, 100)
                drain()
            stages["sendmsg"] = sends / batches
            stages["recvmsg"] = max(0.0, round_trip - stages["sendmsg"])
        stages["decode"] = _per_op_us(decode, count)
        stages["device.region_read (BAR dispatch + lookup + copy)"] = _per_op_us(
            lambda: device.region_read(BAR4, 0x40, 8), count
        )
        stages["shmem.read (mapping lookup + copy)"] = _per_op_us(
            lambda: shmem.read(0x40, 8), count
        )
        stages["build reply"] = _per_op_us(
            lambda: message.reply(m.RegionAccess(0x40, BAR4, 8, bytes(8))), count
        )
        stages["encode"] = _per_op_us(lambda: encode(reply), count)
        decoder.close()
    return stages


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
    accounted = (
        stages["recvmsg"]
        + stages["sendmsg"]
        + stages["decode"]
        + stages["device.region_read (BAR dispatch + lookup + copy)"]
        + stages["build reply"]
        + stages["encode"]
    )
    stages["rest: event loop, server dispatch, access checks, trace hooks"] = max(
        0.0, median_cpu - accounted
    )
    report.details["fig3_region_read_stages_us"] = {k: round(v, 3) for k, v in stages.items()}
    report.details["fig3_region_read_profile"] = profile_server(profile_count)
