"""The package stays `mypy --strict` and `ruff` clean (STYLE.md), checked like any other test."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import ROOT


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff() -> None:
    assert shutil.which("ruff"), "ruff comes with the test extra (scripts/test installs it)"
    result = _run("ruff", "check", "keepwarm")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    result = _run(sys.executable, "-m", "mypy", "keepwarm")
    assert result.returncode == 0, result.stdout + result.stderr
