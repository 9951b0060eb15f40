"""keepwarm: keeps Anthropic prompt caches warm, and shows what that costs and saves."""

__version__ = "0.1.0"
