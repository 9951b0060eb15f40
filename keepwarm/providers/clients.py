"""Every account's SDK client, built once per config load; each pair is sent through its account's.

Secrets are read here (an account's `api_key_file`, `access_token_file`) or left to the
provider's own chain (AWS, Google); errors name the file, never its content.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from keepwarm.config import ApiKey, Config, ConfigError, Pair, _key_from_file
from keepwarm.providers import anthropic as anthropic_provider
from keepwarm.providers.base import Account

_ENV_KEY = {"foundry": "ANTHROPIC_FOUNDRY_API_KEY", "bedrock": "AWS_BEARER_TOKEN_BEDROCK"}


class Clients:
    """The SDK client of each account; `for_pair` gives a pair its own account's."""

    def __init__(self, by_account: Mapping[str, Any], default: str) -> None:
        self.by_account = dict(by_account)
        self.default = default

    def for_pair(self, pair: Pair) -> Any:
        """The client of the pair's account (the first account's for a pair built without one)."""
        return self.by_account.get(pair.account) or self.by_account[self.default]

    @property
    def messages(self) -> Any:
        """The first account's `messages`: what callers written for one client reach."""
        return self.by_account[self.default].messages

    def close(self) -> None:
        """Close every client's connection pool."""
        for client in self.by_account.values():
            close = getattr(client, "close", None)
            if close is not None:
                close()


def sdk_for(client: Any, pair: Pair) -> Any:
    """The SDK client to send `pair` through: its account's from a `Clients`, else `client` itself."""
    return client.for_pair(pair) if isinstance(client, Clients) else client


def _secret(account: Account, key: ApiKey, environ: Mapping[str, str]) -> str | None:
    """The account's own secret: its key file, else the api section's key for an Anthropic account."""
    if account.from_api:
        return key.value  # the api section's chain, as resolve_api_key found it
    if account.provider == "vertex":
        path = account.access_token_file
    else:
        path = account.api_key_file
    if path is not None:
        try:
            return _key_from_file(path)[0].value
        except ConfigError as exc:
            raise ConfigError([f"accounts {account.name!r}: {p}" for p in exc.problems]) from None
    if account.provider == "anthropic":
        return key.value
    env = _ENV_KEY.get(account.provider)
    return environ.get(env) or None if env else None


def make_clients(
    config: Config,
    key: ApiKey,
    *,
    emulator_url: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Clients:
    """A client per account of `config`; with `emulator_url`, every one points at that emulator.

    `key` is the api section's key (`resolve_api_key`), used by Anthropic accounts without a
    key file of their own. Raises ConfigError when a named secret file cannot be read.
    """
    env = os.environ if environ is None else environ
    accounts = config.accounts or (Account("default", "anthropic", config.api.base_url, from_api=True),)
    built: dict[str, Any] = {}
    for account in accounts:
        timeout = config.api.timeout
        if account.provider == "anthropic":
            secret = key.value if emulator_url is not None else _secret(account, key, env)
            built[account.name] = anthropic_provider.make_client(account, secret or "", timeout, emulator_url)
            continue
        module = _module(account.provider)
        if emulator_url is not None:
            built[account.name] = module.emulator_client(account, timeout, emulator_url)
        else:
            built[account.name] = module.make_client(account, _secret(account, key, env), timeout, None)
    return Clients(built, accounts[0].name)


def _module(provider: str) -> Any:
    """The provider's module, imported only when an account uses it (its extra may be absent)."""
    if provider == "bedrock":
        from keepwarm.providers import bedrock

        return bedrock
    if provider == "vertex":
        from keepwarm.providers import vertex

        return vertex
    from keepwarm.providers import foundry

    return foundry
