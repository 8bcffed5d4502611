"""vm/backend_reports.py and HostBinaries.package_version without running anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vm.backend_reports import BACKENDS, BY_NAME, main, verdicts
from vm.qemu import HostBinaries

STATUS = """\
Package: virtiofsd
Status: install ok installed
Architecture: amd64
Version: 1.13.2-1+deb13u1

Package: qemu-utils
Status: deinstall ok config-files
Version: 1:10.0.0+ds-1

Package: qemu-utils-extra
Status: install ok installed
Description: a line: with a colon
Version: 9.9
"""


def test_package_version_reads_installed_packages_only(tmp_path: Path) -> None:
    status = tmp_path / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    status.write_text(STATUS)
    binaries = HostBinaries(tmp_path)
    assert binaries.package_version("virtiofsd") == "1.13.2-1+deb13u1"
    assert binaries.package_version("qemu-utils") is None  # removed, config files left
    assert binaries.package_version("qemu-utils-extra") == "9.9"
    assert binaries.package_version("absent") is None
    assert HostBinaries(tmp_path / "nothing").package_version("virtiofsd") is None


def test_every_backend_is_started_by_the_tool_on_its_socket() -> None:
    assert len(BY_NAME) == len(BACKENDS) == 7
    for run in BACKENDS:
        assert any("{socket}" in arg for arg in run.command), run.name
        assert "--virtio-id" in run.options, run.name
    assert {run.name for run in BACKENDS if run.toolchain} == {"virtiofsd", "qemu-storage-daemon"}


def test_verdicts_and_unknown_names(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    checks = [{"id": "a.b", "verdict": "pass"}, {"id": "a.c", "verdict": "n/a"}]
    report.write_text(json.dumps({"checks": checks}))
    assert verdicts(report) == {"a.b": "pass", "a.c": "n/a"}
    with pytest.raises(SystemExit) as exc:
        main(["nope", "--out", str(tmp_path)])
    assert exc.value.code == 2
