"""The ``raykd`` command line: one dispatcher over the five programs, run as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["data", "train", "tune", "export", "evaluate", "serve"]


def raykd(*args: str, module: str = "raykd") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def option_entries(help_text: str) -> list[tuple[str, str]]:
    """``(invocation, help)`` of every option in an argparse ``--help``, wrapped lines joined."""
    entries: list[list[str]] = []
    current: list[str] | None = None
    for line in help_text.splitlines():
        if line.startswith("  -"):
            current = [line.strip()]
            entries.append(current)
        elif current is not None and line.startswith("      "):
            current.append(line.strip())
        else:
            current = None
    out = []
    for lines in entries:
        invocation, _, first = lines[0].partition("  ")  # argparse puts 2+ spaces before the help
        out.append((invocation, " ".join([first.strip(), *lines[1:]]).strip()))
    return out


def test_help_lists_every_command_with_one_line_each_and_exits_0():
    res = raykd("--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: raykd")
    for name in COMMANDS:
        assert re.search(rf"^  {name}\s+\S", res.stdout, re.M), name


def test_version_prints_the_installed_version():
    res = raykd("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"raykd {version('raykd')}"


def test_an_unknown_command_exits_2_naming_the_closest_one():
    res = raykd("trian", "--config", "x.yaml")
    assert res.returncode == 2
    assert "unknown command 'trian'" in res.stderr and "Did you mean 'train'?" in res.stderr


def test_no_command_is_a_usage_error():
    res = raykd()
    assert res.returncode == 2 and "a command is required" in res.stderr


def test_a_missing_config_file_exits_2_with_an_error_line_not_a_traceback():
    res = raykd("train", "--config", "does-not-exist.yaml")
    assert res.returncode == 2
    assert "error: " in res.stderr and "does-not-exist.yaml" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("command", [*COMMANDS, "data synth", "data ingest", "data inspect"])
def test_every_option_shows_its_default_or_is_a_flag_or_required(command):
    res = raykd(*command.split(), "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: raykd {command} ")
    entries = option_entries(res.stdout)
    assert entries and entries[0][0] == "-h, --help"
    for invocation, text in entries:
        assert text, f"{command}: {invocation} has no help text"
        is_flag = all(" " not in part.strip() for part in invocation.split(","))
        assert is_flag or "default" in text or "required" in text, f"{command}: {invocation}: {text}"


def test_a_program_run_as_its_own_module_keeps_its_module_name():
    res = raykd("--help", module="raykd.tune")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m raykd.tune ")


def test_the_console_script_is_the_same_dispatcher():
    script = Path(sys.executable).with_name("raykd")
    if not script.is_file():
        pytest.skip("raykd is not installed as a console script in this environment")
    res = subprocess.run([str(script), "train", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: raykd train ")
