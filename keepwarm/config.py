"""The YAML config: strict, typed, every problem reported at once with its location.

Loading happens in two passes. Pydantic checks the shape (unknown keys, types, allowed
values); then `_resolve` applies defaults, reads prompt and tool files relative to the
config file, and checks the rules that span keys (`interval < ttl`, unique names). Both
passes collect errors rather than stop at the first, so a user fixes everything in one go.
The result is a frozen `Config` whose `pairs` are what the daemon warms.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from keepwarm.durations import format_duration, parse_duration
from keepwarm.prefix import Prefix, build_prefix
from keepwarm.pricing import PriceTable, load_price_table
from keepwarm.shard import in_shard, parse_shard

TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
DEFAULT_INTERVAL = {"5m": 240.0, "1h": 3300.0}
CREDENTIAL_NAME = "anthropic_api_key"


class ConfigError(Exception):
    """A config that cannot be used; `problems` lists every issue with its location."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        head = f"invalid config {source}" if source else "invalid config"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in problems))


def _duration(value: Any) -> float:
    return parse_duration(value)


Duration = Annotated[float, BeforeValidator(_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ApiSection(_Strict):
    base_url: str | None = None
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


class DefaultsSection(_Overridable):
    pass


class ExpertSection(_Overridable):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")]
    system: Annotated[list[SystemBlock], Field(min_length=1)]
    tools_file: str | None = None


class MetricsSection(_Strict):
    listen: str = "127.0.0.1:9464"
    # standard: the series budget (about 20 a pair); full: every per-pair series and histogram.
    per_pair: Literal["standard", "full"] = "standard"


class LedgerSection(_Strict):
    path: str | None = None
    retention_days: float | None = Field(default=None, gt=0)


class FileSection(_Strict):
    api: ApiSection = ApiSection()
    defaults: DefaultsSection = DefaultsSection()
    # Each expert is validated on its own (see parse_config), so one bad expert does not
    # hide the cross-key problems of the others.
    experts: Annotated[list[Any], Field(min_length=1)]
    pricing_file: str | None = None
    metrics: MetricsSection = MetricsSection()
    ledger: LedgerSection = LedgerSection()
    shard: str | None = None  # "K/N": warm only this shard's pairs (see keepwarm.shard)
    shutdown_timeout: Duration = 10.0


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

    @property
    def key(self) -> str:
        """A stable identifier: `expert/model`."""
        return f"{self.expert}/{self.model}"


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
    shard: tuple[int, int] | None = None
    time_scale: float = 1.0
    metrics_per_pair: Literal["standard", "full"] = "standard"

    def scaled(self, factor: float) -> Config:
        """The same config with every TTL, interval and jitter multiplied by `factor`.

        Used with the emulator, whose TTLs shrink by the same factor, so minutes of cache
        life pass in seconds.
        """
        pairs = tuple(
            replace(p, ttl_seconds=p.ttl_seconds * factor, interval=p.interval * factor, jitter=p.jitter * factor)
            for p in self.pairs
        )
        return replace(self, pairs=pairs, time_scale=self.time_scale * factor)


# --- loading -------------------------------------------------------------------------------


def _loc(parts: tuple[Any, ...]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _pydantic_problems(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> list[str]:
    problems = []
    for err in exc.errors():
        # Pydantic reports the input's problem at a path; our own validators raise
        # ValueError whose text is already user-facing (drop pydantic's "Value error, ").
        loc = prefix + tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] in ("literal_error", "string_pattern_mismatch"):
            msg = f"{msg}, got {err.get('input')!r}"
        elif err["type"].endswith("_type"):
            msg = f"{msg}, got {type(err.get('input')).__name__} {err.get('input')!r}"
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


def auto_concurrency(pairs: Iterable[Pair], latency: float = 1.0, headroom: float = 1.5) -> int:
    """Workers enough for every pair's pings at `latency` seconds each, with headroom (at least 8).

    N pairs at interval I start N / I pings a second; each holds a worker for its latency.
    """
    rate = sum(1.0 / p.interval for p in pairs if p.interval > 0)
    return min(max(8, math.ceil(rate * latency * headroom)), 1024)


def _resolve(
    raw: FileSection,
    experts: list[ExpertSection | None],
    shape_problems: list[str],
    base: Path,
    path: Path | None,
    shard: tuple[int, int] | None = None,
) -> Config:
    problems: list[str] = []
    seen: dict[Path, str] = {}
    d = raw.defaults
    names: set[str] = set()
    pairs: list[Pair] = []
    for i, expert in enumerate(experts):
        if expert is None:
            continue  # its shape problems are already reported
        where = f"experts[{i}]"
        if expert.name in names:
            problems.append(f"{where}.name: duplicate expert name {expert.name!r}")
        names.add(expert.name)

        def pick(key: str) -> Any:
            own = getattr(expert, key)  # noqa: B023 - used right away, inside this iteration
            return own if own is not None else getattr(d, key)

        def at(key: str) -> str:
            """Where a setting came from, so an error points at the line to fix."""
            return f"{where}.{key}" if getattr(expert, key) is not None else f"defaults.{key}"  # noqa: B023

        ttl = pick("ttl") or "5m"
        interval = pick("interval")
        interval = DEFAULT_INTERVAL[ttl] if interval is None else interval
        jitter = pick("jitter")
        jitter = 10.0 if jitter is None else jitter
        max_tokens = pick("max_tokens")
        max_tokens = 1 if max_tokens is None else max_tokens
        message = pick("ping_message")
        message = "ping" if message is None else message
        models = pick("models") or []
        ttl_s = TTL_SECONDS[ttl]

        if not models:
            problems.append(f"{where}.models: no models: set them here or in defaults.models")
        for j, model in enumerate(models):
            if models.index(model) != j:
                problems.append(f"{where}.models[{j}]: duplicate model {model!r}")
        if interval <= 0:
            problems.append(f"{at('interval')}: must be above 0, got {format_duration(interval)}")
        if jitter < 0:
            problems.append(f"{at('jitter')}: must be 0 or more")
        if interval >= ttl_s:
            problems.append(
                f"{at('interval')}: {format_duration(interval)} must be below the ttl ({ttl}),"
                " or every ping finds the cache already expired"
            )
        elif interval + jitter >= ttl_s:
            problems.append(
                f"{at('jitter')}: interval + jitter ({format_duration(interval + jitter)}) must stay below the ttl ({ttl})"
            )
        if not message.strip():
            problems.append(f"{at('ping_message')}: must contain non-whitespace text")

        blocks: list[str | dict[str, Any]] = []
        for k, block in enumerate(expert.system):
            bwhere = f"{where}.system[{k}]"
            if (block.file is None) == (block.text is None):
                problems.append(f"{bwhere}: give exactly one of `file` or `text`")
                continue
            text = block.text if block.text is not None else _read_text(base, block.file or "", f"{bwhere}.file", problems, seen)
            if text is None:
                continue
            if block.text is not None and not text.strip():
                problems.append(f"{bwhere}.text: is empty")
            item: dict[str, Any] = {"type": "text", "text": text}
            if block.cache_control is not None:
                item["cache_control"] = block.cache_control.model_dump(exclude_none=True)
            blocks.append(item)
        tools = _read_tools(base, expert.tools_file, f"{where}.tools_file", problems, seen) if expert.tools_file else None
        prefix = build_prefix(blocks, tools, ttl)
        _check_marker_order(prefix, where, problems)
        for model in dict.fromkeys(models):
            pairs.append(
                Pair(
                    expert=expert.name,
                    model=model,
                    ttl=ttl,
                    ttl_seconds=ttl_s,
                    interval=interval,
                    jitter=jitter,
                    max_tokens=max_tokens,
                    ping_message=message,
                    prefix=prefix,
                    fingerprint=prefix.fingerprint(model),
                )
            )

    prices, price_problems = load_price_table(base / raw.pricing_file if raw.pricing_file else None)
    problems += price_problems
    try:
        host, port = parse_listen(raw.metrics.listen)
    except ValueError as exc:
        problems.append(f"metrics.listen: {exc}")
        host, port = "127.0.0.1", 9464
    if shard is None and raw.shard is not None:
        try:
            shard = parse_shard(raw.shard)
        except ValueError as exc:
            problems.append(f"shard: {exc}")
    if shard is not None:
        pairs = [p for p in pairs if in_shard(p.key, *shard)]
    if raw.api.timeout <= 0:
        problems.append("api.timeout: must be above 0")
    if raw.shutdown_timeout < 0:
        problems.append("shutdown_timeout: must be 0 or more")
    problems = shape_problems + problems
    if problems:
        # Settings inherited from `defaults` would repeat one problem per expert.
        raise ConfigError(list(dict.fromkeys(problems)), str(path) if path else "")
    return Config(
        path=path,
        api=ApiSettings(
            base_url=raw.api.base_url,
            api_key_file=base / raw.api.api_key_file if raw.api.api_key_file else None,
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
        ledger_path=base / raw.ledger.path if raw.ledger.path else None,
        ledger_retention_days=raw.ledger.retention_days,
        shard=shard,
        shutdown_timeout=raw.shutdown_timeout,
    )


def parse_config(data: Any, base: Path, path: Path | None = None, shard: tuple[int, int] | None = None) -> Config:
    """Validate already-parsed YAML; file paths inside resolve against `base`."""
    if not isinstance(data, dict):
        kind = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError([f"(top level): expected a mapping of settings, got {kind}"], str(path or ""))
    problems: list[str] = []
    experts: list[ExpertSection | None] = []
    for i, item in enumerate(data.get("experts") or [] if isinstance(data.get("experts"), list) else []):
        try:
            experts.append(ExpertSection.model_validate(item))
        except ValidationError as exc:
            problems += _pydantic_problems(exc, ("experts", i))
            experts.append(None)
    try:
        raw = FileSection.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_pydantic_problems(exc) + problems, str(path or "")) from None
    return _resolve(raw, experts, problems, base, path, shard)


def _yaml_problem(text: str, exc: yaml.YAMLError) -> str:
    """`line L, column C: not valid YAML: ...`, from the pure-Python parser, whose marks are exact."""
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as exact:
        exc = exact
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(YAML)"
    return f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}"


def load_config(path: Path, shard: tuple[int, int] | None = None) -> Config:
    """Read and validate a config file; raise ConfigError naming every problem.

    `shard` (from `--shard K/N`) overrides the file's own `shard:` key.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read the config file: {exc}"], str(path)) from None
    try:
        # libyaml's loader when present: a 10,000-pair config loads in half the time.
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(text, exc)], str(path)) from None
    return parse_config(data, path.parent, path, shard)


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
