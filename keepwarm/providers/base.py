"""What every provider shares: the account a pair is warmed in, the provider's facts (data), and
how a provider's model id maps to the Claude API model whose price and minimum it takes.

Pure: no SDK import here, so the config can use it without any optional extra installed.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from keepwarm.pricing import ModelPrice, PriceTable

PROVIDERS = ("anthropic", "bedrock", "vertex", "foundry")
# The modules an optional provider needs, and the extra that installs them.
EXTRAS: Mapping[str, tuple[tuple[str, ...], str]] = {
    "bedrock": (("boto3", "botocore"), "pip install 'keepwarm[bedrock]'"),
    "vertex": (("google.auth",), "pip install 'keepwarm[vertex]'"),
}
# Bedrock inference profiles route a model id across regions: `global.` anywhere, the others
# within one geography.
_BEDROCK_GEO = ("us.", "eu.", "apac.", "jp.", "au.", "ca.", "us-gov.")
_BEDROCK_VERSION = re.compile(r"-v\d+(?::\d+)?$")
_DATE = re.compile(r"-\d{8}$")


@dataclass(frozen=True)
class Account:
    """One place production's caches live: a provider plus its account, region or project.

    Holds where the secrets are, never a secret: its `repr` is safe to log.
    """

    name: str
    provider: str = "anthropic"
    base_url: str | None = None
    api_key_file: Path | None = None
    region: str | None = None
    aws_profile: str | None = None
    project_id: str | None = None
    resource: str | None = None
    access_token_file: Path | None = None
    bedrock_api: str = "invoke"  # bedrock: `invoke` (InvokeModel) or `mantle` (its Messages API endpoint)
    from_api: bool = False  # the implicit account built from `api:` (its key: the api's chain)


@dataclass(frozen=True)
class ProviderFacts:
    """What a provider offers a keepalive, from keepwarm/data/providers.yaml."""

    name: str
    source: str
    verified: str
    max_tokens_zero: bool
    count_tokens: bool
    ttl_1h: frozenset[str] | None  # None: every model
    min_cacheable_tokens: Mapping[str, int] = field(default_factory=dict)
    endpoints: Mapping[str, float] = field(default_factory=dict)
    flat_models: frozenset[str] = frozenset()
    mantle_only: frozenset[str] = frozenset()  # bedrock: models InvokeModel does not serve

    def offers_1h(self, model: str) -> bool:
        """Whether the 1h TTL is offered for this (Claude API) model."""
        return self.ttl_1h is None or model in self.ttl_1h


def _facts(name: str, raw: Mapping[str, Any], verified: str) -> ProviderFacts:
    ttl_1h = raw.get("ttl_1h", "all")
    return ProviderFacts(
        name=name,
        source=str(raw["source"]),
        verified=verified,
        max_tokens_zero=bool(raw["max_tokens_zero"]),
        count_tokens=bool(raw["count_tokens"]),
        ttl_1h=None if ttl_1h == "all" else frozenset(ttl_1h),
        min_cacheable_tokens={str(k): int(v) for k, v in (raw.get("min_cacheable_tokens") or {}).items()},
        endpoints={str(k): float(v) for k, v in raw["endpoints"].items()},
        flat_models=frozenset(raw.get("flat_models") or ()),
        mantle_only=frozenset(raw.get("mantle_only") or ()),
    )


@functools.lru_cache(maxsize=1)
def provider_facts() -> Mapping[str, ProviderFacts]:
    """Every provider's facts, parsed once per process from the shipped data."""
    text = resources.files("keepwarm").joinpath("data/providers.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    verified = str(data["verified"])
    return {name: _facts(name, raw, verified) for name, raw in data["providers"].items()}


def canonical_model(provider: str, model: str) -> str:
    """The Claude API model a provider's model id serves (its price and minimum come from it).

    Bedrock: `global.anthropic.claude-sonnet-4-5-20250929-v1:0` -> `claude-sonnet-4-5`;
    Vertex: `claude-sonnet-4-5@20250929` -> `claude-sonnet-4-5`; others unchanged. An id that
    does not look like a Claude model (an application inference profile ARN) stays as it is.
    """
    if provider == "bedrock":
        rest = model
        for prefix in ("global.", *_BEDROCK_GEO):
            if rest.startswith(prefix):
                rest = rest[len(prefix) :]
                break
        if not rest.startswith("anthropic."):
            return model
        rest = _BEDROCK_VERSION.sub("", rest[len("anthropic.") :])
        return _DATE.sub("", rest)
    if provider == "vertex":
        return model.partition("@")[0]
    return model


def endpoint(provider: str, model: str, region: str | None) -> str:
    """How a request is routed, which sets its price: `global`, `geo`, `regional` or `default`."""
    if provider == "bedrock":
        if model.startswith("global."):
            return "global"
        return "geo" if model.startswith(_BEDROCK_GEO) else "regional"
    if provider == "vertex":
        return "global" if region == "global" else "regional"
    return "default"


def provider_price(facts: ProviderFacts, model: str, region: str | None, table: PriceTable) -> tuple[str, ModelPrice]:
    """The model's price on this provider: (the key it is stored under, the price).

    A row for the exact provider model id in the price table (a `pricing_file` entry) wins;
    otherwise the Claude API row of its canonical model times the endpoint's multiplier.
    """
    return routed_price(facts, model, endpoint(facts.name, model, region), table)


def routed_price(facts: ProviderFacts, model: str, route: str, table: PriceTable) -> tuple[str, ModelPrice]:
    """`provider_price` for a request whose route (`endpoint`) is known already, as a ledger row says it."""
    canonical = canonical_model(facts.name, model)
    if facts.name == "anthropic":
        return model, table.get(model)
    key = f"{facts.name}:{route}:{model}"
    # A Bedrock id never collides with a Claude API name, so a row for it is the user's own; a
    # plain Vertex id is the Claude API's name, whose row is the base the multiplier applies to.
    if model in table.models and (model != canonical or facts.name == "bedrock"):
        return key, table.get(model)
    base = table.get(canonical)
    factor = 1.0 if canonical in facts.flat_models else facts.endpoints.get(route, 1.0)
    return key, ModelPrice(
        input=None if base.input is None else base.input * factor,
        output=None if base.output is None else base.output * factor,
        read_multiplier=base.read_multiplier,
        min_cacheable_tokens=facts.min_cacheable_tokens.get(canonical, base.min_cacheable_tokens),
    )


def missing_extra(provider: str) -> str | None:
    """The install command when the optional modules a provider needs are absent, else None."""
    need = EXTRAS.get(provider)
    if need is None:
        return None
    modules, command = need
    for module in modules:
        try:
            if importlib.util.find_spec(module) is None:
                return command
        except (ImportError, ValueError):  # a parent package missing, or a module set to None
            return command
    return None
