"""`keepwarm run`: wire config, client, metrics, web server and scheduler; handle signals.

The main thread only waits: signal handlers set events, and the loop here acts on them
(reload, stop) and forwards the scheduler's heartbeat to systemd's watchdog. Shutdown
runs in order: scheduler (no new pings), in-flight pings (bounded by
`shutdown_timeout`), ledger, HTTP server.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from keepwarm import __version__, sdnotify
from keepwarm.config import ApiKey, Config, ConfigError, load_config, resolve_api_key
from keepwarm.durations import format_duration
from keepwarm.gate import Gate
from keepwarm.ledger import Ledger, LedgerError
from keepwarm.logs import event
from keepwarm.metrics import Metrics
from keepwarm.ping import make_client
from keepwarm.runner import LedgerLike, Runner
from keepwarm.scheduler import HEARTBEAT_EVERY, Scheduler
from keepwarm.web import WebServer

log = logging.getLogger("keepwarm")

EX_OK = 0
EX_CONFIG = 78


@dataclass(frozen=True)
class EmulatorMode:
    """Run against the built-in emulator, with every TTL and interval scaled by `time_scale`."""

    time_scale: float = 0.05


def build_runner(
    config: Config,
    client: Any,
    metrics: Metrics,
    stop: threading.Event,
    key_source: str,
    ledger: LedgerLike | None = None,
) -> Runner:
    """The runner as every entry point wires it (run, once, the benchmark): one place, no drift."""
    return Runner(
        client,
        config.prices,
        metrics,
        stop,
        key_source=key_source,
        ledger=ledger,
        diagnostics=config.api.cache_diagnostics,
        gate=Gate(config.api.requests_per_minute),
    )


def build_web(config: Config, metrics: Metrics, scheduler: Scheduler) -> WebServer:
    """The metrics, health and status server for a running scheduler (raises OSError if busy)."""
    return WebServer(
        config.metrics_host,
        config.metrics_port,
        metrics,
        states=lambda: list(scheduler.states.values()),
        health=scheduler.healthy,
    )


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class Daemon:
    """The running keepalive: one instance per `keepwarm run`."""

    def __init__(
        self, config_path: Path, emulator: EmulatorMode | None = None, shard: tuple[int, int] | None = None
    ) -> None:
        self.config_path = config_path
        self.shard = shard
        self.emulator_mode = emulator
        self.emulator: Any = None
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.signals = 0
        self.abandoned = 0  # pings still running at the stop deadline: the caller must not wait for them

    # --- config ----------------------------------------------------------------------------

    def _load(self) -> tuple[Config, ApiKey, list[str]]:
        config = load_config(self.config_path, self.shard)
        if self.emulator is not None:
            config = config.scaled(self.emulator_mode.time_scale if self.emulator_mode else 1.0)
            return config, ApiKey("emulator-key", "the built-in emulator"), []
        key, warnings = resolve_api_key(config)
        return config, key, warnings

    def _base_url(self, config: Config) -> str | None:
        return self.emulator.base_url if self.emulator is not None else config.api.base_url

    # --- signals ---------------------------------------------------------------------------

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals > 1:
            # A second signal means "now": every committed ledger row is already on disk.
            os.write(2, b"second stop signal: exiting at once\n")
            os._exit(1)
        self.stop_event.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload_event.set()

    # --- run -------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit code."""
        if self.emulator_mode is not None:
            from keepwarm.emulator import Emulator

            self.emulator = Emulator(time_scale=self.emulator_mode.time_scale).start()
        try:
            return self._run()
        finally:
            if self.emulator is not None:
                self.emulator.stop()

    def _run(self) -> int:
        try:
            config, key, warnings = self._load()
        except ConfigError as exc:
            for problem in exc.problems:
                event(log, logging.ERROR, "config error", source=exc.source or str(self.config_path), problem=problem)
            return EX_CONFIG
        for warning in warnings:
            event(log, logging.WARNING, warning)
        if self.emulator is not None:
            event(
                log,
                logging.INFO,
                "emulator mode: no key, no network, no cost; time is scaled so minutes pass in seconds",
                emulator=self.emulator.base_url,
                time_scale=self.emulator_mode.time_scale if self.emulator_mode else 1.0,
                ttl_5m_is=format_duration(300 * config.time_scale),
                example_interval=format_duration(config.pairs[0].interval) if config.pairs else None,
            )

        metrics = Metrics(per_pair=config.metrics_per_pair)
        try:
            ledger = self._open_ledger(config, metrics)
        except LedgerError as exc:
            # The ledger is bookkeeping; the pings are the job. Run without it, loudly.
            metrics.ledger_errors.inc()
            event(log, logging.ERROR, "cannot open the ledger; running WITHOUT it until a reload or restart",
                  error=str(exc))
            ledger = None
        client = make_client(self._base_url(config), key.value, config.api.timeout)
        runner = build_runner(config, client, metrics, self.stop_event, key.source, ledger)
        scheduler = Scheduler(runner, metrics, max_workers=config.api.max_concurrency)
        try:
            web = build_web(config, metrics, scheduler)
        except OSError as exc:
            event(log, logging.ERROR, "cannot listen for metrics", listen=f"{config.metrics_host}:{config.metrics_port}",
                  error=exc.strerror or str(exc))
            return EX_CONFIG
        web.start()
        host, port = web.address
        if not _is_loopback(host):
            event(log, logging.WARNING, "metrics listener is not on loopback: reachable from the network",
                  listen=f"{host}:{port}")

        previous = {
            s: signal.signal(s, h)
            for s, h in ((signal.SIGTERM, self._on_stop), (signal.SIGINT, self._on_stop), (signal.SIGHUP, self._on_hup))
        }
        scheduler.start(config.pairs)
        event(
            log,
            logging.INFO,
            "keepwarm started",
            version=__version__,
            pairs=len(config.pairs),
            shard=None if config.shard is None else f"{config.shard[0]}/{config.shard[1]}",
            workers=config.api.max_concurrency,
            metrics=f"http://{host}:{port}/metrics",
            key=key.hint if self.emulator is None else None,
            key_source=key.source,
        )
        sdnotify.notify("READY=1")
        watchdog = sdnotify.watchdog_interval()
        tick = min(HEARTBEAT_EVERY, watchdog / 2) if watchdog else HEARTBEAT_EVERY
        try:
            while not self.stop_event.wait(tick):
                scheduler.check_clock()
                if self.reload_event.is_set():
                    self.reload_event.clear()
                    config = self._reload(config, metrics, runner, scheduler)
                # The watchdog follows the scheduler's own heartbeat, not API success: an API
                # outage must not turn into a restart storm, a stuck scheduler must.
                if watchdog and time.monotonic() - scheduler.last_heartbeat < watchdog / 2:
                    sdnotify.notify("WATCHDOG=1")
        finally:
            sdnotify.notify("STOPPING=1")
            event(log, logging.INFO, "stopping", shutdown_timeout_s=config.shutdown_timeout)
            left = scheduler.stop(config.shutdown_timeout)
            if left:
                event(log, logging.WARNING, "pings still in flight at the shutdown deadline; abandoning them",
                      inflight=left)
                self.abandoned = left
            if runner.ledger is not None:
                runner.ledger.close()
            web.stop()
            for s, h in previous.items():
                signal.signal(s, h)
        event(log, logging.INFO, "stopped")
        return EX_OK

    @staticmethod
    def _open_ledger(config: Config, metrics: Metrics) -> Ledger | None:
        if config.ledger_path is None:
            return None
        return Ledger(config.ledger_path, config.ledger_retention_days, on_error=metrics.ledger_errors.inc)

    def _reload(self, config: Config, metrics: Metrics, runner: Runner, scheduler: Scheduler) -> Config:
        """Apply a new config as a diff, or keep the old one if the new one is bad."""
        sdnotify.notify("RELOADING=1")
        try:
            new, key, warnings = self._load()
            ledger_changed = (new.ledger_path, new.ledger_retention_days) != (
                config.ledger_path,
                config.ledger_retention_days,
            ) or (new.ledger_path is not None and runner.ledger is None)  # retry one that failed to open
            ledger = self._open_ledger(new, metrics) if ledger_changed else runner.ledger
        except (ConfigError, LedgerError) as exc:
            metrics.reload_ok.set(0)
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            for problem in problems:
                event(log, logging.ERROR, "reload rejected; the old config keeps running",
                      source=str(self.config_path), problem=problem)
            sdnotify.notify("READY=1")
            return config
        for warning in warnings:
            event(log, logging.WARNING, warning)
        if (new.metrics_host, new.metrics_port, new.api.max_concurrency) != (
            config.metrics_host, config.metrics_port, config.api.max_concurrency
        ):
            event(log, logging.WARNING, "metrics.listen and api.max_concurrency take effect only at restart")
        # Always a fresh client: the key file is re-read on every reload, so a rotated key
        # takes effect without a restart.
        runner.client = make_client(self._base_url(new), key.value, new.api.timeout)
        runner.key_source = key.source
        runner.prices = new.prices
        runner.diagnostics = new.api.cache_diagnostics
        # A reload is how an operator says "fixed": a new key or limit starts with an open gate.
        runner.gate = Gate(new.api.requests_per_minute)
        if ledger_changed:
            old, runner.ledger = runner.ledger, ledger
            if old is not None:
                old.close()
        report = scheduler.apply(new.pairs)
        scheduler.release_held()
        metrics.reload_ok.set(1)
        event(log, logging.INFO, "config reloaded", added=len(report.added), removed=len(report.removed),
              changed=len(report.changed), unchanged=len(report.unchanged))
        sdnotify.notify("READY=1")
        return new
