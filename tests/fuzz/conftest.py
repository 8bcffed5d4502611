"""Hypothesis profiles for the fuzz suite and the campaign report.

``default`` keeps the whole directory within about a minute and a half on two shared cores;
``campaign`` (``make fuzz``) runs many more examples and lets the campaign tests run for
``FUZZ_CAMPAIGN_SECONDS`` (default 3600, shared by the three sockets) or until each socket has
seen ``FUZZ_CAMPAIGN_MESSAGES`` messages (default 1,000,000).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from emulator.vhost_frontend import connection
from tests.fuzz import campaign

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]
settings.register_profile(
    "default", max_examples=12, deadline=None, suppress_health_check=_SUPPRESS, derandomize=False
)
settings.register_profile(
    "campaign", max_examples=2000, deadline=None, suppress_health_check=_SUPPRESS
)


def pytest_configure(config: pytest.Config) -> None:
    campaign.ACTIVE = config.getoption("--hypothesis-profile", None) == "campaign"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if campaign.REPORT:
        terminalreporter.section("fuzz counts")
        for line in campaign.report_lines():
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def fast_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    """The front-end retries a lost back-end after 1 s; fuzzing drops it on purpose often."""
    monkeypatch.setattr(connection, "RECONNECT_INTERVAL", 0.01)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
