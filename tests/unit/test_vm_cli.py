"""``virtio-emu-vm``'s options and the QEMU arguments they become; ``virtio-emu-qemu`` without a
toolchain. No QEMU runs here (tests/vm/test_vm_cli.py boots the guests)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vm.cli import USAGE, SocketSpec, build_parser, job_args, qemu_escape

ROOT = Path(__file__).resolve().parents[2]


def test_vhost_user_spec_becomes_emulator_options_with_the_reference_id_by_default() -> None:
    spec = SocketSpec.parse("/tmp/be.sock")
    assert spec.path == Path("/tmp/be.sock")
    assert spec.emulator_args() == ["--virtio-id", "4"]
    spec = SocketSpec.parse("/tmp/fs.sock,virtio-id=26,num-queues=2,config-size=40,verbose")
    assert spec.emulator_args() == [
        "--virtio-id", "26", "--num-queues", "2", "--config-size", "40", "--verbose",
    ]  # fmt: skip


def test_native_spec_defaults_to_the_test_device_and_escapes_commas() -> None:
    assert SocketSpec.parse("/s").native_device("n0") == (
        "vhost-user-test-device-pci,chardev=n0,virtio-id=4,num_vqs=1"
    )
    assert SocketSpec.parse("/s,num_vqs=2").native_device("n0") == (
        "vhost-user-test-device-pci,chardev=n0,virtio-id=4,num_vqs=2"
    )
    assert SocketSpec.parse("/s,driver=vhost-user-fs-pci,tag=my=fs").native_device("n1") == (
        "vhost-user-fs-pci,chardev=n1,tag=my=fs"
    )
    assert qemu_escape("a,b") == "a,,b"


@pytest.mark.parametrize("text", ["", ",virtio-id=4", "/s,", "/s,=1"])
def test_malformed_socket_specs_are_usage_errors(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        SocketSpec.parse(text)


def test_the_job_is_the_command_as_shell_text_and_a_terminal_when_interactive() -> None:
    assert job_args(["sh", "-c", "echo a,b; exit 7"], tty=False) == [
        "-fw_cfg", "name=opt/org.virtio-emu/run,string=sh -c 'echo a,,b; exit 7'",
    ]  # fmt: skip
    shell = job_args([], tty=False)
    assert shell[:2] == ["-fw_cfg", "name=opt/org.virtio-emu/run,string=exec bash --login"]
    assert shell[2] == "-fw_cfg" and shell[3].startswith("name=opt/org.virtio-emu/tty,string=")
    assert len(job_args(["top"], tty=True)) == 4


def test_everything_after_the_double_dash_is_the_guest_command() -> None:
    args = build_parser().parse_args(["-v", "--", "vguest", "list", "--json", "-v"])
    assert args.verbose
    assert args.command == ["--", "vguest", "list", "--json", "-v"]  # run() drops the "--"


def test_readme_synopsis_is_the_one_help_prints() -> None:
    usage = build_parser().format_usage().strip()
    assert usage == f"usage: {USAGE}"
    for doc in ("README.md", "vm/README.md"):
        assert usage in (ROOT / doc).read_text(), doc


def test_qemu_wrapper_without_a_toolchain_says_how_to_build_one(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vm.qemu", "--version"],
        capture_output=True,
        text=True,
        env={**os.environ, "VIRTIO_EMU_CACHE": str(tmp_path)},
        timeout=30,
        check=False,
    )
    assert proc.returncode == 127
    assert "make toolchain" in proc.stderr
    assert proc.stdout == ""
