"""Fixtures for tests that boot a real guest: the toolchain (built on demand) and its logs."""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Iterator

import pytest

from vm.guest import Guest
from vm.toolchain import Toolchain, ToolchainError, ensure_toolchain

SKIP_ENV = "VIRTIO_EMU_SKIP_VM"
log = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def toolchain() -> Toolchain:
    """The built toolchain; building it if needed is part of the test run, not a reason to skip."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: tests needing QEMU or a guest are skipped on request")
    try:
        return ensure_toolchain(progress=log.warning)
    except ToolchainError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach the console and QEMU log tails of any guest the test used."""
    report = yield
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Guest):
                report.sections.append((f"guest {value.config.name}", value.console_tail(80)))
            elif callable(getattr(value, "failure_report", None)):  # a Scenario, a ProcessGroup
                name = getattr(value, "name", type(value).__name__)
                report.sections.append((f"processes {name}", value.failure_report(80)))
    return report


@pytest.fixture(scope="module")
def guest(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """One plain guest per module (a boot costs ~12 s under TCG); reboots allowed for reset."""
    workdir = tmp_path_factory.mktemp("guest")
    with Guest.boot(name="plain", toolchain=toolchain, workdir=workdir, allow_reboot=True) as g:
        yield g
