"""``make backend-reports``: docs/backends/*.md and *.json, check-backend run on every back-end.

Each back-end is started by ``virtio-emu check-backend ... -- CMD`` itself, as a user would type
it: the toolchain's virtiofsd and qemu-storage-daemon through ``virtio-emu-virtiofsd`` and
``virtio-emu-storage-daemon`` (vm/qemu.py), ours by their console scripts or ``python -m``. The
commands run in a scratch directory with relative paths (``share``, ``disk.img``, ``*.ctl``),
so the commands a report shows are the same from run to run; the back-end's version goes into
the report's header. Reports change when Debian ships another virtiofsd or QEMU: tests compare
verdicts with the checked-in JSON (``verdicts``), never bytes.

This module runs the tool as a subprocess and imports none of it::

    python -m vm.backend_reports [--out DIR] [NAME...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from vm.qemu import HostBinaries
from vm.toolchain import HOST_ROOT_DIR, default_cache_dir

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "backends"
#: check-backend's exit statuses that still produced a report (0: no fail, 1: some fail).
REPORTED = (0, 1)
RUN_TIMEOUT = 300.0
DISK_BYTES = 1 << 20
BROKEN_ALL = "wrong-bit,reply-without-need-reply,overlapping-maps,no-shmem-config-reply"


def _ours() -> str:
    return f"virtio-shmem-emu {metadata.version('virtio-shmem-emu')} (this repository)"


def _toolchain(package: str, program: str) -> Callable[[], str]:
    """The program's own ``--version`` line and the Debian package's version."""

    def version() -> str:
        binaries = HostBinaries(default_cache_dir() / HOST_ROOT_DIR)
        if not binaries.loader.exists():
            raise RuntimeError(f"no VM toolchain at {binaries.root}: run `make toolchain` first")
        argv = (
            binaries.virtiofsd_argv("--version")
            if program == "virtiofsd"
            else binaries.storage_daemon_argv("--version")
        )
        out = subprocess.run(
            argv, capture_output=True, text=True, env=binaries.env(), timeout=30, check=True
        ).stdout
        first = out.strip().splitlines()[0] if out.strip() else program
        return f"{first}; Debian package {package} {binaries.package_version(package)}"

    return version


@dataclass(frozen=True)
class BackendRun:
    """One report: the back-end's command (``{socket}`` for the tool to fill in), the tool's
    options for it (every run adds ``--hostile``: the tool restarts the back-end) and a note
    saying why a verdict that is not a pass is what it is."""

    name: str
    title: str
    command: tuple[str, ...]
    options: tuple[str, ...]
    version: Callable[[], str]
    toolchain: bool = False
    note: str = ""


BACKENDS: tuple[BackendRun, ...] = (
    BackendRun(
        "virtiofsd",
        "virtiofsd (Debian trixie, unmodified)",
        (
            "virtio-emu-virtiofsd", "--socket-path={socket}", "--shared-dir=share",
            "--tag=hostshare", "--sandbox=namespace",
        ),
        ("--virtio-id", "26", "--num-queues", "2"),
        _toolchain("virtiofsd", "virtiofsd"),
        toolchain=True,
        note="virtiofsd offers no shared-memory feature (it has no DAX), so the shmem checks are "
        "n/a. It exits when its front-end leaves (lifecycle.reconnect: exits cleanly), so the "
        "tool restarts it for every check that needs a fresh connection.",
    ),
    BackendRun(
        "qemu-storage-daemon",
        "qemu-storage-daemon, vhost-user-blk export (Debian trixie-backports, unmodified)",
        (
            "virtio-emu-storage-daemon",
            "--blockdev", "driver=file,node-name=file0,filename=disk.img",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
            "addr.path={socket},writable=on",
        ),
        ("--virtio-id", "2", "--num-queues", "1"),
        _toolchain("qemu-utils", "qemu-storage-daemon"),
        toolchain=True,
        note="Two warnings, both libvhost-user's behaviour and harmless behind QEMU: a request "
        "it does not know, sent with NEED_REPLY, is acked with status 0 (success) instead of an "
        "error (libvhost-user acks whatever its handler left unanswered), and GET_CONFIG "
        "answers from offset 0 whatever offset was asked (its device callback gets no offset); "
        "QEMU always reads the config from offset 0. No shared-memory feature: shmem n/a.",
    ),
    BackendRun(
        "vhost-device-shmem",
        "vhost-device-shmem, the reference device (maps on request from its control socket)",
        ("vhost-device-shmem", "--socket-path", "{socket}", "--control-socket", "shmem.ctl"),
        ("--virtio-id", "4", "--device", "shmem-reference:shmem.ctl"),
        _ours,
    ),
    BackendRun(
        "vhost-device-fs",
        "vhost-device-fs, virtio-fs with a DAX window (maps on FUSE SETUPMAPPING)",
        (
            "vhost-device-fs", "--socket-path", "{socket}", "--shared-dir", "share",
            "--tag", "daxshare",
        ),
        ("--virtio-id", "26", "--num-queues", "2", "--device", "virtiofs-dax"),
        _ours,
    ),
    BackendRun(
        "framebuffer",
        "the framebuffer example (a persistent read-only map of its frame)",
        ("python", "-m", "vhost_user_backend.devices.examples.framebuffer", "--socket-path",
         "{socket}"),
        ("--virtio-id", "4"),
        _ours,
    ),
    BackendRun(
        "doorbell",
        "the doorbell example (a persistent read-only map of its event ring)",
        ("python", "-m", "vhost_user_backend.devices.examples.doorbell", "--socket-path",
         "{socket}"),
        ("--virtio-id", "4"),
        _ours,
    ),
    BackendRun(
        "broken-backend",
        "the broken fixture with every break (testkit/broken_backend.py)",
        ("python", "-m", "testkit.broken_backend", "--socket", "{socket}", "--break", BROKEN_ALL),
        ("--virtio-id", "4"),
        _ours,
        note="Deliberately wrong: each break must fail exactly its own check "
        "(wrong-bit: negotiation.shmem_bit, reply-without-need-reply: negotiation.reply_ack, "
        "overlapping-maps: shmem.map_rules, no-shmem-config-reply: shmem.get_shmem_config).",
    ),
)  # fmt: skip

BY_NAME = {run.name: run for run in BACKENDS}


@dataclass(frozen=True)
class Report:
    name: str
    status: int
    markdown: Path
    json: Path
    output: str

    def verdicts(self) -> dict[str, str]:
        return verdicts(self.json)


def verdicts(json_path: Path) -> dict[str, str]:
    """check id -> verdict, from a check-backend ``--json`` file."""
    data = json.loads(json_path.read_text())
    return {check["id"]: check["verdict"] for check in data["checks"]}


def prepare(workdir: Path) -> None:
    """What the commands name by relative path: a shared directory and a disk image."""
    share = workdir / "share"
    share.mkdir(parents=True, exist_ok=True)
    (share / "hello.txt").write_text("hello from the host\n")
    with (workdir / "disk.img").open("wb") as disk:
        disk.truncate(DISK_BYTES)


def tool_env() -> dict[str, str]:
    """This interpreter's bin directory first on PATH: the console scripts and ``python``
    of the commands are the project's."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_one(run: BackendRun, out: Path, workdir: Path, *, timeout: float = RUN_TIMEOUT) -> Report:
    """check-backend on ``run``'s back-end; its Markdown and JSON land in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    prepare(workdir)
    markdown, json_path = out / f"{run.name}.md", out / f"{run.name}.json"
    version = run.version()
    argv = [
        sys.executable, "-m", "emulator", "check-backend",
        *run.options, "--hostile", "--no-color",
        "--title", run.title, "--backend-version", version,
        "--markdown", str(markdown), "--json", str(json_path),
        "--", *run.command,
    ]  # fmt: skip
    proc = subprocess.run(
        argv,
        cwd=workdir,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = proc.stdout + proc.stderr
    if proc.returncode not in REPORTED or not json_path.exists():
        raise RuntimeError(f"check-backend on {run.name} exited {proc.returncode}:\n{output}")
    about = ["", "## About this back-end", ""]
    if run.note:
        about += [run.note, ""]
    about.append(
        "Regenerated by `make backend-reports` (vm/backend_reports.py); tests compare the "
        "verdicts, not the text."
    )
    markdown.write_text(markdown.read_text() + "\n".join(about) + "\n")
    return Report(run.name, proc.returncode, markdown, json_path, output)


def generate(names: Sequence[str], out: Path) -> list[Report]:
    reports = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"report-{name}-") as work:
            report = run_one(BY_NAME[name], out, Path(work))
        counts: dict[str, int] = {}
        for verdict in report.verdicts().values():
            counts[verdict] = counts.get(verdict, 0) + 1
        print(f"{name}: exit {report.status}, {counts}", flush=True)
        reports.append(report)
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vm.backend_reports", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(BY_NAME))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BY_NAME]
    if unknown:
        parser.error(f"unknown back-end {', '.join(unknown)} (known: {', '.join(BY_NAME)})")
    generate(args.names or list(BY_NAME), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
