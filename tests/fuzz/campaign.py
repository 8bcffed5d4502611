"""Long fuzz runs with cheap random choices, and the counts they report.

The campaign tests (one per socket, in the ``test_fuzz_*`` modules) call ``run_*`` here. In
the default run each gets a few seconds; under ``--hypothesis-profile=campaign`` (``make fuzz``)
they share ``FUZZ_CAMPAIGN_SECONDS`` (default 3600) and each stops early once it has sent
``FUZZ_CAMPAIGN_MESSAGES`` (default 1,000,000). Every session's seed is in the failure message,
so a failure replays with ``FUZZ_SEED``.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from testkit.procfs import fd_count
from tests.fuzz.engines import ChannelEngine, FrontendEngine, RandomDraw, VfioEngine
from tests.fuzz.invariants import InvariantBroken, Stats, counting_refusals
from tests.fuzz.rig import (
    RunningEmulator,
    connect_client,
    emulator_config,
    emulator_with_backend,
)

ACTIVE = False
SOCKETS = ("vfio-user", "vhost-user front-end", "back-end channel")
DEFAULT_SECONDS = 4.0
REPORT: dict[str, Stats] = {}


def budget() -> tuple[float, int]:
    """(seconds, messages) one socket's campaign may use."""
    if not ACTIVE:
        return DEFAULT_SECONDS, 1 << 62
    total = float(os.environ.get("FUZZ_CAMPAIGN_SECONDS", "3600"))
    return total / len(SOCKETS), int(os.environ.get("FUZZ_CAMPAIGN_MESSAGES", "1000000"))


def _seed() -> int:
    fixed = os.environ.get("FUZZ_SEED")
    return int(fixed) if fixed else random.randrange(1 << 32)


def _record(stats: Stats) -> Stats:
    REPORT.setdefault(stats.socket, Stats(stats.socket)).merge(stats)
    return stats


def report_lines() -> list[str]:
    lines = []
    for name in SOCKETS:
        if name in REPORT:
            lines += REPORT[name].lines()
    return lines


def _loop(stats: Stats, one: callable[[RandomDraw], None]) -> None:  # type: ignore[name-defined]
    seconds, messages = budget()
    start = time.monotonic()
    seed = _seed()
    try:
        with counting_refusals(stats):
            while time.monotonic() - start < seconds and stats.messages < messages:
                try:
                    one(RandomDraw(seed))
                except InvariantBroken as exc:
                    raise InvariantBroken(f"{exc} (replay with FUZZ_SEED={seed})") from exc
                seed = (seed * 6364136223846793005 + 1442695040888963407) % (1 << 64)
    finally:
        stats.seconds = time.monotonic() - start
        _record(stats)


def run_channel(workdir: Path) -> Stats:
    stats = Stats("back-end channel")
    with emulator_with_backend(workdir) as (running, backend):
        client = connect_client(running.emulator.server.path)
        engine = ChannelEngine(running, backend, client, stats, workdir)
        engine.view_every = 8
        baseline = fd_count()
        try:
            _loop(stats, lambda draw: [engine.step(draw) for _ in range(200)] and None)
            engine.reset()
            # Every mapping is gone, so every back-end fd the emulator held must be too.
            stats.leaked_fds += fd_count() - baseline
            if stats.leaked_fds:
                raise InvariantBroken(f"{stats.leaked_fds} fds more than at the start")
        finally:
            engine.close()
            client.close()
    return stats


def run_vfio(workdir: Path) -> Stats:
    stats = Stats("vfio-user")
    config = emulator_config(workdir, vhost_user_socket=None, shmem_regions={0: 1 << 16})
    with RunningEmulator(config) as running:
        engine = VfioEngine(
            config.vfio_user_socket,
            stats,
            workdir,
            lambda: running.alive,
            lambda: len(os.listdir("/proc/self/fd")),
        )
        _loop(stats, lambda draw: engine.session(draw, 100))
        connect_client(config.vfio_user_socket).close()
    return stats


def run_frontend(workdir: Path) -> Stats:
    stats = Stats("vhost-user front-end")
    engine = FrontendEngine(workdir, stats)
    _loop(stats, engine.session)
    return stats
