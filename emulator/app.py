"""Wires the parts together and runs the selector loop (filled in by the integration step)."""

from __future__ import annotations

from emulator.config import EmulatorConfig


def run(config: EmulatorConfig) -> int:
    raise NotImplementedError(config)
