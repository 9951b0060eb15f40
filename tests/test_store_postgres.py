"""What only the PostgreSQL store has to get right, against a real server the suite starts
(tests/conftest.py `postgres_server`); the contract both backends share is tests/test_store.py.

Several daemons migrating one new database at once; a password that comes from libpq's means, a
file or systemd's credentials and never shows in an error, a log line or a repr; a database that
goes away and comes back without a row lost or the pinging stopped; the config that selects it;
`keepwarm ledger copy` and `keepwarm report` on a URL; and a daemon restarted on it that resumes.
"""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import LONG_PROMPT, PostgresServer, basic_doc, free_port, write_config
from test_ledger import SONNET, T0, WARM, outcome
from test_observations import _config, _obs

from keepwarm import cli
from keepwarm.config import ConfigError, parse_config
from keepwarm.daemon import open_ledger
from keepwarm.emulator import Emulator
from keepwarm.exitcodes import EX_CONFIG, EX_OK
from keepwarm.metrics import Metrics
from keepwarm.observations import Observer
from keepwarm.store import Ledger, LedgerError, PairKey, PostgresTarget, read_ledger, read_observations, redact
from keepwarm.store import base as store_base
from keepwarm.store import postgres as pg
from keepwarm.store.copy import copy_ledger
from keepwarm.store.postgres import PostgresLedger, migrations

KEY = PairKey(SONNET.expert, SONNET.model, SONNET.fingerprint)


def _admin(server: PostgresServer, dbname: str = "postgres") -> psycopg.Connection[Any]:
    return psycopg.connect(server.admin_url(dbname), autocommit=True)


def _dbname(url: str) -> str:
    return psycopg.conninfo.conninfo_to_dict(url)["dbname"]  # type: ignore[return-value]


# --- the schema ------------------------------------------------------------------------------


def test_daemons_started_together_migrate_a_new_database_once(postgres_url: str) -> None:
    """Eight writers open the same empty database at the same instant: one creates the schema,
    the others wait on the advisory lock and find it done; none fails."""
    n = 8
    barrier = threading.Barrier(n)
    opened: list[PostgresLedger] = []
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            opened.append(PostgresLedger(postgres_url))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    for i, ledger in enumerate(opened):
        ledger.record(outcome(SONNET, WARM, T0 + i))
        ledger.close()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version, name FROM keepwarm_schema ORDER BY version").fetchall() == [
            (v, name) for v, name, _ in migrations()], "each migration applied once"
        assert conn.execute("SELECT COUNT(*) FROM pings").fetchone() == (n,)
    assert pg.schema_version() == len(pg.migrations())


def test_a_failed_migration_leaves_the_schema_as_it_was(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = pg.migrations()
    monkeypatch.setattr(pg, "migrations", lambda: [*shipped, (2, "broken", "CREATE TABLE half (;")])
    with pytest.raises(LedgerError, match="cannot migrate the schema"):
        PostgresLedger(postgres_url)
    with psycopg.connect(postgres_url) as conn:
        found = conn.execute("SELECT to_regclass('pings'), to_regclass('keepwarm_schema')").fetchone()
    assert found == (None, None), "the first step was rolled back with the broken second"


def test_a_database_of_a_newer_keepwarm_is_refused(postgres_url: str) -> None:
    PostgresLedger(postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("INSERT INTO keepwarm_schema (version, name) VALUES (99, 'future')")
    with pytest.raises(LedgerError, match="schema version 99, newer than this keepwarm knows"):
        PostgresLedger(postgres_url)


# --- the password ------------------------------------------------------------------------------


@pytest.fixture
def tcp_url(postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A fresh database reached over 127.0.0.1, where the server asks for the password; no
    password reaches libpq from the environment unless a test puts it there."""
    for name in ("PGPASSWORD", "PGPASSFILE", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.pgpass
    return postgres_server.tcp_url(postgres_server.new_database())


def _secret_file(tmp_path: Path, text: str, name: str = "pw") -> Path:
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_the_password_comes_from_any_of_the_four_places(
    tcp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(LedgerError, match="no password supplied"):
        PostgresLedger(tcp_url)
    good = PostgresServer.PASSWORD
    PostgresLedger(PostgresTarget(tcp_url, _secret_file(tmp_path, good))).close()  # ledger.password_file
    creds = tmp_path / "creds"
    creds.mkdir()
    _secret_file(creds, good, "ledger_password")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))  # systemd's LoadCredential=
    PostgresLedger(tcp_url).close()
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    monkeypatch.setenv("PGPASSFILE", str(_secret_file(tmp_path, f"127.0.0.1:*:*:keepwarm:{good}", "pgpass")))
    PostgresLedger(tcp_url).close()
    monkeypatch.delenv("PGPASSFILE")
    monkeypatch.setenv("PGPASSWORD", good)
    PostgresLedger(tcp_url).close()


def test_a_wrong_password_shows_nowhere(tcp_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "Wr0ng-but-still-s3cret"
    config = parse_config({**basic_doc(), "ledger": {"url": tcp_url, "password_file": "pw"}}, tmp_path)
    _secret_file(tmp_path, secret)
    errors = Metrics()
    with caplog.at_level(logging.DEBUG):
        assert open_ledger(config, on_error=errors.ledger_errors.inc) is None
    logged = "".join(repr(r.__dict__) for r in caplog.records)  # the message and every field
    assert "password authentication failed" in logged, "the reason is said"
    assert errors.registry.get_sample_value("keepwarm_ledger_errors_total") == 1
    with pytest.raises(LedgerError) as raised:
        PostgresLedger(PostgresTarget(tcp_url, tmp_path / "pw"))
    for shown in (logged, str(raised.value), repr(config), repr(PostgresTarget(tcp_url, tmp_path / "pw"))):
        assert secret not in shown
    good = PostgresTarget(tcp_url, _secret_file(tmp_path, PostgresServer.PASSWORD, "good"))
    with PostgresLedger(good) as ledger:
        assert PostgresServer.PASSWORD not in repr(ledger) + str(ledger.path) + repr(ledger.__dict__)


def test_libpq_messages_that_echo_the_connection_string_are_scrubbed() -> None:
    secret = "hunter2-but-longer"
    # What libpq says about a conninfo it cannot parse quotes the piece it choked on.
    for url in (f"host=db user=k password={secret} dbname", f"postgresql://k:{secret}@db:5432/x?sslmode=bogus&x",
                f"host=db '{secret}"):
        with pytest.raises(LedgerError) as raised:
            PostgresLedger(url)
        assert secret not in str(raised.value), url
    assert redact(f"postgresql://k:{secret}@h/d") == "postgresql://k:***@h/d"
    assert redact(f"host=h password='{secret} x' dbname=d") == "host=h password=*** dbname=d"
    assert redact(f"postgresql://h/d?password={secret}&sslmode=require") == "postgresql://h/d?password=***&sslmode=require"
    assert redact(f'missing "=" after "{secret}" in connection info string', [secret]) == (
        'missing "=" after "***" in connection info string')


# --- a database that goes away ----------------------------------------------------------------


def test_rows_wait_in_memory_while_the_database_is_away_and_go_in_when_it_is_back(
    postgres_server: PostgresServer, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_base, "MAX_PENDING", 5)  # the bound both backends share
    mono = [0.0]
    attempts = []
    real_connect = pg.connect
    monkeypatch.setattr(pg, "connect", lambda *a, **kw: attempts.append(1) or real_connect(*a, **kw))
    errors: list[int] = []
    ledger = PostgresLedger(postgres_url, on_error=lambda: errors.append(1), mono=lambda: mono[0])
    ledger.record(outcome(SONNET, WARM, T0))
    name = _dbname(postgres_url)
    with _admin(postgres_server) as admin:
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")  # type: ignore[arg-type]
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        started = time.monotonic()
        for i in range(1, 8):
            ledger.record(outcome(SONNET, WARM, T0 + 240 * i))  # never raises
        assert time.monotonic() - started < 5, "a database that is away costs no timeout per ping"
        assert len(attempts) == 2, "the first failure reconnects once; the next ones wait for the backoff"
        assert ledger.write_errors == len(errors) == 7
        assert ledger.dropped == 2, "at most MAX_PENDING rows are kept"
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")  # type: ignore[arg-type]
    mono[0] += pg.RETRY_MAX
    ledger.record(outcome(SONNET, WARM, T0 + 240 * 8))
    assert [r.time for r in ledger.rows()] == [T0] + [T0 + 240 * i for i in range(4, 9)]
    assert ledger.resume([KEY], T0 + 240 * 9)[(SONNET.expert, SONNET.model)].last_ping == T0 + 240 * 8
    ledger.close()


# --- the config ------------------------------------------------------------------------------


def _problems(doc: dict[str, Any], tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_config({**basic_doc(), **doc}, tmp_path)
    return raised.value.problems


def test_ledger_url_and_fleet_in_the_config(tmp_path: Path) -> None:
    url = "postgresql://keepwarm@db.internal:5432/keepwarm"
    config = parse_config({**basic_doc(), "ledger": {"url": url, "password_file": "pw"}}, tmp_path)
    assert (config.ledger_url, config.ledger_path, config.ledger_password_file) == (url, None, tmp_path / "pw")
    assert config.fleet is not None and (config.fleet.name, config.fleet.lease, config.fleet.min_members) == ("keepwarm", 20.0, 1)
    config = parse_config({**basic_doc(), "ledger": {"url": "host=db dbname=k"},
                           "fleet": {"name": "eu-1", "lease": "30s", "min_members": 2}}, tmp_path)
    assert config.fleet is not None and (config.fleet.name, config.fleet.lease, config.fleet.min_members) == ("eu-1", 30.0, 2)
    assert parse_config(basic_doc(), tmp_path).fleet is None, "a SQLite file has no fleet"

    assert _problems({"ledger": {"url": url, "path": "l.db"}}, tmp_path) == [
        "ledger: set either path (a SQLite file) or url (a PostgreSQL database), not both"]
    assert _problems({"fleet": {"name": "x"}}, tmp_path) == [
        "fleet: only with ledger.url: the members of a fleet share a PostgreSQL database"]
    assert _problems({"ledger": False, "fleet": {}}, tmp_path) == [
        "fleet: only with ledger.url: the members of a fleet share a PostgreSQL database"]
    assert _problems({"ledger": {"password_file": "pw"}}, tmp_path) == [
        "ledger.password_file: only with ledger.url (a SQLite file has no password)"]
    assert any(p.startswith("fleet.lease: must be above 0") for p in _problems(
        {"ledger": {"url": url}, "fleet": {"lease": "0s"}}, tmp_path))
    assert any(p.startswith("fleet.min_members") for p in _problems({"ledger": {"url": url}, "fleet": {"min_members": 0}}, tmp_path))
    for leaky in ("postgresql://keepwarm:Pa55-in-url@db/k", "host=db password=Pa55-in-url", "host=db 'Pa55-in-url"):
        (problem,) = _problems({"ledger": {"url": leaky}}, tmp_path)
        assert problem.startswith("ledger.url: ") and "Pa55-in-url" not in problem, problem


# --- moving a SQLite ledger in, and reading it back --------------------------------------------


def _sqlite_ledger(tmp_path: Path) -> Path:
    path = tmp_path / "old.db"
    config = _config(tmp_path)
    with Ledger(path, origin="emulator") as ledger:
        ledger.record(outcome(SONNET, WARM, T0 + 5))
    with Ledger(path) as ledger:
        for i in range(30):
            ledger.record(outcome(SONNET, WARM, T0 + 240 * i))
        Observer(config, Metrics(), ledger=lambda: ledger, clock=lambda: T0 + 9000).accept(
            [_obs(at=T0 + 100 * i, read=1500) for i in range(1, 6)])
    return path


def _fields(rows: list[Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.__dict__.items() if k != "id"} for r in rows]


def test_ledger_copy_moves_a_sqlite_ledger_in_once_and_report_reads_it_from_the_url(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _sqlite_ledger(tmp_path)
    assert cli.main(["ledger", "copy", "--from", str(source), "--to", postgres_url]) == EX_OK
    assert "copied 31 ping(s) and 5 observation(s)" in capsys.readouterr().out
    target = PostgresTarget(postgres_url)
    assert _fields(read_ledger(target)) == _fields(read_ledger(source))
    assert _fields(read_observations(target)) == _fields(read_observations(source))
    with Ledger(source) as lite, PostgresLedger(target) as moved:
        keys = [PairKey(SONNET.expert, SONNET.model, SONNET.fingerprint, history=True)]
        assert moved.resume(keys, T0 + 9000) == lite.resume(keys, T0 + 9000), "the first start on PostgreSQL resumes"
        assert moved.spend(0) == lite.spend(0), "to the last bit"
        assert moved.recent(T0 + 9000, T0) == lite.recent(T0 + 9000, T0)

    assert cli.main(["ledger", "copy", "--from", str(source), "--to", postgres_url]) == EX_CONFIG
    assert "already holds rows (31 pings, 5 observations" in capsys.readouterr().err
    assert len(read_ledger(target)) == 31, "a second copy counts nothing twice"

    reports = []
    for where in (str(source), postgres_url):
        code = cli.main(["report", "--ledger", where, "--since", "all", "--origin", "all", "--format", "json"])
        assert code == EX_OK
        reports.append({k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "generated_at"})
    assert reports[0] == reports[1]


def test_report_from_a_config_with_ledger_url(tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with PostgresLedger(postgres_url) as ledger:
        ledger.record(outcome(SONNET, WARM, time.time() - 60))
    config = write_config(tmp_path, {**basic_doc(), "ledger": {"url": postgres_url}})
    assert cli.main(["report", "--config", str(config), "--format", "json"]) == EX_OK
    report = json.loads(capsys.readouterr().out)
    assert report["total"]["pings"] == 1, report


# --- a daemon on PostgreSQL ------------------------------------------------------------------

SCALE = 0.04  # a 5m TTL lasts 12 s, the 3m interval 7.2 s


def test_a_daemon_on_postgresql_resumes_after_sigterm_and_rewrites_no_cache(
    tmp_path: Path, tcp_url: str, _private_state: Path
) -> None:
    """As tests/test_restart.py does for the SQLite file: start, SIGTERM, start again at once."""
    pairs, port = 3, free_port()
    _secret_file(tmp_path, PostgresServer.PASSWORD)
    with Emulator(time_scale=SCALE) as emu:
        doc = {
            "api": {"base_url": emu.base_url},
            "defaults": {"models": ["claude-sonnet-4-6"], "interval": "3m", "jitter": "10s"},
            "experts": [{"name": f"e{i}", "system": [{"text": f"Expert {i}. " + LONG_PROMPT}]} for i in range(pairs)],
            "metrics": {"listen": f"127.0.0.1:{port}"},
            "ledger": {"url": tcp_url, "password_file": "pw"},
        }
        config = write_config(tmp_path, doc)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_STATE_HOME": str(_private_state),
               "ANTHROPIC_API_KEY": "sk-test-restart"}
        logs: list[Path] = []
        procs: list[subprocess.Popen[bytes]] = []

        def start() -> None:
            logs.append(tmp_path / f"daemon-{len(logs)}.log")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "keepwarm", "run", "--log-format", "json", "--config", str(config),
                 "--time-scale", str(SCALE)], env=env, stderr=logs[-1].open("wb"), stdout=subprocess.DEVNULL))

        def writes() -> dict[str, int]:
            counts: dict[str, int] = defaultdict(int)
            for e in emu.log:
                if e.usage and e.fingerprint and (e.usage.get("cache_creation_input_tokens") or 0) > 0:
                    counts[e.fingerprint] += 1
            return counts

        interval = 180 * SCALE
        try:
            start()
            deadline = time.monotonic() + 60
            while len(writes()) < pairs:
                assert time.monotonic() < deadline and procs[-1].poll() is None, logs[-1].read_text()[-3000:]
                time.sleep(0.1)
            procs[-1].send_signal(signal.SIGTERM)
            assert procs[-1].wait(20) == 0
            before = len(emu.log)
            start()
            # Until the new daemon has pinged every pair: resumed, that is an interval after the
            # last touch; without the state it would have pinged each at once, inside the margin.
            while len({e.fingerprint for e in emu.log[before:] if e.fingerprint}) < pairs:
                assert time.monotonic() < deadline + 60 and procs[-1].poll() is None, logs[-1].read_text()[-3000:]
                time.sleep(0.1)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(20)
        entries = [e for e in emu.log if e.path.endswith("/v1/messages") and e.fingerprint]
    assert {fp: n for fp, n in writes().items() if n != 1} == {}, "no cache re-written because of the restart"
    by_pair: dict[str, list[float]] = defaultdict(list)
    for e in entries:
        by_pair[e.fingerprint or ""].append(e.time)
    for times in by_pair.values():
        assert all(b - a >= interval - 0.05 for a, b in zip(times, times[1:])), times
    rows = read_ledger(PostgresTarget(tcp_url, tmp_path / "pw"), origins=("scaled",))
    assert len(rows) == len(entries), "every ping the emulator answered is in the database"
    events = [json.loads(line) for line in logs[1].read_text().splitlines() if line.startswith("{")]
    state = [e for e in events if e.get("event") == "state"]
    assert state and _dbname(tcp_url) in state[0]["ledger"], "the second daemon opened the database"
    for log in logs:
        assert PostgresServer.PASSWORD not in log.read_text()


def test_simulate_from_ledger_reads_the_database_as_it_reads_the_file(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _sqlite_ledger(tmp_path)
    copy_ledger(source, PostgresTarget(postgres_url))
    outputs = []
    for ledger in ({"path": source.name}, {"url": postgres_url}):
        doc = {"defaults": {"models": ["claude-sonnet-4-6"]}, "experts": [{"name": "analyst", "system": [{"text": "x"}]}],
               "ledger": ledger}
        config = write_config(tmp_path, doc, f"sim-{len(outputs)}.yaml")
        assert cli.main(["simulate", "--config", str(config), "--from-ledger", "--format", "json"]) == EX_OK
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[1]["policies"]["none"]["total"]["requests"] == 5
    assert outputs[0] == outputs[1]


def test_the_writers_statement_timeout_cuts_neither_a_migration_nor_a_copy_nor_a_report(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon's statements are bounded (a hung one holds every writer); a schema migration, a
    `ledger copy` and a report's read take what they take."""
    monkeypatch.setattr(pg, "STATEMENT_TIMEOUT_MS", 1)
    source = _sqlite_ledger(tmp_path)
    copy_ledger(source, PostgresTarget(postgres_url))  # migrates the new database, then one COPY a table
    with PostgresLedger(postgres_url) as ledger:
        assert ledger._conn is not None and ledger._conn.execute("SHOW statement_timeout").fetchone() == ("1ms",)
    assert len(read_ledger(PostgresTarget(postgres_url))) == 31


def test_ledger_copy_brings_an_older_file_up_to_date_in_a_copy_and_leaves_it_untouched(
    tmp_path: Path, postgres_url: str
) -> None:
    """A ledger of a keepwarm before the summaries (schema 2): they are derived on the way, from a
    temporary copy; the file itself is read, never migrated."""
    path = tmp_path / "v2.db"
    with Ledger(path) as fresh:
        fresh.record(outcome(SONNET, WARM, T0))
        fresh.record(outcome(SONNET, WARM, T0 + 240))
        expected = fresh.resume([KEY], T0 + 300)
    with sqlite3.connect(path) as db:  # back to the shape schema 2 had
        for table in ("pair_state", "spend", "hours", "members"):
            db.execute(f"DROP TABLE {table}")
        for table in ("pings", "observations"):  # and the columns of later versions
            for column in ("origin", "account", "provider", "endpoint"):
                db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        db.execute("PRAGMA user_version = 2")
    db.close()
    before = path.read_bytes()
    assert copy_ledger(path, PostgresTarget(postgres_url))["pings"] == 2
    assert path.read_bytes() == before, "the source file is not migrated in place"
    with PostgresLedger(postgres_url) as moved:
        assert moved.resume([KEY], T0 + 300) == expected
        assert [r.origin for r in moved.rows()] == ["api", "api"]


def test_daemon_processes_started_together_migrate_once(postgres_url: str, tmp_path: Path) -> None:
    """The same race between processes, as a rollout or a fleet's first start has it."""
    go = tmp_path / "go"
    script = (
        "import os, sys, time\n"
        "from keepwarm.store.postgres import PostgresLedger\n"
        "open(sys.argv[3], 'w').close()\n"  # imported: ready to race
        "while not os.path.exists(sys.argv[2]): time.sleep(0.005)\n"
        "PostgresLedger(sys.argv[1]).close()\n"
    )
    ready = [tmp_path / f"ready-{i}" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", script, postgres_url, str(go), str(r)], stderr=subprocess.PIPE)
             for r in ready]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM keepwarm_schema ORDER BY version").fetchall() == [
            (v,) for v, _, _ in migrations()]
