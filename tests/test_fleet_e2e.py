"""A fleet on a real PostgreSQL: three `keepwarm run` processes share a database and divide the
pairs; one is killed with SIGKILL and the others take its pairs over from the shared state.

At a tenth of real time: a 5m TTL lasts 30 s, the 4m interval 24 s (margin 5 s), the 20 s
lease 2 s, so a takeover (lease + one renewal) comes well inside the margin.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from conftest import LONG_PROMPT, daemon_env

from keepwarm.classify import usage_from_api
from keepwarm.emulator import Emulator
from keepwarm.pricing import builtin_table
from keepwarm.store import PostgresTarget
from keepwarm.store.postgres import read_ledger

SCALE = 0.1
PAIRS = 12


def _doc(base_url: str, url: str) -> dict[str, Any]:
    return {
        "api": {"base_url": base_url},
        "defaults": {"models": ["claude-sonnet-4-6"]},
        "experts": [{"name": f"e{i}", "system": [{"text": f"Expert {i}. {LONG_PROMPT}"}]} for i in range(PAIRS)],
        "ledger": {"url": url},
        "fleet": {"name": "test", "lease": "20s"},
    }


def test_three_members_share_the_pairs_and_survive_a_kill(
    keepwarm_daemon: Any, postgres_url: str, tmp_path: Path
) -> None:
    with Emulator(time_scale=SCALE) as emu:
        env = daemon_env(ANTHROPIC_API_KEY="sk-test-fleet")
        members = [keepwarm_daemon(_doc(emu.base_url, postgres_url), env=env, name=f"m{i}.yaml",
                                   args=("--time-scale", str(SCALE))) for i in range(3)]

        def written() -> dict[str, int]:
            counts: dict[str, int] = defaultdict(int)
            for e in emu.log:
                if e.fingerprint and e.usage and (e.usage.get("cache_creation_input_tokens") or 0) > 0:
                    counts[e.fingerprint] += 1
            return counts

        deadline = time.monotonic() + 120
        while len(written()) < PAIRS:
            assert time.monotonic() < deadline and all(m.alive for m in members), members[0].text()[-3000:]
            time.sleep(0.2)
        for m in members:
            m.wait_for("its fleet gauges", lambda m=m: m.total("keepwarm_fleet_members") == 3, 30)
        owned = [m.total("keepwarm_fleet_owned_pairs") for m in members]
        # Every pair owned once (members' names are random, so one may by chance own none of 12).
        assert sum(owned) == PAIRS, owned
        # Each pair's series on exactly one member: a sum over members counts it once.
        for m in members:
            assert m.total("keepwarm_pair_info") == m.total("keepwarm_fleet_owned_pairs")

        # Production posts a request for a pair of member 1 to member 2: the owner takes it from
        # the store as a touch and skips the ping production made unnecessary.
        owner = max(members[1:], key=lambda m: m.total("keepwarm_fleet_owned_pairs"))
        other = members[2] if owner is members[1] else members[1]
        # The pair it pinged last: its next ping is an interval away, so the request (now) is
        # surely later than the owner's last ping of it and moves the next one.
        last = {dict(labels)["expert"]: value for (name, labels), value in owner.metrics().items()
                if name == "keepwarm_last_ping_timestamp_seconds"}
        expert = max(last, key=lambda e: last[e])
        # The request comes more than the jitter (10 s, scaled) after that ping: a touch closer
        # to it moves the next ping by less than the jitter's new draw may, and rightly skips none.
        while time.time() < last[expert] + 10 * SCALE + 1.0:
            time.sleep(0.05)
        at = time.time()
        body = json.dumps({"expert": expert, "model": "claude-sonnet-4-6", "at": at, "usage": {
            "input_tokens": 10, "cache_read_input_tokens": 3000, "cache_creation_input_tokens": 0, "output_tokens": 5}})
        request = urllib.request.Request(f"http://127.0.0.1:{other.port}/v1/observations", data=body.encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 202
        # Within an interval: the owner's job for the pair wakes, finds the touch, skips.
        end = time.monotonic() + 240 * SCALE * 2
        # Counted over the members: under load a lease may lapse and the pair move, and then the
        # new owner resumes it from the shared state, the touch included, and skips in its place.
        while sum(m.total("keepwarm_pings_skipped_total", expert=expert, reason="production_touch")
                  for m in members) < 1:
            assert time.monotonic() < end, "no member skipped the ping for the request another member took"
            time.sleep(0.2)

        members[0].kill()
        killed = time.time()
        for m in members[1:]:
            m.wait_for("the takeover", lambda m=m: m.total("keepwarm_fleet_members") == 2, 30)
        taken = time.time() - killed
        assert sum(m.total("keepwarm_fleet_owned_pairs") for m in members[1:]) == PAIRS
        time.sleep(300 * SCALE * 1.2)  # every cache's TTL passes once after the kill
        entries = [e for e in emu.log if e.fingerprint and e.usage]
        rewrites = {fp: n for fp, n in written().items() if n != 1}
        for m in members[1:]:
            assert m.stop()[0] == 0

    assert taken < 20 * SCALE + 20 * SCALE / 3 + 2.0, f"takeover took {taken:.1f} s"
    assert not rewrites, f"caches written more than once: {rewrites}"
    # Pings closer than an interval: only at the membership changes (the start, the kill).
    by_pair: dict[str, list[float]] = defaultdict(list)
    for e in entries:
        by_pair[e.fingerprint or ""].append(e.time)
    close = sum(1 for times in by_pair.values() for a, b in zip(times, times[1:]) if b - a < 240 * SCALE - 0.05)
    assert close <= PAIRS // 3 + 1, f"{close} pairs pinged twice within an interval"
    # The fleet's money, from the shared database, is what the emulator answered (the killed
    # member's ping in flight, if any, never reached the database).
    rows = read_ledger(PostgresTarget(postgres_url), origins=None)
    prices = builtin_table()
    stored = {r.request_id for r in rows}
    answered = [e for e in entries if e.request_id in stored]
    assert len(entries) - len(answered) <= 1
    expected = math.fsum(sum((prices.cost("claude-sonnet-4-6", usage_from_api(e.usage, "5m")) or {}).values())
                         for e in answered)
    assert math.fsum(sum((r.costs or {}).values()) for r in rows) == pytest.approx(expected, rel=1e-9)
