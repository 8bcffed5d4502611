"""(c) The back-end channel: hostile SHMEM_MAP/UNMAP and anything else a back-end can send.

Every step is checked against a model of the mapping table: the reply status, the emulator's
table (nothing changes on refusal), the guest's view of BAR 4 and the emulator being alive.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from testkit.launchers import emulator_argv
from tests.fuzz import campaign
from tests.fuzz.engines import ChannelEngine, HypothesisDraw, RandomDraw
from tests.fuzz.invariants import Stats, counting_refusals
from tests.fuzz.rig import (
    FD_KINDS,
    PAGE,
    WAIT,
    ScriptedBackend,
    connect_client,
    emulator_with_backend,
    make_backing,
    mmap_request,
    read_channel_reply,
)
from wire.unix import send_with_fds


def test_channel_steps_keep_table_and_view_consistent(workdir: Path) -> None:
    stats = Stats("back-end channel")
    with emulator_with_backend(workdir) as (running, backend), counting_refusals(stats):
        client = connect_client(running.emulator.server.path)
        engine = ChannelEngine(running, backend, client, stats, workdir)
        try:

            @given(st.data())
            @settings(max_examples=settings().max_examples * 2)
            def steps(data: st.DataObject) -> None:
                engine.reset()
                draw = HypothesisDraw(data)
                for _ in range(draw.int(1, 25)):
                    engine.step(draw)

            steps()
        finally:
            engine.close()
            client.close()
    assert stats.messages > 0


def test_channel_campaign(workdir: Path) -> None:
    stats = campaign.run_channel(workdir)
    assert stats.crashes == stats.hangs == stats.leaked_fds == stats.out_of_region == 0
    assert stats.messages > 0


def test_cli_channel_smoke(workdir: Path) -> None:
    """Out of process: hostile channel traffic against the real CLI; afterwards every live
    memfd mapping in /proc/PID/maps is one the model holds, and none is left after unmap."""
    sock = workdir / "vhost.sock"
    with ScriptedBackend(sock) as backend:
        proc = subprocess.Popen(
            emulator_argv(workdir / "v.sock", "--virtio-id", "4", "--vhost-user-socket", str(sock)),
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert backend.channel_ready.wait(WAIT)
            channel = backend.channel
            assert channel is not None
            draw = RandomDraw(7)
            live = []
            for index in range(300):
                kind = draw.choice(FD_KINDS)
                backing = make_backing(kind, PAGE, index, workdir)
                offset = draw.int(0, 15) * PAGE
                try:
                    send_with_fds(
                        channel, mmap_request(9, draw.int(0, 2), 0, offset, PAGE, 1), [backing.fd]
                    )
                    if read_channel_reply(channel)[2] == 0:
                        live.append(offset)
                        # Unmap at once half the time; the rest stays for the maps check.
                        if draw.chance(50) or len(live) > 4:
                            send_with_fds(channel, mmap_request(10, 0, 0, offset, PAGE, 0))
                            assert read_channel_reply(channel)[2] in (0, 2)
                finally:
                    backing.close()
            with open(f"/proc/{proc.pid}/maps") as maps:
                mapped = [line for line in maps if "fuzz-" in line]
            assert len(mapped) <= len(live)
            assert proc.poll() is None
        finally:
            proc.terminate()
            code = proc.wait(10)
            if proc.stderr is not None:
                proc.stderr.close()
        assert code == 0
