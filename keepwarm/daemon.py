"""`keepwarm run`: wire config, client, metrics, web server and scheduler; handle signals.

The main thread only waits: signal handlers set events, and the loop here acts on them
(reload, stop) and forwards the scheduler's heartbeat to systemd's watchdog. Shutdown
runs in order: scheduler (no new pings), in-flight pings (bounded by
`shutdown_timeout`), ledger, HTTP server.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from keepwarm import __version__, early_signals, sdnotify
from keepwarm.config import ApiKey, Config, ConfigError, Pair, load_config, resolve_api_key
from keepwarm.durations import format_duration
from keepwarm.exitcodes import EX_CONFIG, EX_OK, EX_UNAVAILABLE
from keepwarm.fleet import Membership, RemoteObservations
from keepwarm.fleetcount import ProductionFeed
from keepwarm.gate import Gate
from keepwarm.heap import keep_large_blocks_mapped, release_free_memory
from keepwarm.logs import emergency_line, event
from keepwarm.metrics import Metrics
from keepwarm.observations import ALL, SETTLE, Observer, load_token
from keepwarm.page import History, daily_totals
from keepwarm.policy import Touch
from keepwarm.providers.clients import make_clients
from keepwarm.runner import LedgerLike, PingOutcome, Runner
from keepwarm.scheduler import HEARTBEAT_EVERY, Scheduler
from keepwarm.store import LedgerError, PairKey, PairResume, Store, location, open_store
from keepwarm.store.postgres import PostgresLedger
from keepwarm.web import PageInfo, WebServer
from keepwarm.webconfig import WebSettings, load_web_config

log = logging.getLogger("keepwarm")


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


def store_resume(ledger: Store, clock: Callable[[], float] = time.time) -> Callable[[Sequence[Pair]], dict[str, PairResume]]:
    """Each newly added pair's stored state, read in one go: what the scheduler resumes from."""

    def resume(pairs: Sequence[Pair]) -> dict[str, PairResume]:
        keys = [PairKey(p.expert, p.model, p.fingerprint, history=p.adaptive) for p in pairs]
        found = ledger.resume(keys, clock())
        return {p.key: found[(p.expert, p.model)] for p in pairs if (p.expert, p.model) in found}

    return resume


def build_scheduler(config: Config, runner: Runner, metrics: Metrics, *, resume: bool = True) -> Scheduler:
    """The scheduler with every pair's policy inputs: prices, the budget, the time scale, and the
    state a restart resumes from (unless `resume` is False: a new emulator's caches are all cold)."""
    ledger = runner.ledger if isinstance(runner.ledger, Store) and resume else None
    scheduler = Scheduler(
        runner,
        metrics,
        max_workers=config.api.max_concurrency,
        prices=config.prices,
        budget_usd_per_day=config.budget_usd_per_day,
        time_scale=config.time_scale,
        resume=store_resume(ledger) if ledger is not None else None,
        requests_per_minute=config.api.requests_per_minute,
        spend=ledger.spend if ledger is not None else None,
    )
    return scheduler


def build_observer(config: Config, metrics: Metrics, scheduler: Scheduler, runner: Runner) -> Observer:
    """The observations endpoint's state, fed by and feeding the scheduler; raise ConfigError (token file)."""
    observer = Observer(
        config,
        metrics,
        load_token(config),
        touch_many=scheduler.touch_many,
        ledger=lambda: runner.ledger if isinstance(runner.ledger, Store) else None,
        settle=SETTLE,
    )
    scheduler.on_ping = lambda o: observer.ping(o.pair, o.started, o.result, o.total_cost, o.usage)
    if isinstance(runner.ledger, Store):
        now = time.time()
        longest_ttl = max((p.ttl_seconds for p in config.pairs), default=0.0)
        try:
            observer.restore(runner.ledger.recent(now, now - longest_ttl), now)
        except (LedgerError, sqlite3.Error) as exc:  # the page starts empty; pinging goes on
            event(log, logging.WARNING, "cannot read the ledger back for the status page", error=str(exc))
    return observer


# How often the main loop hands the pings' freed buffers back to the OS (keepwarm.heap): each of
# some 60 worker threads allocates its requests in an arena of its own, which keeps what it frees.
TRIM_EVERY = 30.0


def freeze_heap() -> None:
    """Take what start-up built out of the cyclic garbage collector's reach, for good.

    The modules, the SDK's and pydantic's classes, the config, the pairs' state: some 160,000
    objects that live as long as the process. Every full collection walked all of them, a
    quarter of a second on the bench machine with every other thread waiting for the
    interpreter lock; the allocations of a steady stream of observations trigger one every few
    seconds (docs/performance.md). Frozen, a full pass walks only what came after.
    """
    gc.collect()
    gc.freeze()
    # What the collection and the start-up's transients (the config's YAML tree above all) freed.
    release_free_memory()


def _names(keys: tuple[str, ...], most: int = 20) -> str | None:
    """Pairs for a log line: the first `most`, and how many more (a reload of 10,000 pairs stays one line)."""
    if not keys:
        return None
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return ",".join(keys[:most]) + more


def build_web(
    config: Config, metrics: Metrics, scheduler: Scheduler, observer: Observer | None = None,
    membership: Membership | None = None, web: WebSettings | None = None,
) -> WebServer:
    """The metrics, health and status server for a running scheduler (raises OSError if busy)."""

    # The status page's pictures: every ping and production touch also goes to the strips.
    history = History()
    on_ping = scheduler.on_ping

    def record_ping(outcome: PingOutcome) -> None:
        history.ping(outcome)
        if on_ping is not None:
            on_ping(outcome)

    scheduler.on_ping = record_ping
    if observer is not None and observer.touch_many is not None:
        touch_many = observer.touch_many

        def record_touches(touches: Sequence[tuple[str, Touch]]) -> None:
            touch_many(touches)
            history.touches(touches, scheduler.states)

        observer.touch_many = record_touches

    def page_info() -> PageInfo:
        reload_ok = metrics.registry.get_sample_value("keepwarm_config_last_reload_successful")
        return PageInfo(
            time_scale=None if config.time_scale == 1.0 else config.time_scale,
            reload_ok=reload_ok != 0,
            prices=scheduler.runner.prices,
            policy=scheduler.describe,
            history=history,
            daily=None if observer is None else lambda now: daily_totals(observer.windows.buckets.get(ALL, {}), now),
        )

    return WebServer(
        config.metrics_host,
        config.metrics_port,
        metrics,
        states=lambda: list(scheduler.states.values()),
        health=scheduler.healthy if membership is None else lambda: ready_in_fleet(scheduler, membership),
        page_info=page_info,
        observer=observer,
        live=scheduler.alive,
        web=web,
    )


def open_ledger(config: Config, origin: str = "api", on_error: Callable[[], None] | None = None) -> Store | None:
    """The config's store (a PostgreSQL database for `ledger.url`, else the file at the default
    state path unless it names one), or None when it is off or cannot be opened: that is logged
    loudly and counted, and pinging goes on without it."""
    where = location(config)
    if where is None:
        return None
    try:
        ledger = open_store(config, origin, on_error)
    except (LedgerError, OSError) as exc:
        if on_error is not None:
            on_error()
        event(log, logging.ERROR, "cannot open the ledger; running WITHOUT it (no state kept) until a reload or restart",
              path=str(where), error=str(exc))
        return None
    event(log, logging.INFO, "state", ledger=str(where), origin=origin,
          retention_days=config.ledger_retention_days)
    return ledger


def ready_in_fleet(scheduler: Scheduler, membership: Membership) -> tuple[bool, str]:
    """Readiness of a fleet member: on time, and holding its lease (else another may own its pairs)."""
    if not membership.holds_lease():
        return False, f"fleet {membership.fleet}: lease not renewed within {membership.lease:g}s; still pinging what it owned"
    return scheduler.healthy()


def owned_pairs(config: Config, membership: Membership | None) -> tuple[Pair, ...]:
    """The pairs this daemon keeps warm: all of the config's, or in a fleet those it owns."""
    if membership is None:
        return config.pairs
    return tuple(membership.owned(config.pairs, key=lambda p: p.key))


def join_fleet(config: Config, ledger: Store, settle: Callable[[float], object] = time.sleep) -> Membership | None:
    """This daemon's membership of its fleet, when the config names one (a shared `ledger.url`).

    Members started together must not race to the first ping (each would write the caches it
    thinks it owns): a new member renews, waits one renewal period for the others to do the
    same, and renews again before it takes any pair.
    """
    fleet = config.fleet
    if fleet is None:
        return None
    membership = Membership(ledger, fleet.name, fleet.lease)
    membership.renew()
    settle(min(membership.every, 5.0))
    membership.renew()
    event(log, logging.INFO, "fleet: joined", fleet=fleet.name, member=membership.member,
          members=len(membership.view.members), lease_s=fleet.lease)
    return membership


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
        self.time_scale: float | None = None  # --time-scale for an emulator elsewhere, on loopback
        self.listen: tuple[str, int] | None = None  # --listen, over metrics.listen
        self.membership: Membership | None = None  # in a fleet (ledger.url): this daemon's membership
        self.web: WebServer | None = None  # the listener, once serving (a reload re-reads its web config)

    # --- config ----------------------------------------------------------------------------

    def _load(self) -> tuple[Config, ApiKey, list[str]]:
        config = load_config(self.config_path, self.shard)
        if self.listen is not None:
            config = replace(config, metrics_host=self.listen[0], metrics_port=self.listen[1])
        if self.emulator is not None:
            config = config.scaled(self.emulator_mode.time_scale if self.emulator_mode else 1.0)
            return config, ApiKey("emulator-key", "the built-in emulator"), list(config.warnings)
        if self.time_scale is not None:
            config = config.scaled(self.time_scale)
        key, warnings = resolve_api_key(config)
        return config, key, [*config.warnings, *warnings]

    def _base_url(self, config: Config) -> str | None:
        return self.emulator.base_url if self.emulator is not None else config.api.base_url

    # --- signals ---------------------------------------------------------------------------

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals > 1:
            # A second signal means "now": every committed ledger row is already on disk.
            os.write(2, emergency_line(logging.WARNING, "second stop signal: exiting at once", exit_code=1))
            os._exit(1)
        self.stop_event.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload_event.set()

    # --- run -------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit code."""
        # Handlers first: a SIGHUP or SIGTERM during start-up (the emulator, the config, the
        # port) is queued for the main loop, not left to its default action (SIGHUP kills).
        previous = {
            s: signal.signal(s, h)
            for s, h in ((signal.SIGTERM, self._on_stop), (signal.SIGINT, self._on_stop), (signal.SIGHUP, self._on_hup))
        }
        for signum in early_signals.take():  # those that came while the command was importing us
            (self._on_hup if signum == signal.SIGHUP else self._on_stop)(signum, None)
        try:
            if self.emulator_mode is not None:
                from keepwarm.emulator import Emulator

                self.emulator = Emulator(time_scale=self.emulator_mode.time_scale).start()
            try:
                return self._run()
            finally:
                if self.emulator is not None:
                    self.emulator.stop()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _run(self) -> int:
        keep_large_blocks_mapped()  # before the config's transients: see keepwarm.heap
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
        elif self.time_scale is not None:
            event(log, logging.INFO, "time scaled for an emulator on loopback: every TTL, interval and jitter",
                  time_scale=self.time_scale, base_url=config.api.base_url, ttl_5m_is=format_duration(300 * config.time_scale))
        if not config.pairs:
            event(log, logging.WARNING, "NO PAIRS: this shard holds none of the config's pairs; running idle",
                  shard=None if config.shard is None else f"{config.shard[0]}/{config.shard[1]}")

        metrics = Metrics(per_pair=config.metrics_per_pair)
        ledger = self._open_ledger(config, metrics, self.origin)
        if ledger is None and location(config) is None:
            event(log, logging.WARNING, "ledger: off: no state is kept, so a restart starts without it"
                  " (every pair pinged within its TTL's margin) and the budget forgets its spend")
        try:
            client = make_clients(config, key, emulator_url=self.emulator.base_url if self.emulator else None)
        except ConfigError as exc:
            for problem in exc.problems:
                event(log, logging.ERROR, "config error", source=str(self.config_path), problem=problem)
            return EX_CONFIG
        runner = build_runner(config, client, metrics, self.stop_event, key.source, ledger)
        # The built-in emulator starts with every cache empty: nothing stored is true of it.
        scheduler = build_scheduler(config, runner, metrics, resume=self.emulator is None)
        membership = join_fleet(config, ledger) if ledger is not None else None
        try:
            observer = build_observer(config, metrics, scheduler, runner)
            web_settings = load_web_config(config.web_config_file)
        except ConfigError as exc:
            for problem in exc.problems:
                event(log, logging.ERROR, "config error", source=str(self.config_path), problem=problem)
            return EX_CONFIG
        try:
            web = build_web(config, metrics, scheduler, observer, membership, web_settings)
            self.web = web
        except OSError as exc:
            event(log, logging.ERROR, "cannot listen for metrics", listen=f"{config.metrics_host}:{config.metrics_port}",
                  error=exc.strerror or str(exc), exit_code=EX_UNAVAILABLE)
            # A taken port is usually transient (the old process still exiting): not EX_CONFIG,
            # which the service manager would never retry.
            return EX_UNAVAILABLE
        web.start()
        host, port = web.address
        if not _is_loopback(host):
            event(log, logging.WARNING, "metrics listener is not on loopback: reachable from the network",
                  listen=f"{host}:{port}")

        # A SIGHUP queued during start-up was for a config older than (or the same as) the one
        # just loaded: the loop below applies it, which re-reads the file and is harmless.
        self.membership = membership
        remote: RemoteObservations | None = None
        feed: ProductionFeed | None = None
        if membership is not None and ledger is not None:
            scheduler.owns = membership.owns
            # Observations other members accept for pairs this one owns reach it through the store.
            remote = RemoteObservations(ledger)
            observer.fleet_history = ledger.last_requests
            accepted = observer.touch_many
            if accepted is not None:
                def touch_and_remember(touches: Sequence[tuple[str, Touch]]) -> None:
                    remote.mine(touches)
                    accepted(touches)

                observer.touch_many = touch_and_remember
            if isinstance(ledger, PostgresLedger):  # a fleet's store: `fleet:` comes only with ledger.url
                # Production's series are the owner's: whoever receives an observation stores
                # it, and the pair's owner counts it from the store (keepwarm.fleetcount).
                observer.counted_by_owner = True
                feed = ProductionFeed(ledger)
                feed.start()
        # Renewals run in a thread of their own from here: start-up (the heap's freeze below) and
        # the main loop's work must not make the others count this member gone.
        leasing = membership.keep(self.stop_event) if membership is not None else None
        scheduler.start(owned_pairs(config, membership))
        self._fleet_metrics(metrics, scheduler, config)
        freeze_heap()
        event(
            log,
            logging.INFO,
            "keepwarm started",
            version=__version__,
            pairs=len(config.pairs),
            shard=None if config.shard is None else f"{config.shard[0]}/{config.shard[1]}",
            workers=config.api.max_concurrency,
            metrics=f"{web.scheme}://{host}:{port}/metrics",
            status_page=f"{web.scheme}://{host}:{port}/",
            key=key.hint if self.emulator is None else None,
            key_source=key.source,
        )
        sdnotify.notify("READY=1")
        watchdog = sdnotify.watchdog_interval()
        tick = min(HEARTBEAT_EVERY, watchdog / 2) if watchdog else HEARTBEAT_EVERY
        if membership is not None:  # a membership change is applied within half a renewal period
            tick = min(tick, membership.every / 2)
        trimmed = time.monotonic()
        try:
            renewed = time.monotonic()
            while not self.stop_event.wait(tick):
                if remote is not None and membership is not None:
                    touches = remote.poll(membership.owns)
                    if touches:
                        scheduler.touch_many(touches)
                if membership is not None and membership.changed.is_set():
                    membership.changed.clear()
                    # Pairs won are resumed from the shared store; pairs lost stop and drop their series.
                    scheduler.apply(owned_pairs(config, membership))
                    self._fleet_metrics(metrics, scheduler, config)
                if membership is not None and time.monotonic() - renewed >= membership.every:
                    renewed = time.monotonic()
                    scheduler.sync_budget()  # the cap is the fleet's: every member's spend counts
                    if feed is not None:
                        # After the pairs moved: counted by whoever owns them from now on.
                        observer.count_stored(feed.read(), membership.owns)
                    self._fleet_metrics(metrics, scheduler, config)
                scheduler.check_clock()
                observer.settle()  # savings whose wait is over: credited, their rows written
                if time.monotonic() - trimmed >= TRIM_EVERY:
                    trimmed = time.monotonic()
                    release_free_memory()
                if self.reload_event.is_set():
                    self.reload_event.clear()
                    config = self._reload(config, metrics, runner, scheduler, observer)
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
            if membership is not None:
                if leasing is not None:
                    leasing.join(membership.lease)  # a renewal after the leave would take the lease back
                membership.leave()  # the others take over at their next renewal, not after the lease
            observer.settle(everything=True)  # savings still waiting: judged now, their rows written
            if runner.ledger is not None:
                runner.ledger.close()
            web.stop()
            gc.unfreeze()  # a daemon run inside a longer process (the tests) leaves nothing pinned
        event(log, logging.INFO, "stopped")
        return EX_OK

    def _fleet_metrics(self, metrics: Metrics, scheduler: Scheduler, config: Config) -> None:
        membership = self.membership
        if membership is not None and config.fleet is not None:
            metrics.set_fleet(len(membership.view.members), len(scheduler.states), membership.handovers,
                              membership.failures, config.fleet.min_members)

    @property
    def origin(self) -> str:
        """What this run's ledger rows are marked with, so that test runs never mix with real ones."""
        if self.emulator_mode is not None:
            return "emulator"
        return "scaled" if self.time_scale is not None else "api"

    @staticmethod
    def _open_ledger(config: Config, metrics: Metrics, origin: str = "api") -> Store | None:
        """The configured ledger, or None: without one, or when it cannot be opened.

        The ledger is bookkeeping; the pings are the job. A ledger that cannot open is logged
        loudly and counted, and the daemon runs without it until a reload tries again.
        """
        return open_ledger(config, origin, on_error=metrics.ledger_errors.inc)

    def _reload(
        self, config: Config, metrics: Metrics, runner: Runner, scheduler: Scheduler, observer: Observer | None = None
    ) -> Config:
        """Apply a new config as a diff, or keep the old one if the new one is bad."""
        sdnotify.notify("RELOADING=1")
        try:
            new, key, warnings = self._load()
            token = load_token(new)
            web_settings = load_web_config(new.web_config_file)
            clients = make_clients(new, key, emulator_url=self.emulator.base_url if self.emulator else None)
            ledger_changed = (location(new), new.ledger_retention_days) != (
                location(config),
                config.ledger_retention_days,
            ) or (location(new) is not None and runner.ledger is None)  # retry one that failed to open
        except ConfigError as exc:
            metrics.reload_ok.set(0)
            for problem in exc.problems:
                event(log, logging.ERROR, "reload rejected; the old config keeps running",
                      source=str(self.config_path), problem=problem)
            sdnotify.notify("READY=1")
            return config
        ledger = runner.ledger
        if ledger_changed:
            # As at start: the new config (a prompt fix, say) applies with or without it.
            ledger = self._open_ledger(new, metrics, self.origin)
        for warning in warnings:
            event(log, logging.WARNING, warning)
        if (new.metrics_host, new.metrics_port, new.api.max_concurrency) != (
            config.metrics_host, config.metrics_port, config.api.max_concurrency
        ):
            event(log, logging.WARNING, "metrics.listen and api.max_concurrency take effect only at restart")
        # Always a fresh client: the key file is re-read on every reload, so a rotated key
        # takes effect without a restart.
        runner.client = clients
        runner.key_source = key.source
        runner.prices = new.prices
        scheduler.prices = new.prices  # priced policies follow at their next rebuild
        scheduler.set_budget(new.budget_usd_per_day)
        runner.diagnostics = new.api.cache_diagnostics
        # A reload is how an operator says "fixed": a new key or limit starts with an open gate.
        runner.gate = Gate(new.api.requests_per_minute)
        if ledger_changed:
            old, runner.ledger = runner.ledger, ledger
            if old is not None:
                old.close()
        report = scheduler.apply(owned_pairs(new, self.membership))
        if observer is not None:
            observer.apply(new, token)
        if self.web is not None:
            self.web.apply_web(web_settings)  # new connections: a renewed certificate needs no restart
        scheduler.release_held()
        metrics.reload_ok.set(1)
        event(log, logging.INFO, "config reloaded", added=len(report.added), removed=len(report.removed),
              changed=len(report.changed), unchanged=len(report.unchanged), added_pairs=_names(report.added),
              removed_pairs=_names(report.removed), changed_pairs=_names(report.changed))
        sdnotify.notify("READY=1")
        return new
