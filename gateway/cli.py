"""The ``tollgate`` command: serve, dev, worker-sim, and administration (keys, budgets, usage)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from redis.asyncio import Redis
from redis.exceptions import RedisError

from billing import (
    DEFAULT_SCOPES,
    SCOPES,
    ApiKey,
    Budgets,
    InvalidBudgetError,
    InvalidKeySettingError,
    KeyLimits,
    KeyStore,
    Ledger,
    ReportQueryError,
    check_tenant,
    check_writable,
    format_usd,
    month_of,
    parse_key_id,
    parse_query,
    parse_time,
    parse_usd,
    usage_report,
)
from config import Settings, SettingsError, load_settings
from gateway.deps import build_redis
from gateway.lifecycle import shutdown_seconds
from gateway.logs import logging_config
from gateway.sim import cli as sim_cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per worker call is noise, not a log
    try:
        return int(args.handler(args) or 0)
    except SettingsError as exc:
        print(f"tollgate: configuration error: {exc}", file=sys.stderr)
        return 2
    except RedisError as exc:
        print(f"tollgate: cannot reach Redis ({exc}); pass --redis-url or set TOLLGATE_REDIS__URL", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tollgate", description="A Workers-AI-compatible gateway for vLLM workers.")
    parser.add_argument("--config", help="YAML config file (default: $TOLLGATE_CONFIG or config/tollgate.yaml)")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway (uvicorn with uvloop and httptools)")
    serve.add_argument("--host", help="bind address (default: server.host)")
    serve.add_argument("--port", type=int, help="port (default: server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (default: server.workers)")
    serve.set_defaults(handler=_serve)

    dev = commands.add_parser(
        "dev", help="run everything on this machine: redis-server, two simulated workers, the gateway and a demo key"
    )
    dev.add_argument("--port", type=int, default=8080, help="gateway port (default: 8080)")
    dev.add_argument("--tenant", default="demo", help="demo account id (default: demo)")
    dev.set_defaults(handler=_dev)

    sim = commands.add_parser("worker-sim", help="run a simulated vLLM worker")
    sim_cli.add_arguments(sim)
    sim.set_defaults(handler=sim_cli.run)

    admin_commands = [*_add_key_commands(commands), *_add_budget_commands(commands), _add_usage_command(commands)]
    for sub in admin_commands:
        sub.add_argument("--redis-url", help="Redis URL (default: redis.url from the config)")
    return parser


def _add_key_commands(commands: Any) -> list[argparse.ArgumentParser]:
    keys = commands.add_parser("keys", help="manage API keys (talks to Redis directly)")
    key_commands = keys.add_subparsers(required=True, metavar="ACTION")
    create = key_commands.add_parser("create", help="create a key and print it once")
    create.add_argument("--tenant", required=True, help="the account id the key belongs to")
    create.add_argument("--name", default="", help="a label for the key")
    create.add_argument(
        "--scope",
        action="append",
        choices=SCOPES,
        help="a scope the key holds; repeat for several (default: inference and usage:read)",
    )
    create.add_argument("--expires-at", help="expiry, ISO 8601 (UTC if no offset) or Unix seconds")
    create.add_argument("--expires-in", type=float, metavar="SECONDS", help="expiry, in seconds from now")
    create.add_argument("--monthly-budget-usd", help="the key's own spend cap per calendar month (UTC), e.g. 5.00")
    _add_limit_options(create)
    create.set_defaults(handler=_keys_create)
    listing = key_commands.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--tenant", help="only this account's keys")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_keys_list)
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_keys_revoke)
    rotate = key_commands.add_parser("rotate", help="issue a successor key and retire this one")
    rotate.add_argument("key_id")
    rotate.add_argument(
        "--grace-seconds", type=float, default=0.0, help="keep the old key working this long (default: 0)"
    )
    rotate.set_defaults(handler=_keys_rotate)
    limits = key_commands.add_parser("limits", help="set a key's own rate limits")
    limits.add_argument("key_id")
    _add_limit_options(limits)
    limits.set_defaults(handler=_keys_limits)
    return [create, listing, revoke, rotate, limits]


def _add_limit_options(parser: argparse.ArgumentParser) -> None:
    for option, what in (("--rpm", "requests"), ("--tpm", "tokens"), ("--streams", "concurrent streams")):
        parser.add_argument(
            option,
            type=_limit_value,
            metavar="N",
            help=f"{what} {'at once' if option == '--streams' else 'per minute'} (0: no limit; 'tenant': its default)",
        )


def _add_budget_commands(commands: Any) -> list[argparse.ArgumentParser]:
    budget = commands.add_parser("budget", help="show or set a tenant's monthly budget")
    budget_commands = budget.add_subparsers(required=True, metavar="ACTION")
    show = budget_commands.add_parser("show", help="a tenant's budget and spend this month")
    show.set_defaults(handler=_budget_show)
    set_ = budget_commands.add_parser("set", help="set the monthly cap in dollars, or 'none' for no cap")
    set_.add_argument("usd", help="e.g. 25.00, or none")
    set_.set_defaults(handler=_budget_set)
    reset = budget_commands.add_parser("reset", help="go back to the configured default cap")
    reset.set_defaults(handler=_budget_reset)
    for sub in (show, set_, reset):
        sub.add_argument("--tenant", required=True, help="the account id")
    return [show, set_, reset]


def _add_usage_command(commands: Any) -> argparse.ArgumentParser:
    usage = commands.add_parser("usage", help="usage and spend by hour or day (talks to Redis directly)")
    usage.add_argument("--tenant", action="append", help="an account id; repeat for several (default: all)")
    usage.add_argument("--from", dest="since", help="start, ISO 8601 or Unix seconds (default: 24 h / 30 days ago)")
    usage.add_argument("--to", dest="until", help="end, exclusive (default: now)")
    usage.add_argument("--granularity", choices=["hour", "day"], default="hour")
    usage.add_argument("--model", help="only this model")
    usage.add_argument("--group-by", help="model, tenant or model,tenant")
    usage.add_argument("--format", choices=["table", "json", "csv"], default="table")
    usage.set_defaults(handler=_usage)
    return usage


def _apply_config_option(args: argparse.Namespace) -> None:
    if args.config:
        os.environ["TOLLGATE_CONFIG"] = os.path.abspath(args.config)


def _serve(args: argparse.Namespace) -> int:
    _apply_config_option(args)
    settings = load_settings()  # fail fast, with the key named, before uvicorn starts
    try:
        check_writable(Path(settings.ledger.spool_dir))
    except OSError as exc:
        raise SettingsError(f"ledger.spool_dir: cannot write to {settings.ledger.spool_dir}: {exc}") from exc
    workers = args.workers or settings.server.workers
    with _metrics_directory(workers):
        uvicorn.run(
            "gateway.app:create_app_from_environment",
            factory=True,
            host=args.host or settings.server.host,
            port=args.port or settings.server.port,
            workers=workers,
            loop="uvloop",
            http="httptools",
            access_log=False,  # the gateway writes its own (gateway/logs.py)
            log_config=logging_config(settings.logging),
            timeout_graceful_shutdown=math.ceil(shutdown_seconds(settings)),
        )
    return 0


@contextlib.contextmanager
def _metrics_directory(workers: int) -> Iterator[None]:
    """Several processes serve one port, and a scrape reaches any one of them: they keep their metrics in files of
    one directory (prometheus-client's multiprocess mode), which every process sums when scraped. The directory is
    ``PROMETHEUS_MULTIPROC_DIR`` if set (emptied first: old values would count again), else a temporary one. Its
    variable must be set before the processes import prometheus-client: uvicorn starts them afresh. (Set but empty,
    it already chose multiprocess mode for this process, which then needs a directory too.)"""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        directory = Path(given)
        if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
            raise SettingsError(f"PROMETHEUS_MULTIPROC_DIR={given}: not a writable directory")
        for stale in directory.glob("*.db"):
            stale.unlink()
        yield
    elif workers > 1 or given is not None:
        with tempfile.TemporaryDirectory(prefix="tollgate-metrics-") as temporary:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = temporary
            try:
                yield
            finally:
                del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    else:
        yield


def _dev(args: argparse.Namespace) -> int:
    from gateway.dev import run_dev

    _apply_config_option(args)
    return run_dev(port=args.port, tenant=args.tenant)


def _keys_create(args: argparse.Namespace) -> int:
    async def create(redis: Redis, settings: Settings) -> int:
        expires_at = None
        if args.expires_in is not None:
            expires_at = time.time() + args.expires_in
        elif args.expires_at:
            expires_at = parse_time(args.expires_at, "--expires-at")
        budget = parse_usd(args.monthly_budget_usd) if args.monthly_budget_usd else None
        issued = await KeyStore(redis).create(
            args.tenant,
            args.name,
            scopes=args.scope or DEFAULT_SCOPES,
            expires_at=expires_at,
            monthly_budget_nano_usd=budget,
            limits=_limits_from(args, KeyLimits()),
        )
        _print_record(issued.record)
        print(f"key:      {issued.secret_key}")
        print("Store the key now: it is shown once and kept only as a hash.")
        return 0

    return _run(args, create)


def _keys_list(args: argparse.Namespace) -> int:
    async def list_keys(redis: Redis, settings: Settings) -> int:
        keys = await KeyStore(redis).list_keys(args.tenant)
        if args.json:
            print(json.dumps([key.as_dict() for key in keys], indent=2))
            return 0
        now = time.time()
        rows = [("ID", "TENANT", "NAME", "SCOPES", "CREATED", "EXPIRES", "STATE", "BUDGET/MONTH", "OWN-LIMITS")]
        for key in keys:
            state = "revoked" if key.revoked else ("active" if key.usable_at(now) else "expired")
            budget = "-" if key.monthly_budget_nano_usd is None else "$" + format_usd(key.monthly_budget_nano_usd)
            expires = _iso(key.expires_at) if key.expires_at else "never"
            rows.append((key.key_id, key.tenant, key.name, ",".join(sorted(key.scopes)), _iso(key.created_at),
                         expires, state, budget, _own_limits(key.limits)))  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        return 0

    return _run(args, list_keys)


def _keys_revoke(args: argparse.Namespace) -> int:
    async def revoke(redis: Redis, settings: Settings) -> int:
        if await KeyStore(redis).revoke(args.key_id) is not None:
            print(f"revoked {args.key_id}")
            return 0
        return _no_such_key(args.key_id)

    return _run(args, revoke)


def _keys_rotate(args: argparse.Namespace) -> int:
    async def rotate(redis: Redis, settings: Settings) -> int:
        rotated = await KeyStore(redis).rotate(args.key_id, grace_seconds=args.grace_seconds)
        if rotated is None:
            print(f"tollgate: no usable key with id {args.key_id!r} (revoked, expired or unknown)", file=sys.stderr)
            return 1
        issued, retired = rotated
        _print_record(issued.record)
        print(f"key:      {issued.secret_key}")
        if retired.expires_at is not None and not retired.revoked:
            print(f"The old key {retired.key_id} expires at {_iso(retired.expires_at)}.")
        else:
            print(f"The old key {retired.key_id} is revoked.")
        print("Store the new key now: it is shown once.")
        return 0

    return _run(args, rotate)


def _keys_limits(args: argparse.Namespace) -> int:
    async def set_limits(redis: Redis, settings: Settings) -> int:
        store = KeyStore(redis)
        key = await store.get(args.key_id)
        updated = await store.set_limits(args.key_id, _limits_from(args, key.limits)) if key is not None else None
        if updated is None:
            return _no_such_key(args.key_id)
        _print_record(updated)
        return 0

    return _run(args, set_limits)


_TENANT_DEFAULT = -1  # --rpm tenant: the key follows its tenant's limit


def _limit_value(text: str) -> int:
    if text == "tenant":
        return _TENANT_DEFAULT
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 or 'tenant', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 or 'tenant', got {text!r}")
    return value


def _limits_from(args: argparse.Namespace, current: KeyLimits) -> KeyLimits:
    """``current`` with the options given: a number, or ``tenant`` for the tenant's limit."""
    changes = {}
    options = {"rpm": "requests_per_minute", "tpm": "tokens_per_minute", "streams": "concurrent_streams"}
    for option, name in options.items():
        value = getattr(args, option)
        if value is not None:
            changes[name] = None if value == _TENANT_DEFAULT else value
    return dataclasses.replace(current, **changes)


def _budget_show(args: argparse.Namespace) -> int:
    async def show(redis: Redis, settings: Settings) -> int:
        tenant = check_tenant(args.tenant)
        budgets = Budgets(redis, default_monthly_nano_usd=settings.budgets.default_monthly_nano_usd or None)
        cap, is_default = await budgets.tenant_budget(tenant)
        month = month_of(time.time())
        spent = await Ledger(redis).month_spend(tenant, month)
        limit = "no cap" if cap is None else f"${format_usd(cap)} per month"
        print(f"tenant:   {tenant}")
        print(f"budget:   {limit}{' (the configured default)' if is_default else ''}")
        print(f"spent:    ${format_usd(spent)} in {month[:4]}-{month[4:]} (UTC)")
        return 0

    return _run(args, show)


def _budget_set(args: argparse.Namespace) -> int:
    async def set_budget(redis: Redis, settings: Settings) -> int:
        cap = None if args.usd.strip().lower() == "none" else parse_usd(args.usd)
        await Budgets(redis, default_monthly_nano_usd=None).set_tenant_budget(check_tenant(args.tenant), cap)
        print(f"{args.tenant}: " + ("no monthly cap" if cap is None else f"${format_usd(cap)} per month (UTC)"))
        return 0

    return _run(args, set_budget)


def _budget_reset(args: argparse.Namespace) -> int:
    async def reset(redis: Redis, settings: Settings) -> int:
        await Budgets(redis, default_monthly_nano_usd=None).reset_tenant_budget(check_tenant(args.tenant))
        print(f"{args.tenant}: back to the configured default budget")
        return 0

    return _run(args, reset)


def _usage(args: argparse.Namespace) -> int:
    async def usage(redis: Redis, settings: Settings) -> int:
        tenants = [check_tenant(name) for name in args.tenant] if args.tenant else await KeyStore(redis).tenants()
        if not tenants:
            print("tollgate: no tenants yet (create a key first)", file=sys.stderr)
            return 1
        given = {"from": args.since, "to": args.until, "model": args.model, "group_by": args.group_by}
        params = {"granularity": args.granularity, **{name: value for name, value in given.items() if value}}
        query = parse_query(params, tenants=tenants, now=time.time(), allow_group_by_tenant=True)
        report = await usage_report(redis, query, models=list(settings.models))
        if args.format == "json":
            print(json.dumps(report.as_dict(), indent=2))
        elif args.format == "csv":
            sys.stdout.write(report.to_csv())
        else:
            sys.stdout.write(report.to_table())
        return 0

    return _run(args, usage)


def _run(args: argparse.Namespace, command: Callable[[Redis, Settings], Awaitable[int]]) -> int:
    """Run an administrative ``command`` against the configured Redis; bad input is a message and exit code 2."""

    async def run() -> int:
        settings = _settings_for(args)
        if not args.redis_url:  # say where: a wrong Redis answers just as politely, with nothing in it
            hint = f"tollgate: using Redis {_redacted(settings.redis.url)} (redis.url; --redis-url to choose)"
            print(hint, file=sys.stderr)
        redis = build_redis(settings)
        try:
            return await command(redis, settings)
        except (InvalidKeySettingError, InvalidBudgetError, ReportQueryError) as exc:
            print(f"tollgate: {exc}", file=sys.stderr)
            return 2
        finally:
            await redis.aclose()

    return asyncio.run(run())


def _own_limits(limits: KeyLimits) -> str:
    """``rpm=600,tpm=60000,streams=5`` for the limits a key sets itself; ``-`` when it follows its tenant's."""
    short = {"requests_per_minute": "rpm", "tokens_per_minute": "tpm", "concurrent_streams": "streams"}
    own = [f"{short[name]}={value}" for name, value in limits.as_dict().items() if value is not None]
    return ",".join(own) or "-"


def _redacted(url: str) -> str:
    """``url`` without its password."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _print_record(record: ApiKey) -> None:
    print(f"key id:   {record.key_id}")
    print(f"tenant:   {record.tenant}")
    if record.name:
        print(f"name:     {record.name}")
    print(f"scopes:   {', '.join(sorted(record.scopes))}")
    if record.expires_at is not None:
        print(f"expires:  {_iso(record.expires_at)}")
    if record.monthly_budget_nano_usd is not None:
        print(f"budget:   ${format_usd(record.monthly_budget_nano_usd)} per month (UTC)")
    own = {name: value for name, value in record.limits.as_dict().items() if value is not None}
    if own:
        print("limits:   " + ", ".join(f"{name} {value}" for name, value in own.items()))


def _no_such_key(key_id: str) -> int:
    hint = f" (pass the key id, here {parse_key_id(key_id)})" if parse_key_id(key_id) else ""
    print(f"tollgate: no key with id {key_id!r}{hint}", file=sys.stderr)
    return 1


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _settings_for(args: argparse.Namespace) -> Settings:
    _apply_config_option(args)
    environ = dict(os.environ)
    if args.redis_url:
        environ["TOLLGATE_REDIS__URL"] = args.redis_url
    return load_settings(environ=environ)


if __name__ == "__main__":
    sys.exit(main())
