"""keepwarm.observe in a real process: a 503 retried, one sender however many clients, fork()."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import pytest
from test_observe import TOKEN, Receiver, ask, sdk

from keepwarm import observe
from keepwarm.emulator import Emulator


@pytest.fixture(scope="module")
def emulator() -> Any:
    with Emulator() as emu:
        yield emu


@pytest.fixture
def receiver() -> Any:
    r = Receiver()
    yield r
    r.close()


def test_a_503_keeps_the_batch_and_sends_it_after_retry_after(emulator: Emulator, receiver: Receiver) -> None:
    answers = iter([(503, {"error": "ledger", "retry_after": 0.3})])

    def respond(body: dict[str, Any]) -> tuple[int, Any]:
        found = next(answers, None)
        return found if found is not None else (202, {"accepted": len(body["observations"]), "rejected": []})

    receiver.answer = respond
    client = observe.wrap(sdk(emulator), url=receiver.url, token=TOKEN, expert="analyst", flush_interval=0.01)
    observer = observe.observer_of(client)
    try:
        ask(client)
        ask(client)
        started = time.monotonic()
        assert observer.flush(10)
        stats = observer.stats()
        assert (stats.accepted, stats.dropped) == (2, {}), "nothing lost: kept and sent again"
        refused, *later = [p["body"]["observations"] for p in receiver.posts]
        resent = [o for body in later for o in body]
        assert resent[: len(refused)] == refused and len(resent) == 2, "the refused batch again, first"
        assert time.monotonic() - started >= 0.25, "the Retry-After was honoured"
    finally:
        observer.close()


def _senders() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("keepwarm-observe"))


def test_wrapping_many_clients_starts_one_pair_of_threads(emulator: Emulator, receiver: Receiver) -> None:
    before = _senders()
    clients = [observe.wrap(sdk(emulator), url=receiver.url, token=TOKEN, expert="analyst") for _ in range(100)]
    assert _senders() == before, "no thread before anything is observed"
    observers = {id(observe.observer_of(c)) for c in clients}
    assert len(observers) == 1, "one Observer for one destination"
    ask(clients[0])
    ask(clients[57])
    assert _senders() == before + 2
    observer = observe.observer_of(clients[0])
    assert observer.flush(10) and observer.stats().accepted == 2
    observer.close()
    other = observe.wrap(sdk(emulator), url=receiver.url, token=TOKEN, expert="analyst")
    assert observe.observer_of(other) is not observer, "a closed Observer is not handed out again"
    observe.observer_of(other).close()


def test_a_forked_worker_sends_its_own_observations(emulator: Emulator, receiver: Receiver) -> None:
    client = observe.wrap(sdk(emulator), url=receiver.url, token=TOKEN, expert="analyst", flush_interval=0.01)
    observer = observe.observer_of(client)
    ask(client)  # the parent's threads run (as under gunicorn --preload, wrap() and a call at import)
    assert observer.flush(10)
    # The parent's lock held by one of its threads at the moment of fork(): the child must not inherit it locked.
    observer._lock.acquire()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what happened through the pipe, then leave at once
        try:
            os.close(read)
            ask(client)
            ok = observer.flush(10)
            result = {"flushed": ok, "accepted": observer.stats().accepted,
                      "threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("keepwarm-observe"))}
        except BaseException as exc:  # noqa: BLE001 - anything, reported to the parent
            result = {"error": repr(exc)}
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    observer._lock.release()
    os.close(write)
    deadline = time.monotonic() + 30
    data = b""
    while time.monotonic() < deadline:
        chunk = os.read(read, 65536)
        if not chunk:
            break
        data += chunk
    os.close(read)
    done, _ = os.waitpid(pid, os.WNOHANG)
    if not done:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    result = json.loads(data)
    assert result == {"flushed": True, "accepted": 2,
                      "threads": ["keepwarm-observe-convert", "keepwarm-observe-send"]}, result
    # The child sent only its own observation (the parent's was already delivered).
    assert len([o for p in receiver.posts for o in p["body"]["observations"]]) == 2
    observer.close()
