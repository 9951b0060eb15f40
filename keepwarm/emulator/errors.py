"""The API's error shape: which `error.type` goes with which HTTP status, and the exception
the emulator raises internally to answer with one."""

from __future__ import annotations

from collections.abc import Mapping

# From the API's errors page. 503 has no type of its own there, and the SDK's `ErrorType`
# list has none either, so it is answered as `api_error` like 500; the SDK still raises its
# `ServiceUnavailableError` because it picks the exception class from the status code.
ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    411: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

DEFAULT_MESSAGES: Mapping[int, str] = {
    400: "Invalid request.",
    401: "invalid x-api-key",
    402: "Your credit balance is too low to access the Anthropic API.",
    403: "Your API key does not have permission to use the specified resource.",
    404: "Not found.",
    413: "Request exceeds the maximum allowed number of bytes.",
    429: "Number of requests has exceeded your per-minute rate limit.",
    500: "Internal server error.",
    503: "Service unavailable.",
    504: "Request timed out.",
    529: "Overloaded",
}

SPEND_CAP_MESSAGE = (
    "You have reached your organization's monthly spend limit. "
    "Access resumes when the limit resets at the start of next month."
)
# The SDK reads `error.details.error_code` to raise `EnforcedSpendLimitReachedError`, a
# subclass of `RateLimitError`, so a client can tell this 429 from one that clears.
SPEND_CAP_ERROR_CODE = "enforced_spend_limit_reached"


def error_type_for(status: int) -> str:
    """The API's `error.type` for an HTTP status."""
    known = ERROR_TYPES.get(status)
    if known is not None:
        return known
    return "api_error" if status >= 500 else "invalid_request_error"


class ApiError(Exception):
    """An error response to send: status, `error.type`, message, and any extra headers."""

    def __init__(
        self,
        status: int,
        message: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        error_code: str | None = None,
    ) -> None:
        self.status = status
        self.type = error_type_for(status)
        self.message = message if message is not None else DEFAULT_MESSAGES.get(status, "Error.")
        self.headers: Mapping[str, str] = headers or {}
        self.error_code = error_code
        super().__init__(f"{status} {self.type}: {self.message}")

    def error_object(self) -> dict[str, object]:
        """The `error` member of the response body."""
        error: dict[str, object] = {"type": self.type, "message": self.message}
        if self.error_code is not None:
            error["details"] = {"error_code": self.error_code}
        return error


def invalid(message: str) -> ApiError:
    """A 400 invalid_request_error with the API's wording."""
    return ApiError(400, message)
