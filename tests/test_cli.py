"""The `keepwarm` command as a user runs it: real processes, a real emulator, real HTTP.

TTL and interval are shrunk together (the emulator scales its TTLs) so a daemon shows
minutes of cache life in seconds; tests poll with a deadline, they never sleep a fixed time.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LONG_PROMPT, ROOT, basic_doc, free_port, keepwarm_cmd, write_config
from prometheus_client.parser import text_string_to_metric_families

from keepwarm.emulator import Emulator
from keepwarm.store import read_ledger

DEADLINE = 40.0


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        keepwarm_cmd(*args), capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(metrics: dict, name: str, **labels: str) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


def wait_for(what: str, check: Callable[[], bool], proc: subprocess.Popen[str], deadline: float = DEADLINE) -> None:
    """Poll `check` until it holds; fail with the daemon's output if it never does."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            break
        try:
            if check():
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"timed out waiting for {what}; exit={proc.returncode}\n{err[-3000:]}")


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `keepwarm` processes that are killed at the end of the test, whatever happens."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            keepwarm_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or dict(os.environ)
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    return proc.returncode, err


def test_help_for_every_command() -> None:
    for cmd in ("run", "once", "check", "emulator"):
        result = run(cmd, "--help")
        assert result.returncode == 0 and "usage: keepwarm" in result.stdout, cmd


def test_usage_and_config_errors_have_their_exit_codes(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KEEPWARM_CONFIG"}
    result = subprocess.run(keepwarm_cmd("check"), capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 2 and "--config is required" in result.stderr
    bad = ROOT / "tests" / "data" / "invalid-timing.yaml"
    for cmd in ("run", "once", "check"):
        result = run(cmd, "--config", str(bad))
        assert result.returncode == 78, cmd
        assert "defaults.interval: 5m must be below the ttl (5m)" in result.stderr
    # The config may come from the environment too.
    result = run("check", env={"KEEPWARM_CONFIG": str(bad)})
    assert result.returncode == 78


def test_an_unreadable_key_file_is_a_config_error(tmp_path: Path, emulator: Emulator) -> None:
    doc = basic_doc(emulator.base_url)
    doc["api"]["api_key_file"] = "missing-key"
    path = write_config(tmp_path, doc)
    result = run("once", "--config", str(path), env={"ANTHROPIC_API_KEY": ""})
    assert result.returncode == 78 and "missing-key: cannot read it" in result.stderr


def test_check_flags_the_below_minimum_pair_and_exits_3(tmp_path: Path, emulator: Emulator) -> None:
    path = write_config(tmp_path, basic_doc(emulator.base_url))
    result = run("check", "--config", str(path), env={"ANTHROPIC_API_KEY": "sk-test-check"})
    assert result.returncode == 3, result.stderr
    rows = {line.split()[0] + "/" + line.split()[1]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    assert "below-minimum" in rows["terse/claude-sonnet-4-6"]
    assert "below-minimum" not in rows["analyst/claude-sonnet-4-6"] and " ok" in rows["analyst/claude-sonnet-4-6"]
    assert "TTL ADVICE" in result.stdout.splitlines()[0]
    assert re.search(r"\s(5m|1h)\s+ok$", rows["analyst/claude-sonnet-4-6"]), "a TTL recommendation per pair"
    assert not [e for e in emulator.log if e.status == 200 and "count_tokens" not in e.path], "check sends no ping"


def test_check_exits_0_when_everything_can_cache(tmp_path: Path, emulator: Emulator) -> None:
    doc = basic_doc(emulator.base_url)
    doc["experts"] = doc["experts"][:1]
    path = write_config(tmp_path, doc)
    result = run("check", "--config", str(path), env={"ANTHROPIC_API_KEY": "sk-test-check"})
    assert result.returncode == 0, result.stdout + result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header[:5] == ["EXPERT", "MODEL", "FINGERPRINT", "TOKENS", "MINIMUM"]


def test_once_exit_codes(tmp_path: Path, emulator: Emulator) -> None:
    path = write_config(tmp_path, basic_doc(emulator.base_url))
    env = {"ANTHROPIC_API_KEY": "sk-test-once"}
    result = run("once", "--config", str(path), env=env)
    assert result.returncode == 3, "the terse pair is uncached"
    assert re.search(r"terse\s+claude-sonnet-4-6\s+uncached", result.stdout)
    assert re.search(r"analyst\s+claude-sonnet-4-6\s+rewarmed", result.stdout)
    doc = basic_doc(emulator.base_url)
    doc["experts"] = doc["experts"][:1]
    result = run("once", "--config", str(write_config(tmp_path, doc, "ok.yaml")), env=env)
    assert result.returncode == 0 and "warm" in result.stdout, "second pass reads the cache the first wrote"


def test_daemon_end_to_end_against_a_scaled_emulator(tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]) -> None:
    """rewarmed then warm, uncached flagged, costs equal the usage, reload as a diff, SIGTERM exits 0."""
    # The emulator's 5m TTL lasts 3 s; the daemon pings every second.
    with Emulator(time_scale=0.01) as emu:
        port = free_port()
        doc = basic_doc(emu.base_url, interval="1s", jitter="0s")
        doc["metrics"] = {"listen": f"127.0.0.1:{port}"}
        doc["ledger"] = {"path": "ledger.sqlite"}
        path = write_config(tmp_path, doc)
        proc = spawn(
            "run", "--config", str(path), "--log-format", "json", env={**os.environ, "ANTHROPIC_API_KEY": "sk-test-daemon"}
        )
        pairs = [("analyst", "claude-sonnet-4-6"), ("analyst", "claude-opus-4-8")]

        def warm_everywhere() -> bool:
            m = scrape(port)
            return all((sample(m, "keepwarm_pings_total", expert=e, model=mo, result="warm") or 0) >= 2 for e, mo in pairs) and (
                sample(m, "keepwarm_pings_total", expert="terse", model="claude-sonnet-4-6", result="uncached") or 0
            ) >= 1

        wait_for("every cacheable pair warm, the short one uncached", warm_everywhere, proc)
        m = scrape(port)
        for expert, model in pairs:
            labels = {"expert": expert, "model": model}
            assert sample(m, "keepwarm_pings_total", **labels, result="rewarmed") == 1
            # Costs in /metrics equal a hand calculation from the usage the emulator returned:
            # the first N successful requests of this pair are the N pings /metrics has counted.
            n = sum(sample(m, "keepwarm_pings_total", **labels, result=r) or 0 for r in ("warm", "rewarmed"))
            fingerprint = next(
                dict(k[1])["fingerprint"] for k in m if k[0] == "keepwarm_pair_info" and dict(k[1])["model"] == model
                and dict(k[1])["expert"] == expert
            )
            usages = [e.usage for e in emu.log if e.fingerprint == fingerprint and e.status == 200][: int(n)]
            price = {"claude-sonnet-4-6": 3e-6, "claude-opus-4-8": 5e-6}[model]
            expected = {
                "cache_read": sum(u["cache_read_input_tokens"] for u in usages) * price * 0.1,
                "cache_write_5m": sum(u["cache_creation"]["ephemeral_5m_input_tokens"] for u in usages) * price * 1.25,
                "input": sum(u["input_tokens"] for u in usages) * price,
            }
            for kind, usd in expected.items():
                assert sample(m, "keepwarm_cost_usd_total", **labels, kind=kind) == pytest.approx(usd, rel=1e-9), kind
            assert (sample(m, "keepwarm_cache_expires_timestamp_seconds", **labels) or 0) > time.time()
        assert sample(m, "keepwarm_cache_expires_timestamp_seconds", expert="terse", model="claude-sonnet-4-6") == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            page = resp.read().decode()
        assert 'class="warm">warm<' in page and 'class="uncached">uncached<' in page
        # The pictures: a strip per pair fed by the pings (and production's requests), the daily chart.
        body = json.dumps({"expert": "analyst", "model": "claude-sonnet-4-6", "at": time.time(),
                           "usage": {"input_tokens": 9, "cache_read_input_tokens": 3000, "output_tokens": 5}}).encode()
        post = urllib.request.Request(f"http://127.0.0.1:{port}/v1/observations", data=body,
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(post, timeout=5) as resp:
            assert resp.status == 202
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            page = resp.read().decode()
        assert page.count("<svg class=strip") == 3 and "class=s-warm" in page and "class=s-uncached" in page
        assert "Spent against saved, per UTC day" in page

        # A bad config on SIGHUP is rejected and the old one keeps running.
        path.write_text("experts: [}\n")
        proc.send_signal(signal.SIGHUP)
        wait_for("the reload to fail", lambda: sample(scrape(port), "keepwarm_config_last_reload_successful") == 0, proc)
        # A good one is applied as a diff: the removed pair's series disappear.
        doc["experts"] = doc["experts"][:1]
        write_config(tmp_path, doc)
        proc.send_signal(signal.SIGHUP)
        wait_for("the reload to succeed", lambda: sample(scrape(port), "keepwarm_config_last_reload_successful") == 1, proc)
        m = scrape(port)
        assert sample(m, "keepwarm_pings_total", expert="terse", model="claude-sonnet-4-6", result="uncached") is None
        assert (sample(m, "keepwarm_pings_total", expert="analyst", model="claude-sonnet-4-6", result="warm") or 0) >= 2

        final = scrape(port)
        code, err = stop(proc)
    assert code == 0, err[-2000:]

    # The ledger holds every ping; the first N rows of a pair are the N its counters had seen.
    rows = read_ledger(tmp_path / "ledger.sqlite")
    labels = {"expert": "analyst", "model": "claude-sonnet-4-6"}
    counted = int(sum(sample(final, "keepwarm_pings_total", **labels, result=r) or 0 for r in ("warm", "rewarmed")))
    mine = [r for r in rows if (r.expert, r.model) == ("analyst", "claude-sonnet-4-6")][:counted]
    for kind in ("cache_read", "cache_write_5m", "input", "output"):
        from_rows = math.fsum((r.costs or {})[kind] for r in mine)
        assert sample(final, "keepwarm_cost_usd_total", **labels, kind=kind) == pytest.approx(from_rows, rel=1e-9)
    # `keepwarm report` agrees with the sum of the ledger's rows, to the cent and beyond.
    result = run("report", "--config", str(path), "--since", "1h", "--format", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    all_costs = math.fsum(c for r in rows for c in (r.costs or {}).values())
    assert report["total"]["spend_usd"] == pytest.approx(all_costs, rel=1e-12)
    assert round(report["total"]["spend_usd"], 2) == round(all_costs, 2)
    assert report["total"]["pings"] == len(rows)
    events = [line for line in err.splitlines() if line.startswith("{")]
    assert any('"event": "reload rejected; the old config keeps running"' in e for e in events)
    reloaded = next(json.loads(e) for e in events if '"event": "config reloaded"' in e)
    assert reloaded["removed_pairs"] == "terse/claude-sonnet-4-6", "the reload names what it changed"
    started = next(json.loads(e) for e in events if '"event": "keepwarm started"' in e)
    assert started["status_page"] == f"http://127.0.0.1:{port}/"
    assert any('"event": "stopped"' in e for e in events)
    assert "sk-test-daemon" not in err


def test_run_with_the_builtin_emulator_as_the_readme_shows(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    """The README's first command: the example config against `--emulator`, no key at all."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    config = tmp_path / "config" / "keepwarm.yaml"
    port = free_port()
    config.write_text(config.read_text().replace("listen: 127.0.0.1:9464", f"listen: 127.0.0.1:{port}"))
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    # At 0.01 a 4m interval is 2.4 s and a 5m TTL 3 s.
    proc = spawn("run", "--config", str(config), "--emulator", "--time-scale", "0.01", env=env)
    key = ("keepwarm_pings_total", "chief-economist", "claude-haiku-4-5")

    def shows_warm() -> bool:
        m = scrape(port)
        return (sample(m, key[0], expert=key[1], model=key[2], result="warm") or 0) >= 1 and (
            sample(m, key[0], expert="style-editor", model="claude-sonnet-4-6", result="uncached") or 0
        ) >= 1

    wait_for("a warm ping in /metrics", shows_warm, proc)
    code, err = stop(proc, signal.SIGINT)
    assert code == 0
    lines = [line for line in err.splitlines() if "expert=chief-economist model=claude-haiku-4-5" in line]
    results = [re.search(r"result=(\w+)", line).group(1) for line in lines]  # type: ignore[union-attr]
    assert results[:2] == ["rewarmed", "warm"], err[-2000:]
    assert "emulator mode" in err and "time_scale=0.01" in err, "the log says time is scaled"
    assert re.search(r"expert=style-editor .*result=uncached", err)


def test_report_needs_a_ledger_and_once_records_into_it(tmp_path: Path, emulator: Emulator) -> None:
    doc = basic_doc(emulator.base_url)
    path = write_config(tmp_path, doc)
    result = run("report", "--config", str(path))  # no `ledger:` key: the default state path, still empty
    assert result.returncode == 78 and "no daemon has kept state there yet" in result.stderr
    assert run("report").returncode in (2, 78)
    doc["ledger"] = {"path": "pings.sqlite", "retention_days": 30}
    path = write_config(tmp_path, doc)
    env = {"ANTHROPIC_API_KEY": "sk-test-report"}
    assert run("once", "--config", str(path), env=env).returncode == 3
    result = run("report", "--ledger", str(tmp_path / "pings.sqlite"), "--format", "csv")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("expert,model,ttl,pings,warm,rewarmed")
    assert len(lines) == 1 + 3 + 1, "three pairs and a total"
    assert run("report", "--ledger", str(tmp_path / "pings.sqlite"), "--since", "soon").returncode == 2


def test_metrics_bind_to_loopback_unless_told_and_say_so(tmp_path: Path, emulator: Emulator) -> None:
    """Loopback by default; any other address works but is logged as reachable from the network."""
    from keepwarm.config import parse_config

    default = parse_config(basic_doc(), Path("."))
    assert (default.metrics_host, default.metrics_port) == ("127.0.0.1", 9464)
    logs = {}
    for name, host in (("loopback", "127.0.0.1"), ("wide", "0.0.0.0")):
        doc = basic_doc(emulator.base_url)
        doc["metrics"] = {"listen": f"{host}:{free_port()}"}
        path = write_config(tmp_path, doc, f"{name}.yaml")
        err_path = tmp_path / f"{name}.log"
        with err_path.open("w") as err:
            proc = subprocess.Popen(
                keepwarm_cmd("run", "--config", str(path)),
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, "ANTHROPIC_API_KEY": "sk-test-listen"},
            )
            try:
                end = time.monotonic() + DEADLINE
                while "keepwarm started" not in err_path.read_text() and time.monotonic() < end:
                    assert proc.poll() is None, err_path.read_text()
                    time.sleep(0.1)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
        logs[name] = err_path.read_text()
    assert "not on loopback" not in logs["loopback"]
    assert re.search(r"WARNING metrics listener is not on loopback.* listen=0\.0\.0\.0:\d+", logs["wide"])


# --- issue 10: the command line (items 15, 16, 18, 19, 20, 21) -------------------------------

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.mark.parametrize(
    "args",
    [("emulator", "--port", "99999"), ("emulator", "--time-scale", "0"), ("emulator", "--time-scale", "-1"),
     ("run", "--emulator", "--time-scale", "0"), ("run", "--listen", "nowhere")],
)
def test_usage_errors_exit_2_with_one_line_and_no_traceback(args: tuple[str, ...]) -> None:
    """Item 15."""
    result = run(*args, timeout=30)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("keepwarm ")


def _one_pair_doc(base_url: str) -> dict:
    return {
        "api": {"base_url": base_url},
        "defaults": {"models": ["claude-sonnet-4-6"], "interval": "1s", "jitter": "0s"},
        "experts": [{"name": "analyst", "system": [{"text": LONG_PROMPT}]}],
    }


def _empty_shard(doc: dict) -> str:
    from keepwarm.shard import in_shard

    keys = [f"{e['name']}/{m}" for e in doc["experts"] for m in e.get("models", doc["defaults"]["models"])]
    return next(f"{k}/2" for k in range(2) if not any(in_shard(key, k, 2) for key in keys))


def test_an_empty_shard_is_said_loudly_and_once_and_check_exit_3(tmp_path: Path, emulator: Emulator) -> None:
    """Item 18: `--shard K/N` holding none of the pairs is not a silent success."""
    doc = _one_pair_doc(emulator.base_url)
    path = write_config(tmp_path, doc)
    shard = _empty_shard(doc)
    for cmd in ("once", "check"):
        result = run(cmd, "--config", str(path), "--shard", shard, env={"ANTHROPIC_API_KEY": "sk-test-shard"})
        assert result.returncode == 3, (cmd, result.stdout, result.stderr)
        assert f"WARNING NO PAIRS: this shard holds none of the config's pairs; nothing to do shard={shard}" in result.stderr
    assert not [e for e in emulator.log if "messages" in e.path], "nothing was sent"


def test_run_on_an_empty_shard_warns_at_start(tmp_path: Path, keepwarm_daemon: Callable[..., Any], emulator: Emulator) -> None:
    """Item 18: `run` idles, but says so at start."""
    doc = _one_pair_doc(emulator.base_url)
    shard = _empty_shard(doc)
    daemon = keepwarm_daemon(doc, env={**os.environ, "ANTHROPIC_API_KEY": "sk-test-shard"}, args=("--shard", shard))
    daemon.wait_for("the start", lambda: any(e.get("event") == "keepwarm started" for e in daemon.events()))
    warned = [e for e in daemon.events() if e.get("event", "").startswith("NO PAIRS")]
    assert warned and warned[0]["level"] == "warning" and warned[0]["shard"] == shard
    assert daemon.stop()[0] == 0


def test_a_busy_metrics_port_is_transient_and_listen_overrides_the_config(
    tmp_path: Path, keepwarm_daemon: Callable[..., Any], emulator: Emulator
) -> None:
    """Item 21: a taken port exits 69 (retried by Restart=on-failure, unlike 78); --listen wins over the file."""
    import socket

    env = {**os.environ, "ANTHROPIC_API_KEY": "sk-test-port"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        doc = _one_pair_doc(emulator.base_url)
        doc["metrics"] = {"listen": f"127.0.0.1:{busy}"}
        path = write_config(tmp_path, doc)
        result = run("run", "--config", str(path), env=env, timeout=30)
        assert result.returncode == 69, result.stderr
        assert "cannot listen for metrics" in result.stderr and "exit_code=69" in result.stderr
        port = free_port()
        proc = subprocess.Popen(keepwarm_cmd("run", "--config", str(path), "--listen", f"127.0.0.1:{port}"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        try:
            wait_for("metrics on the --listen port", lambda: scrape(port) is not None, proc)
        finally:
            code, err = stop(proc)
    assert code == 0, err
    assert f"metrics=http://127.0.0.1:{port}/metrics" in err


def test_time_scale_without_the_emulator_needs_a_loopback_base_url(tmp_path: Path) -> None:
    """Item 20: never silently ignored; on loopback it scales keepwarm's TTLs and says so."""
    env = {"ANTHROPIC_API_KEY": "sk-test-scale", "ANTHROPIC_BASE_URL": ""}
    public = write_config(tmp_path, _one_pair_doc("https://api.anthropic.com"), "public.yaml")
    for cmd in ("run", "once"):
        result = run(cmd, "--config", str(public), "--time-scale", "0.1", env=env, timeout=30)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == (
            f"keepwarm {cmd}: --time-scale needs --emulator, or an api.base_url on loopback"
            " (an emulator started elsewhere); the real API's TTLs cannot be scaled"
        )
    with Emulator(time_scale=0.1) as emu:
        local = write_config(tmp_path, _one_pair_doc(emu.base_url), "local.yaml")
        result = run("once", "--config", str(local), "--time-scale", "0.1", env=env)
    assert result.returncode == 0, result.stderr
    assert "time scaled for an emulator on loopback" in result.stderr and "time_scale=0.1" in result.stderr


def test_json_logs_iso_times_rounded_costs_and_a_json_second_signal_line(
    tmp_path: Path, keepwarm_daemon: Callable[..., Any], emulator: Emulator
) -> None:
    """Item 16: every line of `--log-format json` is JSON, `ts` is ISO as in text logs, costs carry no float noise."""
    from keepwarm.emulator import Fault

    doc = _one_pair_doc(emulator.base_url)
    doc["shutdown_timeout"] = "20s"
    daemon = keepwarm_daemon(doc, env={**os.environ, "ANTHROPIC_API_KEY": "sk-test-json"})
    daemon.wait_for("two pings", lambda: len([e for e in daemon.events() if e.get("event") == "ping"]) >= 2)
    emulator.inject(Fault(kind="hang", latency=15))
    def hung() -> bool:
        with urllib.request.urlopen(f"{emulator.base_url}/_emulator/faults", timeout=5) as resp:
            return not json.load(resp)["faults"]

    daemon.wait_for("the hung ping", hung)
    daemon.signal(signal.SIGTERM)
    daemon.wait_for("the shutdown", lambda: any(e.get("event") == "stopping" for e in daemon.events()))
    code, _ = daemon.stop()
    assert code == 1, "a second signal exits at once"
    lines = [line for line in daemon.text().splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line parses
    assert events[-1]["event"] == "second stop signal: exiting at once" and events[-1]["level"] == "warning"
    assert all(ISO_MS.match(e["ts"]) for e in events), [e["ts"] for e in events][:3]
    costs = [e["cost_usd"] for e in events if e.get("event") == "ping" and "cost_usd" in e]
    assert costs and all(len(f"{c:.15g}".lstrip("0.").replace(".", "").rstrip("0")) <= 6 for c in costs), costs


def test_check_has_one_break_even_and_none_for_an_uncacheable_pair(tmp_path: Path, emulator: Emulator) -> None:
    """Item 19: the row's break-even is the advice line's; a below-minimum pair has none."""
    path = write_config(tmp_path, basic_doc(emulator.base_url))
    result = run("check", "--config", str(path), "--explain", env={"ANTHROPIC_API_KEY": "sk-test-check"})
    assert result.returncode == 3, result.stderr
    rows = {line.split()[0] + "/" + line.split()[1]: line for line in result.stdout.split("\n\n")[0].splitlines()[1:]}
    analyst = re.search(r"([\d,.]+) misses/day", rows["analyst/claude-sonnet-4-6"])
    assert analyst, rows["analyst/claude-sonnet-4-6"]
    advice = result.stdout.split("analyst/claude-sonnet-4-6:")[1].split("\n", 1)[1]
    line = next(x for x in advice.splitlines() if "break-even" in x)
    assert f"above {analyst.group(1)} production cache misses/day" in line, (rows, line)
    assert "misses/day" not in rows["terse/claude-sonnet-4-6"] and "below-minimum" in rows["terse/claude-sonnet-4-6"]
    assert "break-even" not in result.stdout.split("terse/claude-sonnet-4-6:")[1]


def test_check_lists_the_counting_errors_it_points_to(tmp_path: Path, emulator: Emulator) -> None:
    """Item 19: "could not be counted" comes with the errors themselves, on the same stream."""
    from keepwarm.emulator import Fault

    emulator.inject(Fault(500, path="count_tokens", count=None, model="claude-opus-4-8"))
    path = write_config(tmp_path, basic_doc(emulator.base_url))
    result = run("check", "--config", str(path), env={"ANTHROPIC_API_KEY": "sk-test-check"})
    assert result.returncode == 1
    tail = result.stderr.split("1 pair(s) could not be counted:")[1].strip().splitlines()
    assert len(tail) == 1 and tail[0].startswith("analyst/claude-opus-4-8: server:"), result.stderr


def test_verbose_means_debug_logging_and_explain_shows_the_arithmetic() -> None:
    """Item 19: `-v` is one thing everywhere; the README says the same."""
    help_text = run("check", "--help").stdout
    assert re.search(r"-v, --verbose\s+debug logging", help_text)
    assert re.search(r"--explain\s+print the arithmetic", help_text)
    readme = (ROOT / "README.md").read_text()
    assert "`-v` for the arithmetic" not in readme and "`--explain` for the arithmetic" in readme


# --- issue 23: what a newcomer tripped over -------------------------------------------------


def test_verbose_is_accepted_by_every_command_before_or_after_it(tmp_path: Path, emulator: Emulator) -> None:
    path = write_config(tmp_path, basic_doc(emulator.base_url))
    env = {"ANTHROPIC_API_KEY": "sk-test-check"}
    result = run("-v", "check", "--config", str(path), env=env)
    assert result.returncode == 3 and " DEBUG " in result.stderr, result.stderr[-2000:]
    result = run("check", "--config", str(path), env=env)
    assert " DEBUG " not in result.stderr, "-v stays off unless asked"
    for cmd in ("run", "once", "check", "report", "simulate", "emulator"):
        assert re.search(r"-v, --verbose", run(cmd, "--help").stdout), cmd
    result = run("report", "-v", "--ledger", str(tmp_path / "none.db"))
    assert "unrecognized arguments" not in result.stderr and result.returncode == 78
    result = run("simulate", "-v", "--config", str(path), "--trace", str(tmp_path / "none.csv"))
    assert "unrecognized arguments" not in result.stderr and result.returncode == 65


def test_the_emulator_on_a_busy_port_is_a_usage_error(tmp_path: Path, emulator: Emulator) -> None:
    port = int(emulator.base_url.rsplit(":", 1)[1].strip("/"))
    result = run("emulator", "-v", "--port", str(port), timeout=30)
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "choose another --port" in result.stderr
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `keepwarm emulator"))
    assert "2 bad port or scale, or the port is taken" in row, "the README says what it does"


def test_check_json_gives_the_full_fingerprint_and_prices_an_uncacheable_ping_as_input(
    tmp_path: Path, emulator: Emulator
) -> None:
    from keepwarm.config import load_config
    from keepwarm.pricing import MILLION

    path = write_config(tmp_path, basic_doc(emulator.base_url))
    result = run("check", "--config", str(path), "--format", "json", env={"ANTHROPIC_API_KEY": "sk-test-check"})
    assert result.returncode == 3, result.stderr
    doc = json.loads(result.stdout)
    pairs = {f"{p['expert']}/{p['model']}": p for p in doc["pairs"]}
    config = load_config(path)
    for pair in config.pairs:
        assert pairs[pair.key]["fingerprint"] == pair.fingerprint and len(pair.fingerprint) == 64
    terse = pairs["terse/claude-sonnet-4-6"]
    assert not terse["cacheable"] and terse["break_even_misses_per_day"] is None
    price = config.prices.get("claude-sonnet-4-6")
    assert price.input is not None and price.output is not None
    # The prefix and the ping message as plain input (no cache read), plus one output token.
    table = run("check", "--config", str(path), env={"ANTHROPIC_API_KEY": "sk-test-check"}).stdout
    row = next(line for line in table.splitlines() if line.startswith("terse"))
    assert "cannot cache:" in row and f"{terse['prefix_tokens']:,} < {terse['minimum_tokens']:,} tokens" in row
    sent = terse["prefix_tokens"] + terse["ping_tokens"]
    assert terse["ping_cost_usd"] == pytest.approx((sent * price.input + price.output) / MILLION)
    warm = config.prices.warm_ping_cost("claude-sonnet-4-6", terse["prefix_tokens"], terse["ping_tokens"], 1)
    assert warm is not None and terse["ping_cost_usd"] > warm, "not priced as a warm read"
    gap = config.pairs[0].interval + config.pairs[0].jitter / 2
    assert terse["keepalive_per_day_usd"] == pytest.approx(terse["ping_cost_usd"] * 86400 / gap)


SIM_DOC = ROOT / "docs" / "simulate-example.yaml"


def test_simulate_says_what_it_matched_and_refuses_a_trace_that_names_no_pair(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("at,expert,model\n2026-03-02T09:00:00Z,chief-economits,claude-sonnet-4-6\n", encoding="utf-8")
    result = run("simulate", "--config", str(SIM_DOC), "--trace", str(trace), timeout=30)
    assert result.returncode == 65, result.stderr
    assert "matched 0 of 1 trace rows to 0 of 2 configured pairs" in result.stderr
    assert "the trace has: chief-economits/claude-sonnet-4-6" in result.stderr
    trace.write_text("at,expert,model\n", encoding="utf-8")
    result = run("simulate", "--config", str(SIM_DOC), "--trace", str(trace), timeout=30)
    assert result.returncode == 65 and "the trace has: no rows" in result.stderr


def test_simulate_warns_on_timestamps_that_cannot_be_seconds(tmp_path: Path) -> None:
    trace = tmp_path / "ms.csv"
    rows = [f"{1772442000000 + 60_000 * i},chief-economist,claude-sonnet-4-6,4200" for i in range(3)]
    trace.write_text("at,expert,model,prefix_tokens\n" + "\n".join(rows) + "\n", encoding="utf-8")
    result = run("simulate", "--config", str(SIM_DOC), "--trace", str(trace), "--policy", "none", timeout=60)
    # A time past the year 5000 cannot be seconds: refused, naming the first such line.
    assert result.returncode == 65, result.stderr
    assert f"{trace}:2" in result.stderr and "milliseconds?" in result.stderr


def test_simulate_table_has_a_legend_and_the_window_it_replayed() -> None:
    result = run("simulate", "--config", str(SIM_DOC), "--trace", str(ROOT / "docs" / "simulate-example.csv"))
    assert result.returncode == 0, result.stderr
    assert "matched 53 of 53 trace rows to 2 of 2 configured pairs" in result.stderr
    assert "replayed: 2026-03-02 09:00:00Z to 2026-03-02 14:23:11Z (5h23m), 53 production requests" in result.stdout
    assert "MISSES: those that found the cache cold" in result.stdout and "×OPTIMUM:" in result.stdout
    json_out = run("simulate", "--config", str(SIM_DOC), "--trace", str(ROOT / "docs" / "simulate-example.csv"),
                   "--format", "json")
    json.loads(json_out.stdout)  # nothing but the document on stdout


def test_once_on_a_terminal_prints_each_ping_once(tmp_path: Path, emulator: Emulator) -> None:
    import pty

    doc = basic_doc(emulator.base_url)
    doc["experts"] = doc["experts"][:1]
    path = write_config(tmp_path, doc)

    def on_a_terminal(*extra: str) -> str:
        leader, follower = pty.openpty()
        proc = subprocess.Popen(keepwarm_cmd("once", "--config", str(path), *extra), stdout=follower, stderr=follower,
                                env={**os.environ, "ANTHROPIC_API_KEY": "sk-test-once"})
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=60)
        os.close(leader)
        return b"".join(chunks).decode()

    screen = on_a_terminal()
    assert re.search(r"analyst\s+claude-sonnet-4-6\s+(rewarmed|warm)", screen), screen
    assert " ping expert=analyst" not in screen, "the table already shows each ping"
    assert " ping expert=analyst" in on_a_terminal("-v")
    piped = run("once", "--config", str(path), env={"ANTHROPIC_API_KEY": "sk-test-once"})
    assert " ping expert=analyst" in piped.stderr, "a log collector still gets one line per ping"


def test_config_errors_are_phrased_for_people_and_suggest_the_key_meant(tmp_path: Path) -> None:
    doc = basic_doc("http://127.0.0.1:9")
    doc["defaults"]["intervall"] = "3m"
    doc["experts"].append({"name": "no-system"})
    doc["experts"].append({"name": "empty", "system": []})
    result = run("check", "--config", str(write_config(tmp_path, doc)))
    assert result.returncode == 78, result.stderr
    assert "defaults.intervall: unknown key; did you mean `interval`?" in result.stderr
    assert "experts[2].system: required, but missing" in result.stderr
    assert "experts[3].system: must not be empty: list at least one" in result.stderr
    assert "Field required" not in result.stderr and "after validation" not in result.stderr


def test_a_config_without_experts_has_no_pairs_and_exits_3_as_the_readme_says(tmp_path: Path, emulator: Emulator) -> None:
    doc = basic_doc(emulator.base_url)
    doc["experts"] = []
    path = write_config(tmp_path, doc)
    for cmd in ("check", "once"):
        result = run(cmd, "--config", str(path), env={"ANTHROPIC_API_KEY": "sk-test"})
        assert result.returncode == 3, (cmd, result.stderr)
        assert "NO PAIRS: the config lists no experts; nothing to do" in result.stderr
    readme = (ROOT / "README.md").read_text()
    assert "3 any below minimum, or no pairs at all" in readme


def test_verbose_is_keepwarms_debug_one_line_per_event(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from keepwarm.logs import setup_logging

    try:
        setup_logging("text", logging.DEBUG)
        logging.getLogger("tzlocal").debug("/etc/timezone found, contents:\n Etc/UTC\n")
        logging.getLogger("keepwarm.ping").debug("two\nlines")
        logging.getLogger("tzlocal").warning("a library's warning still shows")
    finally:
        setup_logging("text", logging.INFO)
        logging.getLogger("keepwarm").setLevel(logging.NOTSET)
    err = capsys.readouterr().err
    assert "/etc/timezone" not in err, "a library's debug dump is not keepwarm's -v"
    assert err.count("\n") == 2 and "DEBUG two\\nlines" in err and "a library's warning still shows" in err


def test_an_uncacheable_pair_warns_once_with_its_reason_then_logs_quietly(
    tmp_path: Path, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import threading

    from keepwarm.config import load_config
    from keepwarm.metrics import Metrics
    from keepwarm.ping import make_client
    from keepwarm.runner import PairState, Runner

    config = load_config(write_config(tmp_path, basic_doc(emulator.base_url)))
    terse = next(p for p in config.pairs if p.expert == "terse")
    runner = Runner(make_client(emulator.base_url, "sk-test", 5), config.prices, Metrics(), threading.Event())
    state = PairState(pair=terse, max_tokens=1)
    caplog.set_level(logging.INFO, logger="keepwarm.ping")
    for _ in range(3):
        runner.ping(state)
    pings = [r for r in caplog.records if r.getMessage() == "ping"]
    assert [r.levelname for r in pings] == ["WARNING", "INFO", "INFO"]
    reason = pings[0].keepwarm_fields["reason"]  # type: ignore[attr-defined]
    assert reason.startswith("cannot cache: ") and "below this model's minimum of 1,024" in reason
    assert all(r.keepwarm_fields["reason"] == reason for r in pings)  # type: ignore[attr-defined]


def test_every_policy_decision_line_carries_a_reason(
    tmp_path: Path, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import threading

    from keepwarm.config import load_config
    from keepwarm.metrics import Metrics
    from keepwarm.ping import make_client
    from keepwarm.runner import Runner
    from keepwarm.scheduler import Scheduler

    config = load_config(write_config(tmp_path, basic_doc(emulator.base_url, policy="adaptive")))
    metrics = Metrics()
    now = [1_800_000_000.0]
    runner = Runner(make_client(emulator.base_url, "sk-test", 5), config.prices, metrics, threading.Event(),
                    clock=lambda: now[0])
    scheduler = Scheduler(runner, metrics, clock=lambda: now[0], draw=lambda: 0.5, mono=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="keepwarm.scheduler")
    scheduler.apply(list(config.pairs))
    pair = config.pairs[0]
    due = scheduler.states[pair.key].next_due
    now[0] = due
    scheduler._run(pair.key, due)
    decisions = [r.keepwarm_fields for r in caplog.records if r.getMessage() == "policy decision"]  # type: ignore[attr-defined]
    assert decisions and all(d.get("reason") for d in decisions), decisions


def test_simulate_without_prefix_sizes_does_not_call_a_valid_config_invalid(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("at,expert,model\n1772442000,chief-economist,claude-sonnet-4-6\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("ANTHROPIC_API_KEY", "CREDENTIALS_DIRECTORY")}
    result = subprocess.run(keepwarm_cmd("simulate", "--config", str(SIM_DOC), "--trace", str(trace)),
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 78, result.stderr
    assert "invalid config" not in result.stderr
    assert "the config is valid, but prefix sizes are missing" in result.stderr
    assert "add a prefix_tokens column to the trace" in result.stderr


def test_simulate_prices_an_uncacheable_pings_as_plain_input(tmp_path: Path) -> None:
    from keepwarm.config import load_config
    from keepwarm.pricing import MILLION
    from keepwarm.simulate import PING_MESSAGE_TOKENS

    path = write_config(tmp_path, {"defaults": {"models": ["claude-sonnet-4-6"]},
                                   "experts": [{"name": "style-editor", "system": [{"text": "Be brief."}]}]})
    trace = tmp_path / "t.csv"
    trace.write_text("at,expert,model,prefix_tokens\n" + "".join(
        f"{1772442000 + 900 * i},style-editor,claude-sonnet-4-6,184\n" for i in range(8)), encoding="utf-8")
    result = run("simulate", "--config", str(path), "--trace", str(trace), "--format", "json", "--policy", "fixed")
    assert result.returncode == 0, result.stderr
    fixed = json.loads(result.stdout)["policies"]["fixed"]["pairs"]["style-editor/claude-sonnet-4-6"]
    price = load_config(path).prices.get("claude-sonnet-4-6")
    assert price.input is not None and price.output is not None
    each = ((184 + PING_MESSAGE_TOKENS) * price.input + price.output) / MILLION
    assert fixed["keepalive_pings"] > 0
    assert fixed["keepalive_usd"] == pytest.approx(fixed["keepalive_pings"] * each)
    assert fixed["write_premiums_usd"] == 0, "nothing to save: it cannot cache"
