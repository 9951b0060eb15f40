"""Sharding: N shards cover every pair exactly once, evenly, stably; the StatefulSet that runs them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from keepwarm.scheduler import phase
from keepwarm.shard import in_shard, owner, parse_shard, shard_of, weight

ROOT = Path(__file__).resolve().parent.parent
STATEFULSET = ROOT / "deploy" / "kubernetes" / "overlays" / "shards" / "statefulset.yaml"
MODELS = ("claude-sonnet-4-6", "claude-haiku-4-5", "claude-opus-4-6")
KEYS = [f"expert-{i:05d}/{model}" for i in range(3000) for model in MODELS]  # 9,000 pairs


@pytest.mark.parametrize("shards", [1, 2, 3, 5, 8, 16, 60])
def test_shards_cover_every_pair_exactly_once(shards: int) -> None:
    # Each in_shard weighs every shard, N² hashes a pair: fewer pairs the more shards.
    for key in KEYS[:: max(1, shards * shards // 40)]:
        owners = [k for k in range(shards) if in_shard(key, k, shards)]
        assert owners == [shard_of(key, shards)], key


@pytest.mark.parametrize("shards", [2, 3, 5, 8, 16])
def test_shards_are_balanced(shards: int) -> None:
    sizes = Counter(shard_of(key, shards) for key in KEYS)
    expected = len(KEYS) / shards
    # A binomial spread is ~sqrt(expected) (<= 67 here); 10% is at least four of those.
    assert set(sizes) == set(range(shards))
    assert all(abs(n - expected) <= 0.10 * expected for n in sizes.values()), sizes


def test_one_shards_pairs_are_still_spread_over_the_interval() -> None:
    # The shard uses other digest bytes than the phase, so a shard's start-up is no burst.
    mine = [key for key in KEYS if in_shard(key, 0, 4)]
    buckets = Counter(int(phase(key, 240) // 30) for key in mine)
    expected = len(mine) / 8
    assert all(abs(buckets[b] - expected) <= 0.2 * expected for b in range(8)), buckets


def test_the_split_is_stable_across_processes() -> None:
    # sha256, not hash(): a fresh interpreter with another hash seed agrees.
    code = "from keepwarm.shard import shard_of; print([shard_of(f'e{i}/m', 7) for i in range(50)])"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, check=True, cwd=ROOT, env={"PYTHONHASHSEED": "12345", "PATH": ""},
    ).stdout
    assert out.strip() == str([shard_of(f"e{i}/m", 7) for i in range(50)])
    # Pinned, so a change of hash is a visible decision, not an accident: the first 8 bytes of
    # sha256("0\0chief-economist/claude-sonnet-4-6") = d2ea4d52678c030d… outweigh slot 1's 0c042e57….
    assert weight("chief-economist/claude-sonnet-4-6", "0") == int("d2ea4d52678c030d", 16)
    assert weight("chief-economist/claude-sonnet-4-6", "1") == int("0c042e57cc27f668", 16)
    assert [shard_of("chief-economist/claude-sonnet-4-6", n) for n in (2, 3, 10, 1000)] == [0, 0, 7, 138]


@pytest.mark.parametrize(("before", "after"), [(4, 5), (8, 9), (5, 4), (1, 2), (16, 17)])
def test_changing_the_number_of_shards_moves_only_about_one_in_n(before: int, after: int) -> None:
    """Rendezvous hashing: a new shard takes only the pairs it wins, a removed one hands over only
    its own. `sha256 mod N` moved 80 % of the pairs from 4 to 5 shards, 89 % from 8 to 9."""
    moved = sum(1 for key in KEYS if shard_of(key, before) != shard_of(key, after))
    minimum = abs(after - before) / max(before, after)
    assert moved / len(KEYS) == pytest.approx(minimum, abs=0.025), (moved, len(KEYS))
    # Only to or from the shard that came or went: no pair moves between two shards that stayed.
    assert all(shard_of(key, before) >= min(before, after) or shard_of(key, after) >= min(before, after)
               or shard_of(key, before) == shard_of(key, after) for key in KEYS)


def test_a_fleet_member_that_leaves_hands_over_only_its_own_pairs() -> None:
    members = ["kw-a", "kw-b", "kw-c", "kw-d"]
    before = {key: owner(key, members) for key in KEYS}
    after = {key: owner(key, [m for m in members if m != "kw-c"]) for key in KEYS}
    assert {key for key in KEYS if before[key] != after[key]} == {key for key in KEYS if before[key] == "kw-c"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0/1", (0, 1)), ("2/3", (2, 3)), (" 1 / 4 ", (1, 4)), ("9/10", (9, 10))],
)
def test_parse_shard(text: str, expected: tuple[int, int]) -> None:
    assert parse_shard(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3/3", "shard 3 does not exist in 3 shard(s): K counts from 0 to 2"),
        ("1/0", "the number of shards must be at least 1, got '1/0'"),
        ("-1/3", "expected K/N, such as 0/3 for the first of three shards, got '-1/3'"),
        ("1", "expected K/N, such as 0/3 for the first of three shards, got '1'"),
        ("a/b", "expected K/N, such as 0/3 for the first of three shards, got 'a/b'"),
        ("1/2/3", "expected K/N, such as 0/3 for the first of three shards, got '1/2/3'"),
        ("", "expected K/N, such as 0/3 for the first of three shards, got ''"),
    ],
)
def test_parse_shard_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_shard(text)
    assert str(caught.value) == message


def test_in_shard_rejects_a_shard_out_of_range() -> None:
    with pytest.raises(ValueError, match="shard 3 is out of range for 3 shard"):
        in_shard("a/m", 3, 3)
    with pytest.raises(ValueError, match="at least 1"):
        in_shard("a/m", 0, 0)


# --- the StatefulSet ---------------------------------------------------------------------------


def _statefulset() -> dict[str, Any]:
    """The StatefulSet document of the file (its headless Service follows it)."""
    (doc,) = [d for d in yaml.safe_load_all(STATEFULSET.read_text()) if d and d["kind"] == "StatefulSet"]
    return dict(doc)


def _kubernetes_validate() -> str:
    here = Path(sys.executable).parent / "kubernetes-validate"
    found = str(here) if here.exists() else shutil.which("kubernetes-validate")
    assert found, "kubernetes-validate not found: scripts/test installs it (`pip install -e '.[test]'`)"
    return found


@pytest.mark.parametrize("version", ["1.28.0", None])  # 1.28: the first with the pod-index label
def test_statefulset_validates_strictly(version: str | None) -> None:
    args = [_kubernetes_validate(), "--strict", "--quiet", *(["-k", version] if version else []), str(STATEFULSET)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and output == "", output


def test_strict_validation_would_catch_a_stray_key(tmp_path: Path) -> None:
    doc = _statefulset()
    doc["spec"]["shards"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = subprocess.run(
        [_kubernetes_validate(), "--strict", "--quiet", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0 and "'shards' was unexpected" in result.stdout + result.stderr


def test_statefulset_gives_each_pod_its_ordinal_as_shard() -> None:
    doc = _statefulset()
    spec = doc["spec"]
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert int(env["SHARDS"]["value"]) == spec["replicas"], "SHARDS must equal replicas"
    args = container["args"]
    assert args[:3] == ["run", "--config", "/etc/keepwarm/keepwarm.yaml"]
    assert args[args.index("--shard") + 1] == "$(POD_INDEX)/$(SHARDS)"
    # Kubernetes expands $(VAR) from the container's env: what each pod then runs parses.
    for ordinal in range(spec["replicas"]):
        expanded = args[args.index("--shard") + 1].replace("$(POD_INDEX)", str(ordinal))
        assert parse_shard(expanded.replace("$(SHARDS)", env["SHARDS"]["value"])) == (ordinal, spec["replicas"])
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert spec["podManagementPolicy"] == "Parallel"
