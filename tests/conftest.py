"""Fixtures shared by the daemon's tests: a real emulator, config files, free ports."""

from __future__ import annotations

import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from keepwarm.emulator import Emulator

ROOT = Path(__file__).resolve().parent.parent
# Sized with the emulator's rule (a token per 4 bytes): ~1,500 tokens, above the 1,024
# minimum of claude-sonnet-4-6 and below the 4,096 of claude-haiku-4-5.
LONG_PROMPT = "You are a careful assistant. Answer briefly and cite your sources. " * 90
SHORT_PROMPT = "You are terse."


def tool(name: str) -> str:
    """A command from this interpreter's environment (scripts/test's .venv) or from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    assert found, f"{name} not found: scripts/test installs it (`pip install -e '.[test]'`)"
    return found


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A test that runs a command in-process (`main([...])`) points the root logger at the
    stderr pytest captured for it; later tests must not log into that closed stream."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("keepwarm", "waitress")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, was in levels.items():
        logging.getLogger(name).setLevel(was)


@pytest.fixture(autouse=True)
def _private_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test (and every daemon it starts, which inherits the environment) keeps its default
    state in a directory of its own: never the user's ~/.local/state, never another test's."""
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    return state


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """A real emulator on loopback, at real-time TTLs unless a test scales them."""
    with Emulator() as emu:
        yield emu


def write_config(directory: Path, doc: dict[str, Any], name: str = "keepwarm.yaml") -> Path:
    """Write a config document as YAML and return its path."""
    path = directory / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def basic_doc(base_url: str | None = None, **defaults: Any) -> dict[str, Any]:
    """A small valid config: a cacheable expert on two models and a too-short one."""
    doc: dict[str, Any] = {
        "defaults": {"models": ["claude-sonnet-4-6"], **defaults},
        "experts": [
            {"name": "analyst", "system": [{"text": LONG_PROMPT}], "models": ["claude-sonnet-4-6", "claude-opus-4-8"]},
            {"name": "terse", "system": [{"text": SHORT_PROMPT}]},
        ],
    }
    if base_url:
        doc["api"] = {"base_url": base_url}
    return doc


def keepwarm_cmd(*args: str) -> list[str]:
    """The `keepwarm` command, run with this interpreter."""
    return [sys.executable, "-m", "keepwarm", *args]


# --- the real daemon as a process (the reliability tests) -------------------------------------
#
# A `keepwarm run` whose stderr goes to a file rather than a pipe, so a test can read the log
# while the daemon runs (a pipe nobody drains would also block it once full), with helpers to
# scrape /metrics and poll with a deadline. Appended for tests/test_reliability_*.py.

import itertools  # noqa: E402 - this section was appended; its imports stay with it
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal as signals  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import datetime  # noqa: E402

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

# How long a daemon may take to log "keepwarm started": on an idle machine 1-2 s, but on a
# loaded 2-core one importing the SDK alone takes 3-7 s, and a test may start several at once.
# Generous because it costs nothing when start-up is fast; a wait's own deadline starts after it.
STARTUP_DEADLINE = 120.0

_daemon_numbers = itertools.count(1)
# The start-up line, in either log format, up to the port of the metrics URL it names.
_STARTED_LINE = re.compile(r"keepwarm started[^\n]*?https?://[^\s\"/]+:(\d+)/metrics")

# The environment a daemon inherits, minus anything that would change where its key or config
# comes from: each test says exactly which it means.
_DAEMON_ENV_DROP = ("ANTHROPIC_API_KEY", "CREDENTIALS_DIRECTORY", "KEEPWARM_CONFIG", "ANTHROPIC_BASE_URL")


def daemon_env(**extra: str) -> dict[str, str]:
    """os.environ without key or config variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _DAEMON_ENV_DROP}
    env.update(extra)
    return env


def event_time(event: dict[str, Any]) -> float:
    """A JSON log event's `ts` (ISO 8601 UTC, ms) as unix seconds."""
    return datetime.fromisoformat(event["ts"]).timestamp()


class DaemonProcess:
    """One `keepwarm run --log-format json` process and what it exposes."""

    def __init__(self, config: Path, port: int | None, env: dict[str, str], args: tuple[str, ...] = ()) -> None:
        """Start the daemon; `port` None means its config listens on port 0 and says the port once started."""
        self.config = config
        self._port = port
        self.log_path = config.parent / f"daemon-{config.stem}-{next(_daemon_numbers)}.log"
        self._log_file = self.log_path.open("wb")
        self._started = False
        self.proc = subprocess.Popen(
            keepwarm_cmd("run", "--config", str(config), "--log-format", "json", *args),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # faulthandler: a daemon that will not exit is sent SIGABRT by stop(), which then
            # writes every thread's stack to the log, so the failure says where it hung.
            env={**env, "PYTHONFAULTHANDLER": "1"},
        )

    # --- what it says -----------------------------------------------------------------------

    def text(self) -> str:
        """Everything the daemon wrote so far (stdout and stderr)."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The JSON log events so far; a half-written last line is left for the next call."""
        out = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def get(self, path: str) -> tuple[int, str]:
        """GET a page of the daemon's web server: (status, body)."""
        try:
            # 30 s: a starved daemon can take seconds to answer; a wait, free when it is quick.
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as resp:
                return resp.status, resp.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode("utf-8", errors="replace")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, keyed by (name, sorted labels)."""
        _, text = self.get("/metrics")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample of `name` whose labels include `labels` (0 when none)."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.metrics().items() if n == name and wanted <= set(ls))

    # --- what it does -----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def port(self) -> int:
        """The metrics port: the one it was given, or the one its "keepwarm started" line names."""
        if self._port is None:
            if not self.started:
                raise ConnectionRefusedError("the daemon has not started listening yet")
            found = _STARTED_LINE.search(self.text())
            assert found, f"no metrics URL in the start-up line\n{self.text()[-2000:]}"
            self._port = int(found.group(1))
        return self._port

    @property
    def started(self) -> bool:
        """Whether the daemon has logged "keepwarm started" (config loaded, scheduler running)."""
        if not self._started:
            self._started = _STARTED_LINE.search(self.text()) is not None
        return self._started

    def wait_for(self, what: str, check: Callable[[], bool], deadline: float = 20.0) -> None:
        """Poll `check` until it holds; fail with the daemon's log if it never does or the daemon dies.

        `deadline` counts from the daemon's "keepwarm started" line, not from the call: start-up
        (seconds of SDK import, more on a loaded machine) is given its own STARTUP_DEADLINE.
        """
        startup_end = time.monotonic() + STARTUP_DEADLINE
        end: float | None = None
        while True:
            now = time.monotonic()
            if end is None and self.started:
                end = now + deadline
            if not self.alive:
                pytest.fail(f"the daemon exited ({self.proc.returncode}) while waiting for {what}\n{self.text()[-4000:]}")
            try:
                if check():
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass  # not listening yet
            if end is not None and now >= end:
                pytest.fail(f"timed out after {deadline:.0f}s (since start-up) waiting for {what}\n{self.text()[-4000:]}")
            if end is None and now >= startup_end:
                pytest.fail(f"the daemon did not start within {STARTUP_DEADLINE:.0f}s (waiting for {what})\n"
                            f"{self.text()[-4000:]}")
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, signum: int | None = None, timeout: float = STARTUP_DEADLINE) -> tuple[int | None, float]:
        """Send SIGTERM (or `signum`) and wait: (exit code, seconds it took); None if it did not exit.

        The default wait is generous: after "stopped", the interpreter's own teardown (a final
        garbage collection of the SDK's objects) took over 15 s of wall time under load.
        """
        t0 = time.monotonic()
        if self.alive:
            self.proc.send_signal(signals.SIGTERM if signum is None else signum)
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
            self.proc.send_signal(signals.SIGABRT)  # its threads' stacks, into the log
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        return code, time.monotonic() - t0

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
        self.proc.wait()
        self._log_file.close()


@pytest.fixture
def keepwarm_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start real `keepwarm run` processes from config documents; all are killed at the end.

    `start(doc, env=..., name=..., args=...)` writes `doc` (its metrics.listen set to loopback
    port 0: the daemon's start-up line says which port it got) next to the test's other files
    and starts the daemon on it.
    """
    started: list[DaemonProcess] = []

    def start(
        doc: dict[str, Any], env: dict[str, str] | None = None, name: str = "keepwarm.yaml", args: tuple[str, ...] = ()
    ) -> DaemonProcess:
        # Port 0, not free_port(): with several test runs on one machine, a port found free can
        # be taken by someone else in the seconds before the daemon binds it (and then scraped).
        doc.setdefault("metrics", {})["listen"] = "127.0.0.1:0"
        daemon = DaemonProcess(write_config(tmp_path, doc, name), None, env if env is not None else daemon_env(), args)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


# --- a real PostgreSQL for the store's tests -------------------------------------------------


def postgres_bin() -> Path:
    """Debian's PostgreSQL binaries (the newest installed version), else initdb on PATH; fail, never skip."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found: ./scripts/test installs Debian's"
                " `postgresql` package (apt-get install postgresql); the store's tests need a real server")


class PostgresServer:
    """A throwaway PostgreSQL cluster: trust on its unix socket, a password (scram) on 127.0.0.1."""

    USER = "keepwarm"
    PASSWORD = "pg-test-Secr3t-(not-a-real-one)"

    def __init__(self, bindir: Path, base: Path, port: int) -> None:
        self.bindir, self.base, self.port = bindir, base, port
        self.socket_dir = base / "sock"
        self._n = 0

    def admin_url(self, dbname: str = "postgres") -> str:
        """A conninfo over the unix socket (no password needed)."""
        return f"host={self.socket_dir} port={self.port} user={self.USER} dbname={dbname}"

    def tcp_url(self, dbname: str) -> str:
        """A URI over 127.0.0.1, where the server asks for the password."""
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """A fresh, empty database's name."""
        import psycopg

        self._n += 1
        name = f"t{os.getpid()}_{self._n}"
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type] # a name we made
        return name


def runuser() -> str:
    """util-linux's runuser, which lives in /usr/sbin: not on a minimal PATH (`env -i PATH=/usr/bin:/bin`)."""
    found = shutil.which("runuser", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    assert found, "runuser not found (util-linux): the PostgreSQL tests run initdb as nobody with it"
    return found


def _as_owner(cmd: list[str], owner: str | None) -> list[str]:
    # initdb and postgres refuse to run as root: the tests (root here and in CI) run them as `nobody`.
    return [runuser(), "-u", owner, "--", *cmd] if owner else cmd


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session, in a temporary directory, stopped at the end."""
    import subprocess
    import tempfile

    bindir = postgres_bin()
    owner = "nobody" if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="keepwarm-pg-"))
    server = PostgresServer(bindir, base, free_port())
    data = base / "data"
    try:
        _start_postgres(server, data, owner)
        yield server
    finally:
        subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], owner),
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _start_postgres(server: PostgresServer, data: Path, owner: str | None) -> None:
    """initdb and pg_ctl start in the server's directory; fail the session with the server's log."""
    import subprocess

    bindir, base = server.bindir, server.base
    base.chmod(0o755)  # the server's user must reach its data and socket directories
    pwfile = base / "pwfile"
    pwfile.write_text(PostgresServer.PASSWORD + "\n")
    for d in (data, server.socket_dir):
        d.mkdir(mode=0o700)
    if owner:
        for p in (data, server.socket_dir, pwfile):
            shutil.chown(p, owner)
        server.socket_dir.chmod(0o755)
    made = subprocess.run(
        _as_owner([str(bindir / "initdb"), "-D", str(data), "-U", PostgresServer.USER, "--pwfile", str(pwfile),
                   "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"], owner),
        capture_output=True, text=True,
    )
    if made.returncode:
        pytest.fail(f"initdb failed ({bindir}): {made.stderr or made.stdout}")
    pwfile.unlink()
    options = (f"-k {server.socket_dir} -p {server.port} -c listen_addresses=127.0.0.1 -c fsync=off"
               " -c synchronous_commit=off -c full_page_writes=off")
    started = subprocess.run(
        _as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(data / "server.log"), "-w", "start"], owner),
        capture_output=True, text=True,
    )
    if started.returncode:
        log_text = (data / "server.log").read_text() if (data / "server.log").exists() else ""
        pytest.fail(f"PostgreSQL did not start: {started.stderr}\n{log_text}")


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server, as a conninfo over its unix socket."""
    return postgres_server.admin_url(postgres_server.new_database())


class RecordedRows:
    """A ledger that keeps the observation rows it is given, for an Observer's tests."""

    def __init__(self) -> None:
        self.rows: list[Any] = []

    def record_observations(self, rows: list[Any]) -> None:
        self.rows.extend(rows)

    def can_keep(self) -> bool:
        return True

    def refreshed_between(self, expert: str, model: str, start: float, end: float) -> bool:
        return False
