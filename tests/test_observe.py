"""keepwarm.observe against the real SDK and the emulator over HTTP, with a small real HTTP
receiver standing in for the daemon so that a test can make it down, slow or refusing."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anthropic
import httpx2
import pytest

from keepwarm import observe
from keepwarm.emulator import Emulator, Fault
from keepwarm.prefix import build_prefix
from keepwarm.shard import shard_of

SONNET = "claude-sonnet-4-6"
PREFIX = build_prefix(["x" * 8000])  # 2,000 emulator tokens, marker on the block
PING: Any = [{"role": "user", "content": "ping"}]
TOKEN = "observe-token-for-tests"


class Receiver:
    """A real HTTP server that records what is POSTed to it and answers as told."""

    def __init__(self, shard: int | None = None, shards: int = 1) -> None:
        self.posts: list[dict[str, Any]] = []  # {"path", "headers", "body"}
        self.status = 202
        self.answer: Callable[[dict[str, Any]], tuple[int, Any]] | None = None
        self.gate = threading.Event()  # cleared: every POST waits until it is set
        self.gate.set()
        self.shard, self.shards = shard, shards
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.gate.wait(30)
                body = json.loads(data)
                with receiver._lock:
                    receiver.posts.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, answer = receiver.respond(body)
                out = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def respond(self, body: dict[str, Any]) -> tuple[int, Any]:
        if self.answer is not None:
            return self.answer(body)
        items = body["observations"]
        if self.status != 202:
            return self.status, {"error": "refused"}
        rejected = []
        if self.shard is not None:
            # As a sharded daemon does: each item of a pair it does not own is refused naming
            # the owner, and a request of nothing but one other shard's pairs is a 421.
            for index, item in enumerate(items):
                owner = shard_of(f"{item['expert']}/{item['model']}", self.shards)
                if owner != self.shard:
                    rejected.append({"index": index, "reason": "misdirected", "shard": owner})
            owners = {r["shard"] for r in rejected}
            if len(rejected) == len(items) and len(owners) == 1:
                return 421, {"shard": owners.pop(), "rejected": rejected}
        return 202, {"accepted": len(items) - len(rejected), "rejected": rejected}

    @property
    def observations(self) -> list[dict[str, Any]]:
        """Every observation received, in arrival order (refused ones included)."""
        with self._lock:
            return [item for post in self.posts for item in post["body"]["observations"]]

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


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
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def sdk(emulator: Emulator, **options: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="sk-test", base_url=emulator.base_url, max_retries=0, **options)


def async_sdk(emulator: Emulator) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key="sk-test", base_url=emulator.base_url, max_retries=0)


@pytest.fixture
def client(emulator: Emulator, receiver: Receiver) -> Iterator[anthropic.Anthropic]:
    wrapped = observe.wrap(sdk(emulator), url=receiver.url, token=TOKEN, expert="analyst", flush_interval=60)
    yield wrapped
    observe.observer_of(wrapped).close()


def ask(client: anthropic.Anthropic, **extra: Any) -> Any:
    return client.messages.create(model=SONNET, max_tokens=3, messages=PING, **PREFIX.params(), **extra)


def expected(entry_usage: dict[str, Any] | None) -> dict[str, Any]:
    """What an observation's usage must be: the emulator's usage without service_tier."""
    assert entry_usage is not None
    return {k: v for k, v in entry_usage.items() if k != "service_tier"}


def flushed(client: Any) -> observe.Stats:
    observer = observe.observer_of(client)
    assert observer.flush(10)
    return observer.stats()


# --- what is observed ----------------------------------------------------------------------


def test_a_plain_call_is_observed_with_usage_fingerprint_time_and_request_id(
    client: anthropic.Anthropic, emulator: Emulator, receiver: Receiver
) -> None:
    before = time.time()
    ask(client)
    ask(client)
    after = time.time()
    stats = flushed(client)
    assert stats.accepted == 2 and stats.dropped_total == 0
    assert len(receiver.posts) == 1, "two observations, one batch"
    post = receiver.posts[0]
    assert post["path"] == "/v1/observations"
    assert post["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert post["headers"]["Content-Type"] == "application/json"
    log = emulator.log
    for observation, entry in zip(receiver.observations, log, strict=True):
        assert observation["expert"] == "analyst" and observation["model"] == SONNET
        assert observation["usage"] == expected(entry.usage)
        # The documented fingerprint, through keepwarm.prefix: the emulator computes it independently.
        assert observation["fingerprint"] == PREFIX.fingerprint(SONNET) == entry.fingerprint
        assert observation["request_id"] == entry.request_id
        assert before <= observation["at"] <= after
    assert [o["usage"]["cache_creation_input_tokens"] for o in receiver.observations] == [2000, 0]
    assert receiver.observations[0]["at"] < receiver.observations[1]["at"]


def test_create_stream_true_is_observed_once_the_stream_is_read(
    client: anthropic.Anthropic, emulator: Emulator, receiver: Receiver
) -> None:
    stream = ask(client, stream=True)
    assert isinstance(stream, anthropic.Stream), "the SDK's own object, not a look-alike"
    events = [event.type for event in stream]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    flushed(client)
    (observation,) = receiver.observations
    assert observation["usage"] == expected(emulator.log[-1].usage)
    assert observation["request_id"] == emulator.log[-1].request_id


def test_a_stream_abandoned_after_message_start_still_reports_what_it_said(
    client: anthropic.Anthropic, emulator: Emulator, receiver: Receiver
) -> None:
    stream = ask(client, stream=True)
    first = next(iter(stream))
    assert first.type == "message_start"
    stream.close()
    del stream, first  # the abandoned iterator is finalised: the request was billed all the same
    gc.collect()
    flushed(client)
    (observation,) = receiver.observations
    logged = expected(emulator.log[-1].usage)
    assert observation["usage"] == {**logged, "output_tokens": 1}, "message_start's counts; output as far as seen"


def test_messages_stream_helper_is_observed(client: anthropic.Anthropic, emulator: Emulator, receiver: Receiver) -> None:
    ask(client)  # write, so the stream reads
    with client.messages.stream(model=SONNET, max_tokens=2, messages=PING, **PREFIX.params()) as stream:
        assert "".join(stream.text_stream) == "Emulated reply"
        final = stream.get_final_message()
    assert final.usage.cache_read_input_tokens == 2000
    flushed(client)
    assert [o["usage"] for o in receiver.observations] == [expected(e.usage) for e in emulator.log]
    assert receiver.observations[1]["usage"]["output_tokens"] == 2


def test_async_client_create_stream_and_stream_helper(emulator: Emulator, receiver: Receiver) -> None:
    async def run() -> None:
        client = observe.wrap(async_sdk(emulator), url=receiver.url, expert="analyst", flush_interval=60)
        async with client:
            await client.messages.create(model=SONNET, max_tokens=3, messages=PING, **PREFIX.params())
            stream = await client.messages.create(model=SONNET, max_tokens=3, messages=PING, stream=True, **PREFIX.params())
            assert isinstance(stream, anthropic.AsyncStream)
            assert [e.type async for e in stream][-1] == "message_stop"
            async with client.messages.stream(model=SONNET, max_tokens=1, messages=PING, **PREFIX.params()) as helper:
                final = await helper.get_final_message()
            assert final.usage.output_tokens == 1
        assert observe.observer_of(client).flush(10)
        observe.observer_of(client).close()

    asyncio.run(run())
    assert [o["usage"] for o in receiver.observations] == [expected(e.usage) for e in emulator.log]
    assert len(receiver.observations) == 3


# --- streams: each usage field's maximum over message_start and message_delta ----------------


def sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


class FakeStreamApi:
    """An HTTP server answering every POST with one fixed SSE stream: for usage shapes the
    emulator does not send (proxies that drop fields from one of the two usage objects)."""

    def __init__(self, start_usage: dict[str, Any], delta_usage: dict[str, Any]) -> None:
        message: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant", "model": SONNET, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": start_usage}  # fmt: skip
        self.body = b"".join(
            [
                sse("message_start", {"type": "message_start", "message": message}),
                sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                sse("ping", {"type": "ping"}),
                sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}}),
                sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
                sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                      "usage": delta_usage}),  # fmt: skip
                sse("message_stop", {"type": "message_stop"}),
            ]
        )
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("request-id", "req_fake")
                self.send_header("Content-Length", str(len(api.body)))
                self.end_headers()
                self.wfile.write(api.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


SPLIT = {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 1500}


@pytest.mark.parametrize(
    ("start", "delta"),
    [
        # The delta carries only output_tokens (older API, some proxies): keep message_start's cache counts.
        (
            {"input_tokens": 7, "cache_creation_input_tokens": 1500, "cache_read_input_tokens": 500, "cache_creation": SPLIT,
             "output_tokens": 1},
            {"output_tokens": 42},
        ),
        # message_start reports zeros and the delta the real counts: keep the delta's.
        (
            {"input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "cache_creation": SPLIT,
             "output_tokens": 1},
            {"input_tokens": 7, "cache_creation_input_tokens": 1500, "cache_read_input_tokens": 500, "output_tokens": 42},
        ),
    ],
    ids=["delta-without-cache-fields", "start-with-zeros"],
)  # fmt: skip
def test_stream_usage_is_each_fields_maximum(receiver: Receiver, start: dict[str, Any], delta: dict[str, Any]) -> None:
    api = FakeStreamApi(start, delta)
    try:
        client = observe.wrap(
            anthropic.Anthropic(api_key="k", base_url=api.url, max_retries=0), url=receiver.url, expert="analyst", flush_interval=60
        )
        with client.messages.stream(model=SONNET, max_tokens=50, messages=PING) as stream:
            stream.get_final_message()
        for _ in ask(client, stream=True):
            pass
        flushed(client)
        observe.observer_of(client).close()
    finally:
        api.close()
    want = {"input_tokens": 7, "cache_creation_input_tokens": 1500, "cache_read_input_tokens": 500, "output_tokens": 42,
            "cache_creation": SPLIT}  # fmt: skip
    assert [o["usage"] for o in receiver.observations] == [want, want]
    assert receiver.observations[0]["request_id"] == "req_fake"


# --- naming the expert --------------------------------------------------------------------


def capture_headers() -> tuple[list[dict[str, str]], httpx2.Client]:
    seen: list[dict[str, str]] = []

    def hook(request: httpx2.Request) -> None:
        seen.append({k.lower(): v for k, v in request.headers.items()})

    return seen, anthropic.DefaultHttpxClient(event_hooks={"request": [hook]})


def test_per_call_header_and_kwarg_name_the_expert_and_are_not_sent(emulator: Emulator, receiver: Receiver) -> None:
    seen, http_client = capture_headers()
    client = observe.wrap(sdk(emulator, http_client=http_client), url=receiver.url, expert="fallback", flush_interval=60)
    headers = {"X-Keepwarm-Expert": "from-header", "x-other": "kept"}
    ask(client, extra_headers=headers)
    ask(client, keepwarm_expert="from-kwarg")
    with client.messages.stream(model=SONNET, max_tokens=1, messages=PING, extra_headers={"x-keepwarm-expert": "streamed"}) as s:
        s.get_final_message()
    ask(client)
    flushed(client)
    observe.observer_of(client).close()
    assert [o["expert"] for o in receiver.observations] == ["from-header", "from-kwarg", "streamed", "fallback"]
    assert all("x-keepwarm-expert" not in h for h in seen)
    assert seen[0]["x-other"] == "kept"
    assert headers == {"X-Keepwarm-Expert": "from-header", "x-other": "kept"}, "the caller's dict is not changed"
    assert all("keepwarm_expert" not in json.dumps(e.body) for e in emulator.log)


def test_expert_for_decides_and_a_call_without_expert_is_sent_unobserved(
    emulator: Emulator, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    def expert_for(kwargs: Any) -> str | None:
        return "by-metadata" if kwargs.get("metadata") else None

    client = observe.wrap(sdk(emulator), url=receiver.url, expert_for=expert_for, flush_interval=60)
    caplog.set_level(logging.WARNING, logger="keepwarm.observe")
    ask(client, metadata={"user_id": "u1"})
    ask(client)
    ask(client)
    stats = flushed(client)
    observe.observer_of(client).close()
    assert [o["expert"] for o in receiver.observations] == ["by-metadata"]
    assert stats.unattributed == 2 and stats.observed == 1
    assert len(emulator.log) == 3, "unattributed calls still reach the API"
    assert len([r for r in caplog.records if "named no expert" in r.getMessage()]) == 1


def test_an_expert_for_that_raises_does_not_fail_production(emulator: Emulator, receiver: Receiver) -> None:
    def broken(kwargs: Any) -> str | None:
        raise KeyError("metadata")

    client = observe.wrap(sdk(emulator), url=receiver.url, expert_for=broken)
    assert ask(client).usage.cache_creation_input_tokens == 2000
    observe.observer_of(client).close()
    assert receiver.posts == []


# --- production is never affected ----------------------------------------------------------


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_daemon_down_production_unaffected_drops_counted_and_logged_once(
    emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="keepwarm.observe")
    client = observe.wrap(sdk(emulator), url=closed_port_url(), expert="analyst", batch_size=1)
    for _ in range(3):
        assert ask(client).type == "message"
    stats = flushed(client)
    observe.observer_of(client).close()
    assert stats.dropped == {"daemon_unreachable": 3}
    assert stats.accepted == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "cannot reach" in warnings[0]


@pytest.mark.parametrize("status", [400, 401, 413, 500])
def test_daemon_refusing_drops_and_logs_once(
    emulator: Emulator, receiver: Receiver, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="keepwarm.observe")
    receiver.status = status
    client = observe.wrap(sdk(emulator), url=receiver.url, token=TOKEN, expert="analyst", batch_size=1)
    ask(client)
    ask(client)
    stats = flushed(client)
    observe.observer_of(client).close()
    assert stats.dropped == {f"http_{status}": 2}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and f"answered {status}" in messages[0]
    assert TOKEN not in caplog.text, "the token never reaches a log line"


def test_a_slow_daemon_never_holds_up_production_and_the_buffer_is_bounded(emulator: Emulator, receiver: Receiver) -> None:
    receiver.gate.clear()  # the daemon takes every POST and answers nothing until released
    client = observe.wrap(sdk(emulator), url=receiver.url, expert="analyst", batch_size=1, queue_size=2, intake_size=2, timeout=30)
    observer = observe.observer_of(client)
    # While the sender is stuck in its first POST, production goes on at full speed.
    for _ in range(12):
        ask(client)
    assert not observer.flush(0.2), "the daemon has not answered yet"
    # At most: 1 in the stuck POST + 2 converted + 2 handed over; the rest were dropped.
    dropped = observer.stats().dropped.get("queue_full", 0)
    assert 12 - 5 <= dropped < 12
    receiver.gate.set()
    stats = flushed(client)
    observer.close()
    assert stats.accepted + stats.dropped_total == 12
    assert stats.accepted == len(receiver.observations) >= 1


def test_record_costs_microseconds_even_with_the_daemon_hung(receiver: Receiver) -> None:
    receiver.gate.clear()
    observer = observe.Observer(receiver.url, timeout=30)
    usage = {"input_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2000, "output_tokens": 1}
    started = time.perf_counter()
    for _ in range(10_000):
        observer.record("analyst", SONNET, time.time(), PREFIX.system, None, usage)
    per_call = (time.perf_counter() - started) / 10_000
    receiver.gate.set()
    observer.close()
    # Generous for a shared 2-core machine: the hand-over is an append, the target is 50 µs.
    assert per_call < 50e-6, per_call


def test_a_failing_api_call_raises_the_sdk_error_and_is_not_observed(client: anthropic.Anthropic, emulator: Emulator) -> None:
    emulator.inject(Fault(status=529))
    with pytest.raises(anthropic.OverloadedError):
        ask(client)
    stats = flushed(client)
    assert stats.observed == 0


def test_rejected_observations_are_counted(emulator: Emulator, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="keepwarm.observe")
    receiver.answer = lambda body: (202, {"accepted": 0, "rejected": [{"index": 0, "reason": "unknown_pair"}]})
    client = observe.wrap(sdk(emulator), url=receiver.url, expert="nobody")
    ask(client)
    stats = flushed(client)
    observe.observer_of(client).close()
    assert (stats.accepted, stats.rejected) == (0, 1)
    assert "unknown_pair" in caplog.text


# --- batching ------------------------------------------------------------------------------


def test_batches_hold_at_most_batch_size(receiver: Receiver) -> None:
    observer = observe.Observer(receiver.url, batch_size=10, flush_interval=60)
    usage = {"input_tokens": 1, "output_tokens": 1}
    for i in range(25):
        observer.record("analyst", SONNET, 1_800_000_000.0 + i, PREFIX.system, None, usage)
    deadline = time.monotonic() + 10
    while len(receiver.observations) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)  # polling for the background sends: full batches leave on their own
    assert observer.flush(10)  # the last 5 would otherwise wait flush_interval
    observer.close()
    assert [len(p["body"]["observations"]) for p in receiver.posts] == [10, 10, 5]
    assert [o["at"] for o in receiver.observations] == [1_800_000_000.0 + i for i in range(25)]


def test_without_a_flush_a_batch_leaves_after_flush_interval(receiver: Receiver) -> None:
    observer = observe.Observer(receiver.url, flush_interval=0.2)
    observer.record("analyst", SONNET, 1.0, PREFIX.system, None, {"output_tokens": 1})
    deadline = time.monotonic() + 10
    while not receiver.posts and time.monotonic() < deadline:
        time.sleep(0.01)  # polling for the background send, not waiting for a schedule
    observer.close()
    assert len(receiver.observations) == 1


def test_batch_size_above_the_endpoint_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_size must be 1 to 1000"):
        observe.Observer("http://127.0.0.1:9464", batch_size=1001)
    with pytest.raises(ValueError, match="not an http"):
        observe.Observer("127.0.0.1:9464")


# --- shards --------------------------------------------------------------------------------

EXPERTS = [f"expert-{i}" for i in range(12)]


def test_each_observation_goes_to_the_shard_that_owns_its_pair() -> None:
    shards = [Receiver(shard=k, shards=3) for k in range(3)]
    try:
        observer = observe.Observer([r.url for r in shards], flush_interval=60)
        for expert in EXPERTS:
            observer.record(expert, SONNET, 1.0, PREFIX.system, None, {"output_tokens": 1})
        assert observer.flush(10)
        stats = observer.stats()
        observer.close()
        assert stats.accepted == len(EXPERTS) and stats.dropped_total == 0
        for k, r in enumerate(shards):
            got = sorted(o["expert"] for o in r.observations)
            assert got == sorted(e for e in EXPERTS if shard_of(f"{e}/{SONNET}", 3) == k)
        assert all(len(r.posts) == 1 for r in shards if r.posts), "one batch per shard"
    finally:
        for r in shards:
            r.close()


def test_a_client_that_missed_a_scale_up_still_reaches_every_pair_the_shards_it_knows_own() -> None:
    """Rendezvous hashing: a pair that shard 0 or 1 owns among three is theirs among two as well,
    so a client that knows only the first two sends it right at once; only shard 2's are lost."""
    shards = [Receiver(shard=k, shards=3) for k in range(3)]
    try:
        observer = observe.Observer([shards[0].url, shards[1].url], flush_interval=60)
        for expert in EXPERTS:
            observer.record(expert, SONNET, 1.0, PREFIX.system, None, {"output_tokens": 1})
        assert observer.flush(10)
        stats = observer.stats()
        observer.close()
        owners = [shard_of(f"{e}/{SONNET}", 3) for e in EXPERTS]
        reachable = sum(owner < 2 for owner in owners)
        assert 0 < reachable < len(EXPERTS), "the test needs both kinds of pair"
        assert stats.accepted == reachable
        assert stats.dropped == {"misdirected": len(EXPERTS) - reachable}
        assert sum(len(r.posts) for r in shards[:2]) == 2, "one batch to each known shard, nothing re-sent"
    finally:
        for r in shards:
            r.close()


# --- the wrapped client looks like the original ----------------------------------------------


def test_the_wrapped_client_passes_everything_else_through(emulator: Emulator, receiver: Receiver) -> None:
    client = observe.wrap(sdk(emulator), url=receiver.url, expert="analyst", flush_interval=60)
    assert client.api_key == "sk-test"
    assert str(client.base_url).rstrip("/") == emulator.base_url
    counted = client.messages.count_tokens(model=SONNET, messages=PING, **PREFIX.params())
    assert counted.input_tokens == 2001
    raw = client.messages.with_raw_response.create(model=SONNET, max_tokens=1, messages=PING)
    assert raw.headers["request-id"].startswith("req_")
    slower = client.with_options(timeout=5.0, max_retries=1)
    assert slower.max_retries == 1 and slower.timeout == 5.0
    ask(slower)  # still observed, through the same observer
    with observe.wrap(sdk(emulator), observer=observe.observer_of(client), expert="second") as other:
        ask(other)
    stats = flushed(client)
    observe.observer_of(client).close()
    assert stats.observed == 2
    assert [o["expert"] for o in receiver.observations] == ["analyst", "second"]
    with pytest.raises(TypeError, match="not made by keepwarm.observe.wrap"):
        observe.observer_of(sdk(emulator))


def test_url_and_token_from_the_environment(emulator: Emulator, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPWARM_OBSERVE_URL", receiver.url)
    monkeypatch.setenv("KEEPWARM_OBSERVE_TOKEN", TOKEN)
    client = observe.wrap(sdk(emulator), expert="analyst")
    ask(client)
    flushed(client)
    observe.observer_of(client).close()
    assert receiver.posts[0]["headers"]["Authorization"] == f"Bearer {TOKEN}"


# --- the converter's fingerprint memo ----------------------------------------------------------


@pytest.mark.parametrize(
    "system",
    [
        PREFIX.system,
        [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}],
        [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        [{"flag": True}],
        [{"flag": 1}],
        [{"flag": 1.0}],
        [{"flag": None}],
        "a plain string system",
        [],
    ],
)
def test_the_memoised_fingerprint_is_the_spec_fingerprint(system: Any) -> None:
    from keepwarm.observe import _FingerprintMemo
    from keepwarm.prefix import fingerprint

    memo = _FingerprintMemo()
    tools = [{"name": "lookup", "input_schema": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}]
    for _ in range(2):  # a miss, then a hit
        assert memo.get(SONNET, system, None) == fingerprint(SONNET, system)
        assert memo.get(SONNET, system, tools) == fingerprint(SONNET, system, tools)
        assert memo.get("claude-haiku-4-5", system, None) == fingerprint("claude-haiku-4-5", system)


def test_the_memo_never_confuses_values_python_finds_equal() -> None:
    from keepwarm.observe import _FingerprintMemo
    from keepwarm.prefix import fingerprint

    memo = _FingerprintMemo()
    variants: list[Any] = [[{"x": True}], [{"x": 1}], [{"x": 1.0}], [{"x": "1"}], [{"x": [1]}], [{"x": {"1": 1}}]]
    got = [memo.get(SONNET, v, None) for v in variants] + [memo.get(SONNET, v, None) for v in variants]
    assert got == [fingerprint(SONNET, v) for v in variants] * 2
    assert len(set(got)) == len(variants)
