"""The HTTP side of the emulator: the server, the request handler, the request log, `serve()`."""

from __future__ import annotations

import functools
import http
import ipaddress
import json
import re
import secrets
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Self

from keepwarm.emulator import eventstream
from keepwarm.emulator.cache import PromptCache
from keepwarm.emulator.diagnostics import Diagnoser, requested
from keepwarm.emulator.errors import (
    SPEND_CAP_ERROR_CODE,
    SPEND_CAP_MESSAGE,
    ApiError,
    invalid,
)
from keepwarm.emulator.faults import MESSAGES_PATH, Fault, FaultQueue
from keepwarm.emulator.prompt import (
    Prompt,
    fingerprint,
    read_prompt,
    validate_common,
    validate_generation,
)
from keepwarm.emulator.routes import Route, route
from keepwarm.emulator.sse import CONTENT_TYPE as SSE_CONTENT_TYPE
from keepwarm.emulator.sse import message_event_objects, message_events
from keepwarm.pricing import builtin_table
from keepwarm.providers.base import canonical_model, provider_facts

CONTROL_PREFIX = "/_emulator/"
# The canned reply, one "token" per piece: max_tokens cuts it short.
REPLY_TOKENS = ("Emulated", " reply", ".")
MAX_BODY_BYTES = 32 * 1024 * 1024
# Distinct request bodies whose analysis (fingerprint, blocks, hashes) is remembered. Keepalive
# pings repeat the same bytes, and serialising a 20 kB prompt canonically costs ~0.1 ms each time.
ANALYSIS_MEMO_SIZE = 256
# The "malformed" fault's answer: cut off mid-object, as by a broken proxy.
MALFORMED_BODY = b'{"id": "msg_emulator_malformed", "type": "message", "content": [{"type'
# Reported in anthropic-ratelimit-requests-* headers; the emulator never enforces it.
REQUESTS_PER_MINUTE = 4000

_REASONS = {status.value: status.phrase for status in http.HTTPStatus}
_REASONS[529] = "Overloaded"


@functools.lru_cache(maxsize=1)
def builtin_min_cacheable_tokens() -> Mapping[str, int]:
    """Known models and their minimum cacheable prefix, from the shipped price table."""
    return {
        name: price.min_cacheable_tokens
        for name, price in builtin_table().models.items()
        if price.min_cacheable_tokens is not None
    }


@dataclass(frozen=True)
class LogEntry:
    """One request as the emulator saw it (control-endpoint calls are not logged)."""

    time: float  # emulator clock at arrival
    model: str | None
    fingerprint: str | None  # the prefix's fingerprint (keepwarm.cachekey); None when the body was not a JSON object
    usage: dict[str, Any] | None  # messages: the response usage; count_tokens: its answer
    status: int  # HTTP status; 0 when no response was sent (hang, drop)
    request_id: str
    error_type: str | None  # error.type, or "hang" / "drop" / "malformed" for those faults
    body: Any  # the parsed JSON request body; None when it was not JSON
    path: str = MESSAGES_PATH
    key_suffix: str | None = None  # last 4 characters of the API key, never more
    provider: str = "anthropic"  # whose path the request came by: anthropic, foundry, bedrock, vertex
    cache: str | None = None  # whose cache it used: `workspace:NAME`, `bedrock:ACCOUNT:REGION`, `vertex:PROJECT:REGION`

    def to_json(self) -> dict[str, Any]:
        """The entry as `GET /_emulator/log` serves it."""
        return asdict(self)


@dataclass
class _Record:
    """A LogEntry being filled in while a request is handled."""

    time: float
    request_id: str
    path: str
    model: str | None = None
    fingerprint: str | None = None
    usage: dict[str, Any] | None = None
    status: int = 0
    error_type: str | None = None
    body: Any = None
    key_suffix: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    beta: str | None = None  # the anthropic-beta request header
    provider: str = "anthropic"
    cache: str | None = None

    def entry(self) -> LogEntry:
        return LogEntry(
            time=self.time,
            model=self.model,
            fingerprint=self.fingerprint,
            usage=self.usage,
            status=self.status,
            request_id=self.request_id,
            error_type=self.error_type,
            body=self.body,
            path=self.path,
            key_suffix=self.key_suffix,
            provider=self.provider,
            cache=self.cache,
        )


@functools.lru_cache(maxsize=4)
def _minute_end(minute: int) -> str:
    """RFC 3339 time at which a wall-clock minute (minutes since the epoch) ends."""
    end = datetime.fromtimestamp((minute + 1) * 60, tz=UTC)
    return end.strftime("%Y-%m-%dT%H:%M:%SZ")


def _fault_error(fault: Fault, headers: dict[str, str]) -> ApiError:
    """The error a `status` fault answers with; adds its headers to `headers`."""
    if fault.spend_cap:
        return ApiError(429, fault.message or SPEND_CAP_MESSAGE, error_code=SPEND_CAP_ERROR_CODE)
    if fault.retry_after is not None:
        seconds = fault.retry_after
        headers["retry-after"] = str(int(seconds)) if seconds == int(seconds) else str(seconds)
    if fault.effective_status == 429:
        headers["anthropic-ratelimit-requests-remaining"] = "0"
    return ApiError(fault.effective_status, fault.message)


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    headers: Mapping[str, str]
    events: tuple[bytes, ...] | None = None  # a streamed answer: sent as chunks, in order


# How Bedrock names an error (header `x-amzn-ErrorType`), by status; it has no 529.
_AWS_ERRORS = {
    400: "ValidationException",
    401: "UnrecognizedClientException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    413: "ValidationException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
    504: "ModelTimeoutException",
}
# Google's `error.status` on Vertex AI, by status.
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _error_response(error: ApiError, request_id: str, headers: Mapping[str, str], provider: str = "anthropic") -> _Response:
    """The error body for `error` in the provider's own shape, with the request's headers plus the error's own.

    Bedrock: `{"message"}` and the exception's name in `x-amzn-ErrorType` (a 529 is a 503
    ServiceUnavailableException); Vertex AI: Google's `{"error": {"code", "message", "status"}}`;
    the Claude API and Foundry: the Anthropic error object.
    """
    status = error.status
    body: dict[str, Any]
    extra: dict[str, str] = {}
    if provider == "bedrock":
        status = 503 if status == 529 else status
        body = {"message": error.message}
        extra["x-amzn-ErrorType"] = _AWS_ERRORS.get(status, "InternalServerException")
    elif provider == "vertex":
        status = 503 if status == 529 else status
        body = {"error": {"code": status, "message": error.message, "status": _GOOGLE_STATUS.get(status, "UNKNOWN")}}
    else:
        body = {"type": "error", "error": error.error_object(), "request_id": request_id}
    return _Response(status, json.dumps(body).encode("utf-8"), {**headers, **error.headers, **extra})


class _AnalysisMemo:
    """Request bytes -> (fingerprint, Prompt) of bodies that passed validation: both are pure
    functions of the bytes."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: dict[bytes, tuple[str, Prompt]] = {}
        self._lock = threading.Lock()

    def get(self, raw: bytes) -> tuple[str, Prompt] | None:
        return self._items.get(raw)  # a single dict read is atomic: no lock on the hot path

    def put(self, raw: bytes, fingerprint: str, prompt: Prompt) -> None:
        with self._lock:
            if raw not in self._items and len(self._items) >= self._size:
                del self._items[next(iter(self._items))]  # oldest first
            self._items[raw] = (fingerprint, prompt)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many keep-alive clients connecting at once

    def __init__(self, address: tuple[str, int], emulator: Emulator) -> None:
        self.emulator = emulator
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client resetting its connection is normal traffic, not an emulator bug to print.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS lookup that can hang offline.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a new TCP connection per request costs throughput
    disable_nagle_algorithm = True
    server_version = "keepwarm-emulator"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.emulator._connection_opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.emulator._connection_closed(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line on stderr per request would cost throughput and drown the daemon's logs

    def do_POST(self) -> None:
        self.server.emulator._handle(self)

    do_GET = do_DELETE = do_PUT = do_PATCH = do_POST


class Emulator:
    """A local Anthropic Messages API on loopback, with a faithful prompt cache and faults."""

    def __init__(
        self,
        time_scale: float = 1.0,
        clock: Callable[[], float] | None = None,
        api_keys: Iterable[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        models: Mapping[str, int] | None = None,
        log_limit: int = 1000,
        workspaces: Mapping[str, str] | None = None,
    ) -> None:
        self.time_scale = time_scale
        self.host = host
        self.port = port
        self._clock = clock or time.monotonic
        self._api_keys = None if api_keys is None else frozenset(api_keys)
        # Key (or AWS access key id) -> workspace (or AWS account). Caches are per workspace, not
        # per key: every key not named here shares the `default` one.
        self._workspaces = dict(workspaces or {})
        self._models = dict(builtin_min_cacheable_tokens() if models is None else models)
        self._cache = PromptCache(time_scale)
        self._faults = FaultQueue()
        self._memo = _AnalysisMemo(ANALYSIS_MEMO_SIZE)
        self._diagnoser = Diagnoser()
        self._log_lock = threading.Lock()
        self._log: deque[LogEntry] = deque(maxlen=log_limit)
        self._minute_counts: dict[str, tuple[int, int]] = {}  # key -> (wall minute, requests)
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Emulator:
        """Start serving in a background thread; returns self."""
        if self._server is not None:
            raise RuntimeError("the emulator is already running")
        self._stopping.clear()
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name=f"keepwarm-emulator-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: close every connection (hung ones too) and release the port."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        # shutdown() waits for serve_forever's next poll; a connection wakes it at once.
        stopper = threading.Thread(target=server.shutdown)
        stopper.start()
        while stopper.is_alive():
            try:
                socket.create_connection(self._local_address(), timeout=1).close()
            except OSError:
                pass
            stopper.join(0.01)
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            # Unblocks handler threads waiting on idle keep-alive connections.
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if thread is not None:
            thread.join()
        self._server = self._thread = None

    def _local_address(self) -> tuple[str, int]:
        """Where a local client reaches the server (a wildcard bind answers on loopback)."""
        return ("127.0.0.1" if self.host in ("", "0.0.0.0") else self.host, self.port)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """The URL to give the SDK as `base_url`."""
        return f"http://{self.host}:{self.port}"

    # -- scripting -------------------------------------------------------------------------

    def inject(self, fault: Fault) -> None:
        """Queue a fault for the next matching request(s)."""
        self._faults.inject(fault)

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        self._faults.clear()

    def expire_all(self) -> None:
        """Expire every cache entry now."""
        self._cache.clear()

    @property
    def cache_entries(self) -> int:
        """How many cache entries are stored (expired ones may linger until swept)."""
        return len(self._cache)

    @property
    def log(self) -> list[LogEntry]:
        """A snapshot of the request log, oldest first."""
        with self._log_lock:
            return list(self._log)

    def clear_log(self) -> None:
        """Empty the request log."""
        with self._log_lock:
            self._log.clear()

    # -- request handling ------------------------------------------------------------------

    def _connection_opened(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)

    def _connection_closed(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def _handle(self, handler: _Handler) -> None:
        request_id = "req_" + secrets.token_hex(12)
        path = handler.path.split("?", 1)[0]
        found = route(path)
        if found is not None and found.provider == "foundry" and _sigv4(handler):
            found = replace(found, provider="bedrock", mantle=True)
        try:
            if path.startswith(CONTROL_PREFIX):
                self._control(handler, path, request_id)
            elif found is not None:
                self._api(handler, found, request_id)
            else:
                self._read_body(handler)
                raise ApiError(404, f"Not found: {handler.command} {path}")
        except ApiError as error:
            response = _error_response(error, request_id, {})
            self._send(handler, response.status, response.body, request_id, response.headers)
        except OSError:
            handler.close_connection = True  # the client went away mid-answer

    def _api(self, handler: _Handler, found: Route, request_id: str) -> None:
        path = found.endpoint
        record = _Record(time=self._clock(), request_id=request_id, path=path, provider=found.provider)
        response: _Response | None = None
        hang: float | None = None
        try:
            if handler.command != "POST":
                self._read_body(handler)
                raise ApiError(405, f"Method Not Allowed: {handler.command} {handler.path}")
            raw = self._read_body(handler)
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            if isinstance(body, dict) and found.provider in ("bedrock", "vertex") and not found.mantle:
                body = _provider_body(body, found)
                # The same bytes name different models on different paths: memoise per path.
                raw = handler.path.encode("utf-8") + b"\0" + raw
            record.body = body
            known = None
            if isinstance(body, dict):
                model = body.get("model")
                record.model = model if isinstance(model, str) else None
                known = self._memo.get(raw)
                record.fingerprint = known[0] if known else fingerprint(body)
            key = self._authenticate(handler, record, found)
            if found.provider in ("anthropic", "foundry"):
                record.headers = self._ratelimit_headers(key)
            elif found.provider == "bedrock":
                record.headers = {"x-amzn-requestid": request_id}
            record.beta = handler.headers.get("anthropic-beta")

            fault = self._faults.take(path, record.model)
            if fault is not None and fault.latency and fault.kind != "hang":
                self._stopping.wait(fault.latency)  # real time: the client's clock sees it
            if fault is None or fault.kind == "latency":
                response = self._answer(path, raw, body, known, key, record)
            elif fault.kind == "hang":
                handler.close_connection = True
                record.error_type = "hang"
                hang = fault.latency
            elif fault.kind == "drop":
                handler.close_connection = True
                record.error_type = "drop"
            elif fault.kind == "malformed":
                record.status, record.error_type = 200, "malformed"
                response = _Response(200, MALFORMED_BODY, record.headers)
            else:
                raise _fault_error(fault, record.headers)
        except ApiError as error:
            # Bedrock's Messages endpoint answers as the Messages API does (unconfirmed).
            response = _error_response(error, request_id, record.headers, "anthropic" if found.mantle else found.provider)
            record.status = response.status
            record.error_type = error.type
        except OSError:
            raise  # the client went away while sending: nobody to answer
        except Exception:  # noqa: BLE001 - any bug must still get an API-shaped answer
            # A bug in the emulator: answer like the API would, and keep the traceback visible.
            traceback.print_exc(file=sys.stderr)
            bug = ApiError(500, "Internal server error (emulator bug).")
            record.status, record.error_type = 500, bug.type
            response = _error_response(bug, request_id, {}, found.provider)
        # Logged before answering, so whoever got the answer finds the request in the log.
        with self._log_lock:
            self._log.append(record.entry())
        if hang is not None:
            self._stopping.wait(hang or None)
        if response is not None and response.events is not None:
            framed = found.provider == "bedrock" and not found.mantle
            content_type = eventstream.CONTENT_TYPE if framed else SSE_CONTENT_TYPE
            self._send_stream(handler, response.events, request_id, response.headers, content_type)
        elif response is not None:
            self._send(handler, response.status, response.body, request_id, response.headers)

    def _read_body(self, handler: _Handler) -> bytes:
        if handler.headers.get("Transfer-Encoding"):
            handler.close_connection = True
            raise ApiError(411, "A Content-Length header is required.")
        try:
            length = int(handler.headers.get("Content-Length") or 0)
        except ValueError:
            handler.close_connection = True
            raise invalid("Content-Length is not a number.") from None
        if length > MAX_BODY_BYTES:
            handler.close_connection = True
            raise ApiError(413)
        return handler.rfile.read(length) if length > 0 else b""

    def _authenticate(self, handler: _Handler, record: _Record, found: Route) -> str:
        """Check the request's credentials; return (and log) whose cache it uses.

        The Claude API and Foundry: the key's workspace. Bedrock: a SigV4 signature from any
        credentials (not verified: no AWS secret is known here) or a Bedrock API key; the cache is
        the access key's account (`--workspace`) in the signed region. Vertex AI: any bearer token;
        the cache is the path's project and region.
        """
        authorization = handler.headers.get("Authorization") or ""
        if found.provider == "bedrock" and _sigv4(handler):
            scope = re.search(r"Credential=([^/,\s]+)/\d{8}/([^/]+)/([^/]+)/aws4_request", authorization)
            if scope is None or "Signature=" not in authorization or not handler.headers.get("x-amz-date"):
                raise ApiError(403, "The request signature we calculated does not match the signature you provided.")
            access_key, region = scope.group(1), scope.group(2)
            record.key_suffix = access_key[-4:]
            # The Messages endpoint is served apart from InvokeModel: its own caches (unconfirmed).
            kind = "bedrock-mantle" if found.mantle else "bedrock"
            record.cache = f"{kind}:{self._workspaces.get(access_key, 'default')}:{region}"
            return record.cache
        key = handler.headers.get("x-api-key") or ""
        if not key and authorization[:7].lower() == "bearer ":
            key = authorization[7:].strip()
        if not key:
            raise ApiError(401, "x-api-key header is required")
        record.key_suffix = key[-4:]
        if found.provider == "vertex":
            record.cache = f"vertex:{found.project}:{found.region}"
            return record.cache
        if self._api_keys is not None and key not in self._api_keys:
            raise ApiError(401, "invalid x-api-key")
        workspace = self._workspaces.get(key, "default")
        # A Bedrock API key names no region in the request: its account's caches, region unknown.
        record.cache = {"bedrock": f"bedrock:{workspace}:api-key", "foundry": f"foundry:{workspace}"}.get(
            found.provider, f"workspace:{workspace}"
        )
        return record.cache

    def _answer(
        self,
        path: str,
        raw: bytes,
        body: Any,
        known: tuple[str, Prompt] | None,
        key: str,
        record: _Record,
    ) -> _Response:
        """The normal answer to an API request (ApiError for an invalid one)."""
        if body is None:
            raise invalid("There was an issue with your request body: it is not valid JSON.")
        if not isinstance(body, dict):
            raise invalid("body: Input should be a valid dictionary")
        prompt = self._analyse(raw, body, record.fingerprint or "", known, record.provider)
        if path == MESSAGES_PATH:
            payload = self._create_message(body, prompt, key, record)
            if body.get("stream") is True:
                pieces = REPLY_TOKENS[: record.usage["output_tokens"] if record.usage else 0]
                if record.provider == "bedrock" and record.cache is not None and not record.cache.startswith("bedrock-mantle:"):
                    events = tuple(eventstream.chunks(message_event_objects(payload, pieces)))
                else:
                    events = tuple(message_events(payload, pieces))
                record.status = 200
                return _Response(200, b"", record.headers, events)
        else:
            record.usage = {"input_tokens": prompt.total_tokens}
            payload = dict(record.usage)
        record.status = 200
        return _Response(200, json.dumps(payload).encode("utf-8"), record.headers)

    def _known_model(self, model: str, provider: str = "anthropic") -> int:
        """The model's minimum cacheable prefix on this provider; 404 for a model nobody serves.

        A Bedrock or Vertex id serves the Claude API model it names; Bedrock's minimums differ
        for some models (keepwarm/data/providers.yaml).
        """
        canonical = canonical_model(provider, model)
        min_tokens = self._models.get(canonical)
        if min_tokens is None:
            raise ApiError(404, f"model: {model}")
        if provider in ("bedrock", "vertex"):
            return provider_facts()[provider].min_cacheable_tokens.get(canonical, min_tokens)
        return min_tokens

    def _analyse(
        self,
        raw: bytes,
        body: dict[str, Any],
        fingerprint_: str,
        known: tuple[str, Prompt] | None,
        provider: str = "anthropic",
    ) -> Prompt:
        """Validate what every endpoint needs and return the request's Prompt (memoised)."""
        model = validate_common(body)
        self._known_model(model, provider)
        if known is not None:
            return known[1]
        prompt = read_prompt(body, model)
        self._memo.put(raw, fingerprint_, prompt)
        return prompt

    def _create_message(
        self, body: dict[str, Any], prompt: Prompt, key: str, record: _Record
    ) -> dict[str, Any]:
        model = prompt.model
        min_tokens = self._known_model(model, record.provider)
        max_tokens = validate_generation(body)
        previous_id = requested(body, record.beta)
        usage = self._cache.settle(
            (key, model), prompt, min_tokens, started=record.time, responding=self._clock()
        )
        output_tokens = min(max_tokens, len(REPLY_TOKENS))
        usage["output_tokens"] = output_tokens
        usage["service_tier"] = "standard"
        record.usage = usage
        content = [{"type": "text", "text": "".join(REPLY_TOKENS[:output_tokens])}] if output_tokens else []
        message_id = "msg_" + secrets.token_hex(12)
        extra: dict[str, Any] = {}
        if previous_id is not None:
            extra["diagnostics"] = self._diagnoser.diagnose(previous_id, body, usage)
        if record.beta and "cache-diagnosis" in record.beta:
            self._diagnoser.remember(message_id, body)
        return {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": "end_turn" if max_tokens >= len(REPLY_TOKENS) else "max_tokens",
            "stop_sequence": None,
            "usage": usage,
            **extra,
        }

    def _ratelimit_headers(self, key: str) -> dict[str, str]:
        """Plausible anthropic-ratelimit-requests-* headers from a per-key, per-minute count."""
        now = time.time()
        minute = int(now // 60)
        with self._log_lock:
            seen_minute, count = self._minute_counts.get(key, (minute, 0))
            count = count + 1 if seen_minute == minute else 1
            self._minute_counts[key] = (minute, count)
        return {
            "anthropic-ratelimit-requests-limit": str(REQUESTS_PER_MINUTE),
            "anthropic-ratelimit-requests-remaining": str(max(0, REQUESTS_PER_MINUTE - count)),
            "anthropic-ratelimit-requests-reset": _minute_end(minute),
        }

    # -- control endpoint ------------------------------------------------------------------

    def _control(self, handler: _Handler, path: str, request_id: str) -> None:
        raw = self._read_body(handler)
        if not ipaddress.ip_address(handler.client_address[0]).is_loopback:
            raise ApiError(403, "The emulator's control endpoint only answers loopback clients.")
        route = (handler.command, path.rstrip("/"))
        answer: dict[str, Any]
        if route == ("GET", "/_emulator/log"):
            answer = {"entries": [entry.to_json() for entry in self.log]}
        elif route == ("DELETE", "/_emulator/log"):
            self.clear_log()
            answer = {"cleared": True}
        elif route == ("GET", "/_emulator/faults"):
            answer = {"faults": self._faults.pending()}
        elif route == ("POST", "/_emulator/faults"):
            try:
                data = json.loads(raw)
                faults = [Fault.from_json(item) for item in (data if isinstance(data, list) else [data])]
            except (ValueError, TypeError) as problem:
                raise invalid(f"bad fault: {problem}") from None
            for fault in faults:
                self.inject(fault)
            answer = {"queued": len(faults), "faults": self._faults.pending()}
        elif route == ("DELETE", "/_emulator/faults"):
            self.clear_faults()
            answer = {"cleared": True}
        elif route == ("POST", "/_emulator/expire"):
            expired = self.cache_entries
            self.expire_all()
            answer = {"expired": expired}
        else:
            raise ApiError(404, f"Not found: {handler.command} {path}")
        self._send(handler, 200, json.dumps(answer).encode("utf-8"), request_id)

    # -- responses -------------------------------------------------------------------------

    def _send(
        self,
        handler: _Handler,
        status: int,
        body: bytes,
        request_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            "content-type: application/json",
            f"content-length: {len(body)}",
            f"request-id: {request_id}",
        ]
        if headers:
            lines.extend(f"{name}: {value}" for name, value in headers.items())
        if handler.close_connection:
            lines.append("connection: close")
        # One write per response: headers and body in the same TCP segment where they fit.
        handler.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def _send_stream(
        self,
        handler: _Handler,
        events: Iterable[bytes],
        request_id: str,
        headers: Mapping[str, str],
        content_type: str = SSE_CONTENT_TYPE,
    ) -> None:
        """A 200 streamed answer (server-sent events, or Bedrock's event-stream frames), one chunk
        per event, each flushed as it is written (as the API sends them), so a client reads
        `message_start` before the stream ends."""
        lines = [
            "HTTP/1.1 200 OK",
            f"content-type: {content_type}",
            "cache-control: no-cache",
            "transfer-encoding: chunked",
            f"request-id: {request_id}",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        if handler.close_connection:
            lines.append("connection: close")
        handler.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        for data in events:
            handler.wfile.write(_chunk(data))
            handler.wfile.flush()
        handler.wfile.write(b"0\r\n\r\n")


def _sigv4(handler: _Handler) -> bool:
    """Whether the request is signed with AWS Signature Version 4."""
    return (handler.headers.get("Authorization") or "").startswith("AWS4-HMAC-SHA256 ")


def _provider_body(body: dict[str, Any], found: Route) -> dict[str, Any]:
    """A Bedrock or Vertex body as the Claude API would take it: the path's model, no version field.

    Bedrock streams by path (the SDK drops `stream` from the body); Vertex by the body's `stream`.
    """
    out = {k: v for k, v in body.items() if k not in ("anthropic_version", "anthropic_beta")}
    if found.model is not None:
        out["model"] = found.model
    if found.provider == "bedrock":
        out.pop("stream", None)
        if found.stream:
            out["stream"] = True
    return out


def _chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (Transfer-Encoding: chunked)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def serve(
    port: int,
    time_scale: float,
    api_keys: list[str] | None,
    host: str = "127.0.0.1",
    workspaces: Mapping[str, str] | None = None,
) -> int:
    """Serve the emulator until SIGTERM or SIGINT; prints `listening on URL` first; returns 0."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous: dict[signal.Signals, Any] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, on_signal)
    try:
        with Emulator(time_scale=time_scale, api_keys=api_keys, host=host, port=port, workspaces=workspaces) as emulator:
            print(f"listening on {emulator.base_url}", flush=True)
            # A bounded wait, so the loop notices the signal even if a wakeup were lost.
            while not stop.wait(0.5):
                pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
