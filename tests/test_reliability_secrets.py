"""The API key never leaves keepwarm: not in a log line, a metric, a page, the ledger or a report.

Every command runs for real against `keepwarm emulator --api-key KEY` (a separate process
that accepts only that key), with the key coming from each of its three sources. Everything
any of them prints or writes is collected and searched for the key. Only its last four
characters may appear in a log, so the search is for everything before them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LONG_PROMPT, STARTUP_DEADLINE, DaemonProcess, daemon_env, free_port, keepwarm_cmd, write_config

from keepwarm.config import load_config, resolve_api_key

# Distinctive, and shaped like a real key; `PREFIX` is what must never appear anywhere.
KEY = "sk-ant-api03-LEAKCHECK-9f2b7c41e8d6a5307b1c-secretsTAIL"
PREFIX = KEY[:-4]
OTHER_KEY = "sk-ant-api03-WRONGKEY-5d0c9e8a7b6f4e3d2c1b-otherKEYZ"  # one the emulator refuses
SONNET, OPUS, SONNET_45 = "claude-sonnet-4-6", "claude-opus-4-8", "claude-sonnet-4-5"
DEADLINE = 20.0
Start = Callable[..., DaemonProcess]


class Outputs:
    """Everything the commands under test printed or wrote, labelled by where it came from.

    One-shot commands run side by side (each spends ~2 s of CPU importing the SDK), and are
    collected, with their exit codes checked, by `finish()`.
    """

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self._running: list[tuple[str, subprocess.Popen[bytes], int]] = []

    def add(self, where: str, data: str | bytes) -> None:
        self.items.append((where, data.encode("utf-8", "replace") if isinstance(data, str) else data))

    def start(self, where: str, *args: str, env: dict[str, str], expect: int) -> None:
        proc = subprocess.Popen(keepwarm_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self._running.append((where, proc, expect))

    def finish(self) -> dict[str, tuple[bytes, bytes]]:
        """Wait for every started command; return each one's (stdout, stderr)."""
        results = {}
        try:
            for where, proc, expect in self._running:
                # Nine Python processes start together here: generous, and free when they are quick.
                stdout, stderr = proc.communicate(timeout=STARTUP_DEADLINE)
                self.add(f"{where} stdout", stdout)
                self.add(f"{where} stderr", stderr)
                assert proc.returncode == expect, f"{where}: exit {proc.returncode}\n{stderr.decode()[-2000:]}"
                results[where] = (stdout, stderr)
        finally:
            for _, proc, _ in self._running:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
            self._running.clear()
        return results

    def leaks(self, secret: str) -> list[str]:
        """Where `secret` appears, in any of the encodings a file or a page could hold it."""
        needles = {secret.encode(), secret.encode("utf-16-le"), json.dumps(secret).encode()}
        return [where for where, data in self.items if any(n in data for n in needles)]


@pytest.fixture
def emulator_url(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`keepwarm emulator --api-key KEY` as its own process; yields its URL and its output file."""
    port = free_port()
    out = tmp_path / "emulator.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            keepwarm_cmd("emulator", "--port", str(port), "--time-scale", "0.01", "--api-key", KEY),
            stdout=sink, stderr=subprocess.STDOUT,
        )
        try:
            end = time.monotonic() + STARTUP_DEADLINE
            while b"listening on" not in out.read_bytes():
                assert proc.poll() is None and time.monotonic() < end, out.read_text()
                time.sleep(0.05)
            yield f"http://127.0.0.1:{port}", out
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def inject(url: str, fault: dict[str, Any]) -> None:
    request = urllib.request.Request(
        f"{url}/_emulator/faults", data=json.dumps(fault).encode(), method="POST",
        headers={"content-type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=5).close()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return bytes(resp.read())


def doc_for(url: str, models: tuple[str, ...] = (SONNET, OPUS), **api: Any) -> dict[str, Any]:
    return {
        "api": {"base_url": url, "timeout": "5s", **api},
        "defaults": {"interval": "500ms", "jitter": "0s"},
        "experts": [{"name": "analyst", "system": [{"text": LONG_PROMPT}], "models": list(models)}],
        "ledger": {"path": "ledger.sqlite"},
    }


def wait_warm(daemon: DaemonProcess, pings: float) -> None:
    daemon.wait_for(f"{pings:g} warm pings", lambda: daemon.total("keepwarm_pings_total", result="warm") >= pings,
                    DEADLINE)


def scrape_everything(daemon: DaemonProcess, out: Outputs, label: str) -> None:
    for path in ("/metrics", "/", "/healthz"):
        out.add(f"{label} {path}", daemon.get(path)[1])


def test_the_key_never_appears_in_any_output(
    tmp_path: Path, keepwarm_daemon: Start, emulator_url: tuple[str, Path]
) -> None:
    url, emulator_out = emulator_url
    out = Outputs()
    bare = daemon_env()
    with_env = daemon_env(ANTHROPIC_API_KEY=KEY)

    # The key in a file, in $CREDENTIALS_DIRECTORY (systemd's LoadCredential=), in the environment.
    key_file = tmp_path / "anthropic.key"
    key_file.write_text(KEY + "\n", encoding="utf-8")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "anthropic_api_key").write_text(KEY, encoding="utf-8")
    for secret in (key_file, creds / "anthropic_api_key"):
        secret.chmod(0o600)
    file_doc = doc_for(url, api_key_file="anthropic.key")

    # Two daemons on different models, so a fault injected for one does not hit the other:
    # one reads the key file and logs JSON, the other reads the environment and logs text.
    daemon = keepwarm_daemon(file_doc, env=bare)
    env_daemon = keepwarm_daemon(doc_for(url, (SONNET_45,)), env=with_env, name="env.yaml", args=("--log-format", "text"))

    # Meanwhile, the one-shot commands: each key source, a key the API refuses, config errors.
    file_config = write_config(tmp_path, file_doc, "file.yaml")
    creds_config = write_config(tmp_path, doc_for(url), "creds.yaml")
    broken = doc_for(url)
    broken["defaults"]["interval"] = "1h"
    broken_config = write_config(tmp_path, broken, "broken.yaml")
    (tmp_path / "two-keys").write_text(f"{KEY} {OTHER_KEY}\n", encoding="utf-8")
    two_keys = write_config(tmp_path, doc_for(url, api_key_file="two-keys"), "two.yaml")
    out.start("check(file)", "check", "--config", str(file_config), env=bare, expect=0)
    out.start("once(creds)", "once", "--config", str(creds_config), "--log-format", "json",
              env=daemon_env(CREDENTIALS_DIRECTORY=str(creds)), expect=0)
    out.start("once(refused key)", "once", "--config", str(creds_config), env=daemon_env(ANTHROPIC_API_KEY=OTHER_KEY),
              expect=3)
    out.start("report(config error)", "report", "--config", str(broken_config), env=with_env, expect=78)
    out.start("run(bad key file)", "run", "--config", str(two_keys), env=bare, expect=78)
    # A key file others can read is used, with a warning that names the file.
    shared = tmp_path / "shared.key"
    shared.write_text(KEY + "\n", encoding="utf-8")
    shared.chmod(0o644)
    shared_config = write_config(tmp_path, doc_for(url, api_key_file="shared.key"), "shared.yaml")
    out.start("once(shared key file)", "once", "--config", str(shared_config), env=bare, expect=0)

    # Auth errors: a 401 for the file daemon, a 403 for the environment one.
    wait_warm(daemon, 2)
    wait_warm(env_daemon, 1)
    inject(url, {"status": 401, "model": SONNET})
    inject(url, {"status": 403, "model": SONNET_45})
    daemon.wait_for("the 401", lambda: daemon.total("keepwarm_ping_errors_total", error_type="authentication") >= 1,
                    DEADLINE)
    env_daemon.wait_for("the 403", lambda: env_daemon.total("keepwarm_ping_errors_total", error_type="permission") >= 1,
                        DEADLINE)
    assert any("file " + str(key_file) in e.get("event", "") for e in daemon.events()), "the 401 names the key file"
    assert "environment variable ANTHROPIC_API_KEY" in env_daemon.text(), "the 403 names the variable"
    scrape_everything(daemon, out, "run(file)")
    scrape_everything(env_daemon, out, "run(env)")

    # A reload, then a rejected one, then pings again; every page once more.
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("a reload", lambda: any(e.get("event") == "config reloaded" for e in daemon.events()), DEADLINE)
    daemon.config.write_text("experts: [}\n", encoding="utf-8")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("a rejected reload", lambda: daemon.total("keepwarm_config_last_reload_successful") == 0, DEADLINE)
    wait_warm(daemon, daemon.total("keepwarm_pings_total", result="warm") + 2)
    scrape_everything(daemon, out, "run(file)")
    for d, label in ((daemon, "run(file)"), (env_daemon, "run(env)")):
        assert d.stop()[0] == 0
        out.add(f"{label} log", d.text())

    results = out.finish()
    refused_out, refused_err = results["once(refused key)"]
    assert b"authentication" in refused_out + refused_err
    warned = [line for line in results["once(shared key file)"][1].decode().splitlines()
              if "WARNING" in line and str(shared) in line]
    assert warned and "readable by other users" in warned[0], "a key file others can read is named in a warning"
    for fmt in ("table", "json", "csv"):
        out.start(f"report {fmt}", "report", "--ledger", str(tmp_path / "ledger.sqlite"), "--since", "all",
                  "--format", fmt, env=bare, expect=0)
    out.finish()
    for name in ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"):
        if (tmp_path / name).exists():
            out.add(name, (tmp_path / name).read_bytes())
    out.add("emulator output", emulator_out.read_bytes())
    out.add("emulator request log", fetch(f"{url}/_emulator/log"))

    assert out.leaks(PREFIX) == [], "the key leaked"
    assert out.leaks(OTHER_KEY[:-4]) == [], "the refused key leaked"
    # The search looked at real output: the key's last four characters are allowed, and shown.
    assert [w for w, data in out.items if KEY[-4:].encode() in data], "the key's hint appears somewhere"
    assert len(out.items) > 25


def test_the_loaded_config_and_key_hold_no_secret_in_their_repr(tmp_path: Path) -> None:
    (tmp_path / "k").write_text(KEY + "\n", encoding="utf-8")
    (tmp_path / "k").chmod(0o600)
    path = write_config(tmp_path, doc_for("http://127.0.0.1:9", api_key_file="k"))
    config = load_config(path)
    key, warnings = resolve_api_key(config, {})
    assert key.value == KEY and warnings == []
    for text in (repr(config), str(config), repr(config.api), repr(key), str(key)):
        assert PREFIX not in text, text[:200]
    assert key.hint.endswith(KEY[-4:])
