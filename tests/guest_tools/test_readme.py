"""guest-tools/README.md's command synopsis says what ``vguest CMD --help`` says: the same
commands, and per command the same options and positional arguments."""

import re

import pytest
from vguest.cli import main

from tests.guest_tools.conftest import GUEST_TOOLS

#: Options every command takes; the README states them once, under the synopsis.
COMMON = {"-h", "--help", "--json", "--sysfs-root", "-v", "--verbose", "--wc"}
POSITIONALS = re.compile(r"\b(BDF|OFFSET|LENGTH|VALUE)\b")
OPTIONS = re.compile(r"(?<![\w-])(--?[a-z][a-z-]*)")


def positionals(usage: str) -> set[str]:
    """The positional arguments named in a usage text (option metavars left out)."""
    return set(POSITIONALS.findall(re.sub(r"--?[a-z][a-z-]* [^\s\]|)]+", "", usage)))


def readme_synopsis() -> dict[str, str]:
    """Command -> its synopsis lines (continuation lines joined) from the Commands block."""
    text = (GUEST_TOOLS / "README.md").read_text()
    block = text.split("## Commands", 1)[1].split("\n\n", 2)[1]
    synopsis: dict[str, str] = {}
    command = ""
    for line in block.splitlines():
        words = line.split()
        if words[0] == "vguest":
            command = words[1]
        synopsis[command] = synopsis.get(command, "") + " " + line.split("#")[0]
    return synopsis


def help_usage(capsys: pytest.CaptureFixture[str], command: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out.split("\n\n", 1)[0]  # the usage paragraph


def test_readme_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out.split("COMMAND\n", 1)[1].split("\n\n", 1)[0]
    commands = [line.split()[0] for line in listed.splitlines()]
    assert len(commands) == 9
    assert sorted(readme_synopsis()) == sorted(commands)


@pytest.mark.parametrize("command", sorted(readme_synopsis()))
def test_synopsis_matches_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    usage = help_usage(capsys, command).split(f"vguest {command}", 1)[1]
    readme = readme_synopsis()[command]
    assert set(OPTIONS.findall(readme)) == set(OPTIONS.findall(usage)) - COMMON
    assert positionals(readme) == positionals(usage)
