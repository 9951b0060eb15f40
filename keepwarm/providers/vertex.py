"""Google Vertex AI: rawPredict on `publishers/anthropic/models/{model}`, as `AnthropicVertex` sends it.

Credentials are Google application default credentials, found by google-auth when the first
request is sent, or a token from `access_token_file` (minted elsewhere, refreshed there).
"""

from __future__ import annotations

from typing import Any

from anthropic import AnthropicVertex

from keepwarm.providers.base import Account

# Google's `error.status` values, and the error kind each is.
ERROR_TYPES = {
    "RESOURCE_EXHAUSTED": "rate_limit",
    "UNAVAILABLE": "overloaded",
    "DEADLINE_EXCEEDED": "timeout",
    "INTERNAL": "server",
    "PERMISSION_DENIED": "permission",
    "UNAUTHENTICATED": "authentication",
    "INVALID_ARGUMENT": "invalid_request",
    "NOT_FOUND": "invalid_request",
    "FAILED_PRECONDITION": "invalid_request",
}


def make_client(account: Account, secret: str | None, timeout: float, base_url: str | None) -> Any:
    """An `AnthropicVertex` client for the account's project and region."""
    assert account.region is not None  # the config requires it
    return AnthropicVertex(
        region=account.region,
        project_id=account.project_id or "",
        access_token=secret,
        base_url=base_url or account.base_url,
        timeout=timeout,
        max_retries=0,
    )


def emulator_client(account: Account, timeout: float, base_url: str) -> Any:
    """A client for an emulator: a fixed access token instead of Google credentials."""
    return make_client(account, "keepwarm-emulator-token", timeout, base_url.rstrip("/") + "/v1")


def error_type(body: Any) -> str | None:
    """The error kind from Google's error body (`{"error": {"status": ...}}`), or None."""
    error = body.get("error") if isinstance(body, dict) else None
    status = error.get("status") if isinstance(error, dict) else None
    return ERROR_TYPES.get(status) if isinstance(status, str) else None


def credentials_problem(exc: Exception) -> str | None:
    """Why no token could be had, when google-auth found no credentials."""
    if type(exc).__name__ in ("DefaultCredentialsError", "RefreshError"):
        return (
            f"no usable Google credentials ({type(exc).__name__}): run `gcloud auth application-default login`,"
            " set GOOGLE_APPLICATION_CREDENTIALS, or give access_token_file"
        )
    return None
