"""One ping: a single Messages API call through the official SDK. I/O only.

Retries, timing, metrics and logging belong to the runner; this module sends exactly
one request and turns whatever comes back into a `PingAttempt`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import anthropic

from keepwarm.classify import Usage, usage_from_api
from keepwarm.config import Pair

# The error_type label values of keepwarm_ping_errors_total (SPEC §5).
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


def _retry_after(headers: Any) -> float | None:
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(float(value) * scale, 0.0)
        except ValueError:
            continue  # an HTTP-date retry-after: rare from this API; fall back to backoff
    return None


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


def describe_error(exc: Exception) -> PingError:
    """Map an SDK exception to an error kind; the message never holds the key."""
    if isinstance(exc, anthropic.APITimeoutError):  # before its parent, APIConnectionError
        return PingError("timeout", "the request timed out")
    if isinstance(exc, anthropic.APIConnectionError):
        return PingError("connection", f"connection failed: {type(exc.__cause__ or exc).__name__}")
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        body = exc.body if isinstance(exc.body, dict) else {}
        detail = body.get("error", {}) if isinstance(body.get("error"), dict) else {}
        message = str(detail.get("message") or exc.message)
        retry_after = _retry_after(exc.response.headers)
        # The monthly spend cap answers 429 without retry-after and does not clear for hours.
        spend_cap = status == 429 and retry_after is None
        return PingError(_status_error_type(status), message, status, retry_after, spend_cap)
    if isinstance(exc, anthropic.APIResponseValidationError):
        return PingError("other", f"malformed response: {exc.message}", exc.status_code)
    return PingError("other", f"{type(exc).__name__}: malformed or unexpected response")


DIAGNOSTICS_BETA = "cache-diagnosis-2026-04-07"


def send_ping(
    client: anthropic.Anthropic, pair: Pair, max_tokens: int, previous_message_id: str | None = None
) -> PingAttempt:
    """Send one ping; never raises for API or network trouble.

    With `previous_message_id`, the cache-diagnostics beta is asked why this request could
    not reuse that one's prefix (opt-in: `api.cache_diagnostics`).
    """
    params = request_params(pair, max_tokens)
    if previous_message_id:
        params["diagnostics"] = {"previous_message_id": previous_message_id}
        params["extra_headers"] = {"anthropic-beta": DIAGNOSTICS_BETA}
    wall = time.time()
    t0 = time.monotonic()
    try:
        raw = client.messages.with_raw_response.create(**params)
        message = raw.parse()
        usage = usage_from_api(message.usage, pair.ttl)
        reason = getattr(getattr(message, "diagnostics", None), "cache_miss_reason", None)
        return PingAttempt(
            wall,
            time.monotonic() - t0,
            usage,
            raw.headers.get("request-id"),
            None,
            max_tokens,
            message.id,
            getattr(reason, "type", None),
        )
    except Exception as exc:  # noqa: BLE001 - every failure becomes data, the daemon lives on
        request_id = getattr(exc, "request_id", None)
        return PingAttempt(wall, time.monotonic() - t0, None, request_id, describe_error(exc), max_tokens)
