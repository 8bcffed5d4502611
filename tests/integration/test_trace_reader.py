"""``virtio-emu trace`` as a process: on the trace the real emulator wrote while the reference
back-end mapped, was refused a map and a client read BAR 4; and ``--follow`` on a file that
grows while the reader runs."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emulator.vfio_user.client import VfioUserClient, VfioUserError
from testkit import Harness, foreground_job_signals
from testkit.virtio_driver import GuestRam, VirtioDriver
from tests.helpers.processes import procs

__all__ = ["procs"]

MiB = 1 << 20
SHMEM_BAR = 4


def trace_command(path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "emulator", "trace", str(path), *args]


def by_line(out: str) -> dict[int, str]:
    """The reader's lines keyed by the trace line each shows."""
    return {int(line[1:].split()[0]): line for line in out.splitlines()}


def test_refused_map_in_a_real_trace(procs: Harness) -> None:
    trace = procs.workdir / "trace.jsonl"
    back = procs.backend("--rng-source", "counter")
    emu = procs.emulator("--vhost-user-socket", str(back.path), "--trace", str(trace))
    ctl = procs.control()
    with GuestRam(2 * MiB) as ram, VfioUserClient.connect(str(emu.path), timeout=15.0) as client:
        driver = VirtioDriver.probe(client, ram)
        assert ctl.map(0, 0, 4096, pattern="counter", seed=3)["ok"]
        assert len(client.region_read(SHMEM_BAR, 0, 8)) == 8
        refused = ctl.map(0, 8 * MiB, 4096)  # the region is 4 MiB
        assert (refused["ok"], refused["code"]) == (False, 22)
        with pytest.raises(VfioUserError):
            client.region_read(SHMEM_BAR, 8 * MiB, 8)  # outside BAR 4: an error reply
        driver.close_msix()
    emu.stop()
    back.stop()

    done = subprocess.run(trace_command(trace), capture_output=True, text=True, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    shown = by_line(done.stdout)
    maps = {n: line for n, line in shown.items() if " SHMEM_MAP " in line}
    assert len(maps) == 4
    [bad] = [n for n, line in maps.items() if line.startswith("!")]
    reply = maps[bad]
    assert "<-- SHMEM_MAP reply to " in reply and "REFUSED status=22 (EINVAL)" in reply
    request = int(reply.split("reply to ")[1].split()[0])
    assert "--> SHMEM_MAP [1 fd] shmid=0" in maps[request]
    assert "shm_offset=0x800000 length=0x1000" in maps[request]
    assert not maps[request].startswith("!")
    # the accepted map and the reads are paired too; the refused read is marked
    reads = [line for line in shown.values() if "REGION_READ" in line and "reply to" in line]
    assert reads and all(re.search(r"reply to \d+ \([\d.]+ (us|ms)\)", line) for line in reads)
    errors = [line for line in shown.values() if line.startswith("!") and "REGION_READ" in line]
    assert len(errors) == 1 and "REFUSED error=" in errors[0]

    only = subprocess.run(
        trace_command(trace, "--socket", "backend", "--json"),
        capture_output=True,
        text=True,
        check=True,
    )
    records = [json.loads(line) for line in only.stdout.splitlines()]
    assert [(r["cmd"], r["dir"]) for r in records] == [
        ("SHMEM_MAP", "in"),
        ("SHMEM_MAP", "out"),
    ] * 2


class LineReader:
    """Lines from a child's stdout, each waited for with a deadline (never a hung test)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.stdout = proc.stdout
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.stdout, selectors.EVENT_READ)
        self.buffer = b""

    def line(self, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not self.selector.select(left):
                raise AssertionError(f"no line within {timeout} s (have {self.buffer!r})")
            chunk = os.read(self.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"reader exited (have {self.buffer!r})")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()


def record(t: float, direction: str, cmd: str, **fields: object) -> str:
    entry = {"t": t, "channel": "vhost-user-backend", "dir": direction, "cmd": cmd, **fields}
    return json.dumps(entry) + "\n"


def test_follow_reads_what_is_appended(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text(record(10.0, "in", "SHMEM_MAP", nfds=1, payload={"shmid": 0}))
    proc = subprocess.Popen(
        trace_command(trace, "--follow", "--poll", "0.02"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=foreground_job_signals,  # noqa: PLW1509 -- two signal() calls
    )
    try:
        out = LineReader(proc)
        assert "--> SHMEM_MAP [1 fd] shmid=0" in out.line()
        reply = record(10.002, "out", "SHMEM_MAP", size=20, payload={"value": 22})
        with trace.open("a") as f:
            f.write(reply[:20])  # half a line: the reader waits for the rest
            f.flush()
            time.sleep(0.2)
            f.write(reply[20:])
            f.flush()
        line = out.line()
        assert line.startswith("!") and "reply to 1 (2.00 ms)" in line
        with trace.open("a") as f:
            f.write("garbage\n" + record(10.5, "in", "SHMEM_UNMAP", payload={"shmid": 0}))
        assert "--> SHMEM_UNMAP" in out.line()
        assert proc.poll() is None  # still following
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert b"3: skipped: not JSON" in err and b"Traceback" not in err
