"""A real guest boots from the built image and runs commands through the agent."""

from __future__ import annotations

import json

import pytest

from vm.guest import Guest, GuestCommandError
from vm.toolchain import Toolchain

pytestmark = pytest.mark.vm


def test_guest_runs_debian_kernel_6_12(guest: Guest, toolchain: Toolchain) -> None:
    release = guest.run(["uname", "-r"], check=True).stdout.strip()
    assert release.startswith("6.12.")
    assert release == toolchain.read_manifest()["kernel_release"]


def test_lspci_lists_the_agent_and_disk_devices(guest: Guest) -> None:
    ids = {line.split()[2] for line in guest.run(["lspci", "-n"], check=True).stdout.splitlines()}
    assert "1af4:1003" in ids  # virtio console (the agent's port)
    assert "1af4:1001" in ids  # virtio block (the root disk)


def test_guest_python_has_cffi_and_pyudev(guest: Guest) -> None:
    out = guest.run(
        ["python3", "-c", "import cffi, pyudev; print(cffi.__version__, pyudev.__version__)"],
        check=True,
    ).stdout.split()
    assert len(out) == 2


def test_root_is_the_labelled_image_on_virtio(guest: Guest) -> None:
    source = guest.run(["findmnt", "-n", "-o", "SOURCE", "/"], check=True).stdout.strip()
    label = guest.run(["blkid", "-s", "LABEL", "-o", "value", source], check=True).stdout
    assert source.startswith("/dev/vd")
    assert label.strip() == "guestroot"


def test_json_stdin_and_exit_status_round_trip(guest: Guest) -> None:
    payload = {"text": 'h\u00e9llo\n"quoted"', "n": [1, 2, 3]}
    assert guest.json(["cat"], stdin=json.dumps(payload)) == payload
    failed = guest.sh("echo out; echo err >&2; exit 7")
    assert (failed.rc, failed.stdout, failed.stderr) == (7, "out\n", "err\n")
    with pytest.raises(GuestCommandError, match="rc=7"):
        failed.check()


def test_missing_program_and_timeout_are_reported(guest: Guest) -> None:
    missing = guest.run(["/nonexistent/program"])
    assert missing.rc == -1
    assert missing.error is not None and "FileNotFoundError" in missing.error
    slow = guest.run(["sleep", "30"], timeout=1)
    assert slow.rc == -1
    assert slow.error is not None and "timed out" in slow.error


def test_guest_tools_are_installed(guest: Guest, toolchain: Toolchain) -> None:
    """The image step ran guest-tools' install: the wrapper and an importable package."""
    if not toolchain.read_manifest()["guest_tools"]:
        pytest.fail("the image was built without guest-tools (no install target at build time)")
    guest.run(["test", "-x", "/usr/local/bin/vguest"], check=True)
    where = guest.run(
        ["env", "PYTHONPATH=/opt/vguest", "python3", "-c", "import vguest; print(vguest.__file__)"],
        check=True,
    )
    assert where.stdout.startswith("/opt/vguest/vguest/")


def test_reset_reboots_the_guest(guest: Guest) -> None:
    guest.sh("echo before-reset > /run/marker", check=True)
    before = guest.ready_event["uptime"]
    ready = guest.reset()
    assert ready["event"] == "ready"
    assert guest.run(["test", "-e", "/run/marker"]).rc == 1  # tmpfs is gone: a real reboot
    assert guest.run(["uname", "-r"], check=True).stdout.startswith("6.12.")
    assert ready["uptime"] < before + 60
