"""The ``tollgate`` command: serve, dev, worker-sim and key administration."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

import uvicorn
from redis.asyncio import Redis
from redis.exceptions import RedisError

from billing import InvalidTenantError, KeyStore, parse_key_id
from config import SettingsError, load_settings
from gateway.deps import build_redis
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

    keys = commands.add_parser("keys", help="manage API keys")
    key_commands = keys.add_subparsers(required=True, metavar="ACTION")
    create = key_commands.add_parser("create", help="create a key and print it once")
    create.add_argument("--tenant", required=True, help="the account id the key belongs to")
    create.add_argument("--name", default="", help="a label for the key")
    create.set_defaults(handler=_keys_create)
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_keys_revoke)
    for sub in (create, revoke):
        sub.add_argument("--redis-url", help="Redis URL (default: redis.url from the config)")
    return parser


def _apply_config_option(args: argparse.Namespace) -> None:
    if args.config:
        os.environ["TOLLGATE_CONFIG"] = os.path.abspath(args.config)


def _serve(args: argparse.Namespace) -> int:
    _apply_config_option(args)
    settings = load_settings()  # fail fast, with the key named, before uvicorn starts
    uvicorn.run(
        "gateway.app:create_app_from_environment",
        factory=True,
        host=args.host or settings.server.host,
        port=args.port or settings.server.port,
        workers=args.workers or settings.server.workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=30,
    )
    return 0


def _dev(args: argparse.Namespace) -> int:
    from gateway.dev import run_dev

    _apply_config_option(args)
    return run_dev(port=args.port, tenant=args.tenant)


def _keys_create(args: argparse.Namespace) -> int:
    async def create() -> int:
        redis = _redis_for(args)
        try:
            issued = await KeyStore(redis).create(args.tenant, args.name)
        except InvalidTenantError as exc:
            print(f"tollgate: {exc}", file=sys.stderr)
            return 2
        finally:
            await redis.aclose()
        print(f"key id:  {issued.record.key_id}")
        print(f"tenant:  {issued.record.tenant}")
        print(f"key:     {issued.secret_key}")
        print("Store the key now: it is shown once and kept only as a hash.")
        return 0

    return asyncio.run(create())


def _keys_revoke(args: argparse.Namespace) -> int:
    async def revoke() -> int:
        redis = _redis_for(args)
        try:
            found = await KeyStore(redis).revoke(args.key_id)
        finally:
            await redis.aclose()
        if found:
            print(f"revoked {args.key_id}")
            return 0
        hint = f" (pass the key id, here {parse_key_id(args.key_id)})" if parse_key_id(args.key_id) else ""
        print(f"tollgate: no key with id {args.key_id!r}{hint}", file=sys.stderr)
        return 1

    return asyncio.run(revoke())


def _redis_for(args: argparse.Namespace) -> Redis:
    _apply_config_option(args)
    environ = dict(os.environ)
    if args.redis_url:
        environ["TOLLGATE_REDIS__URL"] = args.redis_url
    return build_redis(load_settings(environ=environ))


if __name__ == "__main__":
    sys.exit(main())
