"""(a) The vfio-user socket: structure-aware and random messages, fds of every kind, partial
messages and abrupt closes, then a fresh client. After every message a barrier read of the
config space must be answered (or, for broken framing, the connection dropped); after every
session the emulator's fd count is back where it was."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from testkit import ProcessGroup, start_emulator
from testkit.procfs import fd_count
from tests.fuzz import campaign
from tests.fuzz.engines import HypothesisDraw, RandomDraw, VfioEngine
from tests.fuzz.invariants import Stats, check_alive, counting_refusals
from tests.fuzz.rig import RunningEmulator, connect_client, emulator_config


def test_vfio_user_sessions(workdir: Path) -> None:
    stats = Stats("vfio-user")
    config = emulator_config(workdir, vhost_user_socket=None, shmem_regions={0: 1 << 16})
    with RunningEmulator(config) as running, counting_refusals(stats):
        engine = VfioEngine(
            config.vfio_user_socket, stats, workdir, lambda: running.alive, fd_count
        )

        @given(st.data())
        def sessions(data: st.DataObject) -> None:
            draw = HypothesisDraw(data)
            engine.session(draw, draw.int(1, 30))

        sessions()
        with connect_client(config.vfio_user_socket) as client:
            check_alive(running, client)
        # BAR 4 accesses the C hot path served under the same invariants.
        assert running.emulator.server.hot_messages > 0
    assert stats.messages > 0


def test_vfio_user_campaign(workdir: Path) -> None:
    stats = campaign.run_vfio(workdir)
    assert stats.crashes == stats.hangs == stats.leaked_fds == 0
    assert stats.messages > 0


def test_vfio_user_out_of_process_smoke(workdir: Path) -> None:
    """The real CLI: hostile sessions, then /proc/PID/fd back to its baseline."""
    group = ProcessGroup(workdir)
    with group.running():
        emu = start_emulator(
            group, workdir / "cli.sock", "--virtio-id", "4", "--shmem-region", "0:64K"
        )
        stats = Stats("vfio-user")
        engine = VfioEngine(
            emu.path, stats, workdir, lambda: emu.running, lambda: fd_count(emu.pid)
        )
        for seed in range(20):
            engine.session(RandomDraw(seed), 30)
        engine.session(RandomDraw(99), 1)
        assert emu.running
