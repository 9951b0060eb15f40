"""Microsoft Foundry: the Messages API under `https://{resource}.services.ai.azure.com/anthropic/`."""

from __future__ import annotations

from typing import Any

from anthropic import AnthropicFoundry

from keepwarm.providers.base import Account


def make_client(account: Account, secret: str | None, timeout: float, base_url: str | None) -> Any:
    """An `AnthropicFoundry` client for the account's resource (or base_url)."""
    url = base_url or account.base_url
    if url:
        return AnthropicFoundry(api_key=secret, base_url=url, timeout=timeout, max_retries=0)
    return AnthropicFoundry(api_key=secret, resource=account.resource, timeout=timeout, max_retries=0)


def emulator_client(account: Account, timeout: float, base_url: str) -> Any:
    """A client for an emulator, which serves Foundry's paths under `/anthropic`."""
    return make_client(account, "keepwarm-emulator-key", timeout, base_url.rstrip("/") + "/anthropic/")
