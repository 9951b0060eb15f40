"""Fixtures shared by the daemon's tests: a real emulator, config files, free ports."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from keepwarm.emulator import Emulator

ROOT = Path(__file__).resolve().parent.parent
# Sized with the emulator's rule (a token per 4 bytes): ~1,500 tokens, above the 1,024
# minimum of claude-sonnet-4-6 and below the 4,096 of claude-haiku-4-5.
LONG_PROMPT = "You are a careful assistant. Answer briefly and cite your sources. " * 90
SHORT_PROMPT = "You are terse."


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """A real emulator on loopback, at real-time TTLs unless a test scales them."""
    with Emulator() as emu:
        yield emu


def write_config(directory: Path, doc: dict[str, Any], name: str = "keepwarm.yaml") -> Path:
    """Write a config document as YAML and return its path."""
    path = directory / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def basic_doc(base_url: str | None = None, **defaults: Any) -> dict[str, Any]:
    """A small valid config: a cacheable expert on two models and a too-short one."""
    doc: dict[str, Any] = {
        "defaults": {"models": ["claude-sonnet-4-6"], **defaults},
        "experts": [
            {"name": "analyst", "system": [{"text": LONG_PROMPT}], "models": ["claude-sonnet-4-6", "claude-opus-4-8"]},
            {"name": "terse", "system": [{"text": SHORT_PROMPT}]},
        ],
    }
    if base_url:
        doc["api"] = {"base_url": base_url}
    return doc


def keepwarm_cmd(*args: str) -> list[str]:
    """The `keepwarm` command, run with this interpreter."""
    return [sys.executable, "-m", "keepwarm", *args]
