"""A fuzz test of POST /v1/observations over real sockets: random JSON shapes, sizes, encodings,
headers and connection behaviours, against the daemon's server with a real ledger.

Whatever arrives: never a 500, never a traceback, every observation answered as accepted is
counted once and written once, and a scrape running beside it all never stalls. Bounded: a fixed
seed, a few hundred requests, a deadline on every socket.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

from test_observations import T0, FakeClock, _config, _mutant, _obs, _value

from keepwarm.metrics import Metrics
from keepwarm.observations import MAX_BYTES, Observer
from keepwarm.store import Ledger
from keepwarm.web import WebServer

PAIRS = ["analyst/claude-sonnet-4-6", "terse/claude-sonnet-4-6"]
REQUESTS = 400


def _nested(rng: random.Random, depth: int) -> Any:
    if depth <= 0 or rng.random() < 0.3:
        return rng.choice([None, True, 0, -1, 2**64, 1e308, "x", "\ud800", "", [], {}])
    if rng.random() < 0.5:
        return [_nested(rng, depth - 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["observations", "expert", "usage", "at", "k"]): _nested(rng, depth - 1) for _ in range(3)}


def _body(rng: random.Random, n: int) -> bytes:
    """One request body: mostly observations near valid, sometimes anything at all."""
    roll = rng.random()
    if roll < 0.55:
        items = []
        for _ in range(rng.choice([1, 1, 3, 20, 200])):
            item = _mutant(rng, PAIRS) if rng.random() < 0.5 else _obs(rng.choice(PAIRS), at=T0 - rng.randrange(900),
                                                                           read=rng.choice([0, 1500]))
            if isinstance(item, dict) and rng.random() < 0.7:
                item["request_id"] = f"req_{rng.randrange(n * 3)}"  # some repeat: retries
            items.append(item)
        doc: Any = items[0] if len(items) == 1 and rng.random() < 0.5 else {"observations": items}
        text = json.dumps(doc, allow_nan=True)
    elif roll < 0.7:
        text = json.dumps(_nested(rng, rng.randrange(1, 8)))
    elif roll < 0.78:
        depth = rng.choice([10, 1000, 50_000])
        text = "[" * depth + "]" * depth
    elif roll < 0.85:
        text = json.dumps({"observations": [_obs()] * 50})[: rng.randrange(1, 200)]  # cut short
    elif roll < 0.9:
        text = '{"observations": [' + ",".join([json.dumps(_obs())] * 4000) + "]}"  # over a MiB
    else:
        text = json.dumps(_obs()).replace('"output_tokens": 5', '"output_tokens": ' + "9" * rng.choice([20, 5000]))
    data = text.encode("utf-8", "surrogatepass")
    encoding = rng.random()
    if encoding < 0.05:
        data = text.encode("utf-16", "surrogatepass")
    elif encoding < 0.1:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
    elif encoding < 0.13:
        data = b"\xef\xbb\xbf" + data  # a BOM
    return data


def _request(rng: random.Random, body: bytes) -> tuple[bytes, str]:
    """The raw request and how the connection behaves: whole, cut short, reset, pipelined, chunked."""
    headers = [b"POST /v1/observations HTTP/1.1", b"Host: 127.0.0.1"]
    if rng.random() < 0.9:
        headers.append(rng.choice([b"Content-Type: application/json", b"Content-Type: text/plain",
                                   b"Content-Type: application/json; charset=latin-1"]))
    if rng.random() < 0.05:
        headers.append(b"Authorization: Bearer " + bytes(rng.randrange(32, 127) for _ in range(20)))
    if rng.random() < 0.05:
        headers.append(b"Expect: 100-continue")
    behaviour = rng.choices(["whole", "short_length", "long_length", "no_length", "chunked", "cut", "reset", "pipelined"],
                            weights=[60, 5, 5, 5, 5, 8, 7, 5])[0]
    if behaviour == "chunked":
        headers.append(b"Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 500]), body[i:i + 500]) for i in range(0, len(body), 500))
        return b"\r\n".join(headers) + b"\r\n\r\n" + payload + b"0\r\n\r\n", behaviour
    if behaviour != "no_length":
        length = len(body) + (-1 if behaviour == "short_length" and body else 0) + (7 if behaviour == "long_length" else 0)
        headers.append(b"Content-Length: %d" % length)
    raw = b"\r\n".join(headers) + b"\r\n\r\n" + body
    if behaviour == "pipelined":
        raw = raw + raw.replace(b"Host: 127.0.0.1", b"Host: 127.0.0.1\r\nConnection: close")
    return raw, behaviour


def _answers(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in what the server sent back."""
    out = []
    while data.startswith(b"HTTP/1.") and b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
        if len(rest) < length:
            break  # not all of it yet
        if status >= 200:  # not a 100 Continue
            out.append((status, rest[:length]))
        data = rest[length:]
    return out


def _send(address: tuple[str, int], raw: bytes, behaviour: str) -> list[tuple[int, bytes]]:
    with socket.create_connection(address, timeout=5) as s:
        if behaviour in ("cut", "long_length"):  # a body that never ends: sent, then the client goes
            s.sendall(raw[: max(1, len(raw) // 2)] if behaviour == "cut" else raw)
            return []
        if behaviour == "reset":
            s.sendall(raw[: max(1, len(raw) * 3 // 4)])
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return []
        try:
            s.sendall(raw)
        except OSError:
            return []  # refused early (413 before the body): the server closed while we sent
        s.shutdown(socket.SHUT_WR) if behaviour in ("pipelined", "short_length") else None
        data = b""
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except OSError:
                break
            if not chunk:
                break
            data += chunk
            if len(_answers(data)) >= (2 if behaviour == "pipelined" else 1):
                break
        return _answers(data)


def test_the_endpoint_survives_anything(tmp_path: Path, capfd: Any, caplog: Any) -> None:
    rng = random.Random(21)
    clock = FakeClock(T0)
    ledger = Ledger(tmp_path / "l.db", clock=clock)
    metrics = Metrics()
    observer = Observer(_config(tmp_path), metrics, clock=clock, ledger=lambda: ledger)
    web = WebServer("127.0.0.1", 0, metrics, states=lambda: [], health=lambda: (True, "ok"), observer=observer,
                    request_timeout=1.0, idle_timeout=2)
    web.start()
    stop = threading.Event()
    scrapes: list[float] = []

    def scrape() -> None:
        while not stop.wait(0.2):
            start = time.monotonic()
            with socket.create_connection(web.address, timeout=10) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                while s.recv(65536):
                    pass
            scrapes.append(time.monotonic() - start)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    statuses: dict[int, int] = {}
    fresh = 0
    try:
        for n in range(REQUESTS):
            body = _body(rng, REQUESTS)
            raw, behaviour = _request(rng, body)
            for status, answer in _send(web.address, raw, behaviour):
                statuses[status] = statuses.get(status, 0) + 1
                assert status != 500 and status < 500, (n, behaviour, body[:200], answer[:300])
                if status == 202:
                    doc = json.loads(answer)
                    fresh += doc["accepted"] - doc.get("duplicates", 0)
    finally:
        stop.set()
        scraper.join(15)
        web.stop()
    assert statuses.get(202, 0) > REQUESTS // 4 and statuses.get(400, 0) > 10 and statuses.get(413, 0) > 0, statuses
    # Nothing answered as accepted is lost or counted twice: the counters and the ledger agree.
    counted = sum(_value(metrics, "keepwarm_production_requests_total", expert=p.split("/")[0], model=p.split("/")[1],
                         result=r) or 0 for p in PAIRS for r in ("warm", "rewarmed", "partial", "uncached"))
    assert counted == fresh > 0
    assert len(ledger.observations()) == fresh and ledger.pending == 0 and ledger.write_errors == 0
    ledger.close()
    assert scrapes and max(scrapes) < 5, f"a scrape stalled: {max(scrapes, default=0):.1f} s"
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.exc_info or "\n" in r.getMessage()]
    assert MAX_BYTES == 1024 * 1024
