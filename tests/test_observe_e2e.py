"""End to end against the REAL daemon endpoint: a `keepwarm run` process, the emulator, and
production drivers through `keepwarm.observe` (sync and async, streamed and not), raw HTTP, and
the JavaScript snippet of docs/observations.md run with node.

Needs POST /v1/observations in the daemon (keepwarm/observations.py, from the observe-daemon
branch); every test in this file does.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
from conftest import ROOT, DaemonProcess, basic_doc, daemon_env, free_port, write_config

from keepwarm import observe
from keepwarm.classify import classify, usage_from_api
from keepwarm.emulator import Emulator
from keepwarm.observations import SETTLE
from keepwarm.prefix import Prefix, load_prefix
from keepwarm.pricing import builtin_table

SONNET, OPUS = "claude-sonnet-4-6", "claude-opus-4-8"
API_KEY = "sk-e2e-observe"
TOKEN = "e2e-observe-token"
QUESTION = "What moved the markets today?"  # marks production requests in the emulator's log
DOCS = ROOT / "docs" / "observations.md"


class Stack:
    """The emulator, a daemon pinging through it, and what production needs to reach both."""

    def __init__(self, tmp: Path) -> None:
        self.emulator = Emulator().start()
        token_file = tmp / "observe_token"
        token_file.write_text(TOKEN + "\n")
        # A short interval, so the first ping (which warms the caches) comes within seconds.
        doc = basic_doc(self.emulator.base_url, interval="3s", jitter="0s")
        doc["observe"] = {"token_file": str(token_file)}
        self.port = free_port()
        doc["metrics"] = {"listen": f"127.0.0.1:{self.port}"}
        self.config = write_config(tmp, doc)
        self.daemon = DaemonProcess(self.config, self.port, daemon_env(ANTHROPIC_API_KEY=API_KEY))
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix: Prefix = load_prefix(self.config, "analyst")
        for model in (SONNET, OPUS):
            self.daemon.wait_for(f"a warm cache on {model}", functools.partial(self._pinged, model))

    def _pinged(self, model: str) -> bool:
        return self.daemon.total("keepwarm_pings_total", expert="analyst", model=model) >= 1

    def sdk(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(api_key=API_KEY, base_url=self.emulator.base_url, max_retries=0)

    def total(self, name: str, **labels: str) -> float:
        return self.daemon.total(name, **labels)

    def production_log(self) -> list[Any]:
        """The emulator's entries for production requests (not keepwarm's pings)."""
        return [e for e in self.emulator.log if e.body and e.body.get("messages", [{}])[0].get("content") == QUESTION]

    def close(self) -> None:
        self.daemon.kill()
        self.emulator.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("observe-e2e"))
    yield s
    s.close()


def question(prefix: Prefix) -> dict[str, Any]:
    return {"max_tokens": 3, "messages": [{"role": "user", "content": QUESTION}], **prefix.params()}


def post_raw(url: str, body: Any, token: str | None = TOKEN) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{url}/v1/observations", data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def by_result(entries: list[Any], ttl: str = "5m") -> Counter[str]:
    return Counter(str(classify(usage_from_api(e.usage, ttl))) for e in entries)


def production_counts(stack: Stack, model: str) -> Counter[str]:
    return Counter(
        {r: int(stack.total("keepwarm_production_requests_total", expert="analyst", model=model, result=r))
         for r in ("warm", "rewarmed", "partial", "uncached")}
    )  # fmt: skip


def counted(stack: Stack, model: str, expected: Counter[str]) -> bool:
    return production_counts(stack, model) == expected


def test_production_counters_equal_the_emulators_classification(stack: Stack) -> None:
    before_saved = stack.total("keepwarm_saved_usd_total", expert="analyst", model=SONNET)
    started: list[tuple[str, float]] = []
    client = observe.wrap(stack.sdk(), url=stack.url, token=TOKEN, expert="analyst")

    def note(model: str) -> None:
        started.append((model, time.time()))

    note(SONNET)
    client.messages.create(model=SONNET, **question(stack.prefix))
    note(SONNET)
    for _ in client.messages.create(model=SONNET, stream=True, **question(stack.prefix)):
        pass
    note(OPUS)
    with client.messages.stream(model=OPUS, **question(stack.prefix)) as stream:
        stream.get_final_message()

    async def run_async() -> None:
        async_client = observe.wrap(
            anthropic.AsyncAnthropic(api_key=API_KEY, base_url=stack.emulator.base_url, max_retries=0),
            observer=observe.observer_of(client),
            expert="analyst",
        )
        note(SONNET)
        await async_client.messages.create(model=SONNET, **question(stack.prefix))
        note(SONNET)
        async with async_client.messages.stream(model=SONNET, **question(stack.prefix)) as s:
            await s.get_final_message()

    asyncio.run(run_async())
    # One production driver posting raw HTTP, as any language would.
    note(OPUS)
    at = time.time()
    raw = stack.sdk().messages.create(model=OPUS, **question(stack.prefix))
    status, answer = post_raw(
        stack.url, {"expert": "analyst", "model": OPUS, "at": at, "usage": raw.usage.model_dump(), "request_id": raw._request_id}
    )
    assert (status, answer["accepted"], answer["rejected"]) == (202, 1, [])

    observer = observe.observer_of(client)
    assert observer.flush(10)
    stats = observer.stats()
    observer.close()
    assert (stats.accepted, stats.dropped_total, stats.unattributed) == (5, 0, 0)

    log = stack.production_log()
    assert len(log) == 6
    for model in (SONNET, OPUS):
        expected = by_result([e for e in log if e.model == model])
        stack.daemon.wait_for(f"production counters of {model}", functools.partial(counted, stack, model, expected))
    assert by_result(log)["warm"] == 6, "the keepalive had warmed both caches"

    # keepwarm_saved_usd_total by hand: a read is saved when production's own previous request to
    # the pair started a TTL (300 s) or more earlier, or there was none; it saves
    # cache_read x (write price - read price).
    prices = builtin_table().get(SONNET)
    assert prices.input is not None and prices.read_multiplier is not None
    saved, previous = 0.0, None
    for (model, t), entry in zip(started, log, strict=True):
        if model != SONNET:
            continue
        read = entry.usage["cache_read_input_tokens"]
        if read > 0 and (previous is None or t - previous >= 300):
            saved += read * prices.input / 1e6 * (1.25 - prices.read_multiplier)
        previous = t
    if before_saved == 0:  # the first production requests of this pair: one of them was saved
        assert saved > 0

    def settled() -> bool:
        got = stack.total("keepwarm_saved_usd_total", expert="analyst", model=SONNET) - before_saved
        return math.isclose(got, saved, rel_tol=1e-9, abs_tol=1e-12)

    # A saving is credited SETTLE seconds after its report (an earlier report may still come).
    stack.daemon.wait_for("the savings credited", settled, deadline=SETTLE + 30)


def test_a_timestamp_in_the_prefix_is_drift_within_one_request_while_pings_stay_warm(stack: Stack) -> None:
    drift_before = stack.total("keepwarm_prefix_drift_total", expert="analyst", model=SONNET)
    warm_before = stack.total("keepwarm_pings_total", expert="analyst", model=SONNET, result="warm")
    client = observe.wrap(stack.sdk(), url=stack.url, token=TOKEN, expert="analyst")
    params = question(stack.prefix)
    system = [dict(block) for block in params["system"]]
    system[0]["text"] = f"Current time: {time.strftime('%Y-%m-%dT%H:%M:%S')}\n" + system[0]["text"]
    message = client.messages.create(model=SONNET, **{**params, "system": system})
    assert message.usage.cache_creation_input_tokens > 0, "the drifted prefix is written at full price"
    assert observe.observer_of(client).flush(10)
    observe.observer_of(client).close()
    stack.daemon.wait_for(
        "drift", lambda: stack.total("keepwarm_prefix_drift_total", expert="analyst", model=SONNET) == drift_before + 1
    )
    # Meanwhile the keepalive's own pings keep finding their (undrifted) cache warm.
    stack.daemon.wait_for(
        "another warm ping",
        lambda: stack.total("keepwarm_pings_total", expert="analyst", model=SONNET, result="warm") > warm_before,
        deadline=30,
    )
    assert stack.total("keepwarm_pings_total", expert="analyst", model=SONNET, result="rewarmed") <= 1, "only the cold start"


def test_the_wrapper_with_a_wrong_token_leaves_production_alone(stack: Stack) -> None:
    client = observe.wrap(stack.sdk(), url=stack.url, token="wrong-token", expert="analyst")
    assert client.messages.create(model=SONNET, **question(stack.prefix)).type == "message"
    assert observe.observer_of(client).flush(10)
    stats = observe.observer_of(client).stats()
    observe.observer_of(client).close()
    assert stats.dropped == {"http_401": 1}
    assert stack.total("keepwarm_observations_rejected_total", reason="unauthorized") >= 1


def test_answers_of_the_endpoint_are_the_documented_ones(stack: Stack) -> None:
    good = {"expert": "analyst", "model": SONNET, "usage": {"input_tokens": 1, "cache_read_input_tokens": 10}}
    status, answer = post_raw(stack.url, {"observations": [good, {**good, "expert": "nobody"}]})
    assert status == 202 and answer["accepted"] == 1
    assert [(r["index"], r["reason"]) for r in answer["rejected"]] == [(1, "unknown_pair")]
    assert post_raw(stack.url, [good])[0] == 400
    assert post_raw(stack.url, good, token=None)[0] == 401
    assert post_raw(stack.url, {"observations": [good] * 1001})[0] == 413
    # The documented statuses are exactly these (plus 421, tested for shards in tests/test_observe.py,
    # and 503, for a ledger that cannot be written, in tests/test_observations_attack.py).
    documented = set(re.findall(r"^\| `(\d{3})` \|", DOCS.read_text(), re.MULTILINE))
    assert documented == {"202", "400", "401", "411", "413", "421", "503"}


# --- the JavaScript snippet of docs/observations.md, run with node -----------------------------


def js_snippet() -> str:
    """The one ```js block of docs/observations.md, byte for byte."""
    blocks = re.findall(r"^```js\n(.*?)^```$", DOCS.read_text(), re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, "docs/observations.md has exactly one JavaScript snippet"
    return str(blocks[0])


# A Worker-style runtime for the snippet: an `env`, a `ctx` whose waitUntil collects promises.
HARNESS = """
import worker, { fingerprint } from "./snippet.mjs";
const env = JSON.parse(process.env.WORKER_ENV);
const pending = [];
const ctx = { waitUntil: (p) => pending.push(p) };
const request = new Request("http://worker.local/", { method: "POST", body: JSON.stringify({ question: process.env.QUESTION }) });
const response = await worker.fetch(request, env, ctx);
const message = await response.json();
const returnedBeforeReport = pending.length === 1;
await Promise.all(pending);
const prefix = JSON.parse(env.KEEPWARM_PREFIX);
console.log(JSON.stringify({ status: response.status, usage: message.usage, returnedBeforeReport,
  fingerprint: await fingerprint("claude-sonnet-4-6", prefix.system, prefix.tools) }));
"""


def test_the_documented_javascript_snippet_reports_to_the_daemon(stack: Stack, tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node, "node is needed (scripts/test installs Debian's nodejs)"
    (tmp_path / "snippet.mjs").write_text(js_snippet())
    (tmp_path / "harness.mjs").write_text(HARNESS)
    env = {
        "ANTHROPIC_API_KEY": API_KEY,
        "ANTHROPIC_BASE_URL": stack.emulator.base_url,
        "KEEPWARM_URL": stack.url,
        "KEEPWARM_TOKEN": TOKEN,
        "KEEPWARM_EXPERT": "analyst",
        "KEEPWARM_PREFIX": json.dumps(stack.prefix.params()),
    }
    before = production_counts(stack, SONNET)
    drift_before = stack.total("keepwarm_prefix_drift_total", expert="analyst", model=SONNET)
    result = subprocess.run(
        [node, "harness.mjs"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "WORKER_ENV": json.dumps(env), "QUESTION": QUESTION},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "keepwarm" not in result.stderr, result.stderr  # no warning: the report was accepted
    out = json.loads(result.stdout)
    entry = stack.production_log()[-1]
    assert out["status"] == 200 and out["usage"] == entry.usage
    assert out["returnedBeforeReport"], "the report runs in ctx.waitUntil, after the answer"
    # The JavaScript fingerprint is keepwarm's own (prefix.py) and the emulator's.
    assert out["fingerprint"] == stack.prefix.fingerprint(SONNET) == entry.fingerprint
    expected = before + by_result([entry])
    stack.daemon.wait_for("the snippet's observation", lambda: production_counts(stack, SONNET) == expected)
    assert stack.total("keepwarm_prefix_drift_total", expert="analyst", model=SONNET) == drift_before
