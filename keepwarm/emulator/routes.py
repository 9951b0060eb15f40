"""Which provider's path a request came by, and what its path says (model, project, region).

The Claude API: `/v1/messages` and `/v1/messages/count_tokens`. Microsoft Foundry: the same under
`/anthropic`. Amazon Bedrock: `/model/{id}/invoke` and `/model/{id}/invoke-with-response-stream`,
the model URL-quoted in the path and absent from the body. Google Vertex AI:
`[/v1]/projects/{p}/locations/{r}/publishers/anthropic/models/{id}:rawPredict` (`:streamRawPredict`
streams; `count-tokens:rawPredict` counts), the model absent from the body. Bedrock's Messages API
endpoint (bedrock-mantle) shares Foundry's path; the server tells them apart by the SigV4 signature.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from keepwarm.emulator.faults import COUNT_TOKENS_PATH, MESSAGES_PATH

_BEDROCK = re.compile(r"^/model/([^/]+)/(invoke|invoke-with-response-stream)$")
_VERTEX = re.compile(
    r"^(?:/v1)?/projects/([^/]+)/locations/([^/]+)/publishers/anthropic/models/([^/]+?):(rawPredict|streamRawPredict)$"
)


@dataclass(frozen=True)
class Route:
    """One API request's route: the provider, the Claude API endpoint it amounts to, and what the path named."""

    provider: str  # anthropic | foundry | bedrock | vertex
    endpoint: str  # MESSAGES_PATH or COUNT_TOKENS_PATH: what faults and the log match on
    model: str | None = None  # from the path (Bedrock, Vertex); None: from the body
    stream: bool | None = None  # from the path (Bedrock); None: from the body
    project: str | None = None
    region: str | None = None
    mantle: bool = False  # Bedrock's Messages API endpoint: Foundry's path, signed with SigV4


def route(path: str) -> Route | None:
    """The route of an API path, or None when no provider serves it."""
    if path in (MESSAGES_PATH, COUNT_TOKENS_PATH):
        return Route("anthropic", path)
    if path in ("/anthropic" + MESSAGES_PATH, "/anthropic" + COUNT_TOKENS_PATH):
        return Route("foundry", path.removeprefix("/anthropic"))
    m = _BEDROCK.match(path)
    if m:
        return Route("bedrock", MESSAGES_PATH, urllib.parse.unquote(m.group(1)), m.group(2) != "invoke")
    m = _VERTEX.match(path)
    if m:
        project, region, model, verb = (urllib.parse.unquote(g) for g in m.groups())
        if model == "count-tokens":
            return Route("vertex", COUNT_TOKENS_PATH, None, None, project, region) if verb == "rawPredict" else None
        return Route("vertex", MESSAGES_PATH, model, None, project, region)
    return None
