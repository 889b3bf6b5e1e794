"""The command line explains itself: every `--help` exits 0 with its usage, a usage error names
the command and exits 2, and the README's commands use only flags their command reads."""

import os
import re
import subprocess
import sys

import pytest

from picie_jax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "picie_jax.main", *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )


def test_help_lists_every_command_and_exits_0():
  result = _cli("--help")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("usage: picie-jax COMMAND")
  for name, command in main._COMMANDS.items():
    assert f"  {name}" in result.stdout and command.summary in result.stdout


@pytest.mark.parametrize("command", list(main._COMMANDS))
def test_each_command_has_its_own_help(command, monkeypatch, capsys):
  for argv in ([command, "--help"], ["help", command], [command, "-h", "--workdir", "x"]):
    monkeypatch.setattr(sys, "argv", ["picie-jax", *argv])
    with pytest.raises(SystemExit) as exit_:
      main.run()
    assert exit_.value.code == 0, argv
    text = capsys.readouterr().out
    assert text.startswith(f"usage: picie-jax {command}"), argv
    assert "examples:\n  picie-jax " + command in text
    for flag in main._COMMANDS[command].flags:
      assert f"  --{flag}" in text, (command, flag)


def test_usage_errors_name_the_command_and_exit_2():
  unknown = _cli("trian", "--workdir", "x")
  assert unknown.returncode == 2
  assert "unknown command 'trian'" in unknown.stderr and "train, eval" in unknown.stderr
  missing = _cli("segment", "--workdir", "x", "photo.jpg")
  assert missing.returncode == 2
  assert "segment needs --out DIR" in missing.stderr
  assert "usage: picie-jax segment" in missing.stderr
  unread = _cli("train", "--workdir", "x", "--seeds", "1")
  assert unread.returncode == 2 and "train does not read --seeds" in unread.stderr


def _readme_commands():
  """(command, its flags) for every `picie-jax COMMAND ...` in the README's code blocks."""
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", f.read(), flags=re.S)
  found = []
  for block in blocks:
    for line in block.replace("\\\n", " ").splitlines():
      for match in re.finditer(r"picie-jax (\w+)([^#&|;]*)", line):
        flags = {name.split(".")[0] for name in re.findall(r"--([a-z_.]+)", match.group(2))}
        found.append((match.group(1), flags))
  return found


def test_readme_commands_use_only_flags_their_command_reads():
  commands = _readme_commands()
  assert {name for name, _ in commands} == set(main._COMMANDS)
  for name, flags in commands:
    assert flags <= set(main._COMMANDS[name].flags), (name, flags)
