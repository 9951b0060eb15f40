"""The emulator's streamed answers (`stream: true`): the raw SSE bytes, and the official SDK's
`messages.create(stream=True)` and `messages.stream(...)` helpers (sync and async) over HTTP."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from keepwarm.emulator import Emulator

SONNET = "claude-sonnet-4-6"
# 2,000 tokens by the emulator's rule (4 bytes a token), above Sonnet's 1,024 minimum.
SYSTEM: Any = [{"type": "text", "text": "x" * 8000, "cache_control": {"type": "ephemeral"}}]
PING: Any = [{"role": "user", "content": "ping"}]
CACHE_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with Emulator() as emu:
        yield emu


@pytest.fixture(autouse=True)
def clean(emulator: Emulator) -> None:
    emulator.clear_faults()
    emulator.clear_log()
    emulator.expire_all()


@pytest.fixture
def client(emulator: Emulator) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="sk-test", base_url=emulator.base_url, max_retries=0)


def body(**extra: Any) -> dict[str, Any]:
    return {"model": SONNET, "max_tokens": 3, "system": SYSTEM, "messages": PING, "stream": True, **extra}


def raw_post(emu: Emulator, payload: dict[str, Any]) -> bytes:
    """The whole HTTP response to one POST /v1/messages, exactly as it came off the socket."""
    data = json.dumps(payload).encode()
    request = (
        f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: sk-test\r\n"
        f"content-type: application/json\r\ncontent-length: {len(data)}\r\nconnection: close\r\n\r\n"
    ).encode() + data
    with socket.create_connection(("127.0.0.1", emu.port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while piece := sock.recv(65536):
            chunks.append(piece)
    return b"".join(chunks)


def dechunk(payload: bytes) -> bytes:
    """Decode a Transfer-Encoding: chunked body, checking its framing."""
    out = b""
    while True:
        size_line, payload = payload.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            assert payload == b"\r\n", "the last chunk must end the body"
            return out
        out += payload[:size]
        assert payload[size : size + 2] == b"\r\n"
        payload = payload[size + 2 :]


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Server-sent events as (event name, parsed data)."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(fields) == {"event", "data"}, block
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def streamed(emu: Emulator, payload: dict[str, Any]) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """(response head, events) of one streamed request sent as raw bytes."""
    response = raw_post(emu, payload)
    head, rest = response.split(b"\r\n\r\n", 1)
    return head.decode("latin-1"), parse_sse(dechunk(rest).decode("utf-8"))


def test_raw_bytes_follow_the_api_event_sequence(emulator: Emulator) -> None:
    head, events = streamed(emulator, body())
    status, *header_lines = head.split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in header_lines)}
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["transfer-encoding"] == "chunked"
    assert headers["request-id"].startswith("req_")
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    logged = emulator.log[-1].usage
    assert logged is not None
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["role"] == "assistant"
    # message_start already carries every input and cache count, and the 5m/1h split.
    assert {k: start["usage"][k] for k in CACHE_FIELDS} == {k: logged[k] for k in CACHE_FIELDS}
    assert start["usage"]["cache_creation"] == logged["cache_creation"]
    assert start["usage"]["cache_creation_input_tokens"] == 2000  # a cold cache: written
    assert start["usage"]["output_tokens"] < logged["output_tokens"]
    delta = events[-2][1]
    # The delta's counts are cumulative: the same totals as the non-streamed usage.
    assert delta["usage"] == {k: logged[k] for k in (*CACHE_FIELDS, "output_tokens")}
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    plain = anthropic.Anthropic(api_key="k", base_url=emulator.base_url).messages.create(
        model=SONNET, max_tokens=3, system=SYSTEM, messages=PING
    )
    assert plain.content[0].type == "text"
    assert text == plain.content[0].text == "Emulated reply."


def test_a_streamed_request_reads_and_writes_the_cache_like_any_other(emulator: Emulator) -> None:
    _, first = streamed(emulator, body())
    _, second = streamed(emulator, body())
    assert first[0][1]["message"]["usage"]["cache_creation_input_tokens"] == 2000
    usage = second[0][1]["message"]["usage"]
    assert (usage["cache_creation_input_tokens"], usage["cache_read_input_tokens"]) == (0, 2000)
    assert second[-2][1]["usage"]["cache_read_input_tokens"] == 2000


def test_http_client_reads_the_stream_on_a_kept_alive_connection(emulator: Emulator) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=5)
    try:
        for _ in range(2):  # the chunked framing must leave the connection usable
            connection.request("POST", "/v1/messages", body=json.dumps(body()), headers={"x-api-key": "k"})
            response = connection.getresponse()
            events = parse_sse(response.read().decode())
            assert response.status == 200 and events[-1][0] == "message_stop"
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"max_tokens": 0}, "max_tokens: 0 cannot be used together with `stream: true`."),
        ({"stream": "yes"}, "stream: Input should be a valid boolean"),
    ],
)
def test_refused_streams_get_a_json_error(emulator: Emulator, extra: dict[str, Any], message: str) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=5)
    try:
        connection.request("POST", "/v1/messages", body=json.dumps(body(**extra)), headers={"x-api-key": "k"})
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 400
    assert answer["error"] == {"type": "invalid_request_error", "message": message}


def test_sdk_create_stream_true_yields_both_usages(client: anthropic.Anthropic, emulator: Emulator) -> None:
    client.messages.create(model=SONNET, max_tokens=3, system=SYSTEM, messages=PING)  # write
    events = list(client.messages.create(model=SONNET, max_tokens=3, system=SYSTEM, messages=PING, stream=True))
    logged = emulator.log[-1].usage
    assert logged is not None
    start = next(e for e in events if e.type == "message_start")
    delta = next(e for e in events if e.type == "message_delta")
    assert start.message.usage.cache_read_input_tokens == 2000
    assert delta.usage.cache_read_input_tokens == 2000
    assert delta.usage.output_tokens == logged["output_tokens"] == 3
    assert [e.type for e in events][-1] == "message_stop"


def test_sdk_stream_helper_final_message_matches_the_emulator(client: anthropic.Anthropic, emulator: Emulator) -> None:
    with client.messages.stream(model=SONNET, max_tokens=2, system=SYSTEM, messages=PING) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    logged = emulator.log[-1].usage
    assert logged is not None
    assert text == "Emulated reply"
    assert final.stop_reason == "max_tokens"
    assert final.usage.model_dump(include=set(logged)) == logged


def test_async_sdk_stream_helper(emulator: Emulator) -> None:
    async def run() -> anthropic.types.Message:
        async with anthropic.AsyncAnthropic(api_key="k", base_url=emulator.base_url, max_retries=0) as client:
            async with client.messages.stream(model=SONNET, max_tokens=3, system=SYSTEM, messages=PING) as stream:
                return await stream.get_final_message()

    final = asyncio.run(run())
    assert final.usage.cache_creation_input_tokens == 2000
    assert final.content[0].type == "text" and final.content[0].text == "Emulated reply."
