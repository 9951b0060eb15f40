"""Config loading: strict shape, defaults, files relative to the config, every problem at once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from keepwarm.config import ConfigError, load_config, parse_config, resolve_api_key
from keepwarm.durations import parse_duration
from keepwarm.prefix import cache_marker

DATA = Path(__file__).parent / "data"


def test_the_shipped_example_config_loads() -> None:
    config = load_config(ROOT / "config" / "keepwarm.yaml")
    keys = [p.key for p in config.pairs]
    assert keys == [
        "chief-economist/claude-sonnet-4-6",
        "chief-economist/claude-haiku-4-5",
        "support-triage/claude-sonnet-4-6",
        "style-editor/claude-sonnet-4-6",
    ]
    economist = config.pairs[0]
    assert len(economist.prefix.system) == 2, "two prompt files, two system blocks"
    assert economist.prefix.system[-1]["cache_control"] == {"type": "ephemeral"}
    assert "cache_control" not in economist.prefix.system[0]
    assert config.pairs[2].prefix.tools is not None and config.pairs[2].prefix.tools[0]["name"] == "lookup_account"
    assert (economist.interval, economist.jitter, economist.ttl_seconds) == (240.0, 10.0, 300.0)
    assert (config.metrics_host, config.metrics_port) == ("127.0.0.1", 9464)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("4m", 240), ("1h", 3600), ("1m30s", 90), ("250ms", 0.25), ("0s", 0), ("1.5s", 1.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["4", "4 minutes", "", "m", 4, None, True, "-1s"])
def test_bad_durations_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(bad)


def test_defaults_apply_and_experts_override() -> None:
    config = parse_config(
        {
            "defaults": {"models": ["claude-sonnet-4-6"], "ttl": "1h", "jitter": "0s"},
            "experts": [
                {"name": "a", "system": [{"text": "x"}]},
                {"name": "b", "system": [{"text": "y"}], "ttl": "5m", "models": ["claude-opus-4-8"], "max_tokens": 0},
            ],
        },
        Path("."),
    )
    a, b = config.pairs
    assert (a.ttl, a.interval, a.jitter, a.max_tokens) == ("1h", 3300.0, 0.0, 1), "1h defaults to a 55m interval"
    assert a.prefix.system[-1]["cache_control"] == cache_marker("1h") == {"type": "ephemeral", "ttl": "1h"}
    assert (b.ttl, b.interval, b.model, b.max_tokens) == ("5m", 240.0, "claude-opus-4-8", 0)


def test_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "sub" / "prompts").mkdir(parents=True)
    (tmp_path / "sub" / "prompts" / "p.md").write_text("hello prompt")
    (tmp_path / "sub" / "tools.json").write_text(json.dumps([{"name": "t", "input_schema": {"type": "object"}}]))
    cfg = tmp_path / "sub" / "k.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "defaults": {"models": ["claude-sonnet-4-6"]},
                "experts": [{"name": "e", "system": [{"file": "prompts/p.md"}], "tools_file": "tools.json"}],
                "ledger": {"path": "state/ledger.sqlite"},
            }
        )
    )
    cwd = os.getcwd()
    os.chdir("/")
    try:
        config = load_config(cfg)
    finally:
        os.chdir(cwd)
    pair = config.pairs[0]
    assert pair.prefix.system[0]["text"] == "hello prompt"
    assert pair.prefix.tools == ({"name": "t", "input_schema": {"type": "object"}},)
    assert config.ledger_path == tmp_path / "sub" / "state" / "ledger.sqlite"


def test_own_cache_control_markers_are_kept() -> None:
    config = parse_config(
        {
            "defaults": {"models": ["claude-sonnet-4-6"]},
            "experts": [
                {
                    "name": "e",
                    "system": [
                        {"text": "stable rules", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
                        {"text": "weekly notes", "cache_control": {"type": "ephemeral"}},
                        {"text": "tail"},
                    ],
                }
            ],
        },
        Path("."),
    )
    system = config.pairs[0].prefix.system
    assert [b.get("cache_control") for b in system] == [
        {"type": "ephemeral", "ttl": "1h"},
        {"type": "ephemeral"},
        None,
    ]


def _invalid_cases() -> list[tuple[str, list[str]]]:
    cases = []
    for path in sorted(DATA.glob("invalid-*.yaml")):
        expected = [line[3:].rstrip("\n") for line in path.read_text().splitlines() if line.startswith("#|")]
        cases.append((path.name, expected))
    return cases


@pytest.mark.parametrize(("name", "expected"), _invalid_cases())
def test_invalid_configs_report_every_problem_with_its_location(name: str, expected: list[str]) -> None:
    """Each tests/data/invalid-*.yaml lists, in `#|` lines, exactly the problems it must yield."""
    with pytest.raises(ConfigError) as info:
        load_config(DATA / name)
    assert [p.replace(str(DATA) + "/", "") for p in info.value.problems] == expected


def test_there_are_invalid_fixtures() -> None:
    assert len(_invalid_cases()) >= 5


def test_an_empty_or_non_mapping_file_is_a_config_error(tmp_path: Path) -> None:
    for text, word in (("", "empty"), ("- a\n- b\n", "list"), ("just words", "str")):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=word):
            load_config(path)


def test_a_missing_config_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


# --- the API key -----------------------------------------------------------------------------

SECRET = "sk-ant-test-0123456789-SECRETVALUE-wxyz"


def _cfg(tmp_path: Path, key_file: str | None = None):  # type: ignore[no-untyped-def]
    doc = {"defaults": {"models": ["claude-sonnet-4-6"]}, "experts": [{"name": "e", "system": [{"text": "x"}]}]}
    if key_file:
        doc["api"] = {"api_key_file": key_file}
    return parse_config(doc, tmp_path)


def test_key_order_file_then_credentials_directory_then_environment(tmp_path: Path) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "anthropic_api_key").write_text("sk-from-creds\n")
    (tmp_path / "k").write_text(SECRET + "\n")
    (tmp_path / "k").chmod(0o600)
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds"), "ANTHROPIC_API_KEY": "sk-from-env"}

    key, warnings = resolve_api_key(_cfg(tmp_path, "k"), env)
    assert key.value == SECRET and key.source == f"file {tmp_path / 'k'}" and warnings == []
    key, _ = resolve_api_key(_cfg(tmp_path), env)
    assert key.value == "sk-from-creds", "trailing newline stripped"
    key, _ = resolve_api_key(_cfg(tmp_path), {"ANTHROPIC_API_KEY": "sk-from-env"})
    assert key.source == "environment variable ANTHROPIC_API_KEY"
    with pytest.raises(ConfigError, match="no API key"):
        resolve_api_key(_cfg(tmp_path), {})


def test_key_problems_name_the_file_never_the_content(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty.*expected one key"):
        resolve_api_key(_cfg(tmp_path, "empty"), {})
    with pytest.raises(ConfigError, match="missing.*cannot read it"):
        resolve_api_key(_cfg(tmp_path, "missing"), {})
    (tmp_path / "two").write_text(SECRET + " other\n")
    with pytest.raises(ConfigError) as info:
        resolve_api_key(_cfg(tmp_path, "two"), {})
    assert SECRET not in str(info.value)


def test_a_key_file_readable_by_others_is_warned_about(tmp_path: Path) -> None:
    (tmp_path / "k").write_text(SECRET)
    (tmp_path / "k").chmod(0o644)
    key, warnings = resolve_api_key(_cfg(tmp_path, "k"), {})
    assert warnings and "readable by other users" in warnings[0]
    assert SECRET not in repr(key) and SECRET not in str(key) and key.hint == "…wxyz"


def test_shards_split_the_pairs_and_the_cli_overrides_the_file(tmp_path: Path) -> None:
    doc = {
        "defaults": {"models": ["claude-sonnet-4-6", "claude-opus-4-8"]},
        "experts": [{"name": f"e{i}", "system": [{"text": "x"}]} for i in range(30)],
        "shard": "0/3",
    }
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(doc))
    everyone = {p.key for p in parse_config({**doc, "shard": None}, tmp_path).pairs}
    parts = [{p.key for p in load_config(path, (k, 3)).pairs} for k in range(3)]
    assert set().union(*parts) == everyone and sum(map(len, parts)) == len(everyone) == 60
    assert {p.key for p in load_config(path).pairs} == parts[0], "the file's own shard: key"
    assert load_config(path).shard == (0, 3)
    with pytest.raises(ConfigError, match=r"shard: shard 3 does not exist in 3 shard\(s\)"):
        parse_config({**doc, "shard": "3/3"}, tmp_path)


def test_worker_count_is_sized_from_the_pairs_unless_set() -> None:
    from keepwarm.config import auto_concurrency

    small = parse_config({"defaults": {"models": ["m"]}, "experts": [{"name": "a", "system": [{"text": "x"}]}]}, Path("."))
    assert small.api.max_concurrency == 8
    many = [small.pairs[0]] * 10_000  # 10,000 pairs every 4 m: 41.7 pings/s of ~1 s each
    assert auto_concurrency(many) == 63
    fixed = parse_config(
        {"api": {"max_concurrency": 3}, "defaults": {"models": ["m"]}, "experts": [{"name": "a", "system": [{"text": "x"}]}]},
        Path("."),
    )
    assert fixed.api.max_concurrency == 3


# --- issue 10: items 3, 4, 12, 20 --------------------------------------------------------------


def test_ttl_is_derived_from_the_markers_actually_sent() -> None:
    """Item 3: blocks that all carry a 1h marker make a 1h pair, pinged at 55 m, its writes billed at 1h."""
    from keepwarm.classify import usage_from_api

    config = parse_config(
        {
            "defaults": {"models": ["claude-sonnet-4-6"]},
            "experts": [{"name": "e", "system": [{"text": "rules", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}],
        },
        Path("."),
    )
    pair = config.pairs[0]
    assert (pair.ttl, pair.ttl_seconds, pair.interval) == ("1h", 3600.0, 3300.0)
    # An answer without the 5m/1h split is billed at the TTL the markers sent.
    usage = usage_from_api({"input_tokens": 3, "cache_creation_input_tokens": 2000, "cache_read_input_tokens": 0}, pair.ttl)
    assert (usage.cache_write_1h, usage.cache_write_5m) == (2000, 0)


def test_a_marker_on_a_tool_does_not_suppress_the_system_marker(tmp_path: Path) -> None:
    """Item 4: the default marker is decided on the system blocks only."""
    tools = [{"name": "lookup", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    config = parse_config(
        {
            "defaults": {"models": ["claude-sonnet-4-6"]},
            "experts": [{"name": "e", "system": [{"text": "a long system prompt"}], "tools_file": "tools.json"}],
        },
        tmp_path,
    )
    prefix = config.pairs[0].prefix
    assert prefix.system[-1]["cache_control"] == {"type": "ephemeral"}
    assert prefix.tools is not None and prefix.tools[0]["cache_control"] == {"type": "ephemeral"}


def test_load_prefix_finds_experts_outside_the_configs_shard(tmp_path: Path) -> None:
    """Item 12: production imports load_prefix; the file's `shard:` must not hide experts from it."""
    from keepwarm.prefix import UnknownExpertError, load_prefix

    doc = {
        "defaults": {"models": ["claude-sonnet-4-6"]},
        "experts": [{"name": f"e{i}", "system": [{"text": f"prompt {i}"}]} for i in range(8)],
        "shard": "0/4",
    }
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(doc))
    outside = [f"e{i}" for i in range(8) if f"e{i}" not in {p.expert for p in load_config(path).pairs}]
    assert outside, "some experts belong to other shards"
    assert load_prefix(path, outside[0]).system[0]["text"] == f"prompt {outside[0][1:]}"
    with pytest.raises(KeyError) as info:
        load_prefix(path, "nobody")
    assert isinstance(info.value, UnknownExpertError)
    assert str(info.value) == f"no expert named 'nobody' in {path}; known experts: " + ", ".join(f"e{i}" for i in range(8))


def test_a_model_in_no_table_is_warned_about_with_the_closest_name() -> None:
    """Item 20: a typo'd model still loads (it is pinged) but the load names the likely intended one."""
    config = parse_config(
        {"defaults": {"models": ["claude-sonet-4-6"]}, "experts": [{"name": "a", "system": [{"text": "x"}]},
                                                                     {"name": "b", "system": [{"text": "y"}]}]},
        Path("."),
    )
    assert config.warnings == (
        "defaults.models[0]: model 'claude-sonet-4-6' has no price and no minimum cacheable length in the"
        " tables: it is pinged, its cost is unknown; did you mean 'claude-sonnet-4-6'?",
    )
