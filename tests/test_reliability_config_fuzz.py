"""Whatever a config file holds, loading it ends in a Config or a ConfigError that says where.

A daemon that meets a bad config must exit 78 with every problem named and located (README:
Configuration, Commands), never with a traceback: any other exception from `parse_config`/`load_config` is a bug.
Hypothesis feeds them arbitrary YAML documents, arbitrary text, and valid configs with a few
random mutations (wrong types at random keys, unknown keys, deleted keys, odd durations, odd
file names). The explicit cases at the end pin the bugs these properties found, one by one.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import LONG_PROMPT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keepwarm.config import Config, ConfigError, load_config, parse_config

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOP_KEYS = ("api", "defaults", "experts", "pricing_file", "metrics", "ledger", "shutdown_timeout")
KNOWN_KEYS = (
    *TOP_KEYS, "base_url", "api_key_file", "timeout", "max_concurrency", "requests_per_minute",
    "cache_diagnostics", "models", "ttl", "interval", "jitter", "max_tokens", "ping_message", "name", "system",
    "file", "text", "cache_control", "type", "tools_file", "listen", "path", "retention_days",
)
DURATION_KEYS = ("interval", "jitter", "timeout", "shutdown_timeout")
# Files in the fuzz directory a config may name, each a different way for reading it to go wrong.
FILE_NAMES = ("prompt.md", "tools.json", "prices.yaml", "binary.bin", "empty.md", "subdir", "missing.md",
              "a\x00b.md", "../../../../etc/hostname", "x" * 300)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fuzz")
    (directory / "prompt.md").write_text(LONG_PROMPT, encoding="utf-8")
    (directory / "tools.json").write_text(json.dumps([{"name": "lookup", "input_schema": {"type": "object"}}]))
    (directory / "prices.yaml").write_text("models:\n  claude-sonnet-4-6: {input: 3, output: 15}\n")
    (directory / "binary.bin").write_bytes(b"\xff\xfe\x00\x81 not text")
    (directory / "empty.md").write_text("")
    (directory / "subdir").mkdir()
    return directory


def valid_doc() -> dict[str, Any]:
    """A config using every section, so a mutation can land anywhere."""
    return {
        "api": {"base_url": "http://127.0.0.1:9", "timeout": "5s", "max_concurrency": 4},
        "defaults": {"models": ["claude-sonnet-4-6"], "ttl": "5m", "interval": "4m", "jitter": "10s",
                     "max_tokens": 1, "ping_message": "ping"},
        "experts": [
            {"name": "from-file", "system": [{"file": "prompt.md"}], "tools_file": "tools.json"},
            {
                "name": "inline",
                "system": [
                    {"text": LONG_PROMPT, "cache_control": {"type": "ephemeral", "ttl": "1h"}},
                    {"text": "tail"},
                ],
                "models": ["claude-opus-4-8", "claude-sonnet-4-6"],
                "ttl": "1h",
                "interval": "55m",
            },
        ],
        "pricing_file": "prices.yaml",
        "metrics": {"listen": "127.0.0.1:9464"},
        "ledger": {"path": "ledger.sqlite", "retention_days": 30},
        "shutdown_timeout": "10s",
    }


# --- strategies ------------------------------------------------------------------------------

durations = st.one_of(
    st.from_regex(r"\A(\d{1,5}(\.\d{1,3})?(ms|s|m|h|d)){1,3}\Z"),
    st.text(alphabet="0123456789.msdh -+e_", max_size=12),
    st.integers(1, 400).map(lambda n: "9" * n + "s"),  # long enough to overflow a float
    st.sampled_from(["0s", "0ms", "-1s", "1e3s", "1.5.5m", "4m ", " 4m", "4M", "inf", "nan", "4m4m", ""]),
    st.integers(-5, 10**6),
    st.floats(),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=16),
    st.sampled_from(KNOWN_KEYS),
    st.sampled_from(FILE_NAMES),
    st.sampled_from(["5m", "1h", "ephemeral", "claude-sonnet-4-6", "127.0.0.1:0", "[::1]:9464", "a:b:c"]),
    st.dates(),
    durations,
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=10), st.integers(-3, 3), st.booleans(), st.none())
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=30,
)
documents = st.one_of(st.dictionaries(keys, values, max_size=8), values)


def paths(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position in a document: each dict key and list index, depth first."""
    found = [at]
    if isinstance(node, dict):
        for key, child in node.items():
            found += paths(child, (*at, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += paths(child, (*at, index))
    return found


def mutate(doc: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """One to three random edits of `doc`: replace, delete, add an unknown key, or retime."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        where = data.draw(st.sampled_from(paths(doc)), label="where")
        parent = doc
        for step in where[:-1]:
            parent = parent[step]
        node = parent[where[-1]] if where else doc
        action = data.draw(st.sampled_from(["replace", "delete", "unknown key", "duration"]), label="action")
        if not where:
            if action == "unknown key":
                doc[data.draw(keys, label="key")] = data.draw(values, label="value")
            continue
        if action == "replace":
            parent[where[-1]] = data.draw(values, label="value")
        elif action == "delete":
            del parent[where[-1]]
        elif action == "unknown key" and isinstance(node, dict):
            node[data.draw(keys, label="key")] = data.draw(values, label="value")
        elif action == "duration":
            parent[where[-1]] = data.draw(durations, label="duration")
    return doc


# --- the properties --------------------------------------------------------------------------


def located(problem: str, doc: Any) -> bool:
    """Whether a problem starts with where it is: `experts[2].models[0]: ...` and the like."""
    if problem.startswith(("(top level): ", "(YAML): ")):
        return True
    if problem.split(": ", 1)[0].startswith("line ") and ", column " in problem.split(": ", 1)[0]:
        return True
    firsts = set(TOP_KEYS)
    if isinstance(doc, dict):
        firsts |= {str(k) for k in doc}
        if any(not isinstance(k, str) for k in doc) and re.match(r"\[[^\]]*\]: ", problem):
            return True  # a key that is not a string, named as pydantic does: `[1]: Keys should be strings`
    # The first step of the path, then the next step, the end of the location, or (for a file
    # named in the config) the file's path.
    return any(problem.startswith(first) and problem[len(first):][:1] in (".", "[", ":", " ") for first in firsts)


def load(doc: Any, base: Path) -> Config | None:
    """parse_config, failing the test on anything but a located ConfigError."""
    try:
        return parse_config(doc, base, base / "keepwarm.yaml")
    except ConfigError as exc:
        assert exc.problems, "a ConfigError names at least one problem"
        for problem in exc.problems:
            assert isinstance(problem, str) and located(problem, doc), f"problem without a location: {problem!r}"
        return None


def sane(config: Config) -> None:
    """What an accepted config promises: timings the daemon can actually use."""
    for pair in config.pairs:
        assert math.isfinite(pair.interval) and 0 < pair.interval < pair.ttl_seconds, pair.interval
        assert math.isfinite(pair.jitter) and 0 <= pair.jitter and pair.interval + pair.jitter < pair.ttl_seconds
    assert math.isfinite(config.api.timeout) and config.api.timeout > 0, config.api.timeout
    assert math.isfinite(config.shutdown_timeout) and config.shutdown_timeout >= 0, config.shutdown_timeout


def test_the_valid_document_is_valid(base: Path) -> None:
    config = load(valid_doc(), base)
    assert config is not None and len(config.pairs) == 3


@FUZZ
@given(doc=documents)
def test_any_document_is_a_config_or_a_located_config_error(base: Path, doc: Any) -> None:
    config = load(doc, base)
    if config is not None:
        sane(config)


@FUZZ
@given(data=st.data())
def test_a_mutated_valid_config_is_a_config_or_a_located_config_error(base: Path, data: st.DataObject) -> None:
    doc = mutate(valid_doc(), data)
    config = load(doc, base)
    if config is not None:
        sane(config)


@FUZZ
@given(key=st.sampled_from(DURATION_KEYS), value=durations, where=st.sampled_from(["defaults", "expert", "api", "top"]))
def test_any_duration_anywhere_is_a_config_or_a_located_config_error(
    base: Path, key: str, value: Any, where: str
) -> None:
    doc = valid_doc()
    target = {"defaults": doc["defaults"], "expert": doc["experts"][0], "api": doc["api"], "top": doc}[where]
    target[key] = value
    config = load(doc, base)
    if config is not None:
        sane(config)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), documents.map(lambda d: yaml.safe_dump(d, allow_unicode=True))))
def test_any_file_content_is_a_config_or_a_located_config_error(base: Path, text: str) -> None:
    path = base / "fuzzed.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as exc:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError:
            doc = None
        for problem in exc.problems:
            assert located(problem, doc), f"problem without a location: {problem!r}"


@FUZZ
@given(prices=documents)
def test_any_pricing_file_is_prices_or_a_located_config_error(base: Path, prices: Any) -> None:
    (base / "fuzzed-prices.yaml").write_text(yaml.safe_dump(prices, allow_unicode=True), encoding="utf-8")
    doc = valid_doc()
    doc["pricing_file"] = "fuzzed-prices.yaml"
    load(doc, base)


@FUZZ
@given(name=st.one_of(st.sampled_from(FILE_NAMES), st.text(max_size=40)),
       where=st.sampled_from(["system", "tools_file", "pricing_file"]))
def test_any_file_name_is_read_or_a_located_config_error(base: Path, name: str, where: str) -> None:
    doc = valid_doc()
    if where == "system":
        doc["experts"][0]["system"] = [{"file": name}]
    elif where == "tools_file":
        doc["experts"][0]["tools_file"] = name
    else:
        doc["pricing_file"] = name
    load(doc, base)


# --- the bugs the properties found, pinned one by one ------------------------------------------


@pytest.mark.parametrize(
    ("where", "key"),
    [("defaults", "interval"), ("defaults", "jitter"), ("top", "shutdown_timeout"), ("api", "timeout")],
)
def test_a_duration_too_long_for_a_float_is_a_config_error(base: Path, where: str, key: str) -> None:
    """`9999…9s` (400 digits) parses to infinity: it must be refused, not crash or be accepted."""
    doc = valid_doc()
    {"defaults": doc["defaults"], "top": doc, "api": doc["api"]}[where][key] = "9" * 400 + "s"
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base)
    assert any(p.startswith(f"{where}.{key}" if where != "top" else key) for p in info.value.problems)


@pytest.mark.parametrize("where", ["system", "tools_file", "pricing_file"])
def test_a_file_name_with_a_nul_byte_is_a_config_error(base: Path, where: str) -> None:
    doc = valid_doc()
    if where == "system":
        doc["experts"][0]["system"] = [{"file": "a\x00b.md"}]
    elif where == "tools_file":
        doc["experts"][0]["tools_file"] = "a\x00b.json"
    else:
        doc["pricing_file"] = "a\x00b.yaml"
    with pytest.raises(ConfigError):
        parse_config(doc, base)


def test_a_pricing_file_that_is_not_text_is_a_config_error(base: Path) -> None:
    doc = valid_doc()
    doc["pricing_file"] = "binary.bin"
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base)
    assert info.value.problems[0].startswith("pricing_file")


def test_a_yaml_date_where_a_duration_goes_is_a_located_config_error(base: Path) -> None:
    doc = valid_doc()
    doc["defaults"]["interval"] = datetime.date(2026, 1, 1)
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base)
    assert info.value.problems[0].startswith("defaults.interval: ")


def test_a_pricing_file_with_a_number_for_a_key_is_a_config_error(base: Path) -> None:
    """YAML reads `0:` as an int key; sorting it among other unknown keys for the message crashed."""
    (base / "int-key-prices.yaml").write_text("models:\n  claude-sonnet-4-6: {input: 3, colour: 1, 0: 1}\n", encoding="utf-8")
    doc = valid_doc()
    doc["pricing_file"] = "int-key-prices.yaml"
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base)
    assert info.value.problems[0].startswith("pricing_file")
