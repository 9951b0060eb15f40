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

import json
import logging
import resource
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import waitress.server
from prometheus_client import CONTENT_TYPE_LATEST
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

from keepwarm.heap import release_free_memory
from keepwarm.metrics import Metrics
from keepwarm.observations import MAX_BYTES as OBSERVATIONS_MAX_BYTES
from keepwarm.observations import PATH as OBSERVATIONS_PATH
from keepwarm.observations import Observer

# The page moved to keepwarm.page; these names stay importable from here for existing callers.
from keepwarm.page import PageInfo as PageInfo
from keepwarm.page import _money as _money
from keepwarm.page import cache_state as cache_state
from keepwarm.page import render_headline, render_page
from keepwarm.runner import PairState
from keepwarm.webconfig import BasicAuth, WebSettings

log = logging.getLogger("keepwarm.web")


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
# Paths open without basic auth (docs/observations.md, "TLS and basic auth"): the probes say only
# whether the daemon lives and pings on time, and a kubelet has no password to send;
# observations carry their own bearer token.
OPEN_PATHS = ("/healthz", "/readyz")
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
        headers = self.server.web.headers
        if headers:
            start_response = _adding(start_response, headers)
        try:
            auth = self.server.auth
            if (auth is not None and path not in OPEN_PATHS and not (method == "POST" and path == OBSERVATIONS_PATH)
                    and not auth.check(environ.get("HTTP_AUTHORIZATION"))):
                return _reply(start_response, 401, "text/plain; charset=utf-8", b"unauthorized\n", method,
                              [("WWW-Authenticate", 'Basic realm="keepwarm", charset="UTF-8"')])
            if method == "POST":
                return self._post(environ, path, start_response)
            if method not in ("GET", "HEAD"):
                return _reply(start_response, 405, "text/plain; charset=utf-8", b"method not allowed\n", method,
                              [("Allow", "GET, HEAD, POST")])
            if self.server.observer is not None and path in ("/metrics", "/"):
                # Savings whose wait is over reach the counters before they are read.
                self.server.observer.settle()
            if path == "/metrics":
                return self._metrics(environ, method, start_response)
            if path == OBSERVATIONS_PATH and self.server.observer is not None:
                # The endpoint exists, for POST only: say so, as HTTP does, rather than "not found".
                return _reply(start_response, 405, "text/plain; charset=utf-8",
                              b"method not allowed: POST observations here (see docs/observations.md)\n", method,
                              [("Allow", "POST")])
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


def _adding(start_response: StartResponse, extra: tuple[tuple[str, str], ...]) -> StartResponse:
    """`start_response` that also sends the web config's headers."""

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return start_response(status, [*headers, *extra], exc_info)

    return start


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
        web: WebSettings | None = None,
    ) -> None:
        self.metrics = metrics
        self.observer = observer
        self.states = states
        self.health = health
        self.live = live
        self.page_info = page_info
        _quiet_waitress()
        _raise_open_files(max_connections + 256)  # the pings' own sockets and the ledger need some too
        self.web = WebSettings()
        self.auth: BasicAuth | None = None
        self.server = _serve(App(self), host, port, workers, max_connections, idle_timeout, request_timeout)
        self.server.on_refused = self._refused
        self.apply_web(web or WebSettings())
        self._thread = threading.Thread(target=self.server.run, name="keepwarm-http", daemon=True)

    def apply_web(self, web: WebSettings) -> None:
        """Take a (re)loaded web config: TLS for connections accepted from now on, the users, the headers."""
        if web.users and web.ssl_context is None:
            log.warning("web config %s: basic_auth_users without tls_server_config: passwords cross the"
                        " network in clear", web.path)
        self.auth = BasicAuth(web.users) if web.users else None
        self.server.ssl_context = web.ssl_context
        self.web = web

    @property
    def scheme(self) -> str:
        """`https` when connections are served over TLS, else `http`."""
        return "https" if self.server.ssl_context is not None else "http"

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


class _TlsChannel(_Channel):
    """A connection over TLS, driven without blocking the event loop.

    The socket is wrapped as it is accepted and the handshake runs as the client's bytes arrive
    (an `SSLWantReadError` is "wait for more", not an error), within the same request timeout as
    a request: a client that opens a connection and never finishes its handshake holds no
    worker and is closed. Decrypted bytes can wait inside the TLS layer where poll() cannot see
    them, so a read takes everything pending before it returns.
    """

    _handshaken = False
    _want_write = False  # the handshake waits to send, not to receive
    connected: bool

    def __init__(self, server: _Server, sock: Any, addr: Any, adj: Any, map: Any = None) -> None:  # noqa: A002 - waitress's name
        context = server.accepting_with
        assert context is not None  # the server picks this class only with a context
        super().__init__(server, context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr, adj,
                         map)
        self.started = time.monotonic()  # the handshake too must end within the request timeout

    def _handshake(self) -> bool:
        try:
            self.socket.do_handshake()
        except ssl.SSLWantReadError:
            self._want_write = False
            return False
        except ssl.SSLWantWriteError:
            self._want_write = True
            return False
        except OSError as exc:  # plain HTTP on a TLS port, an unknown client certificate, a reset
            log.debug("TLS handshake failed: %s", exc)
            self.handle_close()
            return False
        self._handshaken, self._want_write, self.started = True, False, 0.0
        return True

    def readable(self) -> bool:
        return self._handshaken is False or bool(super().readable())

    def writable(self) -> bool:
        if not self._handshaken:
            return self._want_write or bool(self.will_close)
        return bool(super().writable())

    def handle_write(self) -> None:
        if self._handshaken:
            super().handle_write()
        elif self.will_close:
            self.handle_close()
        else:
            self._handshake()

    def handle_read(self) -> None:
        if not self._handshaken and not self._handshake():
            return
        sock = self.socket
        while self.connected:
            try:
                data = sock.recv(self.adj.recv_bytes)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as exc:  # a TLS alert, a reset
                log.debug("TLS read failed: %s", exc)
                self.handle_close()
                return
            if not data:  # the client closed the connection
                self.handle_close()
                self.connected = False
                return
            self.last_activity = time.time()
            self.received(data)
            if not sock.pending():
                return

    def send(self, data: bytes, do_close: bool = True) -> int:
        try:
            return int(super().send(data, do_close=do_close))
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0
        except ssl.SSLError as exc:
            log.debug("TLS write failed: %s", exc)
            if do_close:
                self.handle_close()
            return 0


class _Server(waitress.server.TcpWSGIServer):  # type: ignore[misc]
    channel_class = _Channel
    ssl_context: ssl.SSLContext | None = None  # set: connections accepted from then on speak TLS
    accepting_with: ssl.SSLContext | None = None  # the context of the connection being accepted
    request_timeout = REQUEST_TIMEOUT
    stop_requested = False
    on_refused: Callable[[str, int], None] | None = None  # (path, status) of what waitress refused itself

    def handle_accept(self) -> None:
        """Accept one connection, over TLS when a context is set (read once: a reload may swap it)."""
        self.accepting_with = self.ssl_context
        self.channel_class = _Channel if self.accepting_with is None else _TlsChannel
        super().handle_accept()

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
