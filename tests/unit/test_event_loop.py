"""The event loop's signal handling: a SIGTERM is never lost, whenever it arrives."""

from __future__ import annotations

import os
import signal

from emulator.loop import EventLoop


def test_a_signal_before_run_makes_run_return_at_once() -> None:
    """The emulator installs its handlers before its ready line; a launcher may send SIGTERM
    the moment it reads that line, before the loop has started."""
    loop = EventLoop()
    try:
        loop.stop_on_signals(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        loop.run()
        assert loop.stop_reason == "SIGTERM"
    finally:
        loop.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_signal_while_running_stops_the_loop() -> None:
    loop = EventLoop()
    fired: list[str] = []
    try:
        loop.stop_on_signals(signal.SIGTERM)
        loop.call_later(0.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
        loop.call_later(5.0, lambda: fired.append("timeout"))
        loop.run()
        assert loop.stop_reason == "SIGTERM"
        assert fired == []
    finally:
        loop.close()
