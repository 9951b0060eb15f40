"""Amazon Bedrock: InvokeModel with the Messages body, as the SDK's `AnthropicBedrock` sends it.

Credentials come from the AWS chain (environment, shared files, `aws_profile`, instance or
task roles) through botocore, or from a Bedrock API key file; keepwarm never reads the AWS
secrets itself, so none can reach a log.
"""

from __future__ import annotations

from typing import Any

from anthropic import AnthropicBedrock, AnthropicBedrockMantle

from keepwarm.providers.base import Account

# Errors AWS names in the `x-amzn-ErrorType` header, and the error kind each is.
ERROR_TYPES = {
    "ThrottlingException": "rate_limit",
    "ServiceQuotaExceededException": "rate_limit",
    "ModelNotReadyException": "overloaded",
    "ServiceUnavailableException": "overloaded",
    "ModelTimeoutException": "timeout",
    "InternalServerException": "server",
    "AccessDeniedException": "permission",
    "UnrecognizedClientException": "authentication",
    "ExpiredTokenException": "authentication",
    "ValidationException": "invalid_request",
    "ResourceNotFoundException": "invalid_request",
}


def make_client(account: Account, secret: str | None, timeout: float, base_url: str | None) -> Any:
    """An `AnthropicBedrock` client for the account's region (and profile, or API key); with
    `bedrock_api: mantle`, an `AnthropicBedrockMantle` for Bedrock's Messages API endpoint."""
    client = AnthropicBedrockMantle if account.bedrock_api == "mantle" else AnthropicBedrock
    return client(
        aws_region=account.region,
        aws_profile=account.aws_profile,
        api_key=secret,
        base_url=base_url or account.base_url,
        timeout=timeout,
        max_retries=0,
    )


def emulator_client(account: Account, timeout: float, base_url: str) -> Any:
    """A client for an emulator: static test credentials, signed with SigV4 like real ones."""
    if account.bedrock_api == "mantle":
        return AnthropicBedrockMantle(
            aws_region=account.region,
            aws_access_key="AKIAKEEPWARMEMULATOR",
            aws_secret_key="keepwarm-emulator-secret",
            base_url=base_url.rstrip("/") + "/anthropic",
            timeout=timeout,
            max_retries=0,
        )
    return AnthropicBedrock(
        aws_region=account.region,
        aws_access_key="AKIAKEEPWARMEMULATOR",
        aws_secret_key="keepwarm-emulator-secret",
        base_url=base_url,
        timeout=timeout,
        max_retries=0,
    )


def error_type(headers: Any) -> str | None:
    """The error kind AWS names in the response, or None."""
    name = (headers.get("x-amzn-errortype") or "").partition(":")[0] if headers is not None else ""
    return ERROR_TYPES.get(name)


def credentials_problem(exc: Exception) -> str | None:
    """Why signing failed, when the AWS chain found no credentials (never the credentials)."""
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound") or (
        isinstance(exc, RuntimeError) and "AWS credentials" in str(exc)
    ):
        return f"no usable AWS credentials ({name}): set them in the environment, a profile or a role"
    return None
