"""Accounts and providers (Bedrock, Vertex AI, Foundry, several workspaces), in process.

The emulator serves each provider's paths and framing; every request here goes through the
official client of that provider (`AnthropicBedrock` with static test AWS credentials, signed
with SigV4; `AnthropicVertex` with an access token; `AnthropicFoundry` with a key). The daemon's
end to end run is in tests/test_providers_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import pytest
import yaml
from conftest import LONG_PROMPT

from keepwarm import observe
from keepwarm.classify import Result, usage_from_api
from keepwarm.config import ConfigError, parse_config, resolve_api_key
from keepwarm.emulator import Emulator, Fault
from keepwarm.metrics import Metrics
from keepwarm.ping import describe_error, send_ping
from keepwarm.providers.base import canonical_model, endpoint, provider_facts
from keepwarm.providers.clients import make_clients
from keepwarm.runner import PairState, Runner

DATA = Path(__file__).resolve().parent.parent / "keepwarm" / "data"
AWS = {"aws_access_key": "AKIATESTACCOUNTA", "aws_secret_key": "test-secret"}
SYSTEM: Any = [{"type": "text", "text": "x" * 20000, "cache_control": {"type": "ephemeral"}}]
PING: Any = [{"role": "user", "content": "ping"}]
BEDROCK_SONNET = "us.anthropic.claude-sonnet-4-6-v1:0"


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with Emulator(workspaces={"sk-ws-a-1": "alpha", "sk-ws-a-2": "alpha", "sk-ws-b-1": "beta"}) as emu:
        yield emu


@pytest.fixture(autouse=True)
def _fresh(emulator: Emulator) -> None:
    emulator.expire_all()
    emulator.clear_faults()
    emulator.clear_log()


def bedrock(emu: Emulator, region: str = "us-east-1", **creds: str) -> anthropic.AnthropicBedrock:
    return anthropic.AnthropicBedrock(aws_region=region, base_url=emu.base_url, max_retries=0, **(creds or AWS))


def vertex(emu: Emulator, project: str = "proj-a", region: str = "global") -> anthropic.AnthropicVertex:
    return anthropic.AnthropicVertex(
        region=region, project_id=project, access_token="test-token", base_url=emu.base_url + "/v1", max_retries=0
    )


def foundry(emu: Emulator, key: str = "foundry-test-key") -> anthropic.AnthropicFoundry:
    return anthropic.AnthropicFoundry(api_key=key, base_url=emu.base_url + "/anthropic/", max_retries=0)


def reads(client: Any, model: str) -> tuple[int, int]:
    """(cache writes, cache reads) of one request."""
    usage = client.messages.create(model=model, max_tokens=1, system=SYSTEM, messages=PING).usage
    return usage.cache_creation_input_tokens or 0, usage.cache_read_input_tokens or 0


# --- model ids and prices -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "model", "canonical", "route"),
    [
        ("bedrock", "us.anthropic.claude-sonnet-4-6-v1:0", "claude-sonnet-4-6", "geo"),
        ("bedrock", "global.anthropic.claude-haiku-4-5-20251001-v1:0", "claude-haiku-4-5", "global"),
        ("bedrock", "anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5", "regional"),
        ("bedrock", "eu.anthropic.claude-opus-4-6-v1", "claude-opus-4-6", "geo"),
        ("bedrock", "arn:aws:bedrock:us-east-1:1:application-inference-profile/x", "arn:aws:bedrock:us-east-1:1:application-inference-profile/x", "regional"),
        ("vertex", "claude-sonnet-4-5@20250929", "claude-sonnet-4-5", "regional"),
        ("foundry", "claude-sonnet-4-6", "claude-sonnet-4-6", "default"),
    ],
)
def test_provider_model_ids_name_the_claude_model_and_the_route(provider: str, model: str, canonical: str, route: str) -> None:
    assert canonical_model(provider, model) == canonical
    assert endpoint(provider, model, "us-east5") == route


def _mixed_doc(tmp_path: Path) -> dict[str, Any]:
    for name, value in (("key-a", "sk-ws-a-1"), ("key-b", "sk-ws-b-1"), ("foundry-key", "foundry-test-key"), ("gcp-token", "tok")):
        (tmp_path / name).write_text(value + "\n")
        (tmp_path / name).chmod(0o600)
    return {
        "accounts": [
            {"name": "ws-a", "provider": "anthropic", "api_key_file": "key-a"},
            {"name": "ws-b", "provider": "anthropic", "api_key_file": "key-b"},
            {"name": "aws-east", "provider": "bedrock", "region": "us-east-1"},
            {"name": "aws-west", "provider": "bedrock", "region": "us-west-2"},
            {"name": "gcp", "provider": "vertex", "region": "global", "project_id": "proj-a", "access_token_file": "gcp-token"},
            {"name": "gcp-eu", "provider": "vertex", "region": "europe-west1", "project_id": "proj-a", "access_token_file": "gcp-token"},
            {"name": "azure", "provider": "foundry", "resource": "example", "api_key_file": "foundry-key"},
        ],
        "defaults": {"interval": "4m", "jitter": "0s"},
        "experts": [
            {"name": "a", "account": "ws-a", "system": [{"text": LONG_PROMPT * 3}], "models": ["claude-sonnet-4-6"]},
            {"name": "b", "account": "ws-b", "system": [{"text": LONG_PROMPT * 3}], "models": ["claude-sonnet-4-6"]},
            {"name": "east", "account": "aws-east", "system": [{"text": LONG_PROMPT * 3}],
             "models": [BEDROCK_SONNET, "global.anthropic.claude-sonnet-4-6-v1:0"]},
            {"name": "west", "account": "aws-west", "system": [{"text": LONG_PROMPT * 3}], "models": [BEDROCK_SONNET]},
            {"name": "gcp", "account": "gcp", "system": [{"text": LONG_PROMPT * 3}], "models": ["claude-sonnet-4-6"]},
            {"name": "gcp-eu", "account": "gcp-eu", "system": [{"text": LONG_PROMPT * 3}], "models": ["claude-sonnet-4-6"]},
            {"name": "azure", "account": "azure", "system": [{"text": LONG_PROMPT * 3}], "models": ["claude-sonnet-4-6"]},
        ],
    }


def test_each_pair_is_priced_as_its_provider_and_route_say(tmp_path: Path) -> None:
    config = parse_config(_mixed_doc(tmp_path), tmp_path)
    models = yaml.safe_load((DATA / "models.yaml").read_text())["models"]
    providers = yaml.safe_load((DATA / "providers.yaml").read_text())["providers"]
    for pair in config.pairs:
        account = config.account(pair.account)
        facts = providers[pair.provider]
        base = models[canonical_model(pair.provider, pair.model)]
        route = endpoint(pair.provider, pair.model, account.region)
        factor = facts["endpoints"][route]
        price = config.prices.get(pair.price_key)
        assert price.input == pytest.approx(base["input"] * factor, rel=1e-12), pair.key
        assert price.output == pytest.approx(base["output"] * factor, rel=1e-12), pair.key
        assert price.read_multiplier == base["read_multiplier"]
        minimum = (facts.get("min_cacheable_tokens") or {}).get(canonical_model(pair.provider, pair.model))
        assert price.min_cacheable_tokens == (minimum or base["min_cacheable_tokens"])
    # Regional Vertex and the Claude API share the model id, not the price.
    eu, api = (config.prices.get(p.price_key) for p in config.pairs if p.expert in ("gcp-eu", "a"))
    assert eu.input != api.input


def test_check_prices_a_pair_that_cannot_cache_at_its_provider_s_price(tmp_path: Path) -> None:
    """`check`'s cost of an uncacheable ping (all plain input) on regional Vertex: the regional price, to 1e-9."""
    from keepwarm.cli import uncached_ping_cost

    config = parse_config(_mixed_doc(tmp_path), tmp_path)
    models = yaml.safe_load((DATA / "models.yaml").read_text())["models"]
    factor = yaml.safe_load((DATA / "providers.yaml").read_text())["providers"]["vertex"]["endpoints"]["regional"]
    pair = next(p for p in config.pairs if p.expert == "gcp-eu")
    each, _ = uncached_ping_cost(config, pair, 700)
    sonnet = models["claude-sonnet-4-6"]
    expected = (700 * sonnet["input"] + max(pair.max_tokens, 1) * sonnet["output"]) * factor / 1e6
    assert each == pytest.approx(expected, rel=1e-9, abs=0)


def test_without_accounts_one_anthropic_account_from_api_as_before(tmp_path: Path) -> None:
    doc = {"api": {"base_url": "http://127.0.0.1:1"}, "experts": [{"name": "e", "system": [{"text": "x"}], "models": ["claude-sonnet-4-6"]}]}
    config = parse_config(doc, tmp_path)
    assert [(a.name, a.provider, a.base_url, a.from_api) for a in config.accounts] == [("default", "anthropic", "http://127.0.0.1:1", True)]
    (pair,) = config.pairs
    assert (pair.account, pair.provider, pair.price_key) == ("default", "anthropic", "claude-sonnet-4-6")


def test_bedrock_only_config_needs_no_anthropic_key(tmp_path: Path) -> None:
    doc = {"accounts": [{"name": "aws", "provider": "bedrock", "region": "us-east-1"}],
           "experts": [{"name": "e", "system": [{"text": "x"}], "models": [BEDROCK_SONNET]}]}
    key, _ = resolve_api_key(parse_config(doc, tmp_path), environ={})
    assert key.value == ""


BAD = [
    ({"name": "v", "provider": "vertex", "region": "global"}, "accounts[0].project_id: a vertex account needs project_id"),
    ({"name": "b", "provider": "bedrock"}, "accounts[0].region: a bedrock account needs region"),
    ({"name": "b", "provider": "bedrock", "region": "us-east-1", "project_id": "p"},
     "accounts[0].project_id: a bedrock account does not take project_id (it takes base_url, region, aws_profile, api_key_file, bedrock_api)"),
    ({"name": "f", "provider": "foundry"}, "accounts[0]: a foundry account needs resource (or base_url)"),
    ({"name": "x", "provider": "openai"}, "accounts[0].provider: expected 'anthropic', 'bedrock', 'vertex' or 'foundry', got 'openai'"),
]


@pytest.mark.parametrize(("account", "message"), BAD)
def test_an_account_is_checked_against_its_provider(tmp_path: Path, account: dict[str, Any], message: str) -> None:
    doc = {"accounts": [account], "experts": [{"name": "e", "system": [{"text": "x"}], "models": ["claude-sonnet-4-6"]}]}
    with pytest.raises(ConfigError) as err:
        parse_config(doc, tmp_path)
    assert message in err.value.problems


def test_an_unknown_account_is_named_with_a_suggestion(tmp_path: Path) -> None:
    doc = {"accounts": [{"name": "aws-east"}], "experts": [{"name": "e", "account": "aws-eats", "system": [{"text": "x"}], "models": ["m"]}]}
    with pytest.raises(ConfigError) as err:
        parse_config(doc, tmp_path)
    assert "experts[0].account: no account named 'aws-eats'; did you mean 'aws-east'?" in err.value.problems


def test_1h_only_where_the_provider_offers_it(tmp_path: Path) -> None:
    offered = provider_facts()["bedrock"].ttl_1h
    assert offered is not None and "claude-sonnet-4-6" in offered and "claude-opus-4-8" not in offered
    doc = {"accounts": [{"name": "aws", "provider": "bedrock", "region": "us-east-1"}],
           "defaults": {"ttl": "1h"},
           "experts": [{"name": "e", "system": [{"text": "x"}], "models": [BEDROCK_SONNET, "us.anthropic.claude-opus-4-8-v1:0"]}]}
    with pytest.raises(ConfigError) as err:
        parse_config(doc, tmp_path)
    (problem,) = [p for p in err.value.problems if "1h" in p]
    assert problem.startswith("experts[0].models[1]: bedrock (account 'aws') offers the 1h TTL only for ")
    assert all(model in problem for model in offered)
    assert BEDROCK_SONNET not in problem  # the supported model is fine


def test_max_tokens_0_becomes_1_where_it_is_not_documented(tmp_path: Path) -> None:
    doc = {"accounts": [{"name": "api"}, {"name": "aws", "provider": "bedrock", "region": "us-east-1"}],
           "defaults": {"max_tokens": 0},
           "experts": [{"name": "e", "system": [{"text": "x"}], "models": ["claude-sonnet-4-6"]},
                       {"name": "f", "account": "aws", "system": [{"text": "x"}], "models": [BEDROCK_SONNET]}]}
    config = parse_config(doc, tmp_path)
    assert {p.expert: p.max_tokens for p in config.pairs} == {"e": 0, "f": 1}
    assert config.warnings == ("experts[1]: max_tokens 0 is not documented on bedrock; account 'aws' pings with 1",)


def test_a_provider_whose_extra_is_missing_fails_at_load_with_the_install_command(tmp_path: Path) -> None:
    path = tmp_path / "keepwarm.yaml"
    path.write_text(yaml.safe_dump({"accounts": [{"name": "aws", "provider": "bedrock", "region": "us-east-1"}],
                                    "experts": [{"name": "e", "system": [{"text": "x"}], "models": [BEDROCK_SONNET]}]}))
    # A fresh interpreter in which boto3 cannot be imported, as without `keepwarm[bedrock]`.
    script = "import sys; sys.modules['boto3'] = None; from keepwarm.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", script, "check", "--config", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 78, done.stderr
    assert "accounts[0].provider: bedrock needs an optional extra that is not installed: pip install 'keepwarm[bedrock]'" in done.stderr


# --- the emulator, through each official client -----------------------------------------------


def test_bedrock_writes_once_then_reads_signed_with_sigv4(emulator: Emulator) -> None:
    client = bedrock(emulator)
    written, _ = reads(client, BEDROCK_SONNET)
    assert written > 0
    assert reads(client, BEDROCK_SONNET) == (0, written)
    entry = emulator.log[-1]
    assert (entry.provider, entry.cache, entry.model) == ("bedrock", "bedrock:default:us-east-1", BEDROCK_SONNET)


def test_bedrock_streams_aws_event_stream_frames(emulator: Emulator) -> None:
    client = bedrock(emulator)
    written, _ = reads(client, BEDROCK_SONNET)
    with client.messages.stream(model=BEDROCK_SONNET, max_tokens=5, system=SYSTEM, messages=PING) as stream:
        message = stream.get_final_message()
    assert message.usage.cache_read_input_tokens == written
    assert message.content[0].text == "Emulated reply."  # type: ignore[union-attr]


def test_bedrock_caches_are_per_region_and_account(emulator: Emulator) -> None:
    written, _ = reads(bedrock(emulator, "us-east-1"), BEDROCK_SONNET)
    assert reads(bedrock(emulator, "us-west-2"), BEDROCK_SONNET) == (written, 0)
    other = {"aws_access_key": "AKIAOTHERACCOUNT", "aws_secret_key": "s"}
    with Emulator(workspaces={"AKIAOTHERACCOUNT": "222"}) as emu:
        reads(bedrock(emu, "us-east-1"), BEDROCK_SONNET)
        assert reads(bedrock(emu, "us-east-1", **other), BEDROCK_SONNET) == (written, 0)


def test_an_unsigned_bedrock_request_is_refused(emulator: Emulator) -> None:
    # Without credentials the SDK cannot sign; a bare request with a fake header is refused as AWS does.
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{emulator.base_url}/model/{BEDROCK_SONNET}/invoke", data=b"{}", method="POST",
        headers={"Authorization": "AWS4-HMAC-SHA256 nothing", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 403
    assert err.value.headers["x-amzn-ErrorType"] == "AccessDeniedException"


def test_vertex_writes_once_then_reads_per_project(emulator: Emulator) -> None:
    written, _ = reads(vertex(emulator), "claude-sonnet-4-6")
    assert reads(vertex(emulator), "claude-sonnet-4-6") == (0, written)
    assert reads(vertex(emulator, project="proj-b"), "claude-sonnet-4-6") == (written, 0)
    assert emulator.log[-1].cache == "vertex:proj-b:global"
    counted = vertex(emulator).messages.count_tokens(model="claude-sonnet-4-6", system=SYSTEM, messages=PING)
    assert counted.input_tokens > written


def test_vertex_streams_server_sent_events(emulator: Emulator) -> None:
    client = vertex(emulator, region="us-east5")
    written, _ = reads(client, "claude-sonnet-4-6")
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=5, system=SYSTEM, messages=PING) as stream:
        assert stream.get_final_message().usage.cache_read_input_tokens == written


def test_foundry_writes_once_then_reads(emulator: Emulator) -> None:
    written, _ = reads(foundry(emulator), "claude-sonnet-4-6")
    assert reads(foundry(emulator), "claude-sonnet-4-6") == (0, written)
    assert emulator.log[-1].provider == "foundry"


def test_a_request_in_workspace_b_never_reads_workspace_a(emulator: Emulator) -> None:
    def api(key: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(api_key=key, base_url=emulator.base_url, max_retries=0)

    written, _ = reads(api("sk-ws-a-1"), "claude-sonnet-4-6")
    assert reads(api("sk-ws-b-1"), "claude-sonnet-4-6") == (written, 0)
    assert reads(api("sk-ws-a-2"), "claude-sonnet-4-6") == (0, written)  # same workspace, other key


def test_bedrock_throttling_is_a_rate_limit_never_the_spend_cap(emulator: Emulator) -> None:
    emulator.inject(Fault(status=429))  # no retry-after: on the Claude API that reads as the spend cap
    with pytest.raises(anthropic.RateLimitError) as err:
        reads(bedrock(emulator), BEDROCK_SONNET)
    assert err.value.response.headers["x-amzn-ErrorType"] == "ThrottlingException"
    mapped = describe_error(err.value, provider="bedrock")
    assert (mapped.error_type, mapped.spend_cap, mapped.status) == ("rate_limit", False, 429)
    assert mapped.message.startswith("ThrottlingException: ")
    assert describe_error(err.value, provider="anthropic").spend_cap  # what it would have been


def test_vertex_quota_errors_are_rate_limits(emulator: Emulator) -> None:
    emulator.inject(Fault(status=429))
    with pytest.raises(anthropic.RateLimitError) as err:
        reads(vertex(emulator), "claude-sonnet-4-6")
    assert err.value.body["error"]["status"] == "RESOURCE_EXHAUSTED"  # type: ignore[index]
    mapped = describe_error(err.value, provider="vertex")
    assert (mapped.error_type, mapped.spend_cap) == ("rate_limit", False)


def test_missing_aws_credentials_are_an_authentication_error_naming_no_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    doc = {"accounts": [{"name": "aws", "provider": "bedrock", "region": "us-east-1", "base_url": "http://127.0.0.1:9"}],
           "experts": [{"name": "e", "system": [{"text": "x"}], "models": [BEDROCK_SONNET]}]}
    config = parse_config(doc, tmp_path)
    clients = make_clients(config, resolve_api_key(config, environ={})[0], environ={})
    attempt = send_ping(clients, config.pairs[0], 1)
    assert attempt.error is not None
    assert attempt.error.error_type == "authentication"
    assert "AWS credentials" in attempt.error.message


# --- the runner through every account: one pair per place, priced as its provider --------------


def test_mixed_accounts_warm_each_place_and_cost_the_emulators_usage(tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS["aws_access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS["aws_secret_key"])
    doc = _mixed_doc(tmp_path)
    for account in doc["accounts"]:
        account["base_url"] = emulator.base_url + {"vertex": "/v1", "foundry": "/anthropic/"}.get(account.get("provider", ""), "")
        account.pop("resource", None)
    config = parse_config(doc, tmp_path)
    key, _ = resolve_api_key(config, environ={})
    clients = make_clients(config, key, environ={})
    metrics = Metrics()
    for pair in config.pairs:
        metrics.add_pair(pair)
    runner = Runner(clients, config.prices, metrics, threading.Event(), key_source=key.source)
    states = {p.key: PairState(pair=p, max_tokens=p.max_tokens) for p in config.pairs}
    first = {k: runner.ping(s) for k, s in states.items()}
    second = {k: runner.ping(s) for k, s in states.items()}
    assert {k: o.result for k, o in first.items() if o} == dict.fromkeys(states, Result.REWARMED)
    assert {k: o.result for k, o in second.items() if o} == dict.fromkeys(states, Result.WARM)
    # One cache per place: eight pairs, eight caches, none shared (workspaces a and b included).
    log = [e for e in emulator.log if e.path == "/v1/messages"]
    places = {(e.cache, e.model) for e in log}
    assert len(places) == len(states) == 8
    # Costs: the emulator's usage at the pair's provider price, to 1e-9.
    by_request = {e.request_id: e.usage for e in log}
    for outcome in [*first.values(), *second.values()]:
        assert outcome is not None and outcome.cost is not None
        usage = by_request.get(outcome.final.request_id or "")
        assert usage is not None, outcome.pair.key
        price = config.prices.get(outcome.pair.price_key)
        assert price.input is not None and price.output is not None and price.read_multiplier is not None
        per_in = price.input / 1e6
        expected = (
            usage["input_tokens"] * per_in
            + usage["cache_creation"]["ephemeral_5m_input_tokens"] * per_in * config.prices.write_5m_multiplier
            + usage["cache_creation"]["ephemeral_1h_input_tokens"] * per_in * config.prices.write_1h_multiplier
            + usage["cache_read_input_tokens"] * per_in * price.read_multiplier
            + usage["output_tokens"] * price.output / 1e6
        )
        assert math.fsum(outcome.cost.values()) == pytest.approx(expected, abs=1e-9), outcome.pair.key
    # keepwarm_pair_info says where each pair's cache is.
    info = {
        (s.labels["expert"], s.labels["model"]): (s.labels["account"], s.labels["provider"])
        for family in metrics.registry.collect() if family.name == "keepwarm_pair_info" for s in family.samples
    }
    assert info == {(p.expert, p.model): (p.account, p.provider) for p in config.pairs}


# --- keepwarm.observe around each provider's client ---------------------------------------------


class Receiver:
    """A real HTTP server keeping what is POSTed to it as observations."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.items += body["observations"]
                out = json.dumps({"accepted": len(body["observations"]), "rejected": []}).encode()
                self.send_response(202)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"


@pytest.mark.parametrize("provider", ["bedrock", "vertex", "foundry"])
def test_observe_wraps_each_providers_client_sync_and_async_streamed_and_not(emulator: Emulator, provider: str) -> None:
    receiver = Receiver()
    model = BEDROCK_SONNET if provider == "bedrock" else "claude-sonnet-4-6"
    sync = {"bedrock": lambda: bedrock(emulator), "vertex": lambda: vertex(emulator), "foundry": lambda: foundry(emulator)}[provider]()
    asynchronous: Any = {
        "bedrock": lambda: anthropic.AsyncAnthropicBedrock(aws_region="us-east-1", base_url=emulator.base_url, max_retries=0, **AWS),
        "vertex": lambda: anthropic.AsyncAnthropicVertex(region="global", project_id="proj-a", access_token="t",
                                                         base_url=emulator.base_url + "/v1", max_retries=0),
        "foundry": lambda: anthropic.AsyncAnthropicFoundry(api_key="k", base_url=emulator.base_url + "/anthropic/", max_retries=0),
    }[provider]()
    client = observe.wrap(sync, url=receiver.url, expert="analyst", account="prod", flush_interval=0.01)
    aclient = observe.wrap(asynchronous, observer=observe.observer_of(client), expert="analyst", account="prod")
    client.messages.create(model=model, max_tokens=1, system=SYSTEM, messages=PING)
    for _ in client.messages.create(model=model, max_tokens=1, system=SYSTEM, messages=PING, stream=True):
        pass
    with client.messages.stream(model=model, max_tokens=1, system=SYSTEM, messages=PING) as stream:
        stream.get_final_message()

    async def run() -> None:
        await aclient.messages.create(model=model, max_tokens=1, system=SYSTEM, messages=PING)
        async with aclient.messages.stream(model=model, max_tokens=1, system=SYSTEM, messages=PING) as astream:
            await astream.get_final_message()

    asyncio.run(run())
    assert observe.observer_of(client).flush(10)
    sent = [e.usage for e in emulator.log if e.path == "/v1/messages"]
    assert len(receiver.items) == len(sent) == 5
    for item, usage in zip(receiver.items, sent):
        assert (item["expert"], item["model"], item["account"], item["provider"]) == ("analyst", model, "prod", provider)
        assert usage_from_api(item["usage"], "5m") == usage_from_api(usage, "5m")


@pytest.mark.parametrize(
    ("extra", "accepted"),
    [({}, True), ({"account": "ws-a"}, True), ({"account": "ws-b"}, False), ({"provider": "bedrock"}, False),
     ({"account": "ws-a", "provider": "anthropic"}, True), ({"expert": "east", "model": BEDROCK_SONNET}, True),
     ({"expert": "east", "model": BEDROCK_SONNET, "provider": "anthropic"}, False)],
)
def test_an_observation_made_in_another_place_is_not_the_pairs(tmp_path: Path, extra: dict[str, str], accepted: bool) -> None:
    from keepwarm.observations import Observation, validate

    config = parse_config(_mixed_doc(tmp_path), tmp_path)
    pairs = {p.key: p for p in config.pairs}
    item = {"expert": "a", "model": "claude-sonnet-4-6", "at": 1000.0,
            "usage": {"input_tokens": 1, "cache_read_input_tokens": 5000, "cache_creation_input_tokens": 0}, **extra}
    checked = validate(item, 0, pairs, 2000.0)
    assert isinstance(checked, Observation) == accepted
    if not accepted:
        assert checked.reason == "unknown_pair"  # type: ignore[union-attr]
        assert "; this request went to" in checked.message  # type: ignore[union-attr]


def test_bedrocks_messages_endpoint_through_the_mantle_client(emulator: Emulator) -> None:
    model = "global.anthropic.claude-opus-4-8"
    client = anthropic.AnthropicBedrockMantle(aws_region="us-east-1", base_url=emulator.base_url + "/anthropic", max_retries=0, **AWS)
    written, _ = reads(client, model)
    assert written > 0 and reads(client, model) == (0, written)
    with client.messages.stream(model=model, max_tokens=5, system=SYSTEM, messages=PING) as stream:
        assert stream.get_final_message().usage.cache_read_input_tokens == written
    assert {(e.provider, e.cache) for e in emulator.log} == {("bedrock", "bedrock-mantle:default:us-east-1")}


def test_a_model_invoke_model_does_not_serve_needs_the_messages_endpoint(tmp_path: Path) -> None:
    model = "global.anthropic.claude-opus-4-8"
    assert "claude-opus-4-8" in provider_facts()["bedrock"].mantle_only
    doc = {"accounts": [{"name": "aws", "provider": "bedrock", "region": "us-east-1"}],
           "experts": [{"name": "e", "system": [{"text": "x"}], "models": [model]}]}
    with pytest.raises(ConfigError) as err:
        parse_config(doc, tmp_path)
    assert err.value.problems == [
        "experts[0].models[0]: bedrock serves claude-opus-4-8 only through its Messages API endpoint, not InvokeModel:"
        " set bedrock_api: mantle on account 'aws' (or give that model an account of its own)"
    ]
    doc["accounts"][0]["bedrock_api"] = "mantle"  # type: ignore[index]
    (pair,) = parse_config(doc, tmp_path).pairs
    assert pair.provider == "bedrock"


def test_a_pricing_file_row_for_an_exact_provider_id_is_taken_as_it_is(tmp_path: Path) -> None:
    arn = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/support"
    (tmp_path / "prices.yaml").write_text(yaml.safe_dump({"models": {arn: {"input": 3.3, "output": 16.5, "read_multiplier": 0.1}}}))
    doc = {"accounts": [{"name": "aws", "provider": "bedrock", "region": "us-east-1"}], "pricing_file": "prices.yaml",
           "experts": [{"name": "e", "system": [{"text": "x"}], "models": [arn, BEDROCK_SONNET]}]}
    config = parse_config(doc, tmp_path)
    by_model = {p.model: config.prices.get(p.price_key) for p in config.pairs}
    assert (by_model[arn].input, by_model[arn].output) == (3.3, 16.5)  # no multiplier on the user's own row
    assert by_model[BEDROCK_SONNET].input != config.prices.get("claude-sonnet-4-6").input


def test_a_dead_key_in_one_account_holds_only_that_accounts_pairs(tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS["aws_access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS["aws_secret_key"])
    (tmp_path / "key-a").write_text("sk-ws-a-1\n")
    doc = {"accounts": [{"name": "ws-a", "api_key_file": "key-a", "base_url": emulator.base_url},
                        {"name": "aws", "provider": "bedrock", "region": "us-east-1", "base_url": emulator.base_url}],
           "experts": [{"name": "bed", "account": "aws", "system": [{"text": LONG_PROMPT * 3}], "models": [BEDROCK_SONNET]},
                       {"name": "api", "account": "ws-a", "system": [{"text": LONG_PROMPT * 3}], "models": ["claude-sonnet-4-6"]}]}
    config = parse_config(doc, tmp_path)
    key, _ = resolve_api_key(config, environ={})
    runner = Runner(make_clients(config, key, environ={}), config.prices, Metrics(), threading.Event(), key_source=key.source)
    bed, api = (PairState(pair=p, max_tokens=1) for p in config.pairs)
    emulator.inject(Fault(status=401, model=BEDROCK_SONNET, count=None))
    failed = runner.ping(bed)
    assert failed is not None and failed.error is not None and failed.error.error_type == "authentication"
    assert runner.ping(bed) is None  # that account's gate is shut for its interval
    outcome = runner.ping(api)  # the other account's pairs go on
    assert outcome is not None and outcome.result is Result.REWARMED


def test_simulate_counts_a_bedrock_pairs_prefix_with_the_emulator(tmp_path: Path) -> None:
    doc = {"accounts": [{"name": "aws", "provider": "bedrock", "region": "us-east-1"}],
           "experts": [{"name": "e", "system": [{"text": LONG_PROMPT * 3}], "models": [BEDROCK_SONNET]}]}
    (tmp_path / "keepwarm.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "trace.csv").write_text(
        "at,expert,model\n" + "".join(f"2026-03-02T09:{m:02d}:00Z,e,{BEDROCK_SONNET}\n" for m in (0, 3, 20, 50))
    )
    done = subprocess.run(
        [sys.executable, "-m", "keepwarm", "simulate", "--config", str(tmp_path / "keepwarm.yaml"),
         "--trace", str(tmp_path / "trace.csv"), "--emulator", "--format", "json"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert BEDROCK_SONNET in done.stdout


def test_a_foundry_429_is_a_rate_limit_not_the_consoles_spend_cap(emulator: Emulator) -> None:
    emulator.inject(Fault(status=429))
    with pytest.raises(anthropic.RateLimitError) as err:
        reads(foundry(emulator), "claude-sonnet-4-6")
    assert describe_error(err.value, provider="foundry").spend_cap is False
    assert describe_error(err.value, provider="anthropic").spend_cap is True


@pytest.mark.parametrize(("west_url", "code"), [("http://127.0.0.1:9", 3), ("https://bedrock-runtime.us-west-2.amazonaws.com", 2)])
def test_time_scale_needs_every_account_on_loopback(tmp_path: Path, west_url: str, code: int) -> None:
    doc = {"accounts": [{"name": "east", "provider": "bedrock", "region": "us-east-1", "base_url": "http://127.0.0.1:9"},
                        {"name": "west", "provider": "bedrock", "region": "us-west-2", "base_url": west_url}],
           "defaults": {"interval": "2s", "jitter": "0s"},  # a refused connection is retried for an interval at most
           "experts": [{"name": "e", "system": [{"text": "x"}], "models": [BEDROCK_SONNET]}]}
    (tmp_path / "keepwarm.yaml").write_text(yaml.safe_dump(doc))
    env = {**__import__("os").environ, "AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": "test"}
    done = subprocess.run([sys.executable, "-m", "keepwarm", "once", "--config", str(tmp_path / "keepwarm.yaml"), "--time-scale", "0.5"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == code, done.stderr


def test_the_documented_config_loads(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "providers.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "support.md").write_text(LONG_PROMPT)
    (tmp_path / "keepwarm.yaml").write_text(block)
    from keepwarm.config import load_config

    config = load_config(tmp_path / "keepwarm.yaml")
    assert {a.provider for a in config.accounts} == {"anthropic", "bedrock", "vertex", "foundry"}
    assert all(p.price_key and config.prices.get(p.price_key).priced for p in config.pairs)
    assert config.warnings == ()


def test_missing_google_credentials_are_an_authentication_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # no metadata server to ask offline
    doc = {"accounts": [{"name": "gcp", "provider": "vertex", "region": "global", "project_id": "p", "base_url": "http://127.0.0.1:9/v1"}],
           "experts": [{"name": "e", "system": [{"text": "x"}], "models": ["claude-sonnet-4-6"]}]}
    config = parse_config(doc, tmp_path)
    attempt = send_ping(make_clients(config, resolve_api_key(config, environ={})[0], environ={}), config.pairs[0], 1)
    assert attempt.error is not None and attempt.error.error_type == "authentication"
    assert "Google credentials" in attempt.error.message and "access_token_file" in attempt.error.message


def test_api_stays_the_defaults_of_anthropic_accounts(tmp_path: Path) -> None:
    doc = {"api": {"base_url": "http://127.0.0.1:7", "timeout": "5s"},
           "accounts": [{"name": "a"}, {"name": "b", "base_url": "http://127.0.0.1:8"},
                        {"name": "aws", "provider": "bedrock", "region": "us-east-1"}],
           "experts": [{"name": "e", "system": [{"text": "x"}], "models": ["claude-sonnet-4-6"]}]}
    config = parse_config(doc, tmp_path)
    assert [a.base_url for a in config.accounts] == ["http://127.0.0.1:7", "http://127.0.0.1:8", None]
    clients = make_clients(config, resolve_api_key(config, environ={"ANTHROPIC_API_KEY": "sk-x"})[0], environ={})
    assert [str(clients.by_account[n].base_url) for n in ("a", "b")] == ["http://127.0.0.1:7", "http://127.0.0.1:8"]
    assert clients.by_account["a"].timeout == 5.0
