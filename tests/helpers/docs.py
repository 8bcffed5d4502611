"""The README's command blocks, read by the tests that run them so the docs cannot rot."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Where the project's commands are installed (the venv's bin).
BIN = Path(sys.executable).parent


def readme_block(marker: str) -> list[str]:
    """The commands (not comments) of the code block right after the README line ``marker``."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    assert lines[start + 1].startswith("```"), f"no code block after {marker!r}"
    end = lines.index("```", start + 2)
    return [ln for ln in lines[start + 2 : end] if ln.strip() and not ln.startswith("#")]


def without_comment(line: str) -> str:
    return line.split("  #", 1)[0].strip()


def user_env() -> dict[str, str]:
    """A user's shell with the venv's commands on PATH."""
    return {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


GUIDE = ROOT / "docs" / "writing-a-device.md"


def guide_block(marker: str, path: Path = GUIDE) -> str:
    """The text of the code block right after the line holding ``<!-- writing-a-device: MARKER``
    in the newcomer's guide."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if f"<!-- writing-a-device: {marker}" in line)
    assert lines[start + 1].startswith("```"), f"no code block after {marker!r}"
    end = lines.index("```", start + 2)
    return "\n".join(lines[start + 2 : end]) + "\n"


def guide_commands(marker: str, tmp: Path) -> list[str]:
    """The guide's commands after ``marker``, ``/tmp/`` moved to ``tmp``."""
    lines = guide_block(marker).splitlines()
    return [
        without_comment(ln).replace("/tmp/", f"{tmp}/")
        for ln in lines
        if ln.strip() and not ln.startswith("#")
    ]
