"""Every command's `--help` as a user sees it: Typer renders help texts as Rich markup, so a hand-written
`[default: ...]` must be escaped to be shown at all."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from mlx_vit.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands.items())
WRITTEN = re.compile(r"\[default: ([^\]]+)\]")


def written_defaults(command) -> list[str]:
    """The defaults that help texts spell out themselves (Typer's own come from the option's value)."""
    return [match for param in command.params for match in WRITTEN.findall(getattr(param, "help", None) or "")]


def test_some_commands_write_their_defaults():
    names = {name for name, command in COMMANDS if written_defaults(command)}
    assert {"classify", "embed", "search", "explain", "convert", "bench"} <= names


@pytest.mark.parametrize("name, command", COMMANDS, ids=[name for name, _ in COMMANDS])
def test_help_shows_every_written_default(name, command):
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    cells = [cell.strip() for row in result.stdout.splitlines() for cell in row.split("│") if cell.strip()]
    assert not [cell for cell in cells if cell.endswith(" .")], result.stdout
    for default in written_defaults(command):
        assert f"[default: {default}]" in result.stdout, default


def test_plain_help_shows_written_defaults_unescaped():
    """Without Rich (TYPER_USE_RICH=0) help is click's plain text, where a backslash would be shown."""
    env = dict(os.environ, TYPER_USE_RICH="0", COLUMNS="300")
    done = subprocess.run([sys.executable, "-m", "mlx_vit", "convert", "--help"], capture_output=True, text=True,
                          env=env, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Output folder. [default: ./NAME-mlx]" in done.stdout
    assert "\\[" not in done.stdout
