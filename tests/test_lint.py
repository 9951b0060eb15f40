"""The package stays `mypy --strict` and `ruff` clean, checked like any other test.

The tools run from this interpreter's environment (`python -m ...`): on a fresh machine the
virtualenv's `bin` is not on PATH, so looking them up there would fail or find another copy.
"""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def _run(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_ruff() -> None:
    result = _run(sys.executable, "-m", "ruff", "check", "keepwarm")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    result = _run(sys.executable, "-m", "mypy", "keepwarm")
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_passes_without_the_virtualenv_on_path() -> None:
    """A fresh machine's PATH (`env -i PATH=/usr/bin:/bin`) has no venv `bin`: the checks must not need it."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    result = _run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_lint.py::test_ruff", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
