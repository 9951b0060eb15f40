"""systemd/keepwarm.service, checked by systemd's own tools.

`systemd-analyze verify` exits 0 on unknown keys and bad values, so a clean unit is one for
which it prints nothing at all. `systemd-analyze security --offline=true` scores the sandbox.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "keepwarm.service"
MAX_EXPOSURE = 2.0


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze not found: scripts/test installs it (Debian package systemd)"
    return path


def directives(text: str) -> dict[str, list[str]]:
    """`Section.Key` -> every value given to it, in order (keys may repeat in a unit)."""
    found: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key}", []).append(value)
    return found


@pytest.fixture
def checkable_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart binary exists.

    verify rejects an ExecStart whose program is missing, and /usr/local/bin/keepwarm exists
    only on a host where keepwarm is installed. The copy points at an executable stub in the
    temp dir with the same arguments; every other line is the shipped unit's, unchanged. The
    file keeps its name, which systemd reads as the unit's name.
    """
    stub = tmp_path / "keepwarm"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    original = "ExecStart=/usr/local/bin/keepwarm "
    assert text.count(original) == 1, "ExecStart is expected to run /usr/local/bin/keepwarm"
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(original, f"ExecStart={stub} "))
    return copy


def test_verify_prints_nothing(checkable_unit: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(checkable_unit)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_would_catch_a_bad_key(checkable_unit: Path) -> None:
    # Guards the check itself: if this systemd stopped reporting unknown keys, an empty
    # output above would prove nothing.
    checkable_unit.write_text(checkable_unit.read_text() + "\n[Service]\nProtectSistem=strict\n")
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(checkable_unit)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert "ProtectSistem" in result.stdout + result.stderr


def test_security_exposure_is_low(checkable_unit: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", "--no-pager", str(checkable_unit)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    match = re.search(r"Overall exposure level for keepwarm\.service: (\d+(?:\.\d+)?)", output)
    assert match, output
    assert float(match.group(1)) <= MAX_EXPOSURE, output


def test_unit_keeps_the_contract() -> None:
    found = directives(UNIT.read_text())
    expected = {
        "Service.Type": ["notify"],
        "Service.NotifyAccess": ["main"],
        "Service.Restart": ["on-failure"],
        "Service.RestartPreventExitStatus": ["78"],
        "Service.DynamicUser": ["yes"],
        "Service.StateDirectory": ["keepwarm"],
        "Service.ConfigurationDirectory": ["keepwarm"],
        # The key, and the observation token load_token reads from $CREDENTIALS_DIRECTORY.
        "Service.LoadCredential": ["anthropic_api_key:/etc/keepwarm/anthropic_api_key",
                                   "observe_token:/etc/keepwarm/observe_token"],
        "Service.ExecReload": ["/bin/kill -HUP $MAINPID"],
        "Service.ExecStart": ["/usr/local/bin/keepwarm run --config /etc/keepwarm/keepwarm.yaml"],
        "Service.RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
    }
    assert {key: found.get(key) for key in expected} == expected
    assert found["Service.WatchdogSec"], "the daemon pings a watchdog: it needs WatchdogSec="
    # The API lives at addresses we do not control: denying IPs would cut the keepalive off.
    assert "Service.IPAddressDeny" not in found
    assert "Service.PrivateNetwork" not in found
    from keepwarm.observations import TOKEN_CREDENTIAL

    assert any(v.startswith(f"{TOKEN_CREDENTIAL}:") for v in found["Service.LoadCredential"]), "the token is wired"
    # The key never travels in the environment.
    assert not any("ANTHROPIC_API_KEY" in value for value in found.get("Service.Environment", []))
