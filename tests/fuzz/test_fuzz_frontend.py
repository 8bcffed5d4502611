"""(b) The vhost-user front-end connection: a scripted back-end answers with wrong sizes, wrong
request codes, no reply at all, extra fds, garbage or a disconnect at any step of negotiation
and of the later requests. The emulator must start or fail with an ``EmulatorError``, within the
configured timeouts, and give every fd back."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import campaign
from tests.fuzz.engines import FrontendEngine, HypothesisDraw
from tests.fuzz.invariants import Stats, counting_refusals


def test_hostile_backend_sessions(workdir: Path) -> None:
    stats = Stats("vhost-user front-end")
    engine = FrontendEngine(workdir, stats)
    with counting_refusals(stats):

        @given(st.data())
        def sessions(data: st.DataObject) -> None:
            engine.session(HypothesisDraw(data))

        sessions()
    assert stats.messages > 0


def test_frontend_campaign(workdir: Path) -> None:
    stats = campaign.run_frontend(workdir)
    assert stats.crashes == stats.hangs == stats.leaked_fds == 0
    assert stats.messages > 0
