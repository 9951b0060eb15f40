"""A fleet's membership: leases in the shared store, pairs divided by rendezvous hashing, a
handover resumed from the store, and an outage that keeps the pinging going.

Members here share one SQLite ledger (the same store interface a PostgreSQL fleet uses) and a
fake clock; the schedulers are real, their APScheduler paused, against the real emulator.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
from conftest import LONG_PROMPT

from keepwarm.classify import Result
from keepwarm.config import parse_config
from keepwarm.daemon import store_resume
from keepwarm.emulator import Emulator
from keepwarm.fleet import Membership, divide
from keepwarm.gate import Gate
from keepwarm.metrics import Metrics
from keepwarm.ping import make_client
from keepwarm.policy import Source, Touch
from keepwarm.runner import Runner
from keepwarm.scheduler import Scheduler
from keepwarm.store import Ledger

T0 = 1_800_000_000.0
LEASE = 20.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Broken:
    """A store that cannot be reached."""

    def renew_lease(self, fleet: str, member: str, now: float, lease: float) -> list[tuple[str, float]]:
        raise OSError("connection refused")

    def drop_lease(self, fleet: str, member: str) -> None:
        raise OSError("connection refused")


def test_members_see_each_other_and_divide_every_pair_exactly_once(tmp_path: Path) -> None:
    clock = Clock()
    with Ledger(tmp_path / "l.db") as store:
        a, b, c = (Membership(store, "kw", LEASE, member=name, clock=clock, mono=clock) for name in "abc")
        for m in (a, b, c, a, b):  # a and b saw the others only at their second renewal
            m.renew()
        assert a.view.members == b.view.members == c.view.members == ("a", "b", "c")
        keys = [f"expert-{i}/claude-sonnet-4-6" for i in range(3000)]
        owners = Counter(next(m.member for m in (a, b, c) if m.owns(k)) for k in keys)
        assert sum(owners.values()) == len(keys) and all(800 < n < 1200 for n in owners.values()), owners
        assert all(sum(m.owns(k) for m in (a, b, c)) == 1 for k in keys)

        # c dies: after its lease the others own its pairs, and only those move.
        before = {k: next(m.member for m in (a, b, c) if m.owns(k)) for k in keys}
        clock.now += LEASE / 2
        assert not a.renew() and not b.renew(), "c's lease still runs"
        clock.now += LEASE / 2 + 0.1
        assert a.renew() and b.renew()
        assert a.view.members == ("a", "b") and a.view.epoch == 2
        moved = [k for k in keys if before[k] != next(m.member for m in (a, b) if m.owns(k))]
        assert set(moved) == {k for k in keys if before[k] == "c"}
        # A clean stop gives the lease up at once: no waiting for it to lapse.
        b.leave()
        a.renew()
        assert a.view.members == ("a",) and all(a.owns(k) for k in keys)
    assert divide(keys, ["a", "b"]).keys() == {"a", "b"}


def test_a_member_that_cannot_reach_the_store_keeps_what_it_owned(tmp_path: Path) -> None:
    clock = Clock()
    with Ledger(tmp_path / "l.db") as store:
        a = Membership(store, "kw", LEASE, member="a", clock=clock, mono=clock)
        b = Membership(store, "kw", LEASE, member="b", clock=clock, mono=clock)
        a.renew(), b.renew(), a.renew()
        view = a.view
        a.store = Broken()
        assert a.renew() is False and a.failures == 1
        assert a.view == view, "availability: the last view, and its pairs, stay"
        assert a.holds_lease()
        for _ in range(2):  # b renews as usual meanwhile
            clock.now += LEASE / 2
            b.renew()
        assert b.view.members == ("b",), "a's lease lapsed: b took its pairs over"
        assert not a.holds_lease(), "a knows its lease may have passed to another"
        a.store = store
        assert a.renew() is False and a.holds_lease(), "back: it renews, and sees b as before"
        assert b.renew() and b.view.members == ("a", "b"), "b yields a's pairs again at its next renewal"


def _scheduler(emulator: Emulator, config_pairs: list, clock: Clock, ledger: Ledger) -> tuple[Scheduler, Metrics]:  # type: ignore[type-arg]
    metrics = Metrics()
    config = parse_config(_doc(emulator.base_url), Path("."))
    runner = Runner(make_client(emulator.base_url, "sk-test-fleet", 5), config.prices, metrics, threading.Event(),
                    clock=clock, ledger=ledger, gate=Gate(clock=clock))
    scheduler = Scheduler(runner, metrics, clock=clock, draw=lambda: 0.0, mono=clock, prices=config.prices,
                          resume=store_resume(ledger, clock))
    scheduler._aps.start(paused=True)
    return scheduler, metrics


def _doc(base_url: str) -> dict:  # type: ignore[type-arg]
    return {"api": {"base_url": base_url}, "defaults": {"models": ["claude-sonnet-4-6"], "jitter": "0s"},
            "experts": [{"name": f"e{i}", "system": [{"text": f"Expert {i}. {LONG_PROMPT}"}]} for i in range(12)]}


def test_a_handover_is_resumed_from_the_shared_store_not_a_cold_start(emulator: Emulator, tmp_path: Path) -> None:
    """a keeps every pair warm; b joins: the pairs b wins move, b resumes each an interval after
    a's last ping of it (no ping at once, no write), and a stops pinging and exporting them."""
    clock = Clock()
    pairs = list(parse_config(_doc(emulator.base_url), Path(".")).pairs)
    with Ledger(tmp_path / "l.db", clock=clock) as ledger:
        ma = Membership(ledger, "kw", LEASE, member="a", clock=clock, mono=clock)
        ma.renew()
        a, a_metrics = _scheduler(emulator, pairs, clock, ledger)
        a.owns = ma.owns
        a.apply(ma.owned(pairs, key=lambda p: p.key))
        for key in list(a.states):  # every pair pinged once: written
            due = a.states[key].next_due
            clock.now = max(clock.now, due)
            a._run(key, due)
        assert all(s.last_start for s in a.states.values())
        last = {key: a.states[key].last_start for key in a.states}
        writes = len(emulator.log)

        clock.now += 60
        ma.renew()  # as it does every lease / 3
        mb = Membership(ledger, "kw", LEASE, member="b", clock=clock, mono=clock)
        assert mb.renew() and mb.view.members == ("a", "b")
        assert ma.renew(), "a sees b at its next renewal"
        b, b_metrics = _scheduler(emulator, pairs, clock, ledger)
        b.owns = mb.owns
        report = b.apply(mb.owned(pairs, key=lambda p: p.key))
        a.apply(ma.owned(pairs, key=lambda p: p.key))
        moved = set(report.added)
        assert moved and moved.isdisjoint(a.states) and set(a.states) | moved == {p.key for p in pairs}
        for key in moved:
            job = b._aps.get_job(key)
            assert job is not None
            assert job.trigger.run_date.timestamp() == pytest.approx(last[key] + 240), "resumed, not re-pinged"
            assert a_metrics.registry.get_sample_value(
                "keepwarm_pair_state", {"expert": key.split("/")[0], "model": "claude-sonnet-4-6"}) is None, \
                "a no longer exports a pair it does not own: sums over members count it once"
        assert len(emulator.log) == writes, "no ping at the handover"
        # A job a had armed before the reassignment is not sent by a once b owns the pair.
        key = next(iter(moved))
        ma.view = mb.view
        a_only = Scheduler(a.runner, a_metrics, clock=clock, draw=lambda: 0.0, mono=clock, prices=a.prices)
        a_only.owns = ma.owns
        a_only._aps.start(paused=True)
        a_only.apply([p for p in pairs if p.key == key])
        a_only._run(key, clock.now)
        assert len(emulator.log) == writes


def test_the_budget_is_the_fleet_s_every_member_s_spend_counts(emulator: Emulator, tmp_path: Path) -> None:
    """Four shards at 0.9 of the cap each spent 3.6 caps. In a fleet each member's budget takes
    the spend of all members from the shared store at each renewal."""
    clock = Clock()
    pairs = list(parse_config(_doc(emulator.base_url), Path(".")).pairs)
    with Ledger(tmp_path / "l.db", clock=clock) as ledger:
        members = []
        for _ in range(2):
            metrics = Metrics()
            config = parse_config(_doc(emulator.base_url), Path("."))
            runner = Runner(make_client(emulator.base_url, "sk-test-fleet", 5), config.prices, metrics,
                            threading.Event(), clock=clock, ledger=ledger, gate=Gate(clock=clock))
            scheduler = Scheduler(runner, metrics, clock=clock, draw=lambda: 0.0, mono=clock, prices=config.prices,
                                  budget_usd_per_day=10.0, spend=ledger.spend)
            scheduler._aps.start(paused=True)
            members.append((scheduler, metrics))
        a, b = members[0][0], members[1][0]
        a.apply(pairs[:6])
        b.apply(pairs[6:])
        for scheduler in (a, b):
            for key in list(scheduler.states):
                due = scheduler.states[key].next_due
                clock.now = max(clock.now, due)
                scheduler._run(key, due)
        total = sum(sum((r.costs or {}).values()) for r in ledger.rows())
        for scheduler, metrics in members:
            own = metrics.registry.get_sample_value("keepwarm_budget_spent_usd")
            assert own is not None and own < total, "alone, a member counts only its own pings"
            scheduler.sync_budget()
            assert metrics.registry.get_sample_value("keepwarm_budget_spent_usd") == pytest.approx(total, rel=1e-9)


def test_an_observation_another_member_accepted_reaches_the_owner_as_a_touch(tmp_path: Path) -> None:
    """Production posts to any member; the owner takes the request from the store within a poll,
    once, and not the ones it accepted itself."""
    from conftest import basic_doc

    from keepwarm.fleet import RemoteObservations
    from keepwarm.observations import Observer

    clock = Clock()
    config = parse_config(basic_doc("http://127.0.0.1:9"), tmp_path)
    with Ledger(tmp_path / "l.db", clock=clock) as ledger:
        poller = RemoteObservations(ledger, clock=clock)
        other = Observer(config, Metrics(), ledger=lambda: ledger, clock=clock)  # another member's endpoint
        usage = {"input_tokens": 10, "cache_read_input_tokens": 1500, "cache_creation_input_tokens": 0, "output_tokens": 5}
        clock.now += 1
        assert other.accept([{"expert": "analyst", "model": "claude-sonnet-4-6", "at": clock.now - 0.5, "usage": usage},
                             {"expert": "analyst", "model": "claude-opus-4-8", "at": clock.now - 0.4, "usage": usage}])[0] == 202
        owned = {"analyst/claude-sonnet-4-6"}
        touches = poller.poll(lambda key: key in owned)
        assert [(key, t.at, t.source.value, t.result.value, t.prefix_tokens) for key, t in touches] == [
            ("analyst/claude-sonnet-4-6", clock.now - 0.5, "production", "warm", 1500)]
        assert poller.poll(lambda key: key in owned) == [], "applied once, though the next poll reads it again"
        # What this member accepted itself touched its scheduler already.
        clock.now += 1
        poller.mine([("analyst/claude-sonnet-4-6", Touch(clock.now - 0.2, Source.PRODUCTION, Result.WARM, 1500))])
        assert other.accept([{"expert": "analyst", "model": "claude-sonnet-4-6", "at": clock.now - 0.2, "usage": usage}])[0] == 202
        assert poller.poll(lambda key: key in owned) == []


def test_savings_are_judged_against_the_fleet_s_history_not_one_member_s(tmp_path: Path) -> None:
    """Two requests 100 s apart, each posted to another member: one saving, not two (the review's
    20x overstatement came from each member seeing half of production)."""
    from conftest import basic_doc

    from keepwarm.observations import Observation, Observer, validate

    clock = Clock()
    config = parse_config(basic_doc("http://127.0.0.1:9"), tmp_path)
    with Ledger(tmp_path / "l.db", clock=clock) as ledger:
        a, b = (Observer(config, Metrics(), ledger=lambda: ledger, clock=clock) for _ in range(2))
        for member in (a, b):
            member.fleet_history = ledger.last_requests
        usage = {"input_tokens": 10, "cache_read_input_tokens": 1500, "cache_creation_input_tokens": 0, "output_tokens": 5}
        pair = {"expert": "analyst", "model": "claude-sonnet-4-6", "usage": usage}
        assert a.accept([{**pair, "at": T0 - 100}])[0] == 202
        assert b.accept([{**pair, "at": T0}])[0] == 202
        saved = [r.saved for r in ledger.observations()]
        assert saved == [1, 0], "b knew of a's request 100 s earlier: production kept the cache warm itself"
        # Alone (no fleet history), b would have credited it too.
        c = Observer(config, Metrics(), ledger=lambda: ledger, clock=clock)
        alone = validate({**pair, "at": T0 + 1}, 0, c.pairs, clock.now)
        assert isinstance(alone, Observation) and c.record([alone])[0].saved


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_savings_with_observations_split_at_random_equal_one_daemons(tmp_path: Path, seed: int) -> None:
    """Production's requests, in time order, each posted to one of three members at random: the
    fleet credits exactly the savings one daemon that saw them all credits, pair by pair."""
    import random

    from conftest import basic_doc

    from keepwarm.observations import Observer

    rng = random.Random(seed)
    config = parse_config(basic_doc("http://127.0.0.1:9"), tmp_path)
    keys = [(p.expert, p.model) for p in config.pairs]
    ttl = config.pairs[0].ttl_seconds
    # Gaps around the TTL (bursts, near misses, long silences), so both verdicts are common.
    stream, at = [], T0
    for _ in range(300):
        at += rng.choice([rng.uniform(1, 60), rng.uniform(ttl - 30, ttl + 30), rng.uniform(ttl, 4 * ttl)])
        expert, model = rng.choice(keys)
        read = rng.choice([0, 1500, 1500, 3000])
        stream.append({"expert": expert, "model": model, "at": at, "usage": {
            "input_tokens": 10, "cache_read_input_tokens": read, "cache_creation_input_tokens": 1500 - min(read, 1500),
            "output_tokens": 5}})

    def saved_by_pair(ledger: Ledger) -> dict[tuple[str, str], float]:
        out: Counter[tuple[str, str]] = Counter()
        for row in ledger.observations():
            out[(row.expert, row.model)] += row.saved_usd or 0.0
        return dict(out)

    clock = Clock()
    with Ledger(tmp_path / "one.db", clock=clock) as one, Ledger(tmp_path / "fleet.db", clock=clock) as shared:
        alone = Observer(config, Metrics(), ledger=lambda: one, clock=clock)
        members = [Observer(config, Metrics(), ledger=lambda: shared, clock=clock) for _ in range(3)]
        for member in members:
            member.fleet_history = shared.last_requests
        for item in stream:
            clock.now = item["at"] + 0.5
            assert alone.accept([item])[0] == 202
            assert rng.choice(members).accept([item])[0] == 202
        expected, got = saved_by_pair(one), saved_by_pair(shared)
    assert sum(expected.values()) > 0, "the stream credits some savings"
    assert got.keys() == expected.keys()
    for key, usd in expected.items():
        assert got[key] == pytest.approx(usd, rel=1e-9), key
