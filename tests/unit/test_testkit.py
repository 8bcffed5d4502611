"""The test kit's own contract: readiness as an event, teardown order, unclean stops reported."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from testkit import ProcessFailed, ProcessGroup, TeardownError

IGNORES_TERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('up', file=sys.stderr, flush=True); time.sleep(60)"
)
EXITS_3_ON_TERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(3)); "
    "print('up', file=sys.stderr, flush=True); time.sleep(60)"
)
CLEAN = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
    "print('up', file=sys.stderr, flush=True); time.sleep(60)"
)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_wait_for_log_fails_at_once_when_the_process_ends(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path)
    proc = group.start("short", python("import sys; print('bye', file=sys.stderr)"))
    with pytest.raises(ProcessFailed, match="before logging 'never'") as failed:
        proc.wait_for_log("never", timeout=30)
    assert "bye" in str(failed.value)
    assert group.close() == []


def test_teardown_goes_guest_first_then_reverse_start_order(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path)
    order: list[str] = []
    first = group.start("first", python(CLEAN))
    second = group.start("second", python(CLEAN))
    for proc in (first, second):
        proc.wait_for_log("up")

    def power_off() -> None:
        order.append(f"guest {first.running} {second.running}")

    group.first(power_off)
    group.callback(lambda: order.append(f"clients {first.returncode} {second.returncode}"))
    group.check()
    assert order == ["guest True True", "clients 0 0"]
    assert first.returncode == second.returncode == 0


def test_killed_and_bad_status_make_the_teardown_unclean(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path, stop_timeout=0.5)
    for name, code in (("stubborn", IGNORES_TERM), ("grumpy", EXITS_3_ON_TERM)):
        group.start(name, python(code)).wait_for_log("up")
    with pytest.raises(TeardownError) as unclean:
        group.check()
    problems = unclean.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("grumpy: exit status 3 after SIGTERM")
    assert problems[1].startswith("stubborn: killed after ignoring SIGTERM")


def test_new_session_keeps_children_out_of_the_terminals_process_group(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path, new_session=True)
    detached = group.start("detached", python(CLEAN))
    attached = group.start("attached", python(CLEAN), new_session=False)
    for proc in (detached, attached):
        proc.wait_for_log("up")
    assert os.getsid(detached.pid) == detached.pid != os.getsid(0)
    assert os.getpgid(attached.pid) == os.getpgid(0)
    group.check()
