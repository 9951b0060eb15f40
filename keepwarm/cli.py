"""The `keepwarm` command line (README: Commands). `main(argv) -> int`; exit codes are interface."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from keepwarm import __version__
from keepwarm.classify import Result, Usage
from keepwarm.config import (
    ApiKey,
    Config,
    ConfigError,
    Pair,
    is_loopback,
    load_config,
    parse_listen,
    resolve_api_key,
)
from keepwarm.exitcodes import EX_CONFIG, EX_FAIL, EX_NOT_ALL_WARM, EX_OK, EX_USAGE
from keepwarm.logs import event, setup_logging
from keepwarm.pricing import format_usd
from keepwarm.store import LedgerError, location

log = logging.getLogger("keepwarm")

DEFAULT_EMULATOR_SCALE = 0.05


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit 2), not the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EX_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (0-65535)")
    return port


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
    return value


def _listen(text: str) -> tuple[str, int]:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="keepwarm",
        description="Keeps Anthropic prompt caches warm and shows, in dollars, whether that pays.",
    )
    p.add_argument("--version", action="version", version=f"keepwarm {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (also accepted after the command)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, scaled: bool = False) -> None:
        sp.add_argument(
            "--config",
            type=Path,
            default=os.environ.get("KEEPWARM_CONFIG"),
            help="the YAML config (default: $KEEPWARM_CONFIG)",
        )
        sp.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines on stderr")
        sp.add_argument(
            "--shard",
            type=_shard_arg,
            default=None,
            metavar="K/N",
            help="warm only shard K of N (0-based) of the pairs; overrides the config's shard",
        )
        verbose(sp)
        if sp.prog.endswith("check"):
            sp.add_argument("--explain", action="store_true", help="print the arithmetic behind each TTL advice")
            sp.add_argument("--format", choices=("table", "json"), default="table",
                            help="json: every figure at full precision, with each pair's full fingerprint")
        sp.add_argument(
            "--emulator",
            action="store_true",
            help="talk to the built-in API emulator on loopback: no key, no network, no cost",
        )
        if scaled:
            sp.add_argument(
                "--time-scale",
                type=_scale,
                default=None,
                metavar="S",
                help=f"multiply every TTL, interval and jitter by S: with --emulator (default {DEFAULT_EMULATOR_SCALE}:"
                " a 5m TTL lasts 15s, a 4m interval 12s), or for an emulator elsewhere whose TTLs are scaled by S"
                " (api.base_url must then be a loopback address)",
            )

    run = sub.add_parser("run", help="the daemon: keep every pair warm until SIGTERM; SIGHUP reloads")
    common(run, scaled=True)
    run.add_argument("--listen", type=_listen, metavar="HOST:PORT", help="serve metrics here (overrides metrics.listen)")
    common(sub.add_parser("once", help="ping every pair once, print a row per pair, exit"), scaled=True)
    common(sub.add_parser("check", help="validate the config and count each prefix's tokens; sends no ping"))
    rep = sub.add_parser("report", help="from the ledger: per pair, pings by result, hit rate, spend, break-even")
    rep.add_argument(
        "--config", type=Path, default=os.environ.get("KEEPWARM_CONFIG"), help="read ledger.path and prices from it"
    )
    rep.add_argument("--ledger", type=_ledger_arg,
                     help="the ledger file or PostgreSQL URL, instead of the config's ledger.path or ledger.url")
    rep.add_argument(
        "--origin",
        choices=["api", "emulator", "scaled", "all"],
        default="api",
        help="whose rows: real pings (default), the built-in emulator's, time-scaled runs', or all",
    )
    rep.add_argument("--since", default="24h", help="the window, a duration such as 24h or 7d (default 24h); 'all' for everything")
    rep.add_argument("--format", choices=("table", "json", "csv"), default="table")
    verbose(rep)
    led = sub.add_parser("ledger", help="move a ledger: `ledger copy --from FILE --to URL` fills a PostgreSQL ledger")
    led_sub = led.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    cp = led_sub.add_parser("copy", help="copy every row of a SQLite ledger into an empty PostgreSQL ledger")
    cp.add_argument("--from", dest="source", type=Path, required=True, metavar="PATH", help="the SQLite ledger file")
    cp.add_argument("--to", dest="target", required=True, metavar="URL",
                    help="the PostgreSQL database (libpq URI or conninfo, without the password)")
    cp.add_argument("--password-file", type=Path, default=None,
                    help="the database password (else PGPASSWORD, PGPASSFILE or $CREDENTIALS_DIRECTORY/ledger_password)")
    verbose(cp)
    from keepwarm.simulate import add_parser as add_simulate

    add_simulate(sub)
    sim = sub.choices["simulate"]
    verbose(sim)
    sim.add_argument("--html", type=Path, metavar="FILE",
                     help="also draw, per pair, production's requests, each policy's pings and the lapses, as HTML")
    emu = sub.add_parser("emulator", help="serve the local Messages API emulator on 127.0.0.1")
    verbose(emu)
    emu.add_argument("--port", type=_port, default=8080)
    emu.add_argument("--time-scale", type=_scale, default=1.0, help="multiply every cache TTL by this (above 0)")
    emu.add_argument("--api-key", action="append", default=None, help="accept only this key (repeatable)")
    emu.add_argument("--workspace", action="append", default=None, type=_workspace, metavar="KEY=NAME",
                     help="the key (or AWS access key id) belongs to workspace NAME (repeatable); caches are per"
                     " workspace, and keys not named share one")
    return p


def verbose(sp: argparse.ArgumentParser) -> None:
    """`-v` on a command; SUPPRESS keeps `keepwarm -v CMD` from being undone by the command's default."""
    if not any("--verbose" in a.option_strings for a in sp._actions):
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")


def _shard_arg(text: str) -> tuple[int, int]:
    from keepwarm.shard import parse_shard

    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `keepwarm` console script."""
    args = _parser().parse_args(argv)
    try:
        code = _main(args)
        sys.stdout.flush()  # here, not at interpreter exit, where a closed pipe cannot be caught
        return code
    except BrokenPipeError:
        # The reader went away (`keepwarm report | head -1`): what it read is what it wanted.
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_OK if args.command == "report" else EX_FAIL


def _workspace(text: str) -> tuple[str, str]:
    """`KEY=NAME` of `keepwarm emulator --workspace`."""
    key, sep, name = text.partition("=")
    if not sep or not key or not name:
        raise argparse.ArgumentTypeError(f"expected KEY=NAME, got {text!r}")
    return key, name


def _main(args: argparse.Namespace) -> int:
    setup_logging(getattr(args, "log_format", "text"), logging.DEBUG if args.verbose else logging.INFO)
    if args.command == "emulator":
        from keepwarm.emulator import serve

        try:
            return serve(args.port, args.time_scale, args.api_key, workspaces=dict(args.workspace or []))
        except OSError as exc:
            # A busy port is the caller's to fix (another --port): a usage error, as the README says.
            print(f"keepwarm emulator: cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}"
                  " (choose another --port)", file=sys.stderr)
            return EX_USAGE
    if args.command == "report":
        return report(args)
    if args.command == "ledger":
        return ledger_copy(args)
    if args.command == "simulate":
        return simulate(args)
    if args.config is None:
        print("keepwarm: --config is required (or set KEEPWARM_CONFIG)", file=sys.stderr)
        return EX_USAGE
    time_scale = getattr(args, "time_scale", None)
    if time_scale is not None and not args.emulator and not _scalable(args):
        print(
            f"keepwarm {args.command}: --time-scale needs --emulator, or an api.base_url on loopback"
            " (an emulator started elsewhere); the real API's TTLs cannot be scaled",
            file=sys.stderr,
        )
        return EX_USAGE
    if args.command == "run":
        from keepwarm import early_signals

        early_signals.hold()  # before the daemon's slow imports: a SIGHUP meanwhile is queued, not fatal
        from keepwarm.daemon import Daemon, EmulatorMode

        mode = EmulatorMode(time_scale or DEFAULT_EMULATOR_SCALE) if args.emulator else None
        daemon = Daemon(args.config, mode, shard=args.shard)
        daemon.time_scale = None if args.emulator else time_scale
        daemon.listen = args.listen
        code = daemon.run()
        if daemon.abandoned:
            # Pings past the shutdown deadline run in worker threads that the interpreter would
            # wait for at exit (up to api.timeout): leave now, the deadline is the contract.
            logging.shutdown()
            sys.stdout.flush()
            os._exit(code)
        return code
    try:
        with _session(args) as (config, client):
            if not config.pairs:
                what = "this shard holds none of the config's pairs" if config.shard else "the config lists no experts"
                event(log, logging.WARNING, f"NO PAIRS: {what}; nothing to do",
                      shard=None if config.shard is None else f"{config.shard[0]}/{config.shard[1]}",
                      exit_code=EX_NOT_ALL_WARM)
                return EX_NOT_ALL_WARM
            if args.command == "once":
                origin = "emulator" if args.emulator else "scaled" if config.time_scale != 1.0 else "api"
                return once(config, client, origin, quiet=not args.verbose and _same_terminal())
            return check(config, client, explain=args.explain, fmt=args.format)
    except ConfigError as exc:
        for problem in exc.problems:
            event(log, logging.ERROR, "config error", source=exc.source or str(args.config), problem=problem)
        return EX_CONFIG
    except LedgerError as exc:
        event(log, logging.ERROR, "cannot open the ledger", error=str(exc))
        return EX_CONFIG


def _scalable(args: argparse.Namespace) -> bool:
    """--time-scale without --emulator: only for an emulator elsewhere, on a loopback base_url.

    A config that does not load is reported by the command itself, with its exit code.
    """
    try:
        config = load_config(args.config, args.shard)
    except ConfigError:
        return True
    if config.accounts and not config.accounts[0].from_api:
        # With `accounts:`, every account must reach the emulator: a scaled TTL elsewhere would be wrong.
        urls = [a.base_url for a in config.accounts]
        return all(url and is_loopback(urllib.parse.urlsplit(url).hostname) for url in urls)
    url = config.api.base_url or os.environ.get("ANTHROPIC_BASE_URL")
    return bool(url) and is_loopback(urllib.parse.urlsplit(url or "").hostname)


@contextlib.contextmanager
def _session(args: argparse.Namespace) -> Iterator[tuple[Config, Any]]:
    """A validated config and an SDK client, against the emulator when asked."""
    from keepwarm.providers.clients import make_clients

    config = load_config(args.config, args.shard)
    for warning in config.warnings:
        event(log, logging.WARNING, "config warning", source=str(args.config), problem=warning)
    scale = getattr(args, "time_scale", None)
    if not args.emulator:
        key, warnings = resolve_api_key(config)
        for warning in warnings:
            event(log, logging.WARNING, warning)
        if scale is not None:
            event(log, logging.INFO, "time scaled for an emulator on loopback: every TTL, interval and jitter",
                  time_scale=scale, base_url=config.api.base_url)
            config = config.scaled(scale)
        yield config, _Client(make_clients(config, key), key)
        return
    from keepwarm.emulator import Emulator

    if scale is not None:
        config = config.scaled(scale)
    with Emulator(time_scale=scale or 1.0) as emu:
        key = ApiKey("emulator-key", "the built-in emulator")
        yield config, _Client(make_clients(config, key, emulator_url=emu.base_url), key)


class _Client:
    """An SDK client with the description of its key (for error messages)."""

    def __init__(self, sdk: Any, key: ApiKey) -> None:
        self.sdk = sdk
        self.key = key


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)



# --- simulate --------------------------------------------------------------------------------

# A Unix time in seconds above this is past the year 5000: the trace was written in milliseconds
# (1.7e12 today) or microseconds. Seconds and milliseconds cannot be told apart below it.
MAX_SECONDS = 1e11

SIMULATE_LEGEND = (
    "REQUESTS: production requests replayed; MISSES: those that found the cache cold; PINGS: keepalive pings sent;\n"
    "KEEPALIVE: what the pings cost; PREMIUMS: the write premiums the misses paid; EXTRA = KEEPALIVE + PREMIUMS,\n"
    "what the policy costs above reading every request from cache; ×OPTIMUM: EXTRA over the hindsight optimum's\n"
    "(none: no keepalive; fixed: a ping every interval; adaptive: pings only when production's gaps make them pay)"
)


def simulate(args: argparse.Namespace) -> int:
    """`keepwarm simulate`, saying first what of the trace it matched and what it replayed."""
    from keepwarm.report import span_text
    from keepwarm.simulate import EX_DATAERR, TraceError, parse_trace
    from keepwarm.simulate import main as replay

    matched: list[Any] = []
    config_path = args.config or (Path(os.environ["KEEPWARM_CONFIG"]) if os.environ.get("KEEPWARM_CONFIG") else None)
    with contextlib.suppress(ConfigError):  # a bad config is the replay's to report, with its exit code
        if config_path is not None and not load_config(config_path).pairs:
            print(f"keepwarm simulate: {config_path} lists no pairs: nothing to replay", file=sys.stderr)
            return EX_CONFIG
    if args.trace is not None:
        try:
            config = load_config(config_path) if config_path is not None else None
            with args.trace.open(encoding="utf-8", newline="") as stream:
                requests = parse_trace(stream, str(args.trace))
        except (ConfigError, TraceError, OSError, UnicodeDecodeError):
            config = None  # the replay itself says what is wrong, with its exit code
        if config is not None:
            keys = {p.key for p in config.pairs}
            matched = [r for r in requests if r.key in keys]
            pairs = {r.key for r in matched}
            big = [r for r in requests if r.at > MAX_SECONDS]
            if big:
                print(f"keepwarm simulate: warning: {len(big)} of {len(requests)} trace rows have an `at` that cannot be"
                      f" seconds (first: {args.trace}:{big[0].line}, {big[0].at:.0f}); milliseconds? write Unix seconds"
                      " or RFC 3339", file=sys.stderr)
            print(f"keepwarm simulate: matched {len(matched)} of {len(requests)} trace rows to {len(pairs)} of"
                  f" {len(keys)} configured pairs", file=sys.stderr)
            args.parsed_trace = requests  # the replay reads this, not the file again (seconds for a large trace)
            if not matched:
                seen = sorted({r.key for r in requests})
                print(f"keepwarm simulate: no trace row names a configured pair; nothing to replay.\n"
                      f"  the trace has: {', '.join(seen[:10]) or 'no rows'}{' …' if len(seen) > 10 else ''}\n"
                      f"  the config has: {', '.join(sorted(keys)[:10])}{' …' if len(keys) > 10 else ''}",
                      file=sys.stderr)
                return EX_DATAERR
    code = replay(args)
    if code == EX_OK and args.format == "table" and matched:
        until = matched[-1].at if args.until is None else None
        start = matched[0].at
        span = f"{_utc(start)} to {_utc(until)} ({span_text(until - start)})" if until is not None \
            else f"from {_utc(start)} to --until {args.until}"
        print(f"\nreplayed: {span}, {len(matched)} production requests\n{SIMULATE_LEGEND}")
    return code


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(when))


# --- report ----------------------------------------------------------------------------------


def _ledger_arg(text: str) -> Any:
    """A `--ledger` value: a PostgreSQL URL or conninfo, else a file's path."""
    from keepwarm.store import PostgresTarget, is_url

    return PostgresTarget(text) if is_url(text) else Path(text)


def ledger_copy(args: argparse.Namespace) -> int:
    """`keepwarm ledger copy`: every row of a SQLite ledger into an empty PostgreSQL ledger."""
    from keepwarm.store import PostgresTarget, is_url
    from keepwarm.store.copy import copy_ledger

    if not is_url(args.target):
        print("keepwarm ledger copy: --to must be a PostgreSQL URL (postgresql://user@host/db) or conninfo"
              " (host=... dbname=...)", file=sys.stderr)
        return EX_USAGE
    try:
        counts = copy_ledger(args.source, PostgresTarget(args.target, args.password_file))
    except LedgerError as exc:
        print(f"keepwarm ledger copy: {exc}", file=sys.stderr)
        return EX_CONFIG
    print(f"copied {counts['pings']} ping(s) and {counts['observations']} observation(s) from {args.source}")
    return EX_OK


def report(args: argparse.Namespace) -> int:
    """`keepwarm report`: what the ledger says about each pair over a window."""
    from keepwarm.durations import parse_duration
    from keepwarm.pricing import load_price_table
    from keepwarm.report import run_report

    try:
        since = None if args.since == "all" else parse_duration(args.since)
    except ValueError as exc:
        print(f"keepwarm report: --since: {exc}", file=sys.stderr)
        return EX_USAGE
    prices = None
    path = args.ledger
    if args.config is not None:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            return EX_CONFIG
        prices = config.prices
        path = path or location(config)
        if path is None:
            print(f"keepwarm report: {args.config} has `ledger: off`, and no --ledger was given", file=sys.stderr)
            return EX_CONFIG
    if path is None:
        print("keepwarm report: give --config (with ledger.path) or --ledger", file=sys.stderr)
        return EX_USAGE
    if prices is None:
        prices, _ = load_price_table()
    origins = None if args.origin == "all" else (args.origin,)
    return int(run_report(path, prices, since, args.format, sys.stdout, origins=origins))


# --- once ------------------------------------------------------------------------------------


def _same_terminal() -> bool:
    """Whether stdout and stderr both show on one terminal, where a person reads the table."""
    try:
        return os.isatty(1) and os.isatty(2) and os.ttyname(1) == os.ttyname(2)
    except OSError:
        return False


def once(config: Config, client: _Client, origin: str = "api", quiet: bool = False) -> int:
    """Ping every pair once; exit 0 only if every pair came back warm or rewarmed.

    `quiet`: the table already shows each ping, so on a shared terminal the per-ping log line
    would print it twice; it goes to debug there (`-v` brings it back). Piped or sent to a
    log collector, every line stays.
    """
    if quiet:
        logging.getLogger("keepwarm.ping").setLevel(logging.WARNING)
    from keepwarm.daemon import build_runner, open_ledger
    from keepwarm.metrics import Metrics
    from keepwarm.runner import PairState, PingOutcome

    # A CronJob running `once` keeps its history in the ledger, like the daemon.
    ledger = open_ledger(config, origin)
    runner = build_runner(config, client.sdk, Metrics(), threading.Event(), client.key.source, ledger)
    states = [PairState(pair=p, max_tokens=p.max_tokens) for p in config.pairs]
    try:
        with concurrent.futures.ThreadPoolExecutor(config.api.max_concurrency) as pool:
            outcomes: list[PingOutcome | None] = list(pool.map(runner.ping, states))
    finally:
        if ledger is not None:
            ledger.close()
    rows = []
    for state, o in zip(states, outcomes):
        if o is None:
            rows.append([state.pair.expert, state.pair.model, "deferred", "-", "-", "-", "-", "-",
                         state.pair.fingerprint[:12], f"not sent: the API asked every pair to wait ({runner.gate_for(state.pair).reason})"])
            continue
        u = o.usage
        rows.append(
            [
                o.pair.expert,
                o.pair.model,
                o.result.value,
                "-" if u is None else str(u.cache_read),
                "-" if u is None else str(u.cache_write),
                "-" if u is None else str(u.input),
                "-" if u is None else format_usd(o.total_cost, 6),
                f"{o.final.latency * 1000:.0f}ms",
                o.pair.fingerprint[:12],
                "" if o.error is None else f"{o.error.error_type}: {o.error.message}"[:80],
            ]
        )
    print(
        _table(
            ["EXPERT", "MODEL", "RESULT", "READ", "WRITTEN", "INPUT", "COST", "LATENCY", "FINGERPRINT", "ERROR"], rows
        )
    )
    ok = all(o is not None and o.result in (Result.WARM, Result.REWARMED) for o in outcomes)
    return EX_OK if ok else EX_NOT_ALL_WARM


# --- check -----------------------------------------------------------------------------------


def uncached_ping_cost(config: Config, pair: Pair, input_tokens: int) -> tuple[float | None, float | None]:
    """A ping of a pair that cannot cache, and its day at the pair's interval: all of it plain input."""
    cost = config.prices.cost(pair.price_key, Usage(input=input_tokens, output=max(pair.max_tokens, 1)))
    if cost is None:
        return None, None
    each = math.fsum(cost.values())
    return each, each * 86400 / mean_gap(pair)


def mean_gap(pair: Pair) -> float:
    """The mean time between two pings of a pair: interval + jitter / 2 (jitter only delays)."""
    return pair.interval + pair.jitter / 2


def check(config: Config, client: _Client, explain: bool = False, fmt: str = "table") -> int:
    """Count each prefix's tokens (free endpoint) against the model's minimum; send no ping.

    KEEPALIVE/DAY, MISS PENALTY and BREAK-EVEN are the advisor's figures for the pair's own
    TTL, so the row and the advice's break-even line are one computation.
    """
    import anthropic

    from keepwarm.advisor import ttl_advice
    from keepwarm.ping import describe_error
    from keepwarm.providers.base import provider_facts
    from keepwarm.providers.clients import sdk_for

    rows, below, errors = [], 0, []
    docs: list[dict[str, Any]] = []
    arithmetic: list[str] = []
    for pair in config.pairs:
        price = config.prices.get(pair.price_key)
        minimum = price.min_cacheable_tokens
        if not provider_facts()[pair.provider].count_tokens:
            rows.append([pair.expert, pair.model, pair.fingerprint[:12], "?", str(minimum or "?"), "-", "-", "-", "-",
                         "-", f"not counted: {pair.provider} has no count_tokens; the daemon's first ping measures it"])
            continue
        sdk = sdk_for(client.sdk, pair)
        try:
            message = [{"role": "user", "content": pair.ping_message}]
            total = sdk.messages.count_tokens(model=pair.model, messages=message, **pair.prefix.params())
            tail = sdk.messages.count_tokens(model=pair.model, messages=message)
        except anthropic.AnthropicError as exc:
            err = describe_error(exc, provider=pair.provider)
            errors.append(f"{pair.key}: {err.error_type}: {err.message}")
            rows.append([pair.expert, pair.model, pair.fingerprint[:12], "?", str(minimum or "?"), "-", "-", "-", "-",
                         "-", "error: not counted (see below)"])
            docs.append({"expert": pair.expert, "model": pair.model, "fingerprint": pair.fingerprint,
                         "status": "error", "error": f"{err.error_type}: {err.message}"})
            continue
        prefix_tokens = total.input_tokens - tail.input_tokens
        event(log, logging.DEBUG, "counted", expert=pair.expert, model=pair.model, prefix_tokens=prefix_tokens,
              ping_tokens=tail.input_tokens, minimum=minimum, fingerprint=pair.fingerprint)
        status = "ok"
        if minimum is None:
            status = "minimum unknown"
        elif prefix_tokens < minimum:
            status = "below-minimum"
            below += 1
        # The pair's own timing for its TTL; the other TTL at its default interval, same jitter.
        advice = ttl_advice(
            config.prices,
            pair.price_key,
            prefix_tokens,
            tail.input_tokens,
            interval_5m=(pair.interval if pair.ttl == "5m" else 240.0) + pair.jitter / 2,
            interval_1h=(pair.interval if pair.ttl == "1h" else 3300.0) + pair.jitter / 2,
            output_tokens=pair.max_tokens,
            ttl=pair.ttl,
        )
        if advice.ping_cost is None:
            status += ", no price"
        ping_cost = advice.ping_cost
        daily = advice.daily_1h if pair.ttl == "1h" else advice.daily_5m
        penalty = advice.miss_penalty_1h if pair.ttl == "1h" else advice.miss_penalty_5m
        if status.startswith("below-minimum"):
            # Nothing caches: every ping pays the whole prefix as plain input, not a cache read.
            ping_cost, daily = uncached_ping_cost(config, pair, total.input_tokens)
            status += f" (cannot cache: {prefix_tokens:,} < {minimum:,} tokens)"
            breakeven = "-"  # it cannot cache: no keepalive pays for itself
        elif advice.break_even_cold_per_day is None:
            breakeven = "unknown"
        else:
            breakeven = f"{advice.break_even_cold_per_day:,.1f} misses/day"
        arithmetic += [f"{pair.key}:", *(f"  {line}" for line in advice.lines)]
        rows.append(
            [
                pair.expert,
                pair.model,
                pair.fingerprint[:12],
                str(prefix_tokens),
                "?" if minimum is None else str(minimum),
                format_usd(ping_cost, 6),
                format_usd(daily, 4),
                format_usd(penalty, 6),
                breakeven,
                advice.recommended,
                status,
            ]
        )
        docs.append({
            "expert": pair.expert, "model": pair.model, "ttl": pair.ttl, "fingerprint": pair.fingerprint,
            "prefix_tokens": prefix_tokens, "ping_tokens": tail.input_tokens, "minimum_tokens": minimum,
            "cacheable": not status.startswith("below"),
            "ping_cost_usd": ping_cost, "keepalive_per_day_usd": daily, "miss_penalty_usd": penalty,
            "break_even_misses_per_day": None if status.startswith("below") else advice.break_even_cold_per_day,
            "ttl_advice": advice.recommended, "status": status,
        })
    if fmt == "json":
        print(json.dumps({"pairs": docs, "errors": errors}, indent=2))
        return EX_FAIL if errors else (EX_NOT_ALL_WARM if below else EX_OK)
    print(
        _table(
            ["EXPERT", "MODEL", "FINGERPRINT", "TOKENS", "MINIMUM", "PING COST", "KEEPALIVE/DAY", "MISS PENALTY",
             "BREAK-EVEN", "TTL ADVICE", "STATUS"],
            rows,
        )
    )
    print("\nKEEPALIVE/DAY: pings at the pair's interval plus one cold start a day; BREAK-EVEN: production cache"
          " misses a day the keepalive must prevent to pay for itself (KEEPALIVE/DAY / MISS PENALTY)")
    if explain:
        print("\nTTL advice, with the arithmetic:\n" + "\n".join(arithmetic))
    if below:
        print(f"\n{below} pair(s) below the model's minimum cacheable length: they cannot cache; "
              "lengthen the prompt or drop the pair.")
    if errors:
        print(f"\n{len(errors)} pair(s) could not be counted:", *(f"  {e}"[:200] for e in errors), sep="\n", file=sys.stderr)
        return EX_FAIL
    return EX_NOT_ALL_WARM if below else EX_OK
