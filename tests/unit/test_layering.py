"""The floor plan of docs/architecture.md, checked: who may import whom.

Each package's modules are parsed (not imported) and every ``import``/``from`` naming one of the
project's packages is compared with the allowed set, so a shortcut across the layers fails here
before a reader trips over it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {
    "wire",
    "vhost_user",
    "emulator",
    "vhost_user_backend",
    "vguest",
    "testkit",
    "vm",
    "bench",
    "conformance",
}

#: package (or sub-package) -> the packages of ours it may import besides itself
ALLOWED: dict[str, set[str]] = {
    "wire": set(),
    "vhost_user": {"wire"},
    "emulator.vfio_user": {"wire", "emulator"},
    "emulator": {"wire", "vhost_user"},
    "vhost_user_backend": {"wire", "vhost_user", "vguest"},
    "conformance": {"wire", "vhost_user", "vhost_user_backend"},
    "vguest": set(),
    "testkit": {"wire", "vhost_user", "emulator", "vhost_user_backend", "vguest", "conformance"},
    "vm": {"testkit", "vguest"},
}
#: The one import across the floor plan: the emulator's command line dispatches
#: ``virtio-emu check-backend`` to ``conformance.cli`` (the tool judges back-ends without the
#: emulator's code; only its command word lives there).
EXCEPTIONS: dict[str, set[str]] = {"emulator/cli.py": {"conformance.cli"}}


def _package_files(package: str) -> list[Path]:
    base = ROOT / "guest-tools" if package == "vguest" else ROOT
    return sorted(base.joinpath(*package.split(".")).rglob("*.py"))


def _imported_packages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            if name.split(".")[0] in OURS:
                found.add(name)
    return found


def _violations(package: str) -> list[str]:
    own_root = package.split(".", maxsplit=1)[0]
    allowed = ALLOWED[package] | {own_root}
    bad = []
    for path in _package_files(package):
        excepted = EXCEPTIONS.get(str(path.relative_to(ROOT)), set())
        for name in _imported_packages(path) - excepted:
            top = name.split(".")[0]
            if top not in allowed:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
            if package == "emulator.vfio_user" and name.startswith("emulator.vhost_frontend"):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_layers_below(package: str) -> None:
    assert _package_files(package), f"{package} has no modules"
    assert _violations(package) == []


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\nfrom emulator.app import Emulator\nimport vhost_user.codec\n")
    assert _imported_packages(module) == {"emulator.app", "vhost_user.codec"}


def test_only_the_command_line_imports_the_conformance_tool() -> None:
    """The exception is one file wide: any other emulator module importing it is caught."""
    importers = [
        str(path.relative_to(ROOT))
        for path in _package_files("emulator")
        if any(name.startswith("conformance") for name in _imported_packages(path))
    ]
    assert importers == ["emulator/cli.py"]
