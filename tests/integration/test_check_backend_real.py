"""``virtio-emu check-backend`` on real back-ends, each started by the tool itself (``-- CMD``).

- The broken fixture (testkit/broken_backend.py): each break alone fails exactly its check, all
  of them fail exactly the four, none fails nothing; exit statuses 1, 1, 0.
- virtiofsd and qemu-storage-daemon from the VM toolchain, unmodified: the tool runs in seconds
  with no guest; its exit status and the verdicts that matter are asserted as they really are
  (docs/backends/*.md says why each non-pass is what it is).
- The checked-in reports are current: the generator run again gives the same verdicts as
  docs/backends/NAME.json (verdicts, not bytes: versions and dates move).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from testkit.broken_backend import BREAKS
from tests.vm.conftest import toolchain
from vm.backend_reports import BY_NAME, DEFAULT_OUT, run_one, tool_env, verdicts
from vm.toolchain import Toolchain

__all__ = ["toolchain"]

VERDICTS = {"pass", "fail", "warn", "n/a"}
FIXTURE = [sys.executable, "-m", "testkit.broken_backend", "--socket", "{socket}"]


def check_backend(
    workdir: Path, options: list[str], command: list[str], timeout: float = 120.0
) -> tuple[int, dict[str, Any], float]:
    """Run the tool; its exit status, its JSON and how long it took."""
    json_path = workdir / "report.json"
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable, "-m", "emulator", "check-backend", *options, "--no-color",
            "--json", str(json_path), "--", *command,
        ],
        cwd=workdir,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    print(proc.stdout, proc.stderr)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(json_path.read_text()), elapsed


def failed(data: dict[str, Any]) -> set[str]:
    return {c["id"] for c in data["checks"] if c["verdict"] == "fail"}


def well_formed(data: dict[str, Any]) -> None:
    """The contract's JSON: stable keys, known verdicts, a summary that adds up."""
    assert data["tool"] == "virtio-emu check-backend" and data["format"] == 1
    counts = dict.fromkeys(VERDICTS, 0)
    for check in data["checks"]:
        assert check["verdict"] in VERDICTS, check
        assert check["id"].startswith(check["group"] + "."), check
        counts[check["verdict"]] += 1
        if check["verdict"] == "fail":
            assert check["spec"], check
    assert data["summary"] == counts


@pytest.mark.parametrize(
    "breaks",
    [
        pytest.param((), id="none"),
        *[pytest.param((b,), id=b) for b in BREAKS],
        pytest.param(tuple(BREAKS), id="all"),
    ],
)
def test_broken_fixture_fails_exactly_what_it_breaks(tmp_path: Path, breaks: tuple[str]) -> None:
    command = FIXTURE + (["--break", ",".join(breaks)] if breaks else [])
    status, data, elapsed = check_backend(tmp_path, ["--virtio-id", "4", "--hostile"], command)
    well_formed(data)
    assert failed(data) == {BREAKS[b] for b in breaks}
    assert status == (1 if breaks else 0)
    assert elapsed < 30  # seconds, no guest (about 3 here; the timeout case waits 3 s more)
    by_id = {c["id"]: c["verdict"] for c in data["checks"]}
    if not breaks:
        # Everything the correct fixture gives a reason to check passes: "no fail" is not
        # "nothing ran". It sends no UNMAP and no CONFIG_CHANGE_MSG.
        assert {cid for cid, v in by_id.items() if v != "pass"} == {
            "shmem.unmap_rules",
            "config.change_msg",
        }
    assert data["backend"]["command"][:3] == FIXTURE[:3]
    assert data["backend"]["virtio_id"] == 4


def test_without_a_command_or_socket_it_cannot_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "emulator", "check-backend", "--socket", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2


NO_SHMEM = {
    "negotiation.shmem_bit": "n/a",
    "shmem.get_shmem_config": "n/a",
    "shmem.regions": "n/a",
    "shmem.map_rules": "n/a",
    "shmem.unmap_rules": "n/a",
    "shmem.refusal": "n/a",
    "lifecycle.mappings_after_reset": "n/a",
}
WORKS = {
    "negotiation.features": "pass",
    "negotiation.protocol_features": "pass",
    "negotiation.reply_ack": "pass",
    "negotiation.reply_header": "pass",
    "config.get_config": "pass",
    "rings.setup": "pass",
    "rings.kick_call": "pass",
    "rings.vring_base": "pass",
    "lifecycle.reset": "pass",
    "lifecycle.reactivate": "pass",
    "lifecycle.reconnect": "pass",
    "hostile.malformed": "pass",
}


def subset(got: dict[str, str], want: dict[str, str]) -> dict[str, tuple[str | None, str]]:
    """What differs from ``want`` (check id -> (got, wanted))."""
    return {cid: (got.get(cid), v) for cid, v in want.items() if got.get(cid) != v}


@pytest.mark.toolchain
def test_virtiofsd_from_the_toolchain(toolchain: Toolchain, tmp_path: Path) -> None:
    """Unmodified virtiofsd 1.13: everything it has passes (its config holds the tag, offsets
    honoured, an unknown request refused); no shared memory. It exits when the front-end
    leaves: the tool restarts it."""
    started = time.monotonic()
    report = run_one(BY_NAME["virtiofsd"], tmp_path / "out", tmp_path / "work")
    assert time.monotonic() - started < 60
    got = report.verdicts()
    well_formed(json.loads(report.json.read_text()))
    assert report.status == 0
    honoured = {"config.offset": "pass", "negotiation.unknown_request": "pass"}
    assert subset(got, {**WORKS, **NO_SHMEM, **honoured}) == {}
    assert "exits cleanly" in report.markdown.read_text()
    assert "- back-end version: virtiofsd 1." in report.markdown.read_text()


@pytest.mark.toolchain
def test_qemu_storage_daemon_from_the_toolchain(toolchain: Toolchain, tmp_path: Path) -> None:
    """Unmodified qemu-storage-daemon 11.1 (libvhost-user): two real warnings, an unknown
    request acked as a success and GET_CONFIG's offset ignored; no shared memory."""
    report = run_one(BY_NAME["qemu-storage-daemon"], tmp_path / "out", tmp_path / "work")
    got = report.verdicts()
    well_formed(json.loads(report.json.read_text()))
    assert report.status == 0
    warned = {"negotiation.unknown_request": "warn", "config.offset": "warn"}
    assert subset(got, {**WORKS, **NO_SHMEM, **warned}) == {}
    assert "qemu-storage-daemon version 11.1" in report.markdown.read_text()


def test_checked_in_report_is_current(tmp_path: Path) -> None:
    name = "vhost-device-shmem"
    report = run_one(BY_NAME[name], tmp_path / "out", tmp_path / "work")
    assert report.verdicts() == verdicts(DEFAULT_OUT / f"{name}.json")
    assert "- back-end version: virtio-shmem-emu" in report.markdown.read_text()


def test_a_backend_that_leaves_with_its_front_end_is_restarted(tmp_path: Path) -> None:
    """Like virtiofsd, ``--serve-once`` exits when its front-end leaves: the tool starts it
    again for each check that needs a fresh back-end, even one still on its way out."""
    command = ["vhost-device-shmem", "--socket-path", "{socket}", "--serve-once"]
    status, data, _ = check_backend(tmp_path, ["--virtio-id", "4", "--hostile"], command)
    by_id = {c["id"]: c for c in data["checks"]}
    assert status == 0
    for cid in ("negotiation.unknown_request", "hostile.malformed", "lifecycle.reconnect"):
        assert by_id[cid]["verdict"] == "pass", by_id[cid]
    assert "exits cleanly" in by_id["lifecycle.reconnect"]["detail"]
