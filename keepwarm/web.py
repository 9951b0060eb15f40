"""The HTTP face of the daemon: `/metrics`, `/healthz`, `/readyz`, a landing page at `/`, and
`POST /v1/observations` (handled by `keepwarm.observations`).

The routes are one WSGI application (`App`); waitress serves it (`WebServer`). waitress reads
requests on one event loop and hands only complete ones to a bounded pool of worker threads, so
a thousand idle connections or a hundred that send a byte a second hold no thread, and a scrape
finds a worker free (bench/http_server.py measured it against cheroot and a hardened
`http.server`: docs/performance.md). On top of waitress's idle timeout, a request that takes
longer than `REQUEST_TIMEOUT` to arrive is closed, and the number of connections is capped.
"""

from __future__ import annotations

import html
import json
import logging
import resource
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import waitress.server
from prometheus_client import CONTENT_TYPE_LATEST
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

from keepwarm import __version__
from keepwarm.durations import format_duration
from keepwarm.heap import release_free_memory
from keepwarm.metrics import Metrics
from keepwarm.observations import MAX_BYTES as OBSERVATIONS_MAX_BYTES
from keepwarm.observations import PATH as OBSERVATIONS_PATH
from keepwarm.observations import Observer, Totals
from keepwarm.pricing import PriceTable, format_usd
from keepwarm.runner import PairState

log = logging.getLogger("keepwarm.web")


def cache_state(state: PairState, now: float) -> str:
    """A word for the page: warm, cold, uncached, error, parked or pending."""
    if state.parked:
        return "parked"
    if state.last_result is None:
        return "pending"
    if state.last_result.value == "uncached":
        return "uncached"
    if state.expires_at > now:
        return "warm"
    return "error" if state.last_result.value == "error" else "cold"


_STYLE = """
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}td,th{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}td.why{white-space:normal;min-width:16em}
.warm{color:#080;font-weight:600}.cold,.error,.parked{color:#b00;font-weight:600}
.uncached{color:#a60;font-weight:600}.pending{color:#666}code{font-size:12px}
.banner{background:#fee;border:1px solid #b00;padding:.5em 1em}span[title]{border-bottom:1px dotted #999}
"""
STATES = ("warm", "cold", "uncached", "error", "parked", "pending")  # the order of the header's counts


@dataclass(frozen=True)
class PageInfo:
    """What the status page shows beyond the pairs' states."""

    time_scale: float | None = None  # the emulator's (or a scaled run's) time factor; None: real time
    reload_ok: bool = True  # False after a rejected SIGHUP reload
    prices: PriceTable | None = None  # for the minimum behind an `uncached`
    policy: Callable[[str, float], str] | None = None  # a pair's policy in words (Scheduler.describe)


def _at(when: float, text: str) -> str:
    """`text` with the absolute UTC time on hover."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))
    return f'<span title="{stamp}">{html.escape(text)}</span>'


def _why(s: PairState, word: str, prices: PriceTable | None) -> str:
    """The problem column: the error, why the pair is parked, or why it does not cache."""
    if s.parked:
        return f"parked: {s.park_reason}"
    if word == "uncached":
        minimum = prices.get(s.pair.model).min_cacheable_tokens if prices is not None else None
        if minimum is not None and s.prefix_tokens < minimum:
            return f"{s.prefix_tokens:,} tokens < minimum {minimum:,}"
        return "caching did not activate (no breakpoint reached the model's minimum)"
    if s.mostly_uncached and not s.last_error:
        return "most of the prefix is sent uncached: move the cache_control marker to the end of the shared prefix"
    return s.last_error or ""


def _money(value: float, unknown: bool = False) -> str:
    text = f"${value:,.4f}" if value >= 0 else f"-${-value:,.4f}"
    return f"&ge; {text}" if unknown else text


def _rate(totals: Totals) -> str:
    rate = totals.hit_rate
    return "—" if rate is None else f"{rate:.1%}"


def render_headline(headline: dict[str, object] | None, now: float | None = None) -> str:
    """What the keepalive spent and saved over 24 h and 7 d, and production's hit rate per pair."""
    if headline is None:
        return ""
    now = time.time() if now is None else now
    windows = headline["windows"]
    pairs = headline["pairs"]
    since = headline["since"]
    assert isinstance(windows, dict) and isinstance(pairs, dict) and isinstance(since, float)
    cells = []
    for name, t in windows.items():
        net = t.net
        cells.append(
            f"<tr><td>last {html.escape(name)}</td><td class=n>{_money(t.keepalive_usd, t.keepalive_unknown)}</td>"
            f"<td class=n>{_money(t.saved_usd)}</td>"
            f'<td class="n {"warm" if net >= 0 else "error"}">{_money(net)}</td>'
            f"<td class=n>{t.requests}</td><td class=n>{_rate(t)}</td></tr>"
        )
    rows = [
        f"<tr><td>{html.escape(key)}</td><td class=n>{t.requests}</td><td class=n>{_rate(t)}</td>"
        f'<td class="n{" error" if t.drift else ""}">{t.drift}</td><td class=n>{_money(t.saved_usd)}</td></tr>'
        for key, t in pairs.items()
        if t.requests
    ]
    covers = f"since the daemon started {format_duration(round(now - since))} ago" if now - since < 7 * 86400 else ""
    note = f"<p><small>Figures held in memory, {covers}; whole hours.</small></p>" if covers else ""
    return (
        "<h2>Does the keepalive pay?</h2>"
        "<table><tr><th>window</th><th>keepalive spent</th><th>saved</th><th>net</th>"
        "<th>production requests</th><th>production hit rate</th></tr>" + "".join(cells) + "</table>" + note
        + ("<h2>Production, last 24 h</h2><table><tr><th>pair</th><th>requests</th><th>hit rate</th>"
           "<th>drift</th><th>saved</th></tr>" + "".join(rows) + "</table>" if rows else
           "<p>No production observations in the last 24 h (POST them to /v1/observations).</p>")
    )


def render_page(
    states: list[PairState], healthy: tuple[bool, str], now: float | None = None, info: PageInfo | None = None,
    headline: str = "",
) -> str:
    """The landing page: counts by state on top, then one row per pair; the page an operator opens first."""
    now = time.time() if now is None else now
    info = info or PageInfo()
    rows = []
    counts = dict.fromkeys(STATES, 0)
    for s in sorted(states, key=lambda s: s.pair.key):
        word = cache_state(s, now)
        counts[word] += 1
        expires = _at(s.expires_at, format_duration(round(s.expires_at - now))) if s.expires_at > now else "—"
        last = _at(s.last_start, f"{format_duration(round(now - s.last_start))} ago") if s.last_start else "never"
        spend = "unknown" if s.spend_unknown else format_usd(s.spend, 6)
        nxt = _at(s.next_due, f"in {format_duration(max(round(s.next_due - now), 0))}") if s.next_due else "—"
        rows.append(
            "<tr>"
            f"<td>{html.escape(s.pair.expert)}</td><td>{html.escape(s.pair.model)}</td>"
            f'<td class="{word}">{word}</td><td class="n">{expires}</td>'
            f"<td>{html.escape(s.last_result.value if s.last_result else '—')}</td>"
            f"<td>{last}</td><td>{nxt}</td><td class=\"n\">{s.pings}</td><td class=\"n\">{spend}</td>"
            f"<td><code>{s.pair.fingerprint[:12]}</code></td>"
            f"<td>{html.escape(info.policy(s.pair.key, now) if info.policy else s.pair.policy)}</td>"
            f'<td class="why">{html.escape(_why(s, word, info.prices))}</td>'
            "</tr>"
        )
    ok, why = healthy
    # Green only when every pair is warm or on its way: a healthy scheduler with parked or
    # cold pairs still needs the operator.
    trouble = counts["cold"] + counts["error"] + counts["parked"]
    health_class = "error" if not ok else ("uncached" if trouble else "warm")
    # Zero counts in grey: a red "0 cold" would draw the eye to nothing.
    summary = " · ".join(
        f'<span class="{w if counts[w] else "pending"}">{counts[w]} {w}</span>' for w in STATES if counts[w] or w != "error"
    )
    mode = "" if info.time_scale is None else f" · <b>emulator, time ×{info.time_scale:g}</b>"
    banner = (
        ""
        if info.reload_ok
        else '<p class="banner error">The last reload was rejected: the previous config keeps running'
        " (the log says why; keepwarm_config_last_reload_successful is 0).</p>"
    )
    return (
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5>"
        f"<title>keepwarm</title><style>{_STYLE}</style></head><body>"
        f"<h1>keepwarm {html.escape(__version__)}</h1>{banner}"
        f"<p>{len(states)} pairs: {summary}{mode}</p>"
        f"<p>Scheduler: <b class=\"{health_class}\">{html.escape(why)}</b> · "
        "<a href=/metrics>/metrics</a> · <a href=/healthz>/healthz</a> · <a href=/readyz>/readyz</a></p>"
        + headline
        + "<h2>Pairs</h2>"
        "<table><tr><th>expert</th><th>model</th><th>state</th><th>expires in</th><th>last result</th>"
        "<th>last ping</th><th>next ping</th><th>pings</th><th>spend</th><th>fingerprint</th><th>policy</th><th>problem</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )


def wants_gzip(accept_encoding: str) -> bool:
    """Whether an `Accept-Encoding` header accepts gzip (and does not refuse it with q=0)."""
    for part in accept_encoding.lower().split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip() in ("gzip", "x-gzip"):
            q = params.strip()
            return not (q.startswith("q=") and _q(q[2:]) == 0)
    return False


def _q(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 1.0



# The server's bounds (docs/observations.md): a worker pool sized for the handful of requests
# that can run at once (scrapes, health probes, observation batches); connections many times
# that, since an idle one costs a file descriptor and no thread.
WORKERS = 8
MAX_CONNECTIONS = 2000
IDLE_TIMEOUT = 60  # seconds a kept-alive connection may sit silent (Prometheus scrapes every 15-60 s)
REQUEST_TIMEOUT = 10.0  # seconds from a request's first byte to its last: header and body alike
MAX_HEADER_BYTES = 64 * 1024
# Bytes of a response waiting for a slow reader before its worker waits too (beyond 1 MB they
# wait in a temporary file, not in memory).
OUTBUF_HIGH = 16 * 1024 * 1024
_STATUS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 411: "Length Required", 413: "Content Too Large", 421: "Misdirected Request",
           500: "Internal Server Error", 503: "Service Unavailable"}

StartResponse = Callable[..., Any]


class App:
    """The daemon's routes as a WSGI application."""

    def __init__(self, server: WebServer) -> None:
        self.server = server

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/")
        try:
            if method == "POST":
                return self._post(environ, path, start_response)
            if method not in ("GET", "HEAD"):
                return _reply(start_response, 405, "text/plain; charset=utf-8", b"method not allowed\n", method,
                              [("Allow", "GET, HEAD, POST")])
            if path == "/metrics":
                return self._metrics(environ, method, start_response)
            return self._page(path, method, start_response)
        except Exception:  # noqa: BLE001 - a bad request must never take the daemon down
            log.exception("request handling failed")
            return _reply(start_response, 500, "application/json",
                          b'{"error": "internal error; see the daemon\'s log"}\n', method)

    def _page(self, path: str, method: str, start_response: StartResponse) -> Iterable[bytes]:
        server = self.server
        if path in ("/healthz", "/readyz"):
            # /healthz is liveness (the process and its scheduler run: a slow API must
            # never restart us); /readyz is readiness (pings go out on time).
            check = server.live if path == "/healthz" and server.live is not None else server.health
            ok, why = check()
            return _reply(start_response, 200 if ok else 503, "text/plain; charset=utf-8", (why + "\n").encode(), method)
        if path == "/":
            info = server.page_info() if server.page_info is not None else None
            observer = server.observer
            headline = render_headline(observer.headline()) if observer is not None else ""
            page = render_page(server.states(), server.health(), info=info, headline=headline)
            return _reply(start_response, 200, "text/html; charset=utf-8", page.encode(), method)
        return _reply(start_response, 404, "text/plain; charset=utf-8", b"not found\n", method)

    def _post(self, environ: dict[str, Any], path: str, start_response: StartResponse) -> Iterable[bytes]:
        observer = self.server.observer
        if path != OBSERVATIONS_PATH or observer is None:
            return _reply(start_response, 404, "text/plain; charset=utf-8", b"not found\n", "POST")
        stream = environ["wsgi.input"]
        # waitress has the whole body by now (it never hands a worker a half-sent request).
        status, doc = observer.post(environ.get("HTTP_AUTHORIZATION"), environ.get("CONTENT_LENGTH") or None,
                                    stream.read)
        extra = [("Retry-After", str(doc["retry_after"]))] if status == 503 and "retry_after" in doc else []
        return _reply(start_response, status, "application/json", (json.dumps(doc) + "\n").encode(), "POST", extra)

    def _metrics(self, environ: dict[str, Any], method: str, start_response: StartResponse) -> Iterable[bytes]:
        gzipped = wants_gzip(environ.get("HTTP_ACCEPT_ENCODING", ""))
        headers = [("Content-Type", CONTENT_TYPE_LATEST), ("Vary", "Accept-Encoding")]
        if gzipped:
            headers.append(("Content-Encoding", "gzip"))
        # 10,000 pairs are ~17 MB of text: it is written as it is made (chunked: no length up front).
        start_response("200 OK", headers)
        if method == "HEAD":
            return []
        return self._exposition(gzipped)

    def _exposition(self, gzipped: bool) -> Iterator[bytes]:
        try:
            chunks = self.server.metrics.exposition()
            if not gzipped:
                yield from chunks
                return
            # Level 1: the text is repetitive enough that it already shrinks ~20x, and
            # higher levels cost more CPU per scrape than they save in bytes.
            packer = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            for chunk in chunks:
                packed = packer.compress(chunk)
                if packed:
                    yield packed
            yield packer.flush()
        finally:
            # A scrape of 10,000 pairs makes megabytes of text on a worker thread; freed, it
            # would stay in the process's resident size (keepwarm.heap).
            release_free_memory()


def _reply(start_response: StartResponse, status: int, ctype: str, body: bytes, method: str,
           extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    start_response(f"{status} {_STATUS.get(status, '')}".strip(),
                   [("Content-Type", ctype), ("Content-Length", str(len(body))), *(extra or [])])
    return [] if method == "HEAD" else [body]


class _OneLine(logging.Filter):
    """waitress logs a reset connection with its traceback: one line instead (`--log-format json`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_waitress() -> None:
    for name in ("waitress", "waitress.queue"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OneLine) for f in logger.filters):
            logger.addFilter(_OneLine())
    # "Task queue depth is N": every burst of observations would log it.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


def _raise_open_files(wanted: int) -> None:
    """Lift the soft limit on open files towards `wanted` (systemd's default soft limit is 1,024)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:  # the cap then bites earlier; serving goes on
        log.warning("cannot raise the open-file limit: %s", exc)


class WebServer:
    """The daemon's HTTP server: waitress with a bounded pool, a connection cap and timeouts."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        states: Callable[[], list[PairState]],
        health: Callable[[], tuple[bool, str]],
        page_info: Callable[[], PageInfo] | None = None,
        observer: Observer | None = None,
        live: Callable[[], tuple[bool, str]] | None = None,
        *,
        workers: int = WORKERS,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: int = IDLE_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.metrics = metrics
        self.observer = observer
        self.states = states
        self.health = health
        self.live = live
        self.page_info = page_info
        _quiet_waitress()
        _raise_open_files(max_connections + 256)  # the pings' own sockets and the ledger need some too
        self.server = _serve(App(self), host, port, workers, max_connections, idle_timeout, request_timeout)
        self.server.on_refused = self._refused
        self._thread = threading.Thread(target=self.server.run, name="keepwarm-http", daemon=True)

    def _refused(self, path: str, status: int) -> None:
        """Count an observations request that waitress refused before the observer saw it."""
        if self.observer is not None and path == OBSERVATIONS_PATH:
            self.metrics.observations_rejected.labels("too_large" if status == 413 else "malformed").inc()

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the port is real even when 0 was asked for)."""
        host, port = self.server.socket.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving: close the listening socket and every connection, and end the workers."""
        server = self.server
        if self._thread.is_alive():
            server.stop_requested = True
            try:
                server.trigger.pull_trigger()  # wakes the loop now; else its next second's maintenance
            except OSError:
                pass
            self._thread.join(5)
        else:
            server.close_all()
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)


class _ErrorTask(ErrorTask):  # type: ignore[misc]
    """waitress's answer to a request it refused itself (too large, bad header): counted first."""

    def execute(self) -> None:
        on_refused = self.channel.server.on_refused
        if on_refused is not None:
            try:
                on_refused(str(getattr(self.request, "path", "") or ""), int(getattr(self.request.error, "code", 400)))
            except Exception:  # noqa: BLE001 - counting must not stop the answer
                log.debug("cannot count a refused request", exc_info=True)
        super().execute()


class _Channel(HTTPChannel):  # type: ignore[misc]  # waitress is untyped
    """A connection whose request must arrive within a deadline, however slowly it trickles."""

    error_task_class = _ErrorTask

    started = 0.0  # when the request now being read began arriving (0: none)
    _tracked: object = None  # the request `started` belongs to

    def received(self, data: bytes) -> bool:
        try:
            return bool(super().received(data))
        finally:
            if self.request is None:  # complete (queued for a worker) or nothing pending
                self.started = 0.0
            elif self.request is not self._tracked:  # a new request began arriving
                self.started = time.monotonic()
            self._tracked = self.request


class _Server(waitress.server.TcpWSGIServer):  # type: ignore[misc]
    channel_class = _Channel
    request_timeout = REQUEST_TIMEOUT
    stop_requested = False
    on_refused: Callable[[str, int], None] | None = None  # (path, status) of what waitress refused itself

    def readable(self) -> bool:
        """Asked by the event loop on every turn: where a stop is carried out, on the loop's thread."""
        if self.stop_requested:
            self.close_all()
            return False
        return bool(super().readable())

    def close_all(self) -> None:
        """Close every connection, the trigger and the listening socket: the loop's map empties and it returns."""
        for channel in list(self._map.values()):
            if channel is not self and channel is not self.trigger:
                # handle_close, not close: it also wakes a worker waiting for the client to read.
                channel.handle_close()
        self.close()

    def maintenance(self, now: float) -> None:
        """waitress closes idle connections; also close one whose request is overdue (slowloris)."""
        super().maintenance(now)
        overdue = time.monotonic() - self.request_timeout
        # A client that asked for a page and reads none of it keeps a worker waiting on a full
        # buffer: after this long without a byte taken, its connection goes.
        stalled = now - 3 * self.request_timeout
        for channel in list(self.active_channels.values()):
            if not isinstance(channel, _Channel):
                continue
            # Stuck: an answer begun (bytes waiting to go out) and none taken for a while. A request
            # still waiting in the queue for a worker has no output yet and is left alone.
            if channel.requests and channel.total_outbufs_len and channel.last_activity < stalled:
                # will_close waits for the socket to be writable, which it never is here: close it
                # outright (on the loop's next turn), which also wakes the worker waiting on it.
                self.trigger.pull_trigger(channel.handle_close)
            elif channel.started and channel.started < overdue:
                channel.will_close = True


def _serve(app: App, host: str, port: int, workers: int, max_connections: int, idle_timeout: int,
           request_timeout: float) -> _Server:
    from waitress.adjustments import Adjustments

    adj = Adjustments(
        host=host.strip("[]"),
        port=port,
        threads=workers,
        connection_limit=max_connections,
        channel_timeout=idle_timeout,
        cleanup_interval=1,  # how often idle and overdue connections are looked for
        max_request_header_size=MAX_HEADER_BYTES,
        # Bodies past the observations' limit are refused by waitress itself; up to it the
        # observer answers (and counts) 413 after checking the token.
        max_request_body_size=OBSERVATIONS_MAX_BYTES + 1,
        asyncore_use_poll=True,  # select() stops at 1,024 descriptors
        outbuf_high_watermark=OUTBUF_HIGH,
        log_socket_errors=False,
        expose_tracebacks=False,
        ident="keepwarm",
        clear_untrusted_proxy_headers=True,
    )
    server = _Server(app, adj=adj, _start=True)
    server.request_timeout = request_timeout
    return server
