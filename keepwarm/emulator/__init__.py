"""A local emulator of the Anthropic Messages API, faithful where prompt caching is concerned.

A real HTTP server on loopback (`POST /v1/messages`, `POST /v1/messages/count_tokens`) that the
`anthropic` SDK reaches through `base_url`. It generates no text; what it reproduces is the
cache: breakpoints, the 20-block lookback, per-workspace and per-model isolation, 5m/1h TTLs counted
from the start of the request that last wrote or read an entry (scaled by `time_scale`), entries
readable only once the writing response has begun, the model minimums, and the usage object.
Faults (429 with or without `retry-after`, 5xx, 529, latency, hangs, dropped connections,
malformed bodies) are scripted in-process with `Emulator.inject(Fault(...))` or over HTTP at
`/_emulator/...`. It also serves Bedrock, Vertex AI and Foundry paths and framing
(`keepwarm.emulator.routes`), each with its own cache scope. docs/emulator.md has the full story.

Approximations (deliberate, and the same everywhere):

- Tokens: a text counts `ceil(len(text.encode("utf-8")) / 4)` tokens. A text block counts its
  text; a tool definition, or any non-text block, counts its canonical JSON (sorted keys,
  compact separators, `cache_control` removed) by the same rule. Blocks have no overhead, roles
  and message framing count nothing. A string `system` or message `content` is one text block.
- Cache key: (workspace, model, sha256 over the blocks' canonical JSON without `cache_control`,
  each tagged with its section and message role). Moving a marker therefore keeps a prefix's
  key; changing a byte, a key order inside a tool, or a block's role changes it. `tool_choice`,
  `thinking` and `speed` are folded in after the tools, so they invalidate the system and
  messages levels but not the tools level.
- Lookup: each breakpoint checks its own position and the 20 block positions before it; the
  longest live entry found is read. An entry is refreshed when read, to the longer of its TTL
  and the TTL of the breakpoint covering it. Entries are written only at breakpoints whose
  prefix reaches the model's minimum; a breakpoint below it adds its tokens to the next one.
- Automatic caching (top-level `cache_control`) marks the last block that is not a thinking
  block and takes one of the 4 breakpoint slots, unless that block is already marked.
- Output: no generation. The reply is the fixed text "Emulated reply." cut to `max_tokens`
  pieces (`output_tokens = min(max_tokens, 3)`). `stream: true` answers the same as the API's
  server-sent events (`keepwarm.emulator.sse`).
"""

from keepwarm.emulator.errors import ApiError
from keepwarm.emulator.faults import Fault
from keepwarm.emulator.prompt import count_text_tokens
from keepwarm.emulator.server import (
    Emulator,
    LogEntry,
    builtin_min_cacheable_tokens,
    serve,
)

__all__ = [
    "ApiError",
    "Emulator",
    "Fault",
    "LogEntry",
    "builtin_min_cacheable_tokens",
    "count_text_tokens",
    "serve",
]
