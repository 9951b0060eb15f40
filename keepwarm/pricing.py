"""The price table (data, not code) and the cost arithmetic built on it.

Prices are USD per million tokens. A model with no known price yields `None` costs:
unknown, never zero. The table ships as `keepwarm/data/models.yaml`; a user's
`pricing_file` overrides or extends it model by model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from keepwarm.classify import Usage

MILLION = 1_000_000
COST_KINDS = ("input", "cache_read", "cache_write_5m", "cache_write_1h", "output")
_MODEL_KEYS = {"input", "output", "read_multiplier", "min_cacheable_tokens"}


@dataclass(frozen=True)
class ModelPrice:
    """What one model costs, and the shortest prefix it caches; any field may be unknown."""

    input: float | None = None
    output: float | None = None
    read_multiplier: float | None = None
    min_cacheable_tokens: int | None = None

    @property
    def priced(self) -> bool:
        """True when every figure a cost needs is known."""
        return None not in (self.input, self.output, self.read_multiplier)


_UNKNOWN = ModelPrice()  # frozen: one for every model without a price, not one per lookup


@dataclass(frozen=True)
class PriceTable:
    """Per-model prices plus the write multipliers shared by every model."""

    models: Mapping[str, ModelPrice] = field(default_factory=dict)
    write_5m_multiplier: float = 1.25
    write_1h_multiplier: float = 2.0
    verified: str = ""
    source: str = ""

    def get(self, model: str) -> ModelPrice:
        """The model's entry, or an entry where everything is unknown."""
        return self.models.get(model, _UNKNOWN)

    def write_multiplier(self, ttl: str) -> float:
        """The write price as a multiple of input for a TTL (`5m` or `1h`)."""
        return self.write_1h_multiplier if ttl == "1h" else self.write_5m_multiplier

    # --- cost arithmetic -------------------------------------------------------------

    def cost(self, model: str, usage: Usage) -> dict[str, float] | None:
        """USD per kind for one response, or None when the model has no price."""
        price = self.get(model)
        if not price.priced:
            return None
        assert price.input is not None and price.output is not None
        assert price.read_multiplier is not None
        per_token_in = price.input / MILLION
        return {
            "input": usage.input * per_token_in,
            "cache_read": usage.cache_read * per_token_in * price.read_multiplier,
            "cache_write_5m": usage.cache_write_5m * per_token_in * self.write_5m_multiplier,
            "cache_write_1h": usage.cache_write_1h * per_token_in * self.write_1h_multiplier,
            "output": usage.output * price.output / MILLION,
        }

    def miss_penalty(self, model: str, prefix_tokens: int, ttl: str) -> float | None:
        """What one production request pays extra when it finds the cache cold.

        It writes the prefix (write price) instead of reading it (read price).
        """
        price = self.get(model)
        if price.input is None or price.read_multiplier is None:
            return None
        extra = self.write_multiplier(ttl) - price.read_multiplier
        return prefix_tokens * price.input / MILLION * extra

    def warm_ping_cost(
        self, model: str, prefix_tokens: int, message_tokens: int, output_tokens: int
    ) -> float | None:
        """The cost of one ping that finds the cache warm: a read plus the tiny tail."""
        usage = Usage(input=message_tokens, cache_read=prefix_tokens, output=output_tokens)
        costs = self.cost(model, usage)
        return None if costs is None else math.fsum(costs.values())


def format_usd(value: float | None, places: int | None = None) -> str:
    """Money for people, the one formatter of tables, pages and advice; `unknown` for None/NaN.

    With `places`, that many decimals (`$0.001234`); without, cents above a dollar and up to
    three significant figures below (`$2.40`, `$0.0069`). Machines get full precision elsewhere.
    """
    if value is None or math.isnan(value):
        return "unknown"
    if places is not None:
        return f"{'-' if value < 0 else ''}${abs(value):,.{places}f}"  # -$0.0065, as the page writes it
    if value == 0:
        return "$0"
    sign, value = ("-" if value < 0 else ""), abs(value)
    if value >= 1:
        return f"{sign}${value:,.2f}"
    places = max(2, 2 - math.floor(math.log10(value)))
    text = f"{value:.{places}f}"
    if places > 2:  # $0.24, not $0.240; but always whole cents
        text = text.rstrip("0")
        text += "0" * max(0, 2 - len(text.partition(".")[2]))
    return f"{sign}${text}"


def break_even_misses_per_day(keepalive_usd_per_day: float | None, miss_penalty_usd: float | None) -> float | None:
    """Production cache misses a day the keepalive must prevent to pay for itself.

    The keepalive's cost a day divided by one miss penalty (what a production request pays
    extra when it finds the cache cold). The one definition `check`, the TTL advisor and
    `report` share; None when either figure is unknown or nothing can be saved.
    """
    if keepalive_usd_per_day is None or miss_penalty_usd is None or miss_penalty_usd <= 0:
        return None
    return keepalive_usd_per_day / miss_penalty_usd


def _parse_models(raw: Any, where: str) -> tuple[dict[str, ModelPrice], list[str]]:
    errors: list[str] = []
    models: dict[str, ModelPrice] = {}
    if not isinstance(raw, dict):
        return models, [f"{where}: expected a mapping of model name to prices"]
    for name, entry in raw.items():
        loc = f"{where}.{name}"
        if not isinstance(entry, dict):
            errors.append(f"{loc}: expected a mapping with {sorted(_MODEL_KEYS)}")
            continue
        unknown = {str(k) for k in entry} - _MODEL_KEYS  # YAML keys may be numbers too
        if unknown:
            errors.append(f"{loc}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_MODEL_KEYS)}")
            continue
        values: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                errors.append(f"{loc}.{key}: expected a number >= 0, got {value!r}")
            elif key == "min_cacheable_tokens":
                values[key] = int(value)
            else:
                values[key] = float(value)
        models[str(name)] = ModelPrice(**values)
    return models, errors


def _table_from_mapping(data: Any, where: str) -> tuple[PriceTable, list[str]]:
    if not isinstance(data, dict):
        return PriceTable(), [f"{where}: expected a mapping"]
    allowed = {"verified", "source", "write_5m_multiplier", "write_1h_multiplier", "models"}
    errors = [f"{where}.{k}: unknown key; allowed: {sorted(allowed)}" for k in data if k not in allowed]
    models, model_errors = _parse_models(data.get("models", {}), f"{where}.models")
    errors += model_errors
    table = PriceTable(models=models, verified=str(data.get("verified", "")), source=str(data.get("source", "")))
    for key in ("write_5m_multiplier", "write_1h_multiplier"):
        if key in data:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                errors.append(f"{where}.{key}: expected a number > 0, got {value!r}")
            elif key == "write_5m_multiplier":
                table = replace(table, write_5m_multiplier=float(value))
            else:
                table = replace(table, write_1h_multiplier=float(value))
    return table, errors


def _first_known(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


@functools.lru_cache(maxsize=1)
def builtin_table() -> PriceTable:
    """The price table shipped with keepwarm, parsed once per process (it is frozen)."""
    text = resources.files("keepwarm").joinpath("data/models.yaml").read_text(encoding="utf-8")
    table, errors = _table_from_mapping(yaml.safe_load(text), "keepwarm/data/models.yaml")
    if errors:  # a broken shipped table is a packaging bug, not a user error
        raise RuntimeError("; ".join(errors))
    return table


def load_price_table(override: Path | None = None) -> tuple[PriceTable, list[str]]:
    """The built-in table, extended and overridden model by model by `override`.

    Returns the table and a list of problems found in the override file (empty when fine).
    """
    base = builtin_table()
    if override is None:
        return base, []
    where = str(override)
    try:
        data = yaml.safe_load(override.read_text(encoding="utf-8"))
    except OSError as exc:
        return base, [f"pricing_file: cannot read {where}: {exc.strerror or exc}"]
    except (UnicodeDecodeError, ValueError) as exc:  # not UTF-8, or a NUL byte in the path
        return base, [f"pricing_file: cannot read {where}: {exc}"]
    except yaml.YAMLError as exc:
        return base, [f"pricing_file: {where} is not valid YAML: {exc}"]
    extra, errors = _table_from_mapping(data, f"pricing_file {where}")
    merged = dict(base.models)
    for name, entry in extra.models.items():
        # A partial override (only `input`, say) keeps the rest of the built-in row.
        old = merged.get(name, ModelPrice())
        merged[name] = ModelPrice(
            **{f.name: _first_known(getattr(entry, f.name), getattr(old, f.name)) for f in fields(ModelPrice)}
        )
    raw = data if isinstance(data, dict) else {}
    table = PriceTable(
        models=merged,
        write_5m_multiplier=extra.write_5m_multiplier if "write_5m_multiplier" in raw else base.write_5m_multiplier,
        write_1h_multiplier=extra.write_1h_multiplier if "write_1h_multiplier" in raw else base.write_1h_multiplier,
        verified=extra.verified or base.verified,
        source=extra.source or base.source,
    )
    # A read must cost less than either write: every miss penalty and every saving is
    # (write - read) x tokens, and a negative one is a typo in the file, not a price.
    cheapest_write = min(table.write_5m_multiplier, table.write_1h_multiplier)
    for name in extra.models:
        read = table.models[name].read_multiplier
        if read is not None and read >= cheapest_write:
            errors.append(
                f"pricing_file {where}.models.{name}.read_multiplier: {read:g} is not below the cache-write"
                f" multipliers ({table.write_5m_multiplier:g} for 5m, {table.write_1h_multiplier:g} for 1h)"
            )
    return table, errors
