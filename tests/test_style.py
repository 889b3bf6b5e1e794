"""The tree has one format (pyink, Google style) and passes one lint config (ruff), both set in
pyproject.toml."""

import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "command",
    [["pyink", "--check", "--quiet", "."], ["ruff", "check", "--quiet", "."]],
    ids=["pyink", "ruff"],
)
def test_tree_is_formatted_and_lint_clean(command):
  result = subprocess.run(
      [sys.executable, "-m", *command], cwd=_ROOT, capture_output=True, text=True, check=False
  )
  assert result.returncode == 0, (
      f"{' '.join(command)} failed; run `pyink . && ruff check --fix .`:\n"
      f"{result.stdout}{result.stderr}"
  )
