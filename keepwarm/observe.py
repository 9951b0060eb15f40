"""Production observations from the application's own `anthropic` client, sent in the background.

    import anthropic
    from keepwarm import observe

    client = observe.wrap(anthropic.Anthropic(), url="http://127.0.0.1:9464",
                          token=open("/run/secrets/keepwarm_observe_token").read().strip(),
                          expert="chief-economist")
    client.messages.create(model="claude-sonnet-4-6", max_tokens=1024, messages=[...], **prefix.params())

The wrapped client is used exactly like the original. Every `messages.create` (streamed or not)
and `messages.stream` that names an expert hands the response's usage, the prefix fingerprint and
the request's start time to a background `Observer`, which posts them to the daemon's
`POST /v1/observations` in batches. Clients wrapped with the same URL, token and options share
one Observer, so a process has one pair of background threads however many clients it wraps;
they start with the first observation and are started again in a child after `fork()` (a
gunicorn `--preload` or uWSGI worker), which starts with empty buffers of its own.

Nothing on the production path waits for the daemon or can raise because of it: the hand-over
is an append to a bounded buffer, and whatever cannot be delivered (buffer full, daemon down,
slow or refusing) is dropped, counted in `Observer.stats()` and logged once per cause. A 503
(the daemon's ledger cannot keep them yet) is no refusal: the batch goes back into the buffer
and is sent again after the answer's Retry-After.

The expert comes from, in order: the per-call header `X-Keepwarm-Expert` in `extra_headers` (or
the `keepwarm_expert=` keyword), both removed before the request is sent; `expert_for(kwargs)`;
the wrap's fixed `expert`. A call with none of them is sent unobserved and counted as
`unattributed`.
"""

from __future__ import annotations

import atexit
import http.client
import json
import logging
import os
import threading
import time
import urllib.parse
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, cast, overload

import anthropic
from anthropic.resources import AsyncMessages

from keepwarm.cachekey import fingerprint as prefix_fingerprint
from keepwarm.shard import shard_of

log = logging.getLogger("keepwarm.observe")

EXPERT_HEADER = "x-keepwarm-expert"
EXPERT_KWARG = "keepwarm_expert"
OBSERVATIONS_PATH = "/v1/observations"
MAX_BATCH = 1000  # the endpoint's limit per request
_USAGE_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")
_SPLIT_FIELDS = ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens")
# How often the background thread looks for new observations when nobody asks it to hurry.
_POLL_SECONDS = 0.05
# The longest a 503's Retry-After holds the sender back (the daemon's ledger cannot keep them yet).
_MAX_RETRY_AFTER = 30.0

ExpertFor = Callable[[Mapping[str, Any]], str | None]


@dataclass(frozen=True)
class Stats:
    """What an Observer did so far (counts since it started)."""

    observed: int  # responses handed over by the wrapped client
    unattributed: int  # calls sent without an expert, hence not observed
    accepted: int  # observations the daemon accepted (202)
    rejected: int  # observations the daemon answered 202 but rejected one by one (reasons logged once)
    dropped: Mapping[str, int]  # cause -> observations that never reached the daemon

    @property
    def dropped_total(self) -> int:
        """All drops, whatever the cause."""
        return sum(self.dropped.values())


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ is slower, and this is on the production path
class _Raw:
    """A response as handed over on the production path: references only, no work done yet."""

    expert: str
    model: str
    at: float
    system: Any
    tools: Any
    usage: Any  # an SDK usage object or a dict of ints
    request_id: str | None
    place: tuple[str | None, str | None] = (None, None)  # (account, provider) to report, when known


class Observer:
    """Posts observations to a keepwarm daemon (or its shards) in the background, in batches.

    Two daemon threads: one turns handed-over responses into observations (the fingerprint is
    computed there, off the production path), one posts them. Both buffers are bounded, so a
    daemon that is down or slow costs at most `queue_size` small observations plus `intake_size`
    references to request prefixes.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        queue_size: int = 10_000,
        intake_size: int = 1_000,
        batch_size: int = MAX_BATCH,
        flush_interval: float = 1.0,
        timeout: float = 2.0,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("observe: give the daemon's URL, or one URL per shard")
        self._targets = [_Target(u, timeout) for u in urls]
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"observe: batch_size must be 1 to {MAX_BATCH}, got {batch_size}")
        if queue_size < 1 or intake_size < 1:
            raise ValueError("observe: queue_size and intake_size must be at least 1")
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._queue_size, self._intake_size = queue_size, intake_size
        self._batch_size, self._flush_interval = batch_size, flush_interval
        self._intake: deque[_Raw] = deque()
        self._outbox: deque[dict[str, Any]] = deque()
        self._routes: dict[str, int] = {}  # pair key -> shard, learnt from 421 answers
        self._fingerprints = _FingerprintMemo()  # used by the converter thread only
        self._counts = {"observed": 0, "unattributed": 0, "accepted": 0, "rejected": 0}
        self._dropped: dict[str, int] = {}
        self._warned: set[str] = set()
        self._closing = False
        self._fresh_state()
        _LIVE.add(self)
        atexit.register(self.close, 1.0)

    def _fresh_state(self) -> None:
        """Locks, events and threads made new: at start, and in a child after fork() (where a
        lock another thread of the parent held stays locked for ever, and no thread runs)."""
        self._lock = threading.Lock()  # counters and warnings; on the production path only to count a drop
        self._start_lock = threading.Lock()
        # Set while an item is between two buffers, so flush() knows when all is settled.
        self._converting = self._sending = False
        self._hurry_convert = threading.Event()
        self._hurry_send = threading.Event()
        self._retry_at = 0.0  # monotonic time before which a 503 asked not to send
        self._started = False
        self._threads: list[threading.Thread] = []

    def _after_fork(self) -> None:
        """In the child: what the parent had buffered is the parent's to send; start afresh."""
        self._fresh_state()
        self._intake.clear()
        self._outbox.clear()
        for target in self._targets:
            target.forget()

    def _start(self) -> None:
        """Start the two background threads, once (lazily: a wrapped client that never calls costs none)."""
        with self._start_lock:
            if self._started or self._closing:
                return
            self._threads = [
                threading.Thread(target=self._convert_loop, name="keepwarm-observe-convert", daemon=True),
                threading.Thread(target=self._send_loop, name="keepwarm-observe-send", daemon=True),
            ]
            for thread in self._threads:
                thread.start()
            self._started = True

    # -- the production path: cheap, never raises --------------------------------------------

    def record(
        self,
        expert: str,
        model: str,
        at: float,
        system: Any,
        tools: Any,
        usage: Any,
        request_id: str | None = None,
        place: tuple[str | None, str | None] = (None, None),
    ) -> None:
        """Hand over one response; returns at once (drops it, counted, when the buffer is full).

        `place` is (account, provider) of the client that sent it, reported so that the daemon
        never credits a request made elsewhere to a pair's cache (docs/providers.md).
        """
        if not self._started:
            self._start()
        if len(self._intake) >= self._intake_size:
            self._drop("queue_full", 1)
            return
        self._intake.append(_Raw(expert, model, at, system, tools, usage, request_id, place))
        self._counts["observed"] += 1  # a lost increment under a race only blurs a statistic

    def unattributed(self) -> None:
        """Count a call that named no expert (warned about once)."""
        self._counts["unattributed"] += 1
        self._warn_once(
            "unattributed", "observe: a call named no expert and is not observed; give expert=, expert_for= or the X-Keepwarm-Expert header"
        )

    # -- control ----------------------------------------------------------------------------

    def stats(self) -> Stats:
        """A snapshot of the counters."""
        with self._lock:
            return Stats(
                observed=self._counts["observed"],
                unattributed=self._counts["unattributed"],
                accepted=self._counts["accepted"],
                rejected=self._counts["rejected"],
                dropped=dict(self._dropped),
            )

    def flush(self, timeout: float = 5.0) -> bool:
        """Send what is buffered now; True once it was all delivered or dropped within `timeout`."""
        deadline = time.monotonic() + timeout
        if (self._intake or self._outbox) and not self._started:
            self._start()
        while self._intake or self._outbox or self._converting or self._sending:
            if time.monotonic() >= deadline or not self._started:
                return False
            self._hurry_convert.set()
            self._hurry_send.set()
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Flush (within `timeout`) and stop the background threads."""
        if self._closing:
            return
        self.flush(timeout)
        self._closing = True
        self._hurry_convert.set()
        self._hurry_send.set()
        for thread in self._threads:
            thread.join(timeout)
        for target in self._targets:
            target.close()
        atexit.unregister(self.close)
        _LIVE.discard(self)
        with _SHARED_LOCK:
            for key, shared in list(_SHARED.items()):
                if shared is self:
                    del _SHARED[key]

    # -- background ---------------------------------------------------------------------------

    def _convert_loop(self) -> None:
        while not self._closing:
            if not self._intake:
                self._hurry_convert.wait(_POLL_SECONDS)
                self._hurry_convert.clear()
                continue
            self._converting = True
            try:
                raw = self._intake.popleft()
                try:
                    observation = _observation(raw, self._fingerprints)
                except Exception:  # noqa: BLE001 - an odd response must not stop the thread
                    self._drop("unreadable", 1)
                    continue
                if len(self._outbox) >= self._queue_size:
                    self._drop("queue_full", 1)
                    continue
                self._outbox.append(observation)
                if len(self._outbox) >= self._batch_size:
                    self._hurry_send.set()
            finally:
                self._converting = False

    def _send_loop(self) -> None:
        first_waiting: float | None = None
        while True:
            if not self._outbox:
                if self._closing:
                    return
                first_waiting = None
                self._hurry_send.wait(_POLL_SECONDS)
                self._hurry_send.clear()
                continue
            now = time.monotonic()
            if first_waiting is None:
                first_waiting = now
            # Batches: up to batch_size at once, or whatever waited flush_interval; none while a
            # 503 asked to wait, unless the process is exiting.
            due = (
                len(self._outbox) >= self._batch_size
                or self._hurry_send.is_set()
                or self._closing
                or now - first_waiting >= self._flush_interval
            ) and (now >= self._retry_at or self._closing)
            if not due:
                self._hurry_send.wait(min(_POLL_SECONDS, self._flush_interval - (now - first_waiting)))
                continue
            self._hurry_send.clear()
            self._sending = True
            try:
                batch = [self._outbox.popleft() for _ in range(min(self._batch_size, len(self._outbox)))]
                first_waiting = None
                try:
                    self._deliver(batch)
                except Exception:  # noqa: BLE001 - the sender must outlive any surprise
                    self._drop("error", len(batch))
                    log.exception("observe: unexpected error while sending observations")
            finally:
                self._sending = False

    def _deliver(self, batch: list[dict[str, Any]]) -> None:
        """Post a batch, split by the shard that owns each pair."""
        if len(self._targets) == 1:
            self._post(0, batch, hops=1)
            return
        by_shard: dict[int, list[dict[str, Any]]] = {}
        for item in batch:
            by_shard.setdefault(self._shard(item), []).append(item)
        for shard, items in by_shard.items():
            self._post(shard, items, hops=1)

    def _shard(self, item: Mapping[str, Any]) -> int:
        key = f"{item['expert']}/{item['model']}"
        learnt = self._routes.get(key)
        return learnt if learnt is not None else shard_of(key, len(self._targets))

    def _post(self, shard: int, items: list[dict[str, Any]], hops: int) -> None:
        target = self._targets[shard]
        # Item by item: one json.dumps of 1,000 observations would hold the GIL for milliseconds,
        # stalling the production threads; between small calls they get their turn.
        body = b'{"observations":[' + b",".join(_dumps(item).encode("utf-8") for item in items) + b"]}"
        try:
            status, answer = target.post(body, self._headers)
        except (OSError, http.client.HTTPException) as problem:
            self._drop("daemon_unreachable", len(items))
            self._warn_once(
                "unreachable", f"observe: cannot reach {target.url} ({type(problem).__name__}: {problem}); dropping observations"
            )
            return
        if status == 202:
            self._accepted(shard, items, answer, hops)
            return
        if status == 421 and isinstance(answer, dict) and isinstance(answer.get("shard"), int):
            self._misdirected(shard, int(answer["shard"]), items, hops)
            return
        if status == 503 and not self._closing:
            self._retry_later(items, answer)
            return
        self._drop(f"http_{status}", len(items))
        self._warn_once(f"http_{status}", f"observe: {target.url} answered {status} ({_excerpt(answer)}); dropping observations")

    def _accepted(self, shard: int, items: list[dict[str, Any]], answer: Any, hops: int) -> None:
        """202: count what was accepted; resend items refused as `misdirected` to the shard named."""
        rejected = answer.get("rejected") if isinstance(answer, dict) else None
        refused = [r for r in rejected if isinstance(r, dict)] if isinstance(rejected, list) else []
        elsewhere: dict[int, list[dict[str, Any]]] = {}
        others = []
        for r in refused:
            index, owner = r.get("index"), r.get("shard")
            if r.get("reason") == "misdirected" and isinstance(index, int) and 0 <= index < len(items) and isinstance(owner, int):
                elsewhere.setdefault(owner, []).append(items[index])
            else:
                others.append(r)
        with self._lock:
            self._counts["accepted"] += len(items) - len(refused)
            self._counts["rejected"] += len(others)
        if others:
            target = self._targets[shard]
            self._warn_once("rejected", f"observe: {target.url} rejected {len(others)} observation(s), e.g. {others[0].get('reason')!r}")
        for owner, moved in elsewhere.items():
            for key in sorted({f"{i['expert']}/{i['model']}" for i in moved}):
                self._misdirected(shard, owner, [i for i in moved if f"{i['expert']}/{i['model']}" == key], hops)

    def _misdirected(self, shard: int, owner: int, items: list[dict[str, Any]], hops: int) -> None:
        """421 {"shard": K}: the shard list disagrees with the daemons'. Learn the owner and resend once."""
        self._warn_once(
            "misdirected",
            f"observe: shard {shard} does not keep some pairs warm (misdirected; owner: shard {owner});"
            " check the number and order of the shard URLs",
        )
        pairs = sorted({f"{item['expert']}/{item['model']}" for item in items})
        if len(pairs) > 1:
            # The answer names the owner of one of the pairs only: ask again pair by pair.
            for key in pairs:
                self._post(shard, [i for i in items if f"{i['expert']}/{i['model']}" == key], hops)
            return
        if hops <= 0 or not 0 <= owner < len(self._targets) or owner == shard:
            self._drop("misdirected", len(items))
            return
        self._routes[pairs[0]] = owner
        self._post(owner, items, hops - 1)

    def _retry_later(self, items: list[dict[str, Any]], answer: Any) -> None:
        """503: the daemon cannot keep observations now. Put them back in front (what does not fit
        the buffer is dropped, counted) and hold the sender back for its Retry-After."""
        wait = answer.get("retry_after") if isinstance(answer, dict) else None
        wait = min(float(wait), _MAX_RETRY_AFTER) if isinstance(wait, (int, float)) and wait > 0 else 5.0
        self._retry_at = time.monotonic() + wait
        room = max(self._queue_size - len(self._outbox), 0)
        kept = items[:room]
        self._outbox.extendleft(reversed(kept))
        if len(items) > len(kept):
            self._drop("http_503", len(items) - len(kept))
        self._warn_once("http_503", "observe: the daemon cannot keep observations now (503); holding them and retrying")

    def _drop(self, cause: str, n: int) -> None:
        with self._lock:
            self._dropped[cause] = self._dropped.get(cause, 0) + n
        if cause == "queue_full":
            self._warn_once(cause, "observe: the observation buffer is full; dropping observations (the daemon is slow or down)")

    def _warn_once(self, cause: str, message: str) -> None:
        with self._lock:
            if cause in self._warned:
                return
            self._warned.add(cause)
        log.warning(message)


class _Target:
    """One daemon (or shard) URL, with its own kept-alive connection (used by one thread only)."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"observe: {url!r} is not an http(s) URL such as http://127.0.0.1:9464")
        path = parts.path.rstrip("/")
        self.path = path if path.endswith(OBSERVATIONS_PATH) else path + OBSERVATIONS_PATH
        self.url = f"{parts.scheme}://{parts.netloc}{self.path}"
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._timeout = timeout
        self._connection: http.client.HTTPConnection | None = None

    def post(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, Any]:
        """POST a body; (status, parsed JSON answer or None). Retries once on a stale connection."""
        for attempt in (1, 2):
            connection = self._connection or self._connect()
            try:
                connection.request("POST", self.path, body=body, headers=dict(headers))
                response = connection.getresponse()
                data = response.read()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                self.close()
                if attempt == 2:
                    raise
                continue  # the daemon closed a kept-alive connection: one fresh try
            except BaseException:
                self.close()
                raise
            if response.will_close:
                self.close()
            try:
                return response.status, json.loads(data) if data else None
            except ValueError:
                return response.status, None
        raise AssertionError("unreachable")

    def _connect(self) -> http.client.HTTPConnection:
        factory = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        self._connection = factory(self._host, self._port, timeout=self._timeout)
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def forget(self) -> None:
        """After fork(): the parent's connection is the parent's; the child opens its own."""
        if self._connection is not None:
            self._connection.close()  # the child's copy of the descriptor only: the parent's stays open
            self._connection = None


# Every live Observer, to start afresh in a child after fork(); and the Observers shared by
# wrap() calls with the same destination and options.
_LIVE: weakref.WeakSet[Observer] = weakref.WeakSet()
_SHARED: dict[tuple[Any, ...], Observer] = {}
_SHARED_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    global _SHARED_LOCK
    _SHARED_LOCK = threading.Lock()
    for observer in list(_LIVE):
        observer._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _excerpt(answer: Any) -> str:
    text = json.dumps(answer)[:200] if answer is not None else "no JSON body"
    return text


def _given(value: Any) -> bool:
    """Whether a keyword argument was really given (the SDK's omit/NOT_GIVEN sentinels are not)."""
    return value is not None and not isinstance(value, (anthropic.NotGiven, anthropic.Omit))


class _FingerprintMemo:
    """Fingerprints of recent prefixes, keyed by a structural copy of (model, system, tools).

    Production sends the same few prefixes again and again, usually as fresh copies
    (`prefix.params()`), but a copy shares its strings with the original, and a string caches
    its hash: building and looking up the key costs a few microseconds whatever the prompt's
    size, where the canonical JSON and its sha256 cost tens of microseconds per 20 kB. Fewer
    cycles on the background thread also means less time the production threads wait for the GIL.
    """

    SIZE = 256

    def __init__(self) -> None:
        self._items: dict[Any, str] = {}

    def get(self, model: str, system: Any, tools: Any) -> str:
        try:
            key = (model, _freeze(system), _freeze(tools))
            hash(key)
        except TypeError:
            return prefix_fingerprint(model, system, tools)  # not plain JSON data: no memo
        found = self._items.get(key)
        if found is None:
            found = prefix_fingerprint(model, system, tools)
            if len(self._items) >= self.SIZE:
                self._items.clear()  # a workload of more distinct prefixes than this gains nothing
            self._items[key] = found
        return found


def _freeze(value: Any) -> Any:
    """A hashable copy of JSON data that is equal only where the JSON text is (True is not 1)."""
    if isinstance(value, dict):
        return ("{", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("[", tuple(_freeze(v) for v in value))
    return (type(value), value)


def _observation(raw: _Raw, fingerprints: _FingerprintMemo | None = None) -> dict[str, Any]:
    """The JSON observation of a handed-over response (runs on the background thread)."""
    observation: dict[str, Any] = {
        "expert": raw.expert,
        "model": raw.model,
        "at": raw.at,
        "usage": _usage_dict(raw.usage),
    }
    try:
        system = raw.system if _given(raw.system) else []
        tools = raw.tools if _given(raw.tools) else None
        memo = fingerprints or _FingerprintMemo()
        observation["fingerprint"] = memo.get(raw.model, system, tools)
    except (TypeError, ValueError):
        pass  # a prefix that is not plain JSON (SDK objects): observed without a fingerprint
    if raw.request_id:
        observation["request_id"] = raw.request_id
    account, provider = raw.place
    if account:
        observation["account"] = account
    # Said for every other provider's client, and with an account; a plain Anthropic client's
    # observation keeps the shape a daemon from before accounts accepts.
    if provider and (provider != "anthropic" or account):
        observation["provider"] = provider
    return observation


def _usage_dict(usage: Any) -> dict[str, Any]:
    """An API usage object (SDK model, dict, or a stream's usages) as the observation's dict."""
    if isinstance(usage, _StreamUsage):
        return usage.usage()
    if isinstance(usage, dict):
        return usage
    out: dict[str, Any] = {name: int(getattr(usage, name, None) or 0) for name in _USAGE_FIELDS}
    split = getattr(usage, "cache_creation", None)
    if split is not None:
        out["cache_creation"] = {name: int(getattr(split, name, None) or 0) for name in _SPLIT_FIELDS}
    return out


class _StreamUsage:
    """Usage of a streamed response: each field's maximum over message_start and message_delta
    (the delta's counts are cumulative, and either one may lack the cache fields).

    The production path only keeps references to the two usage objects; the maxima are taken
    on the background thread (`usage()`), since reading pydantic models costs microseconds.
    """

    __slots__ = ("usages", "done")

    def __init__(self) -> None:
        self.usages: list[Any] = []
        self.done = False

    def see(self, event: Any) -> bool:
        """Take one stream event into account; True at `message_stop`."""
        kind = event.type
        if kind == "message_start":
            self.usages.append(event.message.usage)
        elif kind == "message_delta":
            self.usages.append(event.usage)
        return bool(kind == "message_stop")

    def usage(self) -> dict[str, Any]:
        """The merged usage, as an observation carries it."""
        fields: dict[str, int] = dict.fromkeys(_USAGE_FIELDS, 0)
        split: dict[str, int] | None = None
        for usage in self.usages:
            for name, value in _usage_dict(usage).items():
                if name == "cache_creation":
                    split = split or dict.fromkeys(_SPLIT_FIELDS, 0)
                    for key in _SPLIT_FIELDS:
                        split[key] = max(split[key], value.get(key, 0))
                elif name in fields:
                    fields[name] = max(fields[name], int(value or 0))
        out: dict[str, Any] = dict(fields)
        if split is not None:
            out["cache_creation"] = split
        return out


class _Call:
    """What the production path knows about one call, to report it once its usage is known."""

    __slots__ = ("observer", "expert", "kwargs", "at", "place")

    def __init__(
        self, observer: Observer, expert: str, kwargs: Mapping[str, Any], at: float,
        place: tuple[str | None, str | None] = (None, None),
    ) -> None:
        self.observer, self.expert, self.kwargs, self.at, self.place = observer, expert, kwargs, at, place

    def report(self, usage: Any, request_id: str | None) -> None:
        kw = self.kwargs
        self.observer.record(
            self.expert, str(kw.get("model")), self.at, kw.get("system"), kw.get("tools"), usage, request_id, self.place
        )

    def _see(self, acc: _StreamUsage, event: Any, request_id: str | None) -> None:
        """Take one stream event; report the usage once, at `message_stop`."""
        try:
            if acc.see(event) and not acc.done:
                acc.done = True
                self.report(acc, request_id)
        except Exception:  # noqa: BLE001 - observing must never break the stream
            pass

    def _end(self, acc: _StreamUsage, request_id: str | None) -> None:
        """The stream is over: one abandoned after message_start was still billed, so report it."""
        if not acc.done and acc.usages:
            acc.done = True
            self.report(acc, request_id)

    def watch(self, events: Iterator[Any], request_id: str | None) -> Iterator[Any]:
        """The stream's events, unchanged, with their usage reported at `message_stop`."""
        acc = _StreamUsage()
        try:
            for event in events:
                self._see(acc, event, request_id)
                yield event
        finally:
            self._end(acc, request_id)

    async def awatch(self, events: AsyncIterator[Any], request_id: str | None) -> AsyncIterator[Any]:
        """`watch` for an async stream."""
        acc = _StreamUsage()
        try:
            async for event in events:
                self._see(acc, event, request_id)
                yield event
        finally:
            self._end(acc, request_id)


def _hook(stream: Any, call: _Call, asynchronous: bool) -> None:
    """Route a `Stream`/`AsyncStream`'s events through `call.watch`, keeping the object itself
    (its type, `response`, `close()`, context manager) exactly as the SDK made it."""
    try:
        request_id = stream.response.headers.get("request-id")
        inner = stream._iterator  # the SDK iterates this in both __iter__ and __next__
        stream._iterator = call.awatch(inner, request_id) if asynchronous else call.watch(inner, request_id)
    except Exception:  # noqa: BLE001 - an SDK whose streams look different: serve unobserved
        call.observer._warn_once("stream_hook", "observe: this anthropic version's streams cannot be observed")


class _Wrapper:
    """Shared by the sync and async wrappers: expert resolution and attribute passthrough."""

    def __init__(
        self, inner: Any, observer: Observer, expert: str | None, expert_for: ExpertFor | None,
        place: tuple[str | None, str | None] = (None, None),
    ) -> None:
        self._inner, self._observer, self._expert, self._expert_for = inner, observer, expert, expert_for
        self._place = place

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return f"<observed {self._inner!r}>"

    def _start(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], _Call | None]:
        """The kwargs to send (the expert hint removed) and the call to report, if any."""
        at = time.time()
        try:
            expert = kwargs.pop(EXPERT_KWARG, None)
            headers = kwargs.get("extra_headers")
            if headers:
                for name in headers:
                    if name.lower() == EXPERT_HEADER:
                        headers = dict(headers)
                        expert = expert or headers.pop(name)
                        kwargs["extra_headers"] = headers
                        break
            if not expert and self._expert_for is not None:
                expert = self._expert_for(kwargs)
            expert = expert or self._expert
        except Exception:  # noqa: BLE001 - a failing expert_for must not fail production
            self._observer._warn_once("expert_for", "observe: expert_for raised; the call is sent unobserved")
            return kwargs, None
        if not expert:
            self._observer.unattributed()
            return kwargs, None
        return kwargs, _Call(self._observer, str(expert), kwargs, at, self._place)


class _Messages(_Wrapper):
    def create(self, **kwargs: Any) -> Any:
        """`client.messages.create`, observed."""
        kwargs, call = self._start(kwargs)
        response = self._inner.create(**kwargs)
        if call is not None:
            _report_response(response, call, asynchronous=False)
        return response

    def stream(self, **kwargs: Any) -> Any:
        """`client.messages.stream`, observed."""
        kwargs, call = self._start(kwargs)
        manager = self._inner.stream(**kwargs)
        return manager if call is None else _StreamManager(manager, call)


class _AsyncMessages(_Wrapper):
    async def create(self, **kwargs: Any) -> Any:
        """`client.messages.create`, observed."""
        kwargs, call = self._start(kwargs)
        response = await self._inner.create(**kwargs)
        if call is not None:
            _report_response(response, call, asynchronous=True)
        return response

    def stream(self, **kwargs: Any) -> Any:
        """`client.messages.stream`, observed."""
        kwargs, call = self._start(kwargs)
        manager = self._inner.stream(**kwargs)
        return manager if call is None else _AsyncStreamManager(manager, call)


def _report_response(response: Any, call: _Call, asynchronous: bool) -> None:
    try:
        if isinstance(response, (anthropic.Stream, anthropic.AsyncStream)):
            _hook(response, call, asynchronous)
        else:
            call.report(response.usage, getattr(response, "_request_id", None))
    except Exception:  # noqa: BLE001 - never into production
        call.observer._warn_once("report", "observe: a response could not be observed")


class _StreamManager:
    """`MessageStreamManager` whose stream reports its usage; everything else is the SDK's."""

    def __init__(self, inner: Any, call: _Call) -> None:
        self._inner, self._call = inner, call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> Any:
        self._call.at = time.time()  # the request is sent now, not when stream() was called
        stream = self._inner.__enter__()
        _hook(getattr(stream, "_raw_stream", None), self._call, asynchronous=False)
        return stream

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> Any:
        return self._inner.__exit__(exc_type, exc, tb)


class _AsyncStreamManager:
    """`AsyncMessageStreamManager` whose stream reports its usage."""

    def __init__(self, inner: Any, call: _Call) -> None:
        self._inner, self._call = inner, call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def __aenter__(self) -> Any:
        self._call.at = time.time()
        stream = await self._inner.__aenter__()
        _hook(getattr(stream, "_raw_stream", None), self._call, asynchronous=True)
        return stream

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> Any:
        return await self._inner.__aexit__(exc_type, exc, tb)


class _Client(_Wrapper):
    """An `Anthropic`/`AsyncAnthropic` whose `messages` are observed; all else passes through."""

    def __init__(
        self, inner: Any, observer: Observer, expert: str | None, expert_for: ExpertFor | None,
        place: tuple[str | None, str | None] = (None, None),
    ) -> None:
        super().__init__(inner, observer, expert, expert_for, place)
        # AsyncAnthropicBedrock and AsyncAnthropicVertex are no AsyncAnthropic, but their messages
        # are the same AsyncMessages resource.
        asynchronous = isinstance(inner, anthropic.AsyncAnthropic) or isinstance(inner.messages, AsyncMessages)
        kind = _AsyncMessages if asynchronous else _Messages
        self.messages = kind(inner.messages, observer, expert, expert_for, place)

    @property
    def observer(self) -> Observer:
        """The Observer sending this client's observations (stats, flush, close)."""
        return self._observer

    def with_options(self, **options: Any) -> Any:
        """`client.with_options(...)`, still observed."""
        return _Client(self._inner.with_options(**options), self._observer, self._expert, self._expert_for, self._place)

    copy = with_options

    def __enter__(self) -> Any:
        self._inner.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._inner.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> Any:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._inner.__aexit__(exc_type, exc, tb)


_PROVIDER_CLIENTS = (
    ((anthropic.AnthropicBedrock, anthropic.AsyncAnthropicBedrock, anthropic.AnthropicBedrockMantle,
      anthropic.AsyncAnthropicBedrockMantle), "bedrock"),
    ((anthropic.AnthropicVertex, anthropic.AsyncAnthropicVertex), "vertex"),
    ((anthropic.AnthropicFoundry, anthropic.AsyncAnthropicFoundry), "foundry"),
)
_ProviderClient = TypeVar(
    "_ProviderClient",
    anthropic.AnthropicBedrock,
    anthropic.AsyncAnthropicBedrock,
    anthropic.AnthropicBedrockMantle,
    anthropic.AsyncAnthropicBedrockMantle,
    anthropic.AnthropicVertex,
    anthropic.AsyncAnthropicVertex,
)


def _provider_of(client: Any) -> str:
    """Which provider a client sends to (its class says: `AnthropicBedrock` is Bedrock)."""
    return next((name for kinds, name in _PROVIDER_CLIENTS if isinstance(client, kinds)), "anthropic")


@overload
def wrap(
    client: anthropic.Anthropic,
    *,
    url: str | Sequence[str] | None = ...,
    token: str | None = ...,
    expert: str | None = ...,
    expert_for: ExpertFor | None = ...,
    observer: Observer | None = ...,
    account: str | None = ...,
    **options: Any,
) -> anthropic.Anthropic: ...
@overload
def wrap(
    client: anthropic.AsyncAnthropic,
    *,
    url: str | Sequence[str] | None = ...,
    token: str | None = ...,
    expert: str | None = ...,
    expert_for: ExpertFor | None = ...,
    observer: Observer | None = ...,
    account: str | None = ...,
    **options: Any,
) -> anthropic.AsyncAnthropic: ...
@overload
def wrap(
    client: _ProviderClient,
    *,
    url: str | Sequence[str] | None = ...,
    token: str | None = ...,
    expert: str | None = ...,
    expert_for: ExpertFor | None = ...,
    observer: Observer | None = ...,
    account: str | None = ...,
    **options: Any,
) -> _ProviderClient: ...
def wrap(
    client: Any,
    *,
    url: str | Sequence[str] | None = None,
    token: str | None = None,
    expert: str | None = None,
    expert_for: ExpertFor | None = None,
    observer: Observer | None = None,
    account: str | None = None,
    **options: Any,
) -> Any:
    """The client, observed: used like the original, typed as the original.

    `client` is an `Anthropic`, `AnthropicBedrock`, `AnthropicVertex` or `AnthropicFoundry` (or its
    async twin). `url`: the daemon's metrics listener (`http://host:9464`), or the list of shard
    URLs in shard order; default `$KEEPWARM_OBSERVE_URL` (comma-separated for shards). `token`: the
    daemon's observation token; default `$KEEPWARM_OBSERVE_TOKEN`. `account`: the name of the
    config's account this client sends to (default `$KEEPWARM_OBSERVE_ACCOUNT`); each observation
    carries it, and the provider the client's class names, so the daemon never credits a request
    made in another workspace, account or provider to a pair's cache. `options` go to `Observer`
    (queue_size, intake_size, batch_size, flush_interval, timeout). Pass `observer=` to share one
    Observer between clients.
    """
    if observer is None:
        if url is None:
            env = os.environ.get("KEEPWARM_OBSERVE_URL", "")
            url = [u.strip() for u in env.split(",") if u.strip()]
        token = token or os.environ.get("KEEPWARM_OBSERVE_TOKEN") or None
        urls = (url,) if isinstance(url, str) else tuple(url)
        key = (urls, token, tuple(sorted(options.items())))
        with _SHARED_LOCK:
            observer = _SHARED.get(key)
            if observer is None or observer._closing:
                observer = _SHARED[key] = Observer(url, token=token, **options)
    place = (account or os.environ.get("KEEPWARM_OBSERVE_ACCOUNT") or None, _provider_of(client))
    return cast("anthropic.Anthropic | anthropic.AsyncAnthropic", _Client(client, observer, expert, expert_for, place))


def observer_of(client: Any) -> Observer:
    """The Observer behind a wrapped client (for `stats()`, `flush()`, `close()`)."""
    found = getattr(client, "observer", None)
    if not isinstance(found, Observer):
        raise TypeError("observe: this client was not made by keepwarm.observe.wrap")
    return found


__all__ = ["EXPERT_HEADER", "EXPERT_KWARG", "Observer", "Stats", "observer_of", "wrap"]
