"""``virtio-emu check-backend`` against real back-ends as real processes, and against crafted
in-process back-ends that break one rule each.

Our own back-ends must pass every applicable check in both modes (``-- CMD`` started by the
tool, ``--socket`` already running), with the expected passes where a check applies
(``shmem.map_rules`` with at least one map, ``rings.kick_call``), a JSON report of the
contract's shape, the Markdown written and exit status 0, in a few seconds. Each crafted
back-end makes exactly its check fail (exit status 1); an unreachable back-end or bad usage
is exit status 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conformance import cli
from conformance.verdict import CATALOGUE
from testkit import Harness
from testkit.procfs import fd_table
from tests.helpers.docs import BIN, readme_block, user_env, without_comment
from tests.helpers.processes import procs
from vhost_user.codec import VhostUserHeader, VhostUserMessage, reply_to, spec_for
from vhost_user.messages import VHOST_USER_VERSION, FrontendReq, VhostUserU64
from vhost_user_backend.daemon import VhostUserDaemon
from vhost_user_backend.devices.shmem_reference import ShmemRngDevice

__all__ = ["procs"]

VIRTIO_EMU = str(BIN / "virtio-emu")
#: The tool's runs here take 1 to 3 s; this bounds a regression to a hang.
RUN_LIMIT = 60.0


def check_backend(*args: str, timeout: float = RUN_LIMIT) -> tuple[int, str, float]:
    """Run the tool; (exit status, stdout + stderr, seconds)."""
    started = time.monotonic()
    done = subprocess.run(
        [VIRTIO_EMU, "check-backend", "--no-color", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=user_env(),
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def verdicts(report: dict[str, Any]) -> dict[str, str]:
    return {check["id"]: check["verdict"] for check in report["checks"]}


def assert_contract_shape(report: dict[str, Any]) -> None:
    assert report["tool"] == "virtio-emu check-backend"
    assert report["format"] == 1
    assert set(report["backend"]) == {"command", "socket", "virtio_id", "version"}
    assert [c["id"] for c in report["checks"]] == [info.id for info in CATALOGUE]
    for check in report["checks"]:
        assert set(check) == {
            "id", "group", "title", "verdict", "detail", "spec", "sent", "received"
        }  # fmt: skip
        assert check["verdict"] in ("pass", "fail", "warn", "n/a")
        assert check["spec"].startswith("vhost-user.rst: ")
        assert check["group"] == check["id"].split(".")[0]
    counts = report["summary"]
    assert set(counts) == {"pass", "fail", "warn", "n/a"}
    assert sum(counts.values()) == len(report["checks"])


def assert_clean(report: dict[str, Any], *must_pass: str) -> None:
    got = verdicts(report)
    failed = {cid: c["detail"] for c in report["checks"] if (cid := c["id"]) and got[cid] == "fail"}
    assert failed == {}
    assert {cid: got[cid] for cid in must_pass} == dict.fromkeys(must_pass, "pass")


def maps_checked(report: dict[str, Any]) -> int:
    detail = next(c["detail"] for c in report["checks"] if c["id"] == "shmem.map_rules")
    return int(detail.split()[0])


# -- our back-ends ----------------------------------------------------------------------------
ALWAYS = (
    "negotiation.features",
    "negotiation.shmem_bit",
    "negotiation.reply_ack",
    "negotiation.reply_header",
    "negotiation.unknown_request",
    "shmem.get_shmem_config",
    "shmem.regions",
    "shmem.map_rules",
    "shmem.refusal",
    "rings.setup",
    "rings.kick_call",
    "rings.vring_base",
    "lifecycle.reset",
    "lifecycle.reactivate",
    "lifecycle.mappings_after_reset",
    "lifecycle.reconnect",
)


def test_reference_backend_started_by_the_tool(tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    report_json, report_md = tmp_path / "r.json", tmp_path / "r.md"
    command = [str(BIN / "vhost-device-shmem"), "--socket-path", "{socket}"]
    status, out, took = check_backend(
        "--device", f"shmem-reference:{control}", "--hostile",
        "--json", str(report_json), "--markdown", str(report_md),
        "--", *command, "--control-socket", str(control),
    )  # fmt: skip
    assert status == 0, out
    report = json.loads(report_json.read_text())
    assert_contract_shape(report)
    assert_clean(report, *ALWAYS, "shmem.unmap_rules", "hostile.malformed")
    assert maps_checked(report) >= 2
    assert report["backend"]["command"][0].endswith("vhost-device-shmem")
    assert report["backend"]["virtio_id"] == 4
    markdown = report_md.read_text()
    assert markdown.startswith("# virtio-emu check-backend report")
    assert "| shmem | map_rules | pass |" in markdown
    assert "20 pass" in out or "21 pass" in out
    assert took < 30, took


def test_a_back_end_that_exits_with_its_front_end_is_restarted(tmp_path: Path) -> None:
    """``--serve-once`` behaves as virtiofsd does: every fresh connection needs a restart."""
    report_json = tmp_path / "r.json"
    status, out, _ = check_backend(
        "--virtio-id", "4", "--json", str(report_json), "--",
        str(BIN / "vhost-device-shmem"), "--socket-path", "{socket}", "--serve-once",
    )  # fmt: skip
    assert status == 0, out
    report = json.loads(report_json.read_text())
    assert_clean(report, "negotiation.unknown_request", "lifecycle.reconnect")
    reconnect = next(c for c in report["checks"] if c["id"] == "lifecycle.reconnect")
    assert reconnect["detail"] == "exits cleanly when the front-end leaves (status 0)"


def test_running_reference_backend_by_socket(procs: Harness, tmp_path: Path) -> None:
    back = procs.backend()
    report_json = tmp_path / "r.json"
    status, out, _ = check_backend(
        "--socket", str(back.path), "--device", f"shmem-reference:{procs.workdir / 'control.sock'}",
        "--json", str(report_json),
    )  # fmt: skip
    assert status == 0, out
    report = json.loads(report_json.read_text())
    assert_contract_shape(report)
    assert report["backend"]["command"] is None
    assert_clean(report, *ALWAYS, "shmem.unmap_rules")
    assert verdicts(report)["hostile.malformed"] == "n/a"
    back.stop()  # it survived the whole battery and exits cleanly


def test_the_tool_closes_every_fd_it_received(
    procs: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In this process: every fd that came with a SHMEM_MAP (or anything else), every
    eventfd, memfd and socket of the tool is closed when it returns, error paths included
    (the deliberate refusal, --hostile's dropped connections)."""
    back = procs.backend()
    control = procs.workdir / "control.sock"
    before = fd_table()
    status = cli.main(
        ["--socket", str(back.path), "--device", f"shmem-reference:{control}", "--hostile"]
    )
    assert status == 0, capsys.readouterr().out
    assert fd_table() == before
    back.stop()


def test_virtiofs_dax_device(tmp_path: Path) -> None:
    shared = tmp_path / "share"
    shared.mkdir()
    report_json = tmp_path / "r.json"
    status, out, _ = check_backend(
        "--device", "virtiofs-dax", "--json", str(report_json), "--",
        str(BIN / "vhost-device-fs"), "--socket-path", "{socket}", "--shared-dir", str(shared),
        "--tag", "checkfs", "--cache-size", "64M",
    )  # fmt: skip
    assert status == 0, out
    report = json.loads(report_json.read_text())
    assert_clean(report, *ALWAYS, "shmem.unmap_rules", "config.get_config", "config.offset")
    assert maps_checked(report) >= 2
    assert report["backend"]["virtio_id"] == 26
    assert list(shared.iterdir()) == []  # the stimulus's file is gone again


@pytest.mark.parametrize("module", ["framebuffer", "doorbell"])
def test_device_examples(module: str, tmp_path: Path) -> None:
    report_json = tmp_path / "r.json"
    status, out, _ = check_backend(
        "--virtio-id", "4", "--json", str(report_json), "--",
        sys.executable, "-m", f"vhost_user_backend.devices.examples.{module}",
        "--socket-path", "{socket}",
    )  # fmt: skip
    assert status == 0, out
    report = json.loads(report_json.read_text())
    assert_clean(report, *ALWAYS)
    assert maps_checked(report) >= 2  # at queue start, and again after the reset


def test_readme_command(tmp_path: Path) -> None:
    (command,) = readme_block("tests/integration/test_check_backend.py runs the commands")
    line = without_comment(command).replace("/tmp/", f"{tmp_path}/")
    done = subprocess.run(
        line,
        shell=True,
        check=False,
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT,
        env=user_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "shmem        map_rules             pass" in done.stdout
    assert json.loads((tmp_path / "report.json").read_text())["summary"]["fail"] == 0


# -- crafted back-ends: each breaks one rule -------------------------------------------------
class SilentShmemConfig(VhostUserDaemon):
    """Never answers GET_SHMEM_CONFIG."""

    def _dispatch(self, msg: VhostUserMessage) -> None:
        if msg.request is not FrontendReq.GET_SHMEM_CONFIG:
            super()._dispatch(msg)


class ChattyAcks(VhostUserDaemon):
    """Acks SET_* requests that did not ask for a reply."""

    def _finish(self, msg: VhostUserMessage, result: Any, error: Any) -> None:
        super()._finish(msg, result, error)
        if not spec_for(msg.request).reply and not msg.need_reply:
            self._send(reply_to(msg, VhostUserU64(0)))


class OverlappingMaps(ShmemRngDevice):
    """Maps [0, 8 KiB) and then [4 KiB, 12 KiB) of region 0 whenever its queues start."""

    def on_queues_started(self) -> None:
        threading.Thread(target=self._map_two, daemon=True).start()

    def _map_two(self) -> None:
        assert self.backend is not None
        for offset in (0, 0x1000):
            memfd = os.memfd_create("overlap")
            os.ftruncate(memfd, 0x2000)
            try:
                self.backend.shmem_map(0, memfd, 0, offset, 0x2000, writable=False)
            except Exception:  # a refusal is the front-end's verdict, not ours to judge
                pass
            finally:
                os.close(memfd)


class NoReplyFlag(VhostUserDaemon):
    """Answers GET_FEATURES without the REPLY flag."""

    def _send(self, msg: VhostUserMessage) -> None:
        if msg.request is not FrontendReq.GET_FEATURES or self._conn is None:
            super()._send(msg)
            return
        body = msg.payload.pack()  # the codec would refuse to encode this reply
        header = VhostUserHeader(msg.request, VHOST_USER_VERSION, len(body)).pack()
        self._conn.sendall(header + body)


class Mute(VhostUserDaemon):
    """Accepts a front-end and never answers anything."""

    def _dispatch(self, msg: VhostUserMessage) -> None:
        pass


class BitlessShmem(VhostUserDaemon):
    """Offers no shared-memory bit, yet answers GET_SHMEM_CONFIG."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.offered_protocol_features &= ~self.shmem_mask
        self.shmem_mask = 0


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """Start a daemon in this process on ``tmp_path/be.sock``; stopped at teardown."""
    started: list[tuple[VhostUserDaemon, threading.Thread]] = []

    def start(daemon_type: type[VhostUserDaemon], device: ShmemRngDevice, **kw: Any) -> str:
        path = str(tmp_path / "be.sock")
        daemon = daemon_type(device, path, **kw)
        device.backend = daemon
        started.append((daemon, daemon.serve_in_thread()))
        return path

    yield start
    for daemon, thread in started:
        daemon.stop()
        thread.join(10)


def failures(path: str, tmp_path: Path, *args: str) -> tuple[int, list[str], dict[str, str]]:
    report_json = tmp_path / "r.json"
    status, _out, _ = check_backend(
        "--socket", path, "--virtio-id", "4", "--timeout", "1", "--json", str(report_json), *args
    )
    report = json.loads(report_json.read_text())
    got = verdicts(report)
    return status, [cid for cid, v in got.items() if v == "fail"], got


def test_bit_20_fails_only_the_shmem_bit(serve: Any, tmp_path: Path) -> None:
    path = serve(VhostUserDaemon, ShmemRngDevice(), shmem_feature_bit=20)
    status, failed, got = failures(path, tmp_path)
    assert (status, failed) == (1, ["negotiation.shmem_bit"])
    assert got["shmem.get_shmem_config"] == "pass"  # read at the bit it offers


def test_no_shmem_config_reply_fails_only_that_check(serve: Any, tmp_path: Path) -> None:
    path = serve(SilentShmemConfig, ShmemRngDevice())
    status, failed, got = failures(path, tmp_path)
    assert (status, failed) == (1, ["shmem.get_shmem_config"])
    assert got["rings.kick_call"] == "pass"  # the session went on over a new connection


def test_replies_without_need_reply_fail_only_reply_ack(serve: Any, tmp_path: Path) -> None:
    path = serve(ChattyAcks, ShmemRngDevice())
    status, failed, _ = failures(path, tmp_path)
    assert (status, failed) == (1, ["negotiation.reply_ack"])


def test_overlapping_maps_fail_only_map_rules(serve: Any, tmp_path: Path) -> None:
    path = serve(VhostUserDaemon, OverlappingMaps())
    status, failed, got = failures(path, tmp_path)
    assert (status, failed) == (1, ["shmem.map_rules"])
    assert got["shmem.refusal"] == "pass"


def test_a_shmem_config_answered_without_a_bit_fails_the_shmem_bit(
    serve: Any, tmp_path: Path
) -> None:
    path = serve(BitlessShmem, ShmemRngDevice())
    status, failed, got = failures(path, tmp_path)
    assert (status, failed) == (1, ["negotiation.shmem_bit"])
    assert got["shmem.get_shmem_config"] == "n/a"


def test_a_reply_without_the_reply_flag_fails_reply_header(serve: Any, tmp_path: Path) -> None:
    path = serve(NoReplyFlag, ShmemRngDevice())
    status, failed, _ = failures(path, tmp_path)
    assert (status, failed) == (1, ["negotiation.reply_header"])


def test_a_back_end_that_never_answers_is_a_fail_not_a_hang(serve: Any, tmp_path: Path) -> None:
    path = serve(Mute, ShmemRngDevice())
    started = time.monotonic()
    status, failed, got = failures(path, tmp_path)
    assert (status, failed) == (1, ["negotiation.features"])
    assert set(got.values()) == {"fail", "n/a"}
    assert time.monotonic() - started < 15


CRASHES_ON_GET_VRING_BASE = """
import os, sys
from vhost_user.messages import FrontendReq
from vhost_user_backend.daemon import VhostUserDaemon
from vhost_user_backend.devices.shmem_reference import ShmemRngDevice

class Crashy(VhostUserDaemon):
    def _dispatch(self, msg):
        if msg.request is FrontendReq.GET_VRING_BASE:
            os._exit(3)
        super()._dispatch(msg)

device = ShmemRngDevice()
device.backend = Crashy(device, sys.argv[1])
device.backend.serve_forever()
"""


def test_a_crash_fails_its_check_and_the_tool_restarts_the_command(tmp_path: Path) -> None:
    script = tmp_path / "crashy.py"
    script.write_text(CRASHES_ON_GET_VRING_BASE)
    report_json = tmp_path / "r.json"
    status, out, _ = check_backend(
        "--virtio-id", "4", "--json", str(report_json), "--", sys.executable, str(script),
        "{socket}",
    )  # fmt: skip
    assert status == 1, out
    report = json.loads(report_json.read_text())
    got = verdicts(report)
    assert [cid for cid, v in got.items() if v == "fail"] == ["rings.vring_base"]
    detail = next(c["detail"] for c in report["checks"] if c["id"] == "rings.vring_base")
    assert "exit status 3" in detail
    assert got["lifecycle.reactivate"] == got["lifecycle.reconnect"] == "pass"
    assert "the back-end was started 2 times" in out


# -- exit status 2 ------------------------------------------------------------------------------
def test_nothing_listening_is_exit_2(tmp_path: Path) -> None:
    status, out, _ = check_backend("--socket", str(tmp_path / "nobody.sock"))
    assert status == 2, out
    assert "could not run" in out


def test_a_command_that_fails_to_start_is_exit_2() -> None:
    status, out, _ = check_backend("--", "/bin/false", "{socket}")
    assert status == 2, out
    assert "exited with status 1" in out


def test_usage_errors_are_exit_2() -> None:
    assert check_backend()[0] == 2
    assert check_backend("--socket", "x", "--device", "floppy")[0] == 2
    status, out, _ = check_backend("--help")
    assert status == 0 and "--hostile" in out and "{socket}" in out
