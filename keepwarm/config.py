"""The YAML config: strict, typed, every problem reported at once with its location.

Loading happens in two passes. Pydantic checks the shape (unknown keys, types, allowed
values); then `_resolve` applies defaults, reads prompt and tool files relative to the
config file, and checks the rules that span keys (`interval < ttl`, unique names). Both
passes collect errors rather than stop at the first, so a user fixes everything in one go.
The result is a frozen `Config` whose `pairs` are what the daemon warms.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import stat
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from keepwarm.cachekey import Prefix, build_prefix
from keepwarm.durations import format_duration, parse_duration
from keepwarm.hours import ActiveHours, parse_active_hours
from keepwarm.pricing import PriceTable, load_price_table
from keepwarm.providers.base import Account, canonical_model, missing_extra, provider_facts, provider_price
from keepwarm.shard import in_shard, parse_shard
from keepwarm.store.paths import default_ledger_path

try:  # libyaml's parser when present: a 10,000-pair config loads in half the time
    from yaml import CSafeLoader as _BaseLoader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _BaseLoader  # type: ignore[assignment]

TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
DEFAULT_INTERVAL = {"5m": 240.0, "1h": 3300.0}
CREDENTIAL_NAME = "anthropic_api_key"


class ConfigError(Exception):
    """A config that cannot be used; `problems` lists every issue with its location."""

    def __init__(self, problems: list[str], source: str = "", heading: str = "invalid config") -> None:
        self.problems = problems
        self.source = source
        # `heading`: what failed, for a valid config that still cannot be used for the task at hand.
        head = f"{heading} {source}" if source else heading
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in problems))


def _duration(value: Any) -> float:
    return parse_duration(value)


Duration = Annotated[float, BeforeValidator(_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _url(value: Any) -> Any:
    if isinstance(value, str):
        parts = urllib.parse.urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http(s) URL such as https://api.anthropic.com, got {value!r}")
    return value


class ApiSection(_Strict):
    base_url: Annotated[str | None, BeforeValidator(_url)] = None
    api_key_file: str | None = None
    timeout: Duration = 30.0
    max_concurrency: int | None = Field(default=None, ge=1, le=1024)  # None: sized from the pairs
    requests_per_minute: float | None = Field(default=None, gt=0)
    cache_diagnostics: bool = False


class CacheControl(_Strict):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class SystemBlock(_Strict):
    file: str | None = None
    text: str | None = None
    cache_control: CacheControl | None = None


class _Overridable(_Strict):
    """Keys that `defaults` sets and each expert may override."""

    models: list[str] | None = None
    ttl: Literal["5m", "1h"] | None = None
    interval: Duration | None = None
    jitter: Duration | None = None
    max_tokens: Literal[0, 1] | None = None
    ping_message: str | None = None
    policy: Literal["fixed", "adaptive"] | None = None  # docs/policy.md
    active_hours: str | list[str] | None = None  # parsed by keepwarm.hours in _resolve
    account: str | None = None  # which `accounts` entry (docs/providers.md); default the first


class DefaultsSection(_Overridable):
    pass


class ExpertSection(_Overridable):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")]
    system: Annotated[list[SystemBlock], Field(min_length=1)]
    tools_file: str | None = None


class AccountSection(_Strict):
    """One `accounts` entry (docs/providers.md); which keys a provider takes is checked in _accounts."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")]
    provider: Literal["anthropic", "bedrock", "vertex", "foundry"] = "anthropic"
    base_url: Annotated[str | None, BeforeValidator(_url)] = None
    api_key_file: str | None = None  # anthropic, foundry; bedrock: a Bedrock API key instead of AWS credentials
    region: str | None = None  # bedrock, vertex (`global` too)
    aws_profile: str | None = None  # bedrock
    bedrock_api: Literal["invoke", "mantle"] | None = None  # bedrock: InvokeModel (default) or the Messages endpoint
    project_id: str | None = None  # vertex
    access_token_file: str | None = None  # vertex: a token minted elsewhere, instead of ADC
    resource: str | None = None  # foundry


# Which keys each provider takes, beyond name, provider and base_url.
ACCOUNT_KEYS = {
    "anthropic": ("api_key_file",),
    "bedrock": ("region", "aws_profile", "api_key_file", "bedrock_api"),
    "vertex": ("region", "project_id", "access_token_file"),
    "foundry": ("resource", "api_key_file"),
}
ACCOUNT_REQUIRED = {"anthropic": (), "bedrock": ("region",), "vertex": ("region", "project_id"), "foundry": ()}


class MetricsSection(_Strict):
    listen: str = "127.0.0.1:9464"
    # standard: the series budget (about 20 a pair); full: every per-pair series and histogram.
    per_pair: Literal["standard", "full"] = "standard"


class ObserveSection(_Strict):
    token_file: str | None = None  # bearer token production sends with observations
    allow_unauthenticated: bool = False  # accept observations without a token off loopback


class WebSection(_Strict):
    # A web config file in the Prometheus exporter toolkit's format: TLS and basic auth for the
    # metrics listener (keepwarm.webconfig).
    config_file: str | None = None


class LedgerSection(_Strict):
    path: str | None = None  # None: the default state path (keepwarm.store.paths)
    url: str | None = None  # instead of path: a PostgreSQL database (libpq URI or conninfo), no password in it
    password_file: str | None = None  # else libpq's PGPASSWORD/PGPASSFILE, else $CREDENTIALS_DIRECTORY/ledger_password
    retention_days: float = Field(default=30.0, gt=0)


class FleetSection(_Strict):
    # Daemons that share a database and this name divide its pairs (only with ledger.url).
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")] = "keepwarm"
    lease: Duration = 20.0  # a member that has not renewed for this long loses its pairs
    min_members: int = Field(default=1, ge=1)  # below this the fleet is degraded


def _ledger_off(value: Any) -> Any:
    """`ledger: off` (YAML reads `off` as false), `ledger: "off"` or an empty `ledger:` turn the state off."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return False
    return value


class BudgetSection(_Strict):
    usd_per_day: float | None = Field(default=None, gt=0)  # None: no cap


class FileSection(_Strict):
    api: ApiSection = ApiSection()
    defaults: DefaultsSection = DefaultsSection()
    # Each expert is validated on its own (see parse_config), so one bad expert does not
    # hide the cross-key problems of the others.
    # Empty is allowed: a config (or shard) with no pairs is "nothing to do" (exit 3), not a bad config.
    experts: list[Any]
    pricing_file: str | None = None
    metrics: MetricsSection = MetricsSection()
    ledger: Annotated[LedgerSection | Literal[False], BeforeValidator(_ledger_off)] = LedgerSection()
    observe: ObserveSection = ObserveSection()
    web: WebSection = WebSection()
    budget: BudgetSection = BudgetSection()
    fleet: FleetSection | None = None
    shard: str | None = None  # "K/N": warm only this shard's pairs (see keepwarm.shard)
    shutdown_timeout: Duration = 10.0
    # Each account is validated on its own, as experts are (see parse_config).
    accounts: Annotated[list[Any], Field(min_length=1)] | None = None


# --- the resolved, frozen config the daemon uses ------------------------------------------


@dataclass(frozen=True, slots=True)  # 10,000 of them: no per-instance __dict__
class Pair:
    """One (expert, model) cache to keep warm, with every setting resolved."""

    expert: str
    model: str
    ttl: str
    ttl_seconds: float
    interval: float
    jitter: float
    max_tokens: int
    ping_message: str
    prefix: Prefix
    fingerprint: str
    policy: str = "fixed"  # fixed | adaptive (keepwarm.policy.make_policy)
    active_hours: ActiveHours | None = None  # None: always
    account: str = "default"  # the `accounts` entry whose cache this pair warms
    provider: str = "anthropic"
    # The price table row of a provider's pair (`bedrock:geo:us.anthropic...`, priced with its
    # endpoint multiplier); empty for the Claude API, whose row is the model's (see price_key).
    price_row: str = ""
    # A stable identifier: `expert/model`. Computed once here, not in a property: the scheduler
    # and the observations look it up several times per production request.
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.expert}/{self.model}")

    @property
    def price_key(self) -> str:
        """The price table row this pair is billed by: its provider's, else its model's."""
        return self.price_row or self.model

    @property
    def adaptive(self) -> bool:
        """Whether the adaptive policy decides this pair's pings (what it keeps differs)."""
        return self.policy == "adaptive"


@dataclass(frozen=True)
class ApiSettings:
    """Where the API is and how long to wait for it; the key is resolved separately."""

    base_url: str | None
    api_key_file: Path | None
    timeout: float
    max_concurrency: int
    cache_diagnostics: bool = False
    requests_per_minute: float | None = None


@dataclass(frozen=True)
class FleetSettings:
    """The fleet a daemon with `ledger.url` belongs to (README: A fleet on PostgreSQL)."""

    name: str = "keepwarm"
    lease: float = 20.0
    min_members: int = 1


@dataclass(frozen=True)
class Config:
    """A validated config. Its `repr` holds no secret: the key is never stored here."""

    path: Path | None
    api: ApiSettings
    pairs: tuple[Pair, ...]
    prices: PriceTable = field(repr=False)
    metrics_host: str
    metrics_port: int
    ledger_path: Path | None
    shutdown_timeout: float
    ledger_retention_days: float | None = None
    ledger_default: bool = False  # ledger_path is the default state path, not one the config named
    shard: tuple[int, int] | None = None
    time_scale: float = 1.0
    warnings: tuple[str, ...] = ()  # worth logging at load, not worth refusing the config
    observe_token_file: Path | None = None
    observe_allow_unauthenticated: bool = False
    web_config_file: Path | None = None  # TLS and basic auth for the listener (keepwarm.webconfig)
    # Configured pairs that another shard keeps warm: observations for them answer 421.
    other_shard_pairs: frozenset[str] = frozenset()
    budget_usd_per_day: float | None = None  # cap on the keepalive's spend over the trailing 24 h
    metrics_per_pair: Literal["standard", "full"] = "standard"
    # A PostgreSQL ledger instead of ledger_path (which is then None); the URL holds no password.
    ledger_url: str | None = None
    ledger_password_file: Path | None = None
    fleet: FleetSettings | None = None  # set exactly when ledger_url is
    # Where the caches live (docs/providers.md); without `accounts:`, one Anthropic account from `api:`.
    accounts: tuple[Account, ...] = ()

    def account(self, name: str) -> Account:
        """The account of that name (a pair's `account`)."""
        return next(a for a in self.accounts if a.name == name)

    def scaled(self, factor: float) -> Config:
        """The same config with every TTL, interval, jitter and fleet lease multiplied by `factor`.

        Used with the emulator, whose TTLs shrink by the same factor, so minutes of cache
        life pass in seconds.
        """
        pairs = tuple(
            replace(p, ttl_seconds=p.ttl_seconds * factor, interval=p.interval * factor, jitter=p.jitter * factor)
            for p in self.pairs
        )
        # A fleet's lease is timed against the TTL's margin: it scales with it.
        fleet = None if self.fleet is None else replace(self.fleet, lease=self.fleet.lease * factor)
        return replace(self, pairs=pairs, time_scale=self.time_scale * factor, fleet=fleet)


# --- loading -------------------------------------------------------------------------------


def _loc(parts: tuple[Any, ...]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


_YAML_TYPES = {"str": "text", "int": "a number", "float": "a number", "bool": "true/false", "list": "a list",
               "dict": "a mapping", "NoneType": "nothing"}


def _kind(value: Any) -> str:
    """What a YAML value is, in the words of YAML rather than Python's."""
    return _YAML_TYPES.get(type(value).__name__, type(value).__name__)


def _keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys a mapping at `loc` (relative to `model`) may have; [] when unknown."""
    target: Any = model
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list: its type was taken when the list's field was
        fields = getattr(target, "model_fields", None)
        if fields is None or part not in fields:
            return []
        target = fields[part].annotation
        # Unwrap `X | None`, `list[X]`, `Annotated[...]` down to a model class.
        for _ in range(4):
            args = [a for a in getattr(target, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
            if isinstance(target, type) and issubclass(target, BaseModel):
                break
            if not args:
                inner = [a for a in getattr(target, "__args__", ()) if a is not type(None)]
                if not inner:
                    return []
                target = inner[0]
            else:
                target = args[0]
    fields = getattr(target, "model_fields", None)
    return [] if fields is None else list(fields)


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    """`; did you mean `interval`?` for a near miss, else the keys allowed there."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.75)
    # `apikey` for `api_key_file`, `base` for `base_url`: a key written short, or without its underscores.
    squeezed = word.replace("_", "").lower()
    close = close or [c for c in choices if len(squeezed) >= 3 and c.replace("_", "").startswith(squeezed)][:1]
    if close:
        return f"; did you mean `{close[0]}`?"
    return f"; expected one of {', '.join(choices)}" if choices else ""


def _pydantic_problems(
    exc: ValidationError, prefix: tuple[Any, ...] = (), model: type[BaseModel] | None = None
) -> list[str]:
    problems = []
    for err in exc.errors():
        # Pydantic reports the input's problem at a path; our own validators raise
        # ValueError whose text is already user-facing (drop pydantic's "Value error, ").
        where = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        loc = prefix + where
        msg = err["msg"].removeprefix("Value error, ")
        kind, value = err["type"], err.get("input")
        if kind == "extra_forbidden":
            msg = "unknown key" + (_did_you_mean(str(where[-1]), _keys_at(model, where[:-1])) if model and where else "")
        elif kind == "missing":
            msg = "required, but missing"
        elif kind == "too_short":
            msg = "must not be empty: list at least one"
        elif kind == "literal_error":
            expected = msg.removeprefix("Input should be ")
            msg = f"expected {expected}, got {value!r}"
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            bound = msg.removeprefix("Input should be ").replace("greater than or equal to", "at least") \
                .replace("greater than", "above").replace("less than or equal to", "at most").replace("less than", "below")
            msg = f"must be {bound}, got {value!r}"
        elif kind == "string_pattern_mismatch":
            msg = f"{msg}, got {value!r}"
        elif kind == "model_type" or kind == "dict_type":
            msg = f"expected a mapping of settings, got {_kind(value)} {value!r}"
        elif kind.endswith("_type") or kind.endswith("_parsing"):
            wanted = {"int": "a whole number", "float": "a number", "bool": "true or false", "list": "a list",
                      "string": "text", "dict": "a mapping"}.get(kind.split("_")[0], msg)
            msg = f"expected {wanted}, got {_kind(value)} {value!r}"
        problems.append(f"{_loc(loc)}: {msg}")
    return problems


def parse_listen(text: str) -> tuple[str, int]:
    """Split `host:port` (IPv6 as `[::1]:9464`); raise ValueError if malformed."""
    m = re.fullmatch(r"\[([0-9a-fA-F:]+)\]:(\d+)|([^:\s]+):(\d+)", text.strip())
    if not m:
        raise ValueError(f"expected host:port such as 127.0.0.1:9464, got {text!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return host, port


def is_loopback(host: str | None) -> bool:
    """True for a loopback host name or address (`localhost`, `127.x.y.z`, `::1`)."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _read_text(base: Path, rel: str, where: str, problems: list[str], seen: dict[Path, str]) -> str | None:
    """Read a prompt or tools file once per load: thousands of experts often share a few files."""
    path = base / rel
    if path in seen:
        return seen[path]
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(f"{where}: file not found: {path}")
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL byte in the path
        problems.append(f"{where}: cannot read {path}: {exc}")
        return None
    if not text.strip():
        problems.append(f"{where}: file is empty: {path}")
        return None
    if "\x00" in text:
        problems.append(f"{where}: {path} contains NUL bytes: a binary file, not a prompt")
        return None
    seen[path] = text
    return text


def _read_tools(
    base: Path, rel: str, where: str, problems: list[str], seen: dict[Path, str]
) -> list[dict[str, Any]] | None:
    text = _read_text(base, rel, where, problems, seen)
    if text is None:
        return None
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as exc:
        problems.append(f"{where}: {base / rel} is not valid JSON: {exc}")
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and "name" in t for t in tools):
        problems.append(f"{where}: {base / rel} must hold a JSON list of tool definitions, each with a name")
        return None
    return tools


def _check_marker_order(prefix: Prefix, where: str, problems: list[str]) -> None:
    """The API rejects a 1h marker placed after a 5m marker; catch it before any ping."""
    seen_5m = False
    for block in [*(prefix.tools or ()), *prefix.system]:
        marker = block.get("cache_control")
        if marker is None:
            continue
        if marker.get("ttl") == "1h" and seen_5m:
            problems.append(f"{where}: a 1h cache_control marker comes after a 5m one; the API rejects that order")
            return
        seen_5m = seen_5m or marker.get("ttl", "5m") == "5m"
    markers = sum("cache_control" in b for b in [*(prefix.tools or ()), *prefix.system])
    if markers > 4:
        problems.append(f"{where}: {markers} cache_control markers; the API allows at most 4")


def _markers(prefix: Prefix, where: str) -> list[tuple[str, str]]:
    """(location, ttl) of every cache_control marker the prefix sends, tools first."""
    found = [
        (f"{where}.tools_file: tool {t.get('name')!r}", t["cache_control"].get("ttl", "5m"))
        for t in prefix.tools or ()
        if "cache_control" in t
    ]
    found += [
        (f"{where}.system[{k}].cache_control", b["cache_control"].get("ttl", "5m"))
        for k, b in enumerate(prefix.system)
        if "cache_control" in b
    ]
    return found


def effective_ttl(prefix: Prefix, asked: str | None, asked_at: str, where: str, problems: list[str]) -> str:
    """The pair's TTL: the shortest one its markers send, since that breakpoint lapses first.

    A `ttl` set in the config must agree with the markers actually sent: a 1h expert whose
    block carries a 5m marker would ping at 55 m and rewrite every time; the reverse would
    bill 1h writes at the 5m rate. Such a contradiction is a config error at the marker.
    """
    markers = _markers(prefix, where)
    if not markers:
        return asked or "5m"
    sent = min((ttl for _, ttl in markers), key=TTL_SECONDS.__getitem__)
    if asked is not None and asked != sent:
        loc = next((w for w, ttl in markers if TTL_SECONDS[ttl] < TTL_SECONDS[asked]), None)
        if loc is not None:
            problems.append(
                f"{loc}: ttl {sent} contradicts the expert's ttl {asked} ({asked_at}): that breakpoint"
                f" would expire between pings; give the marker ttl {asked} or set the expert's ttl to {sent}"
            )
        else:
            problems.append(
                f"{asked_at}: ttl {asked} contradicts the expert's cache_control markers, which all say"
                f" ttl {sent}: set ttl {sent} or change the markers"
            )
    return sent


def auto_concurrency(pairs: Iterable[Pair], latency: float = 1.0, headroom: float = 1.5) -> int:
    """Workers enough for every pair's pings at `latency` seconds each, with headroom (at least 8).

    N pairs at interval I start N / I pings a second; each holds a worker for its latency.
    """
    rate = sum(1.0 / p.interval for p in pairs if p.interval > 0)
    return min(max(8, math.ceil(rate * latency * headroom)), 1024)


@dataclass
class _Load:
    """What one load collects while it resolves: problems, warnings, files read, broken keys."""

    base: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seen: dict[Path, str] = field(default_factory=dict)
    # Keys whose value was rejected by the shape check: checks that would read them are
    # skipped, so one typo is reported once, not again as every consequence it has.
    broken: frozenset[str] = frozenset()

    def is_broken(self, loc: str) -> bool:
        """True when the value at `loc` (`defaults.ttl`), or its whole section, was rejected."""
        return loc in self.broken or loc.split(".", 1)[0] in self.broken


@dataclass(frozen=True)
class _Timing:
    ttl: str | None  # as configured; None when neither the expert nor defaults set it
    ttl_at: str
    interval: float | None
    jitter: float
    max_tokens: int
    message: str
    models: list[str]
    policy: str = "fixed"
    active_hours: ActiveHours | None = None


def _expert_timing(expert: ExpertSection, d: DefaultsSection, where: str, load: _Load) -> _Timing:
    """The expert's settings with defaults applied, checked one by one."""

    def pick(key: str) -> Any:
        own = getattr(expert, key)
        return own if own is not None else getattr(d, key)

    def at(key: str) -> str:
        """Where a setting came from, so an error points at the line to fix."""
        return f"{where}.{key}" if getattr(expert, key) is not None else f"defaults.{key}"

    jitter = pick("jitter")
    max_tokens = pick("max_tokens")
    message = pick("ping_message")
    timing = _Timing(
        ttl=pick("ttl"),
        ttl_at=at("ttl"),
        interval=pick("interval"),
        jitter=10.0 if jitter is None else jitter,
        max_tokens=1 if max_tokens is None else max_tokens,
        message="ping" if message is None else message,
        models=pick("models") or [],
        policy=pick("policy") or "fixed",
        active_hours=_active_hours(pick("active_hours"), at("active_hours"), load),
    )
    if not timing.models and not load.is_broken(at("models")):
        load.problems.append(f"{where}.models: no models: set them here or in defaults.models")
    for j, model in enumerate(timing.models):
        if timing.models.index(model) != j:
            load.problems.append(f"{where}.models[{j}]: duplicate model {model!r}")
    if timing.interval is not None and timing.interval <= 0:
        load.problems.append(f"{at('interval')}: must be above 0, got {format_duration(timing.interval)}")
    if timing.jitter < 0:
        load.problems.append(f"{at('jitter')}: must be 0 or more")
    if not timing.message.strip():
        load.problems.append(f"{at('ping_message')}: must contain non-whitespace text")
    return timing


def _active_hours(text: str | list[str] | None, where: str, load: _Load) -> ActiveHours | None:
    """The parsed `active_hours`, or None (always active, or a problem recorded at `where`)."""
    if text is None or load.is_broken(where):
        return None
    try:
        return parse_active_hours(text)
    except ValueError as exc:
        load.problems.append(f"{where}: {exc}")
        return None


def _check_interval(ttl: str, interval: float, jitter: float, at: dict[str, str], load: _Load) -> None:
    """interval < ttl, and interval + jitter < ttl: else pings find the cache expired."""
    if any(load.is_broken(loc) for loc in at.values()):
        return  # a rejected ttl, interval or jitter: comparing against its default would mislead
    ttl_s = TTL_SECONDS[ttl]
    if interval >= ttl_s:
        load.problems.append(
            f"{at['interval']}: {format_duration(interval)} must be below the ttl ({ttl}),"
            " or every ping finds the cache already expired"
        )
    elif interval + jitter >= ttl_s:
        load.problems.append(
            f"{at['jitter']}: interval + jitter ({format_duration(interval + jitter)}) must stay below the ttl ({ttl})"
        )


def _system_blocks(expert: ExpertSection, where: str, load: _Load) -> list[str | dict[str, Any]]:
    """The expert's system blocks, files read, each with the marker it was given (if any)."""
    blocks: list[str | dict[str, Any]] = []
    for k, block in enumerate(expert.system):
        bwhere = f"{where}.system[{k}]"
        if (block.file is None) == (block.text is None):
            load.problems.append(f"{bwhere}: give exactly one of `file` or `text`")
            continue
        if block.text is not None:
            text: str | None = block.text
            if not block.text.strip():
                load.problems.append(f"{bwhere}.text: is empty")
            elif "\x00" in block.text:
                load.problems.append(f"{bwhere}.text: contains NUL bytes")
        else:
            text = _read_text(load.base, block.file or "", f"{bwhere}.file", load.problems, load.seen)
        if text is None:
            continue
        item: dict[str, Any] = {"type": "text", "text": text}
        if block.cache_control is not None:
            item["cache_control"] = block.cache_control.model_dump(exclude_none=True)
        blocks.append(item)
    return blocks


def _accounts(raw: FileSection, sections: list[AccountSection | None], load: _Load) -> list[Account]:
    """The configured accounts, each checked against what its provider takes and needs.

    Without `accounts:`, one Anthropic account named `default` from `api:`, as before accounts
    existed, so every older config means what it meant.
    """
    if raw.accounts is None and load.is_broken("accounts"):
        return []  # reported already; a stand-in account would only add "no account named" noise
    if raw.accounts is None:
        api_key_file = load.base / raw.api.api_key_file if raw.api.api_key_file else None
        return [Account("default", "anthropic", raw.api.base_url, api_key_file, from_api=True)]
    accounts: list[Account] = []
    names: set[str] = set()
    for i, section in enumerate(sections):
        if section is None:
            continue  # its shape problems are already reported
        where = f"accounts[{i}]"
        if section.name in names:
            load.problems.append(f"{where}.name: duplicate account name {section.name!r}")
        names.add(section.name)
        provider = section.provider
        allowed = ACCOUNT_KEYS[provider]
        for key in ("api_key_file", "region", "aws_profile", "bedrock_api", "project_id", "access_token_file", "resource"):
            if getattr(section, key) is not None and key not in allowed:
                takes = ", ".join(("base_url", *allowed))
                load.problems.append(f"{where}.{key}: a {provider} account does not take {key} (it takes {takes})")
        for key in ACCOUNT_REQUIRED[provider]:
            if getattr(section, key) is None:
                load.problems.append(f"{where}.{key}: a {provider} account needs {key}")
        if provider == "foundry" and section.resource is None and section.base_url is None:
            load.problems.append(f"{where}: a foundry account needs resource (or base_url)")
        if provider == "bedrock" and section.aws_profile is not None and section.api_key_file is not None:
            load.problems.append(f"{where}: give aws_profile or api_key_file, not both")
        command = missing_extra(provider)
        if command is not None:
            load.problems.append(f"{where}.provider: {provider} needs an optional extra that is not installed: {command}")
        # `api:` stays the Claude API's defaults: an Anthropic account without a base_url of its own
        # uses api.base_url (and, without a key file, the api key chain).
        base_url = section.base_url or (raw.api.base_url if provider == "anthropic" else None)
        accounts.append(
            Account(
                name=section.name,
                provider=provider,
                base_url=base_url,
                api_key_file=load.base / section.api_key_file if section.api_key_file else None,
                region=section.region,
                aws_profile=section.aws_profile,
                project_id=section.project_id,
                resource=section.resource,
                access_token_file=load.base / section.access_token_file if section.access_token_file else None,
                bedrock_api=section.bedrock_api or "invoke",
            )
        )
    return accounts


def _expert_account(expert: ExpertSection, d: DefaultsSection, where: str, accounts: list[Account], load: _Load) -> Account | None:
    """The expert's account: its own `account`, else defaults.account, else the first."""
    name = expert.account if expert.account is not None else d.account
    if name is None:
        return accounts[0] if accounts else None
    found = next((a for a in accounts if a.name == name), None)
    if found is None and accounts:
        at = f"{where}.account" if expert.account is not None else "defaults.account"
        close = difflib.get_close_matches(name, [a.name for a in accounts], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; accounts: {', '.join(a.name for a in accounts)}"
        load.problems.append(f"{at}: no account named {name!r}{hint}")
    return found


def _provider_checks(account: Account, model: str, ttl: str, where: str, load: _Load) -> None:
    """What the pair's provider does not offer: a 1h TTL for this model, InvokeModel for a new model."""
    facts = provider_facts()[account.provider]
    canonical = canonical_model(account.provider, model)
    if account.provider == "bedrock" and account.bedrock_api == "invoke" and canonical in facts.mantle_only:
        load.problems.append(
            f"{where}: bedrock serves {canonical} only through its Messages API endpoint, not InvokeModel:"
            f" set bedrock_api: mantle on account {account.name!r} (or give that model an account of its own)"
        )
    if ttl == "1h" and not facts.offers_1h(canonical):
        offered = ", ".join(sorted(facts.ttl_1h or ()))
        load.problems.append(
            f"{where}: {account.provider} (account {account.name!r}) offers the 1h TTL only for {offered};"
            f" not for {model!r}: use ttl 5m"
        )


def _expert_pairs(
    expert: ExpertSection,
    i: int,
    d: DefaultsSection,
    load: _Load,
    accounts: list[Account] | None = None,
    prices: PriceTable | None = None,
) -> list[Pair]:
    """The pairs of one expert (one per model), every per-expert rule checked."""
    where = f"experts[{i}]"
    timing = _expert_timing(expert, d, where, load)
    account = _expert_account(expert, d, where, accounts or [], load)
    facts = provider_facts()[account.provider] if account is not None else None
    max_tokens = timing.max_tokens
    if facts is not None and account is not None and max_tokens == 0 and not facts.max_tokens_zero:
        # Pre-warming with 0 is documented on the Claude API only: 1 works everywhere.
        load.warnings.append(
            f"{where}: max_tokens 0 is not documented on {account.provider}; account {account.name!r} pings with 1"
        )
        max_tokens = 1
    blocks = _system_blocks(expert, where, load)
    tools = (
        _read_tools(load.base, expert.tools_file, f"{where}.tools_file", load.problems, load.seen)
        if expert.tools_file
        else None
    )
    prefix = build_prefix(blocks, tools, timing.ttl or "5m")
    _check_marker_order(prefix, where, load.problems)
    ttl = effective_ttl(prefix, timing.ttl, timing.ttl_at, where, load.problems)
    interval = DEFAULT_INTERVAL[ttl] if timing.interval is None else timing.interval
    own = {"ttl": expert.ttl, "interval": expert.interval, "jitter": expert.jitter}
    at = {k: f"{where}.{k}" if v is not None else f"defaults.{k}" for k, v in own.items()}
    if interval > 0:
        _check_interval(ttl, interval, timing.jitter, at, load)
    models = list(dict.fromkeys(timing.models))
    price_keys = {m: m for m in models}
    if account is not None and facts is not None:
        for j, model in enumerate(models):
            _provider_checks(account, model, ttl, f"{where}.models[{j}]", load)
            if prices is not None:
                price_keys[model] = provider_price(facts, model, account.region, prices)[0]
    return [
        Pair(
            expert=expert.name,
            model=model,
            ttl=ttl,
            ttl_seconds=TTL_SECONDS[ttl],
            interval=interval,
            jitter=timing.jitter,
            max_tokens=max_tokens,
            ping_message=timing.message,
            prefix=prefix,
            fingerprint=prefix.fingerprint(model),
            policy=timing.policy,
            active_hours=timing.active_hours,
            account=account.name if account is not None else "default",
            provider=account.provider if account is not None else "anthropic",
            price_row="" if price_keys[model] == model else price_keys[model],
        )
        for model in models
    ]


def _unknown_model_warnings(
    experts: list[ExpertSection | None], d: DefaultsSection, prices: PriceTable, providers: Mapping[str, str] | None = None
) -> list[str]:
    """A model in neither the price table nor the minimum table is likely a typo: say so at load.

    `providers` maps an expert name to its account's provider: a Bedrock or Vertex id is known
    when the Claude API model it serves is.
    """
    known = sorted(prices.models)
    warnings = []
    for i, expert in enumerate(experts):
        if expert is None:
            continue
        own = expert.models is not None
        provider = (providers or {}).get(expert.name, "anthropic")
        for j, model in enumerate((expert.models if expert.models is not None else d.models) or []):
            if model in prices.models or canonical_model(provider, model) in prices.models:
                continue
            where = f"experts[{i}].models[{j}]" if own else f"defaults.models[{j}]"
            close = difflib.get_close_matches(model, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            warnings.append(
                f"{where}: model {model!r} has no price and no minimum cacheable length in the tables:"
                f" it is pinged, its cost is unknown{hint}"
            )
    return list(dict.fromkeys(warnings))  # models from defaults would repeat per expert


def _shard(raw: FileSection, shard: tuple[int, int] | None, problems: list[str]) -> tuple[int, int] | None:
    """The shard to warm: `--shard` over the file's `shard:` key; None for all pairs."""
    if shard is None and raw.shard is not None:
        try:
            return parse_shard(raw.shard)
        except ValueError as exc:
            problems.append(f"shard: {exc}")
    return shard


def _resolve(
    raw: FileSection,
    experts: list[ExpertSection | None],
    load: _Load,
    path: Path | None,
    shard: tuple[int, int] | None = None,
    all_shards: bool = False,
    account_sections: list[AccountSection | None] | None = None,
) -> Config:
    """Apply defaults, read files, check the rules that span keys, and build the frozen Config."""
    prices, price_problems = load_price_table(load.base / raw.pricing_file if raw.pricing_file else None)
    accounts = _accounts(raw, account_sections or [], load)
    names: set[str] = set()
    pairs: list[Pair] = []
    for i, expert in enumerate(experts):
        if expert is None:
            continue  # its shape problems are already reported
        if expert.name in names:
            load.problems.append(f"experts[{i}].name: duplicate expert name {expert.name!r}")
        names.add(expert.name)
        pairs += _expert_pairs(expert, i, raw.defaults, load, accounts, prices)

    load.problems += price_problems
    prices = _with_provider_prices(prices, pairs, accounts)
    providers = {p.expert: p.provider for p in pairs}
    load.warnings += _unknown_model_warnings(experts, raw.defaults, prices, providers)
    try:
        host, port = parse_listen(raw.metrics.listen)
    except ValueError as exc:
        load.problems.append(f"metrics.listen: {exc}")
        host, port = "127.0.0.1", 9464
    shard = _shard(raw, shard, load.problems)
    # Configured pairs that another shard keeps warm: observations for them answer 421.
    other_shard_pairs: frozenset[str] = frozenset()
    if shard is not None and not all_shards:
        other_shard_pairs = frozenset(p.key for p in pairs if not in_shard(p.key, *shard))
        pairs = [p for p in pairs if in_shard(p.key, *shard)]
    if raw.api.timeout <= 0:
        load.problems.append("api.timeout: must be above 0")
    if raw.shutdown_timeout < 0:
        load.problems.append("shutdown_timeout: must be 0 or more")
    fleet = _fleet(raw, load.problems)
    if load.problems:
        # Settings inherited from `defaults` would repeat one problem per expert.
        raise ConfigError(list(dict.fromkeys(load.problems)), str(path) if path else "")
    return Config(
        path=path,
        api=ApiSettings(
            base_url=raw.api.base_url,
            api_key_file=load.base / raw.api.api_key_file if raw.api.api_key_file else None,
            timeout=raw.api.timeout,
            max_concurrency=raw.api.max_concurrency or auto_concurrency(pairs),
            cache_diagnostics=raw.api.cache_diagnostics,
            requests_per_minute=raw.api.requests_per_minute,
        ),
        pairs=tuple(pairs),
        prices=prices,
        metrics_host=host,
        metrics_port=port,
        metrics_per_pair=raw.metrics.per_pair,
        ledger_path=_ledger_path(raw.ledger, load.base),
        ledger_retention_days=raw.ledger.retention_days if raw.ledger is not False else None,
        ledger_default=raw.ledger is not False and raw.ledger.path is None and raw.ledger.url is None,
        ledger_url=raw.ledger.url if raw.ledger is not False else None,
        ledger_password_file=(
            load.base / raw.ledger.password_file if raw.ledger is not False and raw.ledger.password_file else None
        ),
        fleet=fleet,
        shard=shard,
        shutdown_timeout=raw.shutdown_timeout,
        warnings=tuple(load.warnings),
        observe_token_file=load.base / raw.observe.token_file if raw.observe.token_file else None,
        observe_allow_unauthenticated=raw.observe.allow_unauthenticated,
        web_config_file=load.base / raw.web.config_file if raw.web.config_file else None,
        other_shard_pairs=other_shard_pairs,
        budget_usd_per_day=raw.budget.usd_per_day,
        accounts=tuple(accounts),
    )


def _fleet(raw: FileSection, problems: list[str]) -> FleetSettings | None:
    """The fleet settings, which exist only with `ledger.url`; check the keys that go with it."""
    url = raw.ledger.url if raw.ledger is not False else None
    if raw.ledger is not False:
        if url is not None and raw.ledger.path is not None:
            problems.append("ledger: set either path (a SQLite file) or url (a PostgreSQL database), not both")
        if raw.ledger.password_file is not None and url is None:
            problems.append("ledger.password_file: only with ledger.url (a SQLite file has no password)")
        if url is not None:
            from keepwarm.store.postgres import url_problem  # psycopg loads only for a database

            problem = url_problem(url)
            if problem:
                problems.append(f"ledger.url: {problem}")
    if url is None:
        if raw.fleet is not None:
            problems.append("fleet: only with ledger.url: the members of a fleet share a PostgreSQL database")
        return None
    section = raw.fleet or FleetSection()
    if section.lease <= 0:
        problems.append("fleet.lease: must be above 0")
    return FleetSettings(section.name, section.lease, section.min_members)


def _ledger_path(section: LedgerSection | Literal[False], base: Path) -> Path | None:
    """The ledger file: the configured one, the default state path, or None (`ledger: off` or a database)."""
    if section is False or section.url is not None:
        return None
    if section.path is None:
        return default_ledger_path()
    return base / section.path


def _with_provider_prices(prices: PriceTable, pairs: list[Pair], accounts: list[Account]) -> PriceTable:
    """The table plus one row per provider price a pair is billed by (`Pair.price_key`).

    A provider model id that names its endpoint by itself (every Bedrock id, a dated Vertex id)
    is also added under the bare id, so what knows only a ledger row's model prices it right.
    """
    by_name = {a.name: a for a in accounts}
    extra: dict[str, Any] = {}
    bare: dict[str, Any] = {}
    for pair in pairs:
        account = by_name.get(pair.account)
        if account is None or pair.price_key == pair.model:
            continue
        key, price = provider_price(provider_facts()[account.provider], pair.model, account.region, prices)
        extra[key] = price
        if account.provider == "bedrock" or canonical_model(account.provider, pair.model) != pair.model:
            bare.setdefault(pair.model, price)
    if not extra:
        return prices
    return replace(prices, models={**prices.models, **{k: v for k, v in bare.items() if k not in prices.models}, **extra})


def _drop(doc: dict[str, Any], loc: tuple[Any, ...], broken: set[str]) -> None:
    """Remove the rejected value at `loc` (to its section's key) so its default stands in."""
    head = loc[0]
    section = doc.get(head)
    if len(loc) >= 2 and isinstance(section, dict) and isinstance(loc[1], str):
        doc[head] = {k: v for k, v in section.items() if k != loc[1]}
        broken.add(f"{head}.{loc[1]}")
    elif head == "experts":
        doc[head] = [None]  # reported as it is; the experts are validated one by one
        broken.add(head)
    else:
        doc.pop(head, None)
        broken.add(str(head))


def _file_section(data: dict[str, Any], problems: list[str]) -> tuple[FileSection, frozenset[str]]:
    """Validate the top level, reporting every bad key and going on with the good ones.

    A rejected value is dropped and validation runs again, so an unknown key in one section
    does not hide the cross-key checks (interval vs ttl, listen address, shard) of the rest.
    """
    doc = dict(data)
    broken: set[str] = set()
    for _ in range(8):  # each round drops what the last one rejected; a few rounds always do
        try:
            return FileSection.model_validate(doc), frozenset(broken)
        except ValidationError as exc:
            problems += _pydantic_problems(exc, model=FileSection)
            for err in exc.errors():
                _drop(doc, tuple(err["loc"]), broken)
    raise ConfigError(list(dict.fromkeys(problems)))


def parse_config(
    data: Any,
    base: Path,
    path: Path | None = None,
    shard: tuple[int, int] | None = None,
    *,
    all_shards: bool = False,
    problems: Sequence[str] = (),
) -> Config:
    """Validate already-parsed YAML; file paths inside resolve against `base`.

    `all_shards` keeps every pair whatever the shard (for `load_prefix`); `problems` are
    ones already found (duplicate keys), reported together with the rest.
    """
    if not isinstance(data, dict):
        kind = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError([*problems, f"(top level): expected a mapping of settings, got {kind}"], str(path or ""))
    per_expert: list[str] = []
    experts: list[ExpertSection | None] = []
    for i, item in enumerate(data.get("experts") or [] if isinstance(data.get("experts"), list) else []):
        try:
            experts.append(ExpertSection.model_validate(item))
        except ValidationError as exc:
            per_expert += _pydantic_problems(exc, ("experts", i), ExpertSection)
            experts.append(None)
    account_sections: list[AccountSection | None] = []
    raw_accounts = data.get("accounts")
    for i, item in enumerate(raw_accounts if isinstance(raw_accounts, list) else []):
        try:
            account_sections.append(AccountSection.model_validate(item))
        except ValidationError as exc:
            per_expert += _pydantic_problems(exc, ("accounts", i))
            account_sections.append(None)
    top: list[str] = []
    try:
        raw, broken = _file_section(data, top)
    except ConfigError as exc:
        raise ConfigError([*problems, *exc.problems, *per_expert], str(path or "")) from None
    load = _Load(base=base, broken=broken, problems=[*problems, *top, *per_expert])
    return _resolve(raw, experts, load, path, shard, all_shards, account_sections)


class _UniqueKeyLoader(_BaseLoader):
    """A safe YAML loader that notes duplicate keys (PyYAML silently keeps the last one)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[str, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            line = key_node.start_mark.line + 1
            if key_node.value in first:
                # Located as YAML syntax errors are: the key has no settled path while the document
                # is still being read.
                self.duplicates.append(
                    f"line {line}, column {key_node.start_mark.column + 1}: duplicate key {key_node.value!r}"
                    f" (first at line {first[key_node.value]}); only one may be given"
                )
            else:
                first[key_node.value] = line
        return super().construct_mapping(node, deep)


def _load_yaml(text: str) -> tuple[Any, list[str]]:
    """Parse YAML, returning the data and one problem per duplicate key."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data(), loader.duplicates
    finally:
        loader.dispose()


def _yaml_problem(text: str, exc: yaml.YAMLError) -> str:
    """`line L, column C: not valid YAML: ...`, from the pure-Python parser, whose marks are exact."""
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as exact:
        exc = exact
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(YAML)"
    return f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}"


def load_config(path: Path, shard: tuple[int, int] | None = None, *, all_shards: bool = False) -> Config:
    """Read and validate a config file; raise ConfigError naming every problem.

    `shard` (from `--shard K/N`) overrides the file's own `shard:` key; `all_shards` keeps
    every pair whatever the shard.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read the config file: {exc}"], str(path)) from None
    try:
        data, duplicates = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(text, exc)], str(path)) from None
    return parse_config(data, path.parent, path, shard, all_shards=all_shards, problems=duplicates)


# --- the API key ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiKey:
    """The key and a description of where it came from; `repr` and `str` hide the key."""

    value: str = field(repr=False)
    source: str

    def __str__(self) -> str:
        return f"<api key ending {self.value[-4:]!r} from {self.source}>"

    @property
    def hint(self) -> str:
        """The last four characters: enough to tell keys apart, never the key."""
        return "…" + self.value[-4:]


def _key_from_file(path: Path) -> tuple[ApiKey, list[str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError([f"api key file {path}: cannot read it: {reason}"]) from None
    key = text.strip()
    if not key or any(c.isspace() for c in key):
        raise ConfigError([f"api key file {path}: expected one key on one line, found {'nothing' if not key else 'whitespace inside'}"])
    warnings = []
    try:
        if path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
            warnings.append(f"api key file {path} is readable by other users; chmod 600 it")
    except OSError:
        pass
    return ApiKey(key, f"file {path}"), warnings


def resolve_api_key(config: Config, environ: dict[str, str] | None = None) -> tuple[ApiKey, list[str]]:
    """Find the key: api.api_key_file, then $CREDENTIALS_DIRECTORY, then ANTHROPIC_API_KEY.

    Returns the key and warnings to log. Raises ConfigError (exit 78) when there is none or
    a named file cannot be read; the message names the place, never the content.
    """
    env = os.environ if environ is None else environ
    if config.accounts and not any(a.provider == "anthropic" and (a.from_api or a.api_key_file is None) for a in config.accounts):
        # Every account names its own credentials (keepwarm.providers reads them): none is needed here.
        return ApiKey("", "the accounts' own credentials"), []
    if config.api.api_key_file is not None:
        return _key_from_file(config.api.api_key_file)
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).exists():
        return _key_from_file(Path(creds) / CREDENTIAL_NAME)
    value = env.get("ANTHROPIC_API_KEY", "").strip()
    if value:
        return ApiKey(value, "environment variable ANTHROPIC_API_KEY"), []
    raise ConfigError(
        [
            "no API key: set api.api_key_file, or provide the credential "
            f"{CREDENTIAL_NAME!r} in $CREDENTIALS_DIRECTORY (systemd LoadCredential=), "
            "or set ANTHROPIC_API_KEY"
        ]
    )
