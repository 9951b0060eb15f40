"""The Claude API (one account per workspace key), and what the other providers share with it."""

from __future__ import annotations

from typing import Any

import anthropic

from keepwarm.providers.base import Account


def make_client(account: Account, secret: str, timeout: float, base_url: str | None) -> Any:
    """An `Anthropic` client for a workspace key; no SDK retries (the runner retries, bounded)."""
    return anthropic.Anthropic(api_key=secret, base_url=base_url or account.base_url, timeout=timeout, max_retries=0)
