"""End to end: `keepwarm run` warming two Anthropic workspaces, Bedrock in two regions, Vertex AI
and Foundry, all against `keepwarm emulator --workspace ...` (each account's `base_url` points at
it), and production sending through each provider's official client wrapped by keepwarm.observe.

One pair per place; each written once then warm; a production request made in workspace B with
workspace A's prompt reads nothing of A's cache and is never credited to A's pair.
"""

from __future__ import annotations

import functools
import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
from conftest import LONG_PROMPT, DaemonProcess, daemon_env, free_port, keepwarm_cmd, write_config

from keepwarm import observe
from keepwarm.prefix import load_prefix

AWS_KEY_ID, AWS_SECRET = "AKIAKEEPWARME2ETEST", "e2e-static-test-secret"
BEDROCK_SONNET = "us.anthropic.claude-sonnet-4-6-v1:0"
SONNET = "claude-sonnet-4-6"
QUESTION = "Which freight lanes got dearer this week?"
# expert -> (account, model)
PAIRS = {
    "a": ("ws-a", SONNET),
    "b": ("ws-b", SONNET),
    "east": ("aws-east", BEDROCK_SONNET),
    "west": ("aws-west", BEDROCK_SONNET),
    "gcp": ("gcp", SONNET),
    "azure": ("azure", SONNET),
}


class EmulatorProcess:
    """`keepwarm emulator` as a process, with its workspaces."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            keepwarm_cmd("emulator", "--port", str(self.port), "--time-scale", "1", *args),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == f"listening on http://127.0.0.1:{self.port}", line
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.url + "/_emulator/log", timeout=10) as resp:
            entries: list[dict[str, Any]] = json.load(resp)["entries"]
        return entries

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmulatorProcess, DaemonProcess, Path]]:
    tmp = tmp_path_factory.mktemp("providers")
    emu = EmulatorProcess("--workspace", "sk-ws-a-1=alpha", "--workspace", "sk-ws-b-1=beta")
    secrets = {"key-a": "sk-ws-a-1", "key-b": "sk-ws-b-1", "foundry-key": "foundry-e2e-key", "gcp-token": "ya29.e2e"}
    for name, value in secrets.items():
        (tmp / name).write_text(value + "\n")
        (tmp / name).chmod(0o600)
    port = free_port()
    doc = {
        "accounts": [
            {"name": "ws-a", "provider": "anthropic", "base_url": emu.url, "api_key_file": "key-a"},
            {"name": "ws-b", "provider": "anthropic", "base_url": emu.url, "api_key_file": "key-b"},
            {"name": "aws-east", "provider": "bedrock", "region": "us-east-1", "base_url": emu.url},
            {"name": "aws-west", "provider": "bedrock", "region": "us-west-2", "base_url": emu.url},
            {"name": "gcp", "provider": "vertex", "region": "global", "project_id": "proj-e2e",
             "access_token_file": "gcp-token", "base_url": emu.url + "/v1"},
            {"name": "azure", "provider": "foundry", "api_key_file": "foundry-key", "base_url": emu.url + "/anthropic/"},
        ],
        # A short interval: the second ping of each pair, the warm one, comes within seconds.
        "defaults": {"interval": "3s", "jitter": "0s"},
        "experts": [
            {"name": name, "account": account, "system": [{"text": f"{name}: {LONG_PROMPT * 3}"}], "models": [model]}
            for name, (account, model) in PAIRS.items()
        ],
        "metrics": {"listen": f"127.0.0.1:{port}"},
    }
    config = write_config(tmp, doc)
    env = daemon_env(AWS_ACCESS_KEY_ID=AWS_KEY_ID, AWS_SECRET_ACCESS_KEY=AWS_SECRET, AWS_EC2_METADATA_DISABLED="true")
    daemon = DaemonProcess(config, port, env)
    try:
        for name, (_, model) in PAIRS.items():
            daemon.wait_for(f"{name} warm", functools.partial(_warm, daemon, name, model), deadline=60)
        yield emu, daemon, config
    finally:
        daemon.stop()
        emu.stop()


def _warm(daemon: DaemonProcess, expert: str, model: str) -> bool:
    return daemon.total("keepwarm_pings_total", expert=expert, model=model, result="warm") >= 1


def test_one_pair_per_place_written_once_then_warm(stack: tuple[EmulatorProcess, DaemonProcess, Path]) -> None:
    emu, daemon, _ = stack
    metrics = daemon.metrics()
    info = {dict(labels)["expert"]: (dict(labels)["account"], dict(labels)["provider"], dict(labels)["model"])
            for name, labels in metrics if name == "keepwarm_pair_info"}
    providers = {"ws-a": "anthropic", "ws-b": "anthropic", "aws-east": "bedrock", "aws-west": "bedrock", "gcp": "vertex", "azure": "foundry"}
    assert info == {name: (account, providers[account], model) for name, (account, model) in PAIRS.items()}
    for name, (_, model) in PAIRS.items():
        assert daemon.total("keepwarm_pings_total", expert=name, model=model, result="rewarmed") == 1, name
    # Each pair's pings went to its own place: six places, one per pair.
    places = {e["cache"] for e in emu.log() if e["path"] == "/v1/messages" and e["status"] == 200}
    assert places == {"workspace:alpha", "workspace:beta", "bedrock:default:us-east-1", "bedrock:default:us-west-2",
                      "vertex:proj-e2e:global", "foundry:default"}
    assert "sk-ws" not in daemon.text() and AWS_SECRET not in daemon.text() and "ya29" not in daemon.text()


def _production(stack: tuple[EmulatorProcess, DaemonProcess, Path], client: Any, expert: str, account: str) -> Any:
    emu, daemon, config = stack
    model = PAIRS[expert][1]
    wrapped = observe.wrap(client, url=f"http://127.0.0.1:{daemon.port}", expert=expert, account=account, flush_interval=0.01)
    params = load_prefix(config, expert).params()
    response = wrapped.messages.create(model=model, max_tokens=5, messages=[{"role": "user", "content": QUESTION}], **params)
    assert observe.observer_of(wrapped).flush(10)
    return response.usage


def _clients(emu: EmulatorProcess) -> dict[str, Any]:
    return {
        "a": anthropic.Anthropic(api_key="sk-ws-a-1", base_url=emu.url, max_retries=0),
        "east": anthropic.AnthropicBedrock(aws_region="us-east-1", aws_access_key=AWS_KEY_ID, aws_secret_key=AWS_SECRET,
                                           base_url=emu.url, max_retries=0),
        "west": anthropic.AnthropicBedrock(aws_region="us-west-2", aws_access_key=AWS_KEY_ID, aws_secret_key=AWS_SECRET,
                                           base_url=emu.url, max_retries=0),
        "gcp": anthropic.AnthropicVertex(region="global", project_id="proj-e2e", access_token="ya29.prod",
                                         base_url=emu.url + "/v1", max_retries=0),
        "azure": anthropic.AnthropicFoundry(api_key="foundry-prod-key", base_url=emu.url + "/anthropic/", max_retries=0),
    }


@pytest.mark.parametrize("expert", ["a", "east", "west", "gcp", "azure"])
def test_production_through_each_providers_client_reads_the_warm_cache_of_its_pair(
    stack: tuple[EmulatorProcess, DaemonProcess, Path], expert: str
) -> None:
    emu, daemon, _ = stack
    account, model = PAIRS[expert]
    usage = _production(stack, _clients(emu)[expert], expert, account)
    assert usage.cache_read_input_tokens > 0 and not usage.cache_creation_input_tokens
    daemon.wait_for(f"{expert}'s production counted", lambda: daemon.total(
        "keepwarm_production_requests_total", expert=expert, model=model, result="warm") >= 1, deadline=20)


def test_a_request_in_workspace_b_is_never_a_hit_of_workspace_a(stack: tuple[EmulatorProcess, DaemonProcess, Path]) -> None:
    emu, daemon, _ = stack
    before = daemon.total("keepwarm_production_requests_total", expert="a", model=SONNET)
    # Workspace B's key sends expert a's exact prompt: B's cache has never seen it.
    other = anthropic.Anthropic(api_key="sk-ws-b-1", base_url=emu.url, max_retries=0)
    usage = _production(stack, other, "a", "ws-b")
    assert usage.cache_read_input_tokens == 0 and usage.cache_creation_input_tokens > 0
    daemon.wait_for("the rejection", lambda: daemon.total("keepwarm_observations_rejected_total", reason="unknown_pair") >= 1)
    assert daemon.total("keepwarm_production_requests_total", expert="a", model=SONNET) == before
