"""(c) The back-end channel: hostile SHMEM_MAP/UNMAP and anything else a back-end can send.

Every step is checked against a model of the mapping table: the reply status, the emulator's
table (nothing changes on refusal), the guest's view of BAR 4 and the emulator being alive.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz import campaign
from tests.fuzz.engines import ChannelEngine, HypothesisDraw
from tests.fuzz.invariants import Stats, counting_refusals
from tests.fuzz.rig import connect_client, emulator_with_backend


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
