"""Where each row's cache lives: account, provider and endpoint, recorded with every ping and
observation on both backends, carried by `ledger copy`, and read back from ledgers written before
the columns existed (as the default account) and after their upgrade."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest
from test_ledger import T0, WARM
from test_observations import _obs
from test_providers import BEDROCK_SONNET, _mixed_doc
from test_store import Backend, backend  # noqa: F401 - the fixture: both backends

from keepwarm.classify import Usage, classify
from keepwarm.config import Config, Pair, parse_config
from keepwarm.metrics import Metrics
from keepwarm.observations import Observer
from keepwarm.ping import PingAttempt
from keepwarm.runner import PingOutcome
from keepwarm.store import Ledger, PostgresTarget, read_ledger, read_observations, schema_version
from keepwarm.store.copy import copy_ledger
from keepwarm.store.postgres import PostgresLedger

PLACES = ("account", "provider", "endpoint")
SONNET = "claude-sonnet-4-6"
DEFAULT = ("default", "anthropic", "default")


def mixed(tmp_path: Path) -> Config:
    """Two workspaces, Bedrock in two regions, Vertex global and regional, Foundry."""
    return parse_config(_mixed_doc(tmp_path), tmp_path)


def billed(pair: Pair, config: Config, at: float, usage: Usage = WARM) -> PingOutcome:
    """A ping as the runner records it, billed at the pair's provider price."""
    attempt = PingAttempt(started_wall=at, latency=0.3, usage=usage, request_id=f"req_{pair.key}_{at}", error=None)
    cost = config.prices.cost(pair.price_key, usage)
    return PingOutcome(pair, classify(usage), at, 0.3, (attempt,), usage, cost, at + pair.ttl_seconds)


def place(row: Any) -> tuple[str, str, str]:
    return (row.account, row.provider, row.endpoint)


# Each mixed pair's place, as the config resolves it: the route comes from the model id
# (Bedrock) or the account's region (Vertex).
EXPECTED = {
    ("a", SONNET): ("ws-a", "anthropic", "default"),
    ("b", SONNET): ("ws-b", "anthropic", "default"),
    ("east", BEDROCK_SONNET): ("aws-east", "bedrock", "geo"),
    ("east", "global.anthropic.claude-sonnet-4-6-v1:0"): ("aws-east", "bedrock", "global"),
    ("west", BEDROCK_SONNET): ("aws-west", "bedrock", "geo"),
    ("gcp", SONNET): ("gcp", "vertex", "global"),
    ("gcp-eu", SONNET): ("gcp-eu", "vertex", "regional"),
    ("azure", SONNET): ("azure", "foundry", "default"),
}


def expected(row: Any) -> tuple[str, str, str]:
    return EXPECTED[(row.expert, row.model)]


def _record_mixed(config: Config, ledger: Any) -> None:
    for i, pair in enumerate(config.pairs):
        ledger.record(billed(pair, config, T0 + i))
    observer = Observer(config, Metrics(), ledger=lambda: ledger, clock=lambda: T0 + 1000)
    observer.accept([_obs(f"{name}/{SONNET}", at=T0 + 100 + i, read=1500)
                     for i, name in enumerate(("a", "b", "gcp", "gcp-eu", "azure"))])


def test_every_row_records_where_its_cache_lives(tmp_path: Path, backend: Backend) -> None:  # noqa: F811
    config = mixed(tmp_path)
    with backend.open() as ledger:
        _record_mixed(config, ledger)
        written = ledger.rows()
        seen = ledger.observations()
        assert ledger.write_errors == 0
    assert len(written) == len(config.pairs) and len(seen) == 5
    for row in [*written, *seen]:
        assert place(row) == expected(row), row
    # A reader that does not write (report, simulate) reads the same.
    assert [place(r) for r in read_ledger(backend.where)] == [place(r) for r in written]
    assert [place(r) for r in read_observations(backend.where)] == [place(r) for r in seen]


def _back_to_v5(path: Path) -> None:
    """Make a current file into what keepwarm wrote at schema version 5: no place columns."""
    with sqlite3.connect(path) as db:
        for table in ("pings", "observations"):
            for column in PLACES:
                db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        db.execute("PRAGMA user_version = 5")
    db.close()


def _without_place(rows: list[Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.__dict__.items() if k not in PLACES} for r in rows]


def test_a_version_5_sqlite_ledger_is_read_as_the_default_account_then_upgraded_in_place(tmp_path: Path) -> None:
    config = mixed(tmp_path)
    path = tmp_path / "v5.db"
    with Ledger(path) as ledger:
        _record_mixed(config, ledger)
        rows, seen = ledger.rows(), ledger.observations()
    _back_to_v5(path)

    # A report reads the old file as it is (read-only, never migrated): the default account.
    old = read_ledger(path)
    assert _without_place(old) == _without_place(rows)
    assert {place(r) for r in [*old, *read_observations(path)]} == {DEFAULT}

    with Ledger(path) as upgraded:
        assert _without_place(upgraded.rows()) == _without_place(rows), "every ping kept"
        assert _without_place(upgraded.observations()) == _without_place(seen), "every observation kept"
        assert {place(r) for r in upgraded.rows()} == {DEFAULT}
        gcp_eu = next(p for p in config.pairs if p.expert == "gcp-eu")
        upgraded.record(billed(gcp_eu, config, T0 + 5000))
        assert place(upgraded.rows()[-1]) == EXPECTED[("gcp-eu", SONNET)], "new rows say where they belong"
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema_version()
    db.close()


def test_an_existing_postgresql_schema_is_upgraded_and_keeps_its_rows(tmp_path: Path, postgres_url: str) -> None:
    config = mixed(tmp_path)
    with PostgresLedger(postgres_url) as ledger:
        _record_mixed(config, ledger)
        rows, seen = ledger.rows(), ledger.observations()
    with psycopg.connect(postgres_url, autocommit=True) as conn:  # back to the schema of migration 0002
        for table in ("pings", "observations"):
            conn.execute(f"ALTER TABLE {table} " + ", ".join(f"DROP COLUMN {c}" for c in PLACES))  # type: ignore[arg-type]
        conn.execute("DELETE FROM keepwarm_schema WHERE version > 2")
    target = PostgresTarget(postgres_url)
    # Read before any daemon migrates it (a report while older members still run).
    assert _without_place(read_ledger(target)) == _without_place(rows)
    assert {place(r) for r in read_observations(target)} == {DEFAULT}

    with PostgresLedger(postgres_url) as upgraded:
        assert _without_place(upgraded.rows()) == _without_place(rows)
        assert _without_place(upgraded.observations()) == _without_place(seen)
        east = next(p for p in config.pairs if p.expert == "east" and p.model == BEDROCK_SONNET)
        upgraded.record(billed(east, config, T0 + 5000))
        assert [place(r) for r in upgraded.rows()][-2:] == [DEFAULT, EXPECTED[("east", BEDROCK_SONNET)]]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        assert conn.execute("SELECT MAX(version) FROM keepwarm_schema").fetchone() == (3,)


@pytest.mark.parametrize("old", [False, True], ids=["current", "version-5"])
def test_ledger_copy_carries_the_places(tmp_path: Path, postgres_url: str, old: bool) -> None:
    config = mixed(tmp_path)
    path = tmp_path / "l.db"
    with Ledger(path) as ledger:
        _record_mixed(config, ledger)
    if old:
        _back_to_v5(path)
    before = path.read_bytes()
    counts = copy_ledger(path, PostgresTarget(postgres_url))
    assert (counts["pings"], counts["observations"]) == (len(config.pairs), 5)
    assert path.read_bytes() == before, "the source is read, never migrated"
    target = PostgresTarget(postgres_url)
    for read in (read_ledger, read_observations):
        copied = read(target)
        assert [r.__dict__ | {"id": 0} for r in copied] == [r.__dict__ | {"id": 0} for r in read(path)]
        assert {place(r) for r in copied} == ({DEFAULT} if old else {expected(r) for r in copied})
