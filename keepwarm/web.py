"""The HTTP face of the daemon: `/metrics`, `/healthz`, a landing page at `/`, and
`POST /v1/observations` (handled by `keepwarm.observations`)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

from keepwarm.heap import release_free_memory
from keepwarm.metrics import Metrics
from keepwarm.observations import PATH as OBSERVATIONS_PATH
from keepwarm.observations import Observer

# The page moved to keepwarm.page; these names stay importable from here for existing callers.
from keepwarm.page import PageInfo as PageInfo
from keepwarm.page import _money as _money
from keepwarm.page import cache_state as cache_state
from keepwarm.page import render_headline, render_page
from keepwarm.runner import PairState

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


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class WebServer:
    """A small threaded HTTP server for the daemon's three pages."""

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
    ) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                # Monitoring probes and load balancers ask HEAD: the headers a GET would send.
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._metrics_headers(wants_gzip(self.headers.get("Accept-Encoding", "")))
                else:
                    self._head_only = True
                    try:
                        self.do_GET()
                    finally:
                        self._head_only = False

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._metrics()
                elif path in ("/healthz", "/readyz"):
                    # /healthz is liveness (the process and its scheduler run: a slow API must
                    # never restart us); /readyz is readiness (pings go out on time).
                    check = server.live if path == "/healthz" and server.live is not None else server.health
                    ok, why = check()
                    self._send(200 if ok else 503, "text/plain; charset=utf-8", (why + "\n").encode())
                elif path == "/":
                    info = server.page_info() if server.page_info is not None else None
                    observer = server.observer
                    headline = render_headline(observer.headline()) if observer is not None else ""
                    page = render_page(server.states(), server.health(), info=info, headline=headline)
                    self._send(200, "text/html; charset=utf-8", page.encode())
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found\n")

            def do_POST(self) -> None:
                observer = server.observer
                if self.path.split("?", 1)[0] != OBSERVATIONS_PATH or observer is None:
                    self._send(404, "text/plain; charset=utf-8", b"not found\n")
                    return
                try:
                    status, doc = observer.post(
                        self.headers.get("Authorization"), self.headers.get("Content-Length"), self.rfile.read
                    )
                except Exception:  # noqa: BLE001 - a bad observation must never take the daemon down
                    log.exception("observation handling failed")
                    status, doc = 500, {"error": "internal error; see the daemon's log"}
                if status in (401, 411, 413):
                    self.close_connection = True  # the body was not read: the connection cannot be reused
                self._send(status, "application/json", (json.dumps(doc) + "\n").encode())


            def _metrics_headers(self, gzipped: bool) -> None:
                # 10,000 pairs are ~17 MB of text: it is written as it is made, and the end of
                # the connection marks the end of the body (no Content-Length to know up front).
                self.close_connection = True
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                if gzipped:
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Vary", "Accept-Encoding")
                self.send_header("Connection", "close")
                self.end_headers()

            def _metrics(self) -> None:
                try:
                    self._write_metrics()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the scraper gave up (its scrape_timeout): nothing to answer any more
                finally:
                    # A scrape of 10,000 pairs makes megabytes of text on this fresh thread;
                    # freed, it would stay in the process's resident size (keepwarm.heap).
                    release_free_memory()

            def _write_metrics(self) -> None:
                gzipped = wants_gzip(self.headers.get("Accept-Encoding", ""))
                self._metrics_headers(gzipped)
                chunks = server.metrics.exposition()
                if not gzipped:
                    for chunk in chunks:
                        self.wfile.write(chunk)
                    return
                # Level 1: the text is repetitive enough that it already shrinks ~20x, and
                # higher levels cost more CPU per scrape than they save in bytes.
                packer = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
                for chunk in chunks:
                    self.wfile.write(packer.compress(chunk))
                self.wfile.write(packer.flush())

            def _send(self, status: int, ctype: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not getattr(self, "_head_only", False):
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every 15 s would drown the ping log

        self.metrics = metrics
        self.observer = observer
        self.states = states
        self.health = health
        self.live = live
        self.page_info = page_info
        server_class = _V6Server if ":" in host else ThreadingHTTPServer
        self.httpd = server_class((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="keepwarm-http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the port is real even when 0 was asked for)."""
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()
