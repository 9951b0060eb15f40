"""The emulator over raw HTTP: authentication, headers, validation messages, the control
endpoint, and `serve()` as a real process."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

from keepwarm.emulator import Emulator

REPO = Path(__file__).resolve().parent.parent
SONNET = "claude-sonnet-4-6"
PING_BODY: Any = {"model": SONNET, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}
GOOD_KEY = "sk-test-good"


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with Emulator(api_keys=[GOOD_KEY, "sk-test-other"]) as emu:
        yield emu


@pytest.fixture(autouse=True)
def clean(emulator: Emulator) -> None:
    emulator.clear_faults()
    emulator.clear_log()
    emulator.expire_all()


def call(
    emu: Emulator,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One request on a fresh connection: (status, lower-cased headers, parsed JSON body)."""
    connection = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=5)
    try:
        payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        connection.request(method, path, body=payload, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(data)
    finally:
        connection.close()


def post(emu: Emulator, body: Any, key: str | None = GOOD_KEY, path: str = "/v1/messages") -> tuple[int, dict[str, str], Any]:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["x-api-key"] = key
    return call(emu, "POST", path, body, headers)


# --- authentication -----------------------------------------------------------------------


def test_x_api_key_and_bearer_are_both_accepted(emulator: Emulator) -> None:
    assert post(emulator, PING_BODY)[0] == 200
    status, _, _ = call(
        emulator, "POST", "/v1/messages", PING_BODY, {"Authorization": f"Bearer {GOOD_KEY}"}
    )
    assert status == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"x-api-key": "sk-test-wrong"}, {"Authorization": "Bearer sk-test-wrong"}, {"Authorization": GOOD_KEY}],
)
def test_missing_or_wrong_key_is_401(emulator: Emulator, headers: dict[str, str]) -> None:
    status, response_headers, body = call(emulator, "POST", "/v1/messages", PING_BODY, headers)
    assert status == 401
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert body["request_id"] == response_headers["request-id"]
    entry = emulator.log[-1]
    assert entry.status == 401 and entry.error_type == "authentication_error"
    assert entry.model == SONNET and entry.fingerprint is not None and entry.usage is None


def test_sdk_with_a_wrong_key_gets_authentication_error(emulator: Emulator) -> None:
    client = anthropic.Anthropic(api_key="sk-test-wrong", base_url=emulator.base_url, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(**PING_BODY)
    good = anthropic.Anthropic(api_key=GOOD_KEY, base_url=emulator.base_url, max_retries=0)
    assert good.messages.create(**PING_BODY).usage.input_tokens == 1


def test_without_a_key_list_any_nonempty_key_is_accepted() -> None:
    with Emulator() as emu:
        assert post(emu, PING_BODY, key="anything")[0] == 200
        assert post(emu, PING_BODY, key=None)[0] == 401


# --- headers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/messages", PING_BODY, 200),
        ("POST", "/v1/messages/count_tokens", {"model": SONNET, "messages": PING_BODY["messages"]}, 200),
        ("POST", "/v1/messages", {"model": SONNET}, 400),
        ("POST", "/v1/complete", PING_BODY, 404),
        ("GET", "/v1/messages", None, 405),
        ("GET", "/_emulator/log", None, 200),
        ("GET", "/_emulator/nothing", None, 404),
    ],
)
def test_every_response_carries_a_request_id(
    emulator: Emulator, method: str, path: str, body: Any, status: int
) -> None:
    got, headers, _ = call(emulator, method, path, body, {"x-api-key": GOOD_KEY})
    assert got == status
    assert headers["request-id"].startswith("req_") and len(headers["request-id"]) > 10
    assert headers["content-type"] == "application/json"


def test_request_ids_are_unique(emulator: Emulator) -> None:
    ids = {post(emulator, PING_BODY)[1]["request-id"] for _ in range(5)}
    assert len(ids) == 5


def test_rate_limit_headers_are_present(emulator: Emulator) -> None:
    _, headers, _ = post(emulator, PING_BODY)
    assert int(headers["anthropic-ratelimit-requests-limit"]) > 0
    assert 0 <= int(headers["anthropic-ratelimit-requests-remaining"]) < int(
        headers["anthropic-ratelimit-requests-limit"]
    )
    assert headers["anthropic-ratelimit-requests-reset"].endswith("Z")


def test_keep_alive_serves_many_requests_on_one_connection(emulator: Emulator) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=5)
    body = json.dumps(PING_BODY).encode()
    sockets = set()
    for _ in range(3):
        connection.request("POST", "/v1/messages", body=body, headers={"x-api-key": GOOD_KEY})
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("connection") is None
        response.read()
        sockets.add(id(connection.sock))
    connection.close()
    assert len(sockets) == 1  # http.client drops the socket when the server says close


# --- validation messages ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}, "model: Field required"),
        ({"model": SONNET, "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
        ({"model": SONNET, "max_tokens": "1", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Input should be a valid integer"),
        ({"model": SONNET, "max_tokens": -1, "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Input should be greater than or equal to 0"),
        ({"model": SONNET, "max_tokens": 1}, "messages: Field required"),
        ({"model": SONNET, "max_tokens": 1, "messages": []}, "messages: at least one message is required"),
        ({"model": SONNET, "max_tokens": 1, "messages": [{"content": "x"}]}, "messages.0.role: Field required"),
        ({"model": SONNET, "max_tokens": 1, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role: Input should be 'user' or 'assistant'"),
        ({"model": SONNET, "max_tokens": 1, "messages": [{"role": "user"}]}, "messages.0.content: Field required"),
        ({"model": SONNET, "max_tokens": 1, "messages": [{"role": "user", "content": ""}]}, "messages.0.content: text content blocks must be non-empty"),
        ({"model": SONNET, "max_tokens": 1, "system": 5, "messages": [{"role": "user", "content": "x"}]}, "system: Input should be a valid string or list"),
        ([1, 2], "body: Input should be a valid dictionary"),
    ],
)
def test_invalid_bodies_get_api_like_messages(emulator: Emulator, body: Any, message: str) -> None:
    status, _, answer = post(emulator, body)
    assert status == 400
    assert answer["error"] == {"type": "invalid_request_error", "message": message}


def test_invalid_json_is_400(emulator: Emulator) -> None:
    status, _, answer = call(
        emulator, "POST", "/v1/messages", raw=b"{not json", headers={"x-api-key": GOOD_KEY}
    )
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    entry = emulator.log[-1]
    assert entry.status == 400 and entry.body is None and entry.fingerprint is None


# --- control endpoint ---------------------------------------------------------------------


def test_control_injects_a_fault_without_an_api_key(emulator: Emulator) -> None:
    status, _, answer = call(emulator, "POST", "/_emulator/faults", {"status": 529, "count": 2})
    assert status == 200 and answer["queued"] == 1
    assert answer["faults"][0]["status"] == 529 and answer["faults"][0]["remaining"] == 2
    client = anthropic.Anthropic(api_key=GOOD_KEY, base_url=emulator.base_url, max_retries=0)
    with pytest.raises(anthropic.OverloadedError):
        client.messages.create(**PING_BODY)
    assert call(emulator, "GET", "/_emulator/faults")[2]["faults"][0]["remaining"] == 1
    assert call(emulator, "DELETE", "/_emulator/faults")[0] == 200
    assert call(emulator, "GET", "/_emulator/faults")[2] == {"faults": []}
    client.messages.create(**PING_BODY)


def test_control_accepts_a_list_and_retry_after(emulator: Emulator) -> None:
    faults = [{"status": 429, "retry_after": 2.5}, {"spend_cap": True}]
    assert call(emulator, "POST", "/_emulator/faults", faults)[2]["queued"] == 2
    first = post(emulator, PING_BODY)
    assert first[0] == 429 and first[1]["retry-after"] == "2.5"
    second = post(emulator, PING_BODY)
    assert second[0] == 429 and "retry-after" not in second[1]
    assert "monthly spend limit" in second[2]["error"]["message"]


@pytest.mark.parametrize(
    "fault",
    [{"status": 429, "colour": "red"}, {"kind": "explode"}, {"latency": "slow"}, "529", {"count": 0}],
)
def test_control_rejects_bad_faults(emulator: Emulator, fault: Any) -> None:
    status, _, answer = call(emulator, "POST", "/_emulator/faults", fault)
    assert status == 400 and "bad fault" in answer["error"]["message"]
    assert call(emulator, "GET", "/_emulator/faults")[2] == {"faults": []}


def test_control_expire_and_log(emulator: Emulator) -> None:
    body = {**PING_BODY, "system": [{"type": "text", "text": "x" * 8000, "cache_control": {"type": "ephemeral"}}]}
    assert post(emulator, body)[2]["usage"]["cache_creation_input_tokens"] == 2000
    assert post(emulator, body)[2]["usage"]["cache_read_input_tokens"] == 2000
    assert call(emulator, "POST", "/_emulator/expire")[2] == {"expired": 1}
    assert post(emulator, body)[2]["usage"]["cache_creation_input_tokens"] == 2000

    entries = call(emulator, "GET", "/_emulator/log")[2]["entries"]
    assert [entry["usage"]["cache_read_input_tokens"] for entry in entries] == [0, 2000, 0]
    assert entries[0]["model"] == SONNET and entries[0]["status"] == 200
    assert entries[0]["body"] == body and len(entries[0]["fingerprint"]) == 64
    assert call(emulator, "DELETE", "/_emulator/log")[0] == 200
    assert call(emulator, "GET", "/_emulator/log")[2] == {"entries": []}


def test_control_endpoint_is_not_logged(emulator: Emulator) -> None:
    call(emulator, "GET", "/_emulator/faults")
    assert emulator.log == []


def test_stop_closes_idle_keep_alive_connections() -> None:
    emu = Emulator().start()
    connection = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=5)
    connection.request("POST", "/v1/messages", body=json.dumps(PING_BODY), headers={"x-api-key": "k"})
    connection.getresponse().read()
    emu.stop()
    with pytest.raises((http.client.HTTPException, OSError)):
        connection.request("POST", "/v1/messages", body=json.dumps(PING_BODY), headers={"x-api-key": "k"})
        connection.getresponse().read()
    connection.close()


# --- serve() as a process -----------------------------------------------------------------


def start_serve(*args: str) -> subprocess.Popen[str]:
    code = "import sys; from keepwarm.emulator import serve; sys.exit(serve(0, 0.5, %s))" % (
        repr(list(args)) if args else "None"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def first_line_port(process: subprocess.Popen[str]) -> int:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("listening on http://127.0.0.1:"), line
    return int(line.strip().rsplit(":", 1)[1])


def wait_exit(process: subprocess.Popen[str], limit: float = 10.0) -> int | None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            return code
        time.sleep(0.02)
    process.kill()
    return None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_prints_its_address_and_exits_0_on_signal(signum: int) -> None:
    process = start_serve()
    try:
        port = first_line_port(process)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("POST", "/v1/messages", body=json.dumps(PING_BODY), headers={"x-api-key": "k"})
        assert connection.getresponse().status == 200
        connection.close()
        process.send_signal(signum)
        assert wait_exit(process) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def test_serve_honours_api_keys() -> None:
    process = start_serve("sk-only")
    try:
        port = first_line_port(process)
        for key, expected in (("sk-only", 200), ("sk-other", 401)):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("POST", "/v1/messages", body=json.dumps(PING_BODY), headers={"x-api-key": key})
            assert connection.getresponse().status == expected
            connection.close()
        process.terminate()
        assert wait_exit(process) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
