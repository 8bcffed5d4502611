"""(b) The vhost-user front-end connection: a scripted back-end answers with wrong sizes, wrong
request codes, no reply at all, extra fds, garbage or a disconnect at any step of negotiation
and of the later requests. The emulator must start or fail with an ``EmulatorError``, within the
configured timeouts, and give every fd back."""

from __future__ import annotations

import subprocess
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from testkit.launchers import emulator_argv
from tests.fuzz import campaign
from tests.fuzz.engines import FrontendEngine, HypothesisDraw
from tests.fuzz.invariants import Stats, counting_refusals
from tests.fuzz.rig import ScriptedBackend


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


def test_cli_with_a_garbage_backend_exits_with_a_clear_error(workdir: Path) -> None:
    """Out of process: a back-end answering GET_FEATURES with garbage framing; the real CLI
    exits 1 and says why instead of hanging or dumping a traceback."""
    sock = workdir / "garbage.sock"
    with ScriptedBackend(sock, policy=lambda _req, _i: "bad-version"):
        done = subprocess.run(
            emulator_argv(
                workdir / "v.sock",
                "--virtio-id",
                "4",
                "--vhost-user-socket",
                str(sock),
                "--backend-timeout",
                "1",
            ),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 1, done.stderr
    assert "bad reply to GET_FEATURES" in done.stderr
    assert "Traceback" not in done.stderr
