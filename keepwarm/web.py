"""The HTTP face of the daemon: `/metrics`, `/healthz`, and a landing page at `/`."""

from __future__ import annotations

import html
import socket
import threading
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

from keepwarm import __version__
from keepwarm.durations import format_duration
from keepwarm.metrics import Metrics
from keepwarm.runner import PairState


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
table{border-collapse:collapse}td,th{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.warm{color:#080;font-weight:600}.cold,.error,.parked{color:#b00;font-weight:600}
.uncached{color:#a60;font-weight:600}.pending{color:#666}code{font-size:12px}
"""


def render_page(states: list[PairState], healthy: tuple[bool, str], now: float | None = None) -> str:
    """The landing page: one row per pair, the page an operator opens first."""
    now = time.time() if now is None else now
    rows = []
    for s in sorted(states, key=lambda s: s.pair.key):
        word = cache_state(s, now)
        expires = format_duration(round(s.expires_at - now)) if s.expires_at > now else "—"
        last = f"{format_duration(round(now - s.last_start))} ago" if s.last_start else "never"
        spend = "unknown" if s.spend_unknown else f"${s.spend:.6f}"
        nxt = f"in {format_duration(max(round(s.next_due - now), 0))}" if s.next_due else "—"
        rows.append(
            "<tr>"
            f"<td>{html.escape(s.pair.expert)}</td><td>{html.escape(s.pair.model)}</td>"
            f'<td class="{word}">{word}</td><td class="n">{expires}</td>'
            f"<td>{html.escape(s.last_result.value if s.last_result else '—')}</td>"
            f"<td>{last}</td><td>{nxt}</td><td class=\"n\">{s.pings}</td><td class=\"n\">{spend}</td>"
            f"<td><code>{s.pair.fingerprint[:12]}</code></td>"
            f"<td>{html.escape(s.last_error or s.parked or '')}</td>"
            "</tr>"
        )
    ok, why = healthy
    return (
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5>"
        f"<title>keepwarm</title><style>{_STYLE}</style></head><body>"
        f"<h1>keepwarm {html.escape(__version__)}</h1>"
        f"<p>Health: <b class=\"{'warm' if ok else 'error'}\">{html.escape(why)}</b> · "
        f"{len(states)} pairs · <a href=/metrics>/metrics</a> · <a href=/healthz>/healthz</a></p>"
        "<table><tr><th>expert</th><th>model</th><th>state</th><th>expires in</th><th>last result</th>"
        "<th>last ping</th><th>next ping</th><th>pings</th><th>spend</th><th>fingerprint</th><th>problem</th></tr>"
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
                elif path == "/healthz":
                    ok, why = server.health()
                    self._send(200 if ok else 503, "text/plain; charset=utf-8", (why + "\n").encode())
                elif path == "/":
                    page = render_page(server.states(), server.health())
                    self._send(200, "text/html; charset=utf-8", page.encode())
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found\n")

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
        self.states = states
        self.health = health
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
