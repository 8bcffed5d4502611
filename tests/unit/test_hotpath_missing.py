"""Without its compiled hot path the emulator refuses to start, and says how to build it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from emulator.cli import main
from emulator.vfio_user import hotpath


def test_a_missing_module_is_a_clear_refusal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "emulator._hotpath", None)  # import raises ImportError
    with pytest.raises(hotpath.HotPathMissing) as refused:
        hotpath.require()
    assert "make setup" in str(refused.value) and "pip install -e ." in str(refused.value)
    sock = tmp_path / "emu.sock"
    with caplog.at_level(logging.ERROR, logger="emulator"):
        status = main(["--vfio-user-socket", str(sock), "--virtio-id", "4"])
    assert status == 1
    assert not sock.exists()
    assert [r.getMessage() for r in caplog.records] == [str(refused.value)]


def test_the_built_module_loads() -> None:
    hotpath.require()
