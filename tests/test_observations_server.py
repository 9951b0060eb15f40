"""The listener under attack: idle, trickling and resetting clients against scrapes and observations."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_observations import T0, FakeClock, _config, _obs

from keepwarm.metrics import Metrics
from keepwarm.observations import Observer
from keepwarm.web import WORKERS, WebServer


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebServer]:
    metrics = Metrics(per_pair="full")
    for i in range(2000):  # a page bigger than the socket buffers
        metrics.pings.labels(f"expert-{i}", "claude-sonnet-4-6", "warm").inc()
    observer = Observer(_config(tmp_path), metrics, clock=FakeClock(T0))
    server = WebServer("127.0.0.1", 0, metrics, states=lambda: [], health=lambda: (True, "ok"), observer=observer,
                       live=lambda: (True, "alive"), idle_timeout=2, request_timeout=1.0)
    server.start()
    yield server
    server.stop()


def _get(web: WebServer, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*web.address, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Accept-Encoding": "gzip"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes the connection within `within` seconds (after an answer or not)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def test_idle_and_trickling_connections_hold_no_worker_and_scrapes_go_on(web: WebServer) -> None:
    threads_before = threading.active_count()
    idle = [socket.create_connection(web.address) for _ in range(300)]
    slow = [socket.create_connection(web.address) for _ in range(3 * WORKERS)]
    try:
        for s in slow:
            s.sendall(b"POST /v1/observations HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        start = time.monotonic()
        for _ in range(5):
            assert _get(web, "/metrics")[0] == 200
            assert _get(web, "/healthz") == (200, b"alive\n")
        assert time.monotonic() - start < 5, "five scrapes past 300 idle and 24 half-sent requests"
        assert threading.active_count() <= threads_before + WORKERS, "no thread per connection"
    finally:
        for s in idle + slow:
            s.close()


def test_a_request_that_trickles_in_is_cut_off_and_an_idle_one_closed(web: WebServer) -> None:
    with socket.create_connection(web.address) as trickle, socket.create_connection(web.address) as idle:
        trickle.sendall(b"GET /metrics HTTP/1.1\r\n")
        deadline = time.monotonic() + 4
        closed = False
        while time.monotonic() < deadline and not closed:
            try:
                trickle.sendall(b"X")  # a byte at a time: activity, but the request never completes
            except OSError:
                closed = True
                break
            trickle.settimeout(0.3)
            try:
                closed = trickle.recv(1024) == b""
            except TimeoutError:
                pass
        assert closed, "the 1 s request deadline closed it, however active"
        assert _closed_by_server(idle, within=5), "the 2 s idle timeout closed the silent one"


def test_a_reset_connection_logs_one_line_at_most(web: WebServer, caplog: Any, capfd: Any) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(10):
        with socket.create_connection(web.address) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(100)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, as a timed-out scraper
        with socket.create_connection(web.address) as s:
            body = json.dumps(_obs(read=1500)).encode()
            s.sendall(b"POST /v1/observations HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert _get(web, "/metrics")[0] == 200
    assert "Traceback" not in capfd.readouterr().err
    assert all("\n" not in r.getMessage() and not r.exc_info for r in caplog.records)


def test_a_bad_request_line_or_header_is_a_4xx(web: WebServer) -> None:
    for raw in (b"\x00\x01\x02 garbage\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n"):
        with socket.create_connection(web.address, timeout=5) as s:
            s.sendall(raw)
            answer = s.recv(100)
            assert answer.startswith(b"HTTP/1.") and answer.split()[1][:1] == b"4", answer
    assert _get(web, "/healthz")[0] == 200


def test_a_scraper_that_reads_nothing_frees_its_worker(tmp_path: Path, monkeypatch: Any) -> None:
    import keepwarm.web as web_module

    monkeypatch.setattr(web_module, "OUTBUF_HIGH", 64 * 1024)  # the worker waits once 64 kB are unread
    metrics = Metrics(per_pair="full")
    for i in range(3000):
        metrics.pings.labels(f"expert-{i}", "claude-sonnet-4-6", "warm").inc()
    server = WebServer("127.0.0.1", 0, metrics, states=lambda: [], health=lambda: (True, "ok"), workers=1,
                       request_timeout=0.3)
    server.start()
    try:
        with socket.create_connection(server.address) as stuck:
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stuck.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads the answer
            time.sleep(0.3)
            start = time.monotonic()
            assert _get(server, "/healthz", timeout=10) == (200, b"ok\n"), "the only worker came back"
            assert time.monotonic() - start < 5
    finally:
        server.stop()
