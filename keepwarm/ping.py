"""One ping: a single Messages API call through the official SDK. I/O only.

Retries, timing, metrics and logging belong to the runner; this module sends exactly
one request and turns whatever comes back into a `PingAttempt`.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import anthropic

from keepwarm.classify import Usage, usage_from_api
from keepwarm.config import Pair
from keepwarm.providers.base import provider_facts
from keepwarm.providers.clients import sdk_for

# The error_type label values of keepwarm_ping_errors_total (README: Metrics).
ERROR_TYPES = (
    "rate_limit",
    "overloaded",
    "server",
    "timeout",
    "connection",
    "authentication",
    "permission",
    "invalid_request",
    "other",
)
# Kinds worth retrying within the same ping: the API may answer differently in a moment.
TRANSIENT = frozenset({"rate_limit", "overloaded", "server", "timeout", "connection"})


@dataclass(frozen=True)
class PingError:
    """Why an attempt failed, in the terms the runner acts on."""

    error_type: str
    message: str
    status: int | None = None
    retry_after: float | None = None
    spend_cap: bool = False


@dataclass(frozen=True)
class PingAttempt:
    """The outcome of one request: a usage on success, an error otherwise."""

    started_wall: float
    latency: float
    usage: Usage | None
    request_id: str | None
    error: PingError | None = None
    max_tokens: int = 1
    message_id: str | None = None
    miss_reason: str | None = None  # the API's cache diagnosis, when asked for and given


def make_client(base_url: str | None, api_key: str, timeout: float) -> anthropic.Anthropic:
    """An SDK client with keepwarm's own timeout and no SDK retries.

    The SDK's retries sleep in a blocking call and obey any `retry-after` uncapped, which
    would let one 429 stall a worker past the cache's expiry and block shutdown; keepwarm
    retries itself, bounded by the expiry.
    """
    return anthropic.Anthropic(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)


def request_params(pair: Pair, max_tokens: int) -> dict[str, Any]:
    """The body of a ping: the production prefix, then one short user message."""
    return {
        "model": pair.model,
        "max_tokens": max_tokens,
        **pair.prefix.params(),
        "messages": [{"role": "user", "content": pair.ping_message}],
    }


# How the API says "monthly spend limit reached": an error code the SDK reads, and the wording.
SPEND_CAP_ERROR_CODE = "enforced_spend_limit_reached"
_SPEND_CAP_WORDS = ("spend limit", "spending limit")


def _has_retry_after(headers: Any) -> bool:
    return headers is not None and any(headers.get(name) is not None for name in ("retry-after-ms", "retry-after"))


def _retry_after(headers: Any, now: float) -> float | None:
    """Seconds the server asks to wait: `retry-after-ms`, or `retry-after` in seconds or as an HTTP date."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(float(value) * scale, 0.0)
        except ValueError:
            pass
        if name == "retry-after":
            # RFC 9110 allows an HTTP date (IMF-fixdate) as well as delay-seconds.
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                continue  # neither form: fall back to backoff
            if when.tzinfo is None:  # a date without zone ("-0000") is UTC by RFC 5322
                when = when.replace(tzinfo=UTC)
            return max(when.timestamp() - now, 0.0)
    return None


def is_spend_cap(status: int, detail: dict[str, Any], message: str, headers: Any) -> bool:
    """The monthly spend-limit 429, recognised from the error itself.

    The API marks it with an error code and says so in its message; failing both, a 429 that
    carries no `retry-after` at all is taken for it (the real one has none). A 429 with any
    `retry-after` (seconds or an HTTP date) is an ordinary rate limit that clears.
    """
    if status != 429:
        return False
    details = detail.get("details")
    code = details.get("error_code") if isinstance(details, dict) else None
    if code == SPEND_CAP_ERROR_CODE or any(word in message.lower() for word in _SPEND_CAP_WORDS):
        return True
    return not _has_retry_after(headers)


def _status_error_type(status: int) -> str:
    if status == 429:
        return "rate_limit"
    if status == 529:
        return "overloaded"
    if status >= 500:
        return "server"
    if status == 401:
        return "authentication"
    if status == 403:
        return "permission"
    if status in (400, 404, 413, 422):
        return "invalid_request"
    if status == 408:
        return "timeout"
    return "other"


def _provider_error(exc: Exception, provider: str) -> PingError | None:
    """What Bedrock and Vertex say in their own terms: AWS error names, Google statuses, missing
    credentials. Their 429s are throttling or quota, never the Claude Console's monthly spend cap."""
    if provider == "bedrock":
        from keepwarm.providers import bedrock as module
    elif provider == "vertex":
        from keepwarm.providers import vertex as module  # type: ignore[no-redef]
    else:
        return None
    problem = module.credentials_problem(exc)
    if problem is not None:
        return PingError("authentication", problem)
    if not isinstance(exc, anthropic.APIStatusError):
        return None
    kind = bedrock_kind = None
    if provider == "bedrock":
        kind = bedrock_kind = module.error_type(exc.response.headers)
    else:
        kind = module.error_type(exc.body)
    body = exc.body if isinstance(exc.body, dict) else {}
    detail = body.get("error") if isinstance(body.get("error"), dict) else body
    message = str(detail.get("message") or exc.message) if isinstance(detail, dict) else exc.message
    name = (exc.response.headers.get("x-amzn-errortype") or "").partition(":")[0] if bedrock_kind else ""
    return PingError(
        kind or _status_error_type(exc.status_code),
        f"{name}: {message}" if name else message,
        exc.status_code,
        _retry_after(exc.response.headers, time.time()),
    )


def describe_error(exc: Exception, now: float | None = None, provider: str = "anthropic") -> PingError:
    """Map an SDK exception to an error kind; the message never holds the key.

    `now` (wall time) turns an HTTP-date `retry-after` into seconds; default: the system clock.
    `provider` reads Bedrock's and Vertex's own error names (docs/providers.md).
    """
    if provider != "anthropic":
        mapped = _provider_error(exc, provider)
        if mapped is not None:
            return mapped
    if isinstance(exc, anthropic.APITimeoutError):  # before its parent, APIConnectionError
        return PingError("timeout", "the request timed out")
    if isinstance(exc, anthropic.APIConnectionError):
        return PingError("connection", f"connection failed: {type(exc.__cause__ or exc).__name__}")
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        body = exc.body if isinstance(exc.body, dict) else {}
        detail = body.get("error", {}) if isinstance(body.get("error"), dict) else {}
        message = str(detail.get("message") or exc.message)
        headers = exc.response.headers
        retry_after = _retry_after(headers, time.time() if now is None else now)
        # The monthly spend cap does not clear for hours: it must not be retried like a 429. It is
        # the Claude Console's; Foundry is billed by Azure, where a 429 is a rate limit.
        spend_cap = provider == "anthropic" and is_spend_cap(status, detail, message, headers)
        if spend_cap:
            retry_after = None
        return PingError(_status_error_type(status), message, status, retry_after, spend_cap)
    if isinstance(exc, anthropic.APIResponseValidationError):
        return PingError("other", f"malformed response: {exc.message}", exc.status_code)
    return PingError("other", f"{type(exc).__name__}: malformed or unexpected response")


DIAGNOSTICS_BETA = "cache-diagnosis-2026-04-07"


def count_tail(client: Any, pair: Pair) -> int | None:
    """Tokens of the ping's user message alone (free count_tokens), or None if it cannot be counted.

    An `uncached` ping's `input_tokens` is its prefix plus this tail; `keepwarm check` counts the
    prefix as the difference, and the daemon must report the same figure.
    """
    if not provider_facts()[pair.provider].count_tokens:
        return None  # Bedrock has no count_tokens: the prefix is read from the first ping instead
    try:
        counted = sdk_for(client, pair).messages.count_tokens(
            model=pair.model, messages=[{"role": "user", "content": pair.ping_message}]
        )
    except anthropic.AnthropicError:
        return None
    return int(counted.input_tokens)


def send_ping(
    client: Any,
    pair: Pair,
    max_tokens: int,
    previous_message_id: str | None = None,
    clock: Callable[[], float] = time.time,
    mono: Callable[[], float] = time.monotonic,
) -> PingAttempt:
    """Send one ping; never raises for API or network trouble.

    With `previous_message_id`, the cache-diagnostics beta is asked why this request could
    not reuse that one's prefix (opt-in: `api.cache_diagnostics`).
    """
    params = request_params(pair, max_tokens)
    if previous_message_id:
        params["diagnostics"] = {"previous_message_id": previous_message_id}
        params["extra_headers"] = {"anthropic-beta": DIAGNOSTICS_BETA}
    wall = clock()
    t0 = mono()
    try:
        raw = sdk_for(client, pair).messages.with_raw_response.create(**params)
        message = raw.parse()
        usage = usage_from_api(message.usage, pair.ttl)
        reason = getattr(getattr(message, "diagnostics", None), "cache_miss_reason", None)
        return PingAttempt(
            wall,
            mono() - t0,
            usage,
            raw.headers.get("request-id") or raw.headers.get("x-amzn-requestid"),
            None,
            max_tokens,
            message.id,
            getattr(reason, "type", None),
        )
    except Exception as exc:  # noqa: BLE001 - every failure becomes data, the daemon lives on
        request_id = getattr(exc, "request_id", None)
        error = describe_error(exc, clock(), pair.provider)
        return PingAttempt(wall, mono() - t0, None, request_id, error, max_tokens)
