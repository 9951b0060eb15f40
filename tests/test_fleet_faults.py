"""A fleet on a real PostgreSQL through faults: the database cut off for several leases, and a
rolling update that changes the config while a member is added.

Three (then four) `keepwarm run` processes and the emulator at a tenth of real time, as in
tests/test_fleet_e2e.py: a 5m TTL lasts 30 s, the 4m interval 24 s. The lease is 30 s (3 s
scaled) rather than the default 20 s: the work of a start-up or a takeover does not shrink with
the scale, and on a loaded machine a 2 s lease can lapse under it, a membership change the test
did not make.
Each member pings with an API key of its own, so the emulator's log (which keeps a key's last
four characters) says which member sent each ping: "pinged by two members within an interval"
is read from it, not guessed.

The outage is made with a forwarder between the members and the suite's PostgreSQL server,
which other tests share: stopping that server would break them, and a dedicated one for this
test would cost an initdb. Cutting the forwarder resets every open connection and every new one,
which is what a member sees of a stopped server or a lost network path.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import LONG_PROMPT, DaemonProcess, daemon_env, keepwarm_cmd

from keepwarm.classify import usage_from_api
from keepwarm.emulator import Emulator
from keepwarm.emulator.server import LogEntry
from keepwarm.pricing import builtin_table
from keepwarm.shard import owner
from keepwarm.store import PostgresTarget
from keepwarm.store.postgres import read_ledger

SCALE = 0.1
PAIRS = 12
MODEL = "claude-sonnet-4-6"
LEASE = 30 * SCALE
INTERVAL = 240 * SCALE
TTL = 300 * SCALE


class Forwarder:
    """TCP on 127.0.0.1 to the test server's unix socket, that the test can cut and restore.

    Cut, every open connection is reset and every new one is reset as soon as it is accepted
    (the listener stays, so its port cannot be taken by someone else meanwhile).
    """

    def __init__(self, unix_path: str) -> None:
        self.unix_path = unix_path
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._cut = False
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                if self._cut:
                    _reset(client)
                    continue
                upstream = socket.socket(socket.AF_UNIX)
                try:
                    upstream.connect(self.unix_path)
                except OSError:
                    _reset(client)
                    upstream.close()
                    continue
                self._open += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """From now on the database is unreachable: open connections reset, new ones too."""
        with self._lock:
            self._cut = True
            conns, self._open = self._open, []
        for conn in conns:
            _reset(conn)

    def restore(self) -> None:
        """The database is reachable again (for new connections)."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self.cut()
        self._closed = True
        self._thread.join(5)
        self._listener.close()


def _reset(conn: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): the peer's next read fails at once, as with a dead server."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    conn.close()


@pytest.fixture
def forwarded(postgres_url: str) -> Iterator[tuple[Forwarder, str]]:
    """A forwarder to the suite's server and the fresh database's conninfo through it."""
    params = psycopg.conninfo.conninfo_to_dict(postgres_url)
    forwarder = Forwarder(f"{params['host']}/.s.PGSQL.{params['port']}")
    try:
        # Over TCP to the forwarder; the server sees a unix-socket client and trusts it.
        yield forwarder, f"host=127.0.0.1 port={forwarder.port} user={params['user']} dbname={params['dbname']}"
    finally:
        forwarder.close()


def _experts(n: int) -> list[dict[str, Any]]:
    return [{"name": f"e{i}", "system": [{"text": f"Expert {i}. {LONG_PROMPT}"}]} for i in range(n)]


def _doc(base_url: str, url: str, experts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "api": {"base_url": base_url},
        "defaults": {"models": [MODEL]},
        "experts": experts,
        "ledger": {"url": url},
        "fleet": {"name": "faults", "lease": "30s"},
    }


class Fleet:
    """The members of one test, each started with an API key of its own (the emulator logs its
    last four characters, so every ping names its member)."""

    def __init__(self, start: Callable[..., DaemonProcess], emu: Emulator) -> None:
        self._start = start
        self.emu = emu
        self.members: list[DaemonProcess] = []
        self.tags: dict[int, str] = {}  # id(member) -> the last four characters of its key

    def start(self, doc: dict[str, Any]) -> DaemonProcess:
        tag = f"m{len(self.members):03d}"
        member = self._start(doc, env=daemon_env(ANTHROPIC_API_KEY=f"sk-test-faults-{tag}"),
                             name=f"{tag}.yaml", args=("--time-scale", str(SCALE)))
        self.members.append(member)
        self.tags[id(member)] = tag
        return member

    def entries(self) -> list[LogEntry]:
        """The pings the emulator answered, in arrival order."""
        return [e for e in list(self.emu.log) if e.fingerprint and e.usage]

    def writes(self) -> dict[str, int]:
        """How many times each cache (by fingerprint) was written."""
        counts: dict[str, int] = defaultdict(int)
        for e in self.entries():
            if (e.usage or {}).get("cache_creation_input_tokens"):
                counts[e.fingerprint or ""] += 1
        return counts


def _story(entries: list[LogEntry], fingerprints: Iterator[str] | list[str], t0: float) -> str:
    """Each pair's pings (seconds from t0, member, whether it wrote the cache), for a failure message."""
    return "; ".join(
        f"{fp[:8]}: " + " ".join(f"{e.time - t0:+.1f}{e.key_suffix}{'W' if (e.usage or {}).get('cache_creation_input_tokens') else ''}"
                                 for e in entries if e.fingerprint == fp)
        for fp in fingerprints)


def _member_name(member: DaemonProcess) -> str:
    """The fleet member name the daemon chose (its "fleet: joined" line)."""
    for ev in member.events():
        if ev.get("event") == "fleet: joined":
            return str(ev["member"])
    raise AssertionError(f"no 'fleet: joined' line\n{member.text()[-3000:]}")


def _sees(members: list[DaemonProcess], n: int, deadline: float = 30) -> None:
    for m in members:
        m.wait_for(f"a fleet of {n}", lambda m=m: m.total("keepwarm_fleet_members") == n, deadline)


def _expert(entry: LogEntry) -> str:
    """The expert a ping was for (each expert's text starts with its number)."""
    return "e" + entry.body["system"][0]["text"].split(".")[0].split()[-1]


def _post(member: DaemonProcess, fleet: Fleet, expert: str) -> tuple[int, dict[str, str]]:
    """POST one production observation of `expert` to a member: (status, headers).

    Its time is that of the pair's last ping, the one request the emulator really answered: a
    request made up at another time would tell the owner the cache was refreshed when it was
    not, and its next ping would come too late.
    """
    last = max((e for e in fleet.entries() if _expert(e) == expert), key=lambda e: e.time)
    at = time.time() - (time.monotonic() - last.time)
    body = json.dumps({"expert": expert, "model": MODEL, "at": at, "usage": {
        "input_tokens": 10, "cache_read_input_tokens": 3000, "cache_creation_input_tokens": 0, "output_tokens": 5}})
    request = urllib.request.Request(f"http://127.0.0.1:{member.port}/v1/observations", data=body.encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def _expected_usd(entries: list[LogEntry]) -> float:
    """What the emulator's answers cost at the built-in prices."""
    prices = builtin_table()
    return math.fsum(sum((prices.cost(MODEL, usage_from_api(e.usage, "5m")) or {}).values()) for e in entries)


def _two_member_pings(entries: list[LogEntry], since: float, spacing: dict[str, float]) -> dict[str, int]:
    """Per pair, pings from two different members closer than the pair's interval, both after
    `since` (one before it belongs to the membership change of the start)."""
    close: dict[str, int] = defaultdict(int)
    last: dict[str, LogEntry] = {}
    for e in entries:
        key = e.fingerprint or ""
        before = last.get(key)
        last[key] = e
        if before is None or before.time < since:
            continue
        if e.key_suffix != before.key_suffix and e.time - before.time < spacing.get(key, INTERVAL) - 0.05:
            close[key] += 1
    return dict(close)


class Switch:
    """A store that can be made unreachable (as the forwarder makes the server), around a real one."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.down = False

    def renew_lease(self, fleet: str, member: str, now: float, lease: float) -> list[tuple[str, float]]:
        if self.down:
            raise OSError("connection refused")
        return list(self.store.renew_lease(fleet, member, now, lease))

    def drop_lease(self, fleet: str, member: str) -> None:
        if self.down:
            raise OSError("connection refused")
        self.store.drop_lease(fleet, member)


def test_a_member_back_from_an_outage_waits_for_the_others_before_it_counts_them_gone(tmp_path: Path) -> None:
    """The whole store away for several leases: every lease ran out, nobody left. The first
    member back must not take every pair (and give them back a renewal later); one that really
    died meanwhile is let go once the others had the time to renew."""
    from keepwarm.fleet import Membership
    from keepwarm.store import Ledger

    now = [1_800_000_000.0]

    def clock() -> float:
        return now[0]

    with Ledger(tmp_path / "l.db") as ledger:
        switch = Switch(ledger)
        a, b, c = (Membership(switch, "kw", 20.0, member=name, clock=clock, mono=clock, recovery=25.0) for name in "abc")
        for m in (a, b, c, a, b):
            m.renew()
        assert a.view.members == b.view.members == c.view.members == ("a", "b", "c")
        switch.down = True
        for _ in range(6):  # two minutes: six leases
            now[0] += 20.0
            assert not any(m.renew() for m in (a, b, c))
        switch.down = False
        now[0] += 1.0
        assert not a.renew() and a.view.members == ("a", "b", "c"), "a alone in the store, but the others did not leave"
        now[0] += 5.0
        assert not b.renew() and b.view.members == ("a", "b", "c")
        # c died during the outage: it never renews. Within the recovery a and b keep it; after, it is gone.
        now[0] += 10.0
        assert not a.renew() and not b.renew()
        now[0] += 10.0
        assert a.renew() and a.view.members == ("a", "b") and a.handovers == 2, "c's recovery period is over"
        assert not b.renew(), "b came back 5 s after a: its recovery runs 5 s longer"
        now[0] += 6.0
        assert b.renew() and b.view.members == ("a", "b")
        # A member that joins during another's recovery is taken in at once.
        switch.down = True
        now[0] += 60.0
        a.renew()
        switch.down = False
        d = Membership(switch, "kw", 20.0, member="d", clock=clock, mono=clock)
        d.renew()
        assert a.renew() and a.view.members == ("a", "b", "d")


def test_database_outage_longer_than_several_leases(
    keepwarm_daemon: Any, forwarded: tuple[Forwarder, str], postgres_url: str
) -> None:
    forwarder, url = forwarded
    with Emulator(time_scale=SCALE) as emu:
        fleet = Fleet(keepwarm_daemon, emu)
        members = [fleet.start(_doc(emu.base_url, url, _experts(PAIRS))) for _ in range(3)]
        deadline = time.monotonic() + 120
        while len(fleet.writes()) < PAIRS:
            assert time.monotonic() < deadline and all(m.alive for m in members), members[0].text()[-3000:]
            time.sleep(0.2)
        _sees(members, 3)
        handovers = [m.total("keepwarm_fleet_handovers_total") for m in members]
        owned = [m.total("keepwarm_fleet_owned_pairs") for m in members]
        assert sum(owned) == PAIRS, owned

        forwarder.cut()
        cut_at = time.monotonic()  # the emulator's clock
        for m in members:
            m.wait_for("a failed renewal", lambda m=m: m.total("keepwarm_fleet_lease_failures_total") > 0, 30)
        # Past its lease a member cannot know its pairs are still its own: it leaves the Service.
        for m in members:
            m.wait_for("readiness to fail", lambda m=m: m.get("/readyz")[0] == 503, 30)
        # An observation that cannot be kept is refused, with a time to come back.
        # Once a member holds a ping's row in memory (its ledger errors count), it cannot keep more.
        end = time.monotonic() + INTERVAL * 2
        while not (waiting := [m for m in members if m.total("keepwarm_ledger_errors_total") > 0]):
            assert time.monotonic() < end, "no member failed to write a ping's row"
            time.sleep(0.2)
        busiest = waiting[0]
        status, headers = _post(busiest, fleet, "e0")
        assert status == 503, status
        assert int(headers["Retry-After"]) > 0
        # Several leases without the database (4 leases: 12 s at this scale); members go on pinging.
        time.sleep(max(0.0, cut_at + 4 * LEASE - time.monotonic()))
        during = [e for e in fleet.entries() if e.time >= cut_at]
        forwarder.restore()
        back_at = time.monotonic()

        for m in members:
            m.wait_for("readiness once the database is back", lambda m=m: m.get("/readyz")[0] == 200, 30)
        # Kept again once its writes go through: its writer reconnects on a backoff of its own
        # (up to 30 s), so the test asks again, as a client told Retry-After does.
        end = time.monotonic() + 60
        while (answer := _post(busiest, fleet, "e1"))[0] != 202:
            assert answer[0] == 503 and "Retry-After" in answer[1] and time.monotonic() < end, answer
            time.sleep(0.5)
        # What was pinged meanwhile reaches the database once it is back, without waiting for a stop.
        answered = {e.request_id for e in fleet.entries() if e.time < back_at}
        target = PostgresTarget(postgres_url)
        end = time.monotonic() + 60
        while answered - {r.request_id for r in read_ledger(target)}:
            assert time.monotonic() < end, "pings answered during the outage never reached the database"
            time.sleep(0.5)
        # Every pair pinged once more after the return: the members agree on who pings what.
        end = time.monotonic() + INTERVAL * 2 + 30
        while len({e.fingerprint for e in fleet.entries() if e.time > back_at + LEASE}) < PAIRS:
            assert time.monotonic() < end, "some pairs were not pinged after the database came back"
            time.sleep(0.2)
        after = [m.total("keepwarm_fleet_handovers_total") for m in members]
        entries = fleet.entries()
        changes = [(fleet.tags[id(m)], ev.get("ts"), ev.get("members"), ev.get("joined"), ev.get("left"))
                   for m in members for ev in m.events() if ev.get("event") == "fleet: members changed"]
        for m in members:
            assert m.stop()[0] == 0

    assert during, "no ping went out while the database was away"
    rewritten = [fp for fp, n in fleet.writes().items() if n != 1]
    assert not rewritten, f"caches written more than once (cut at 0, back at {back_at - cut_at:+.1f}): " \
        f"{_story(entries, rewritten, cut_at)}; {changes}"
    # Every member is still there: the outage is not a membership change, and no pair moved.
    assert after == handovers, (handovers, after, changes)
    close = _two_member_pings(entries, cut_at, {})
    assert not close, f"pairs pinged by two members within an interval after the outage: {_story(entries, list(close), cut_at)}"
    rows = read_ledger(PostgresTarget(postgres_url))
    assert {r.request_id for r in rows} == {e.request_id for e in entries}
    assert math.fsum(sum((r.costs or {}).values()) for r in rows) == pytest.approx(_expected_usd(entries), rel=1e-9)


def test_rolling_update_with_a_changed_config_and_a_member_added(
    keepwarm_daemon: Any, postgres_url: str, tmp_path: Path
) -> None:
    with Emulator(time_scale=SCALE) as emu:
        fleet = Fleet(keepwarm_daemon, emu)
        old = _doc(emu.base_url, postgres_url, _experts(PAIRS))
        # The update: one expert more, and one pair's interval shortened (its cache is the same).
        experts = _experts(PAIRS + 1)
        experts[0]["interval"] = "3m"
        new = _doc(emu.base_url, postgres_url, experts)
        members = [fleet.start(old) for _ in range(3)]
        deadline = time.monotonic() + 120
        while len(fleet.writes()) < PAIRS:
            assert time.monotonic() < deadline and all(m.alive for m in members), members[0].text()[-3000:]
            time.sleep(0.2)
        _sees(members, 3)
        views = [sorted(_member_name(m) for m in members)]
        since = time.monotonic()
        stopping: list[DaemonProcess] = []
        for i in range(3):
            # SIGTERM: it gives its lease up; the others take its pairs at their next renewal.
            members[i].signal(15)
            stopping.append(members[i])
            rest = [m for j, m in enumerate(members) if j != i]
            _sees(rest, 2)
            views.append(sorted(_member_name(m) for m in rest))
            members[i] = fleet.start(new)
            _sees(members, 3)
            views.append(sorted(_member_name(m) for m in members))
        members.append(fleet.start(new))
        _sees(members, 4)
        views.append(sorted(_member_name(m) for m in members))
        changed = time.monotonic()
        # Every pair, the new one too, pinged again after the last change: none is left without an owner.
        end = time.monotonic() + INTERVAL * 2 + 30
        while len({e.fingerprint for e in fleet.entries() if e.time > changed}) < PAIRS + 1:
            assert time.monotonic() < end, "some pairs were not pinged after the update"
            time.sleep(0.2)
        for m in [*stopping, *members]:
            assert m.stop()[0] == 0
        entries = fleet.entries()

    assert not {fp: n for fp, n in fleet.writes().items() if n != 1}, "caches written more than once"
    # Which pair each fingerprint is (experts differ by their text), and how often its owner changed.
    names = {e.fingerprint: _expert(e) for e in entries}
    moves = {fp: sum(1 for a, b in zip(views, views[1:]) if owner(f"{n}/{MODEL}", a) != owner(f"{n}/{MODEL}", b))
             for fp, n in names.items()}
    spacing = {fp: (180 if n == "e0" else 240) * SCALE for fp, n in names.items()}
    close = _two_member_pings(entries, since, spacing)
    assert all(n <= moves[fp] for fp, n in close.items()), (close, moves)
    report = subprocess.run(
        keepwarm_cmd("report", "--ledger", postgres_url, "--origin", "all", "--since", "all", "--format", "json"),
        capture_output=True, text=True, env=daemon_env(), timeout=120,
    )
    assert report.returncode == 0, report.stderr
    total = json.loads(report.stdout)["total"]
    assert total["pings"] == len(entries)
    assert total["spend_usd"] == pytest.approx(_expected_usd(entries), rel=1e-9)


def test_the_lease_is_renewed_in_a_thread_of_its_own_whatever_the_caller_does(tmp_path: Path) -> None:
    """The daemon's main loop may be busy for seconds (a thousand pairs resumed after a change,
    the heap frozen at start): renewals must not wait for it, or at a short lease the others
    count the member gone while it works."""
    from keepwarm.fleet import Membership
    from keepwarm.store import Ledger

    with Ledger(tmp_path / "l.db") as ledger:
        a = Membership(ledger, "kw", 0.3, member="a")
        a.renew()
        stop = threading.Event()
        thread = a.keep(stop)
        try:
            b = Membership(ledger, "kw", 0.3, member="b")
            b.renew()
            assert a.changed.wait(5), "a saw b join without being asked to renew"
            assert a.view.members == ("a", "b")
            a.changed.clear()
            renewed = a.renewed_at
            time.sleep(1.0)  # the caller busy for more than three leases
            assert a.renewed_at is not None and renewed is not None and a.renewed_at > renewed
            assert a.holds_lease()
            assert a.changed.is_set(), "b stopped renewing: a saw it leave"
            assert a.view.members == ("a",)
        finally:
            stop.set()
            thread.join(5)
        assert not thread.is_alive()


def test_a_renewal_does_not_wait_behind_the_pings_writes(postgres_url: str) -> None:
    """Each ping's commit holds the ledger's writers' lock; at 1,000 pairs a member a renewal
    queued behind them for 0.7-1.2 s (bench/fleet.py), against a 2 s lease at a tenth of real
    time: live members were counted gone. Leases have a connection of their own."""
    from keepwarm.store.postgres import PostgresLedger

    with PostgresLedger(postgres_url, origin="scaled") as ledger:
        done: list[list[tuple[str, float]]] = []
        with ledger._lock:  # a ping's commit in progress, however long it takes
            thread = threading.Thread(target=lambda: done.append(ledger.renew_lease("kw", "a", time.time(), 20.0)))
            thread.start()
            thread.join(10)
            assert done, "the renewal waited for the pings' writes"
        thread.join(10)
        assert [name for name, _ in done[0]] == ["a"]
        ledger.drop_lease("kw", "a")
        assert ledger.renew_lease("kw", "b", time.time(), 20.0)[0][0] == "b"
