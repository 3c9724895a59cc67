"""Redis memory per unit of Tollgate's state: bills, usage buckets, API keys, budgets and rate-limit windows.

    .venv/bin/python -m bench.redis_memory                     # about a minute on 2 cores
    .venv/bin/python -m bench.redis_memory --requests 20000    # quicker; the per-request figure barely moves

Each scenario starts from an empty database (FLUSHALL) of a private, memory-only redis-server and writes through the
project's own code: ``Ledger.record`` (what the bill step calls), ``KeyStore.create``, ``Budgets.set_tenant_budget``
and ``Limiter.admit``. Once Redis has finished resizing its key tables it reads INFO memory, INFO keyspace and MEMORY
STATS on a connection of its own. A scenario's cost is the growth of ``used_memory``. The two key tables (every key,
and the keys with a TTL) are counted apart: each is a power of two >= its number of keys, 8 bytes a slot, so they grow
in steps that would blur a per-unit figure. The rule of thumb and the worked example at the end come from this run.

stdout gets the tables; progress goes to stderr; ``--output FILE`` appends the figures as JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

from redis.asyncio import Redis

from billing import (
    ApiKey,
    Budgets,
    KeyStore,
    Ledger,
    Limiter,
    Limits,
    Price,
    UsageRecord,
    cost_nano_usd,
    price_of,
)
from billing.budgets import month_bounds
from config import Settings, load_settings
from gateway._processes import redis_server
from gateway.deps import retention_for

MODELS: Final = ("@cf/meta/llama-3.1-8b-instruct", "@cf/meta/llama-3.1-8b-instruct-fp8")
# 56 characters: "<model>|completion_tokens" passes hash-max-listpack-value (64 bytes): its buckets are hash tables.
LONG_MODEL: Final = "@cf/deepseek-ai/deepseek-r1-distill-qwen-32b-instruct-awq"
DEFAULT_PRICE: Final = Price(280, 830)
STATUSES: Final = (("ok", 0.97), ("client_disconnected", 0.02), ("upstream_error", 0.01))
SLOT_BYTES: Final = 8  # one slot of a key table (a pointer)
SAMPLE_KEYS: Final = 300  # keys per class whose MEMORY USAGE is read for the breakdown
KEY_ID_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz234567"
# The sizes of the first, unreported pass: every command and structure is used once before anything is measured.
SMALL_PASS: Final = {
    "requests": 200,
    "tenants": 10,
    "floor_tenants": 5,
    "bucket_tenants": 2,
    "bucket_hours": 3,
    "keys": 20,
    "key_tenants": 5,
    "budgets": 20,
    "rate_keys": 2,
}
MIB: Final = 1024 * 1024
GIB: Final = 1024 * MIB

# Key classes of the breakdown, first match wins (layouts: billing/ledger.py, limits.py, keys.py, budgets.py).
CLASSES: Final = (
    ("seen", re.compile(rb"^tg:\{[^}]*\}:seen:")),
    ("events", re.compile(rb"^tg:\{[^}]*\}:events$")),
    ("usage:h", re.compile(rb"^tg:\{[^}]*\}:usage:h:")),
    ("usage:d", re.compile(rb"^tg:\{[^}]*\}:usage:d:")),
    ("spend:m", re.compile(rb"^tg:\{[^}]*\}:spend:m:")),
    ("rl window", re.compile(rb"^tg:\{[^}]*\}:rl:.*:w$")),
    ("rl tokens", re.compile(rb"^tg:\{[^}]*\}:rl:.*:wt$")),
    ("rl slots", re.compile(rb"^tg:\{[^}]*\}:rl:.*:c$")),
    ("key record", re.compile(rb"^tg:key:")),
    ("tenant keys", re.compile(rb"^tg:\{[^}]*\}:keys$")),
    ("budget", re.compile(rb"^tg:\{[^}]*\}:budget$")),
    ("tenants", re.compile(rb"^tg:tenants$")),
)
LENGTH_COMMANDS: Final = {b"stream": "XLEN", b"hash": "HLEN", b"zset": "ZCARD", b"set": "SCARD", b"list": "LLEN"}


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def table_slots(entries: int) -> int:
    """Slots of a settled Redis key table holding ``entries`` keys: the smallest power of two >= entries (>= 4)."""
    return 0 if entries == 0 else max(4, 1 << (entries - 1).bit_length())


def table_bytes(keys: int, keys_with_ttl: int) -> int:
    """The main and expires key tables of a settled database."""
    return SLOT_BYTES * (table_slots(keys) + table_slots(keys_with_ttl))


@dataclasses.dataclass(frozen=True, slots=True)
class Reading:
    used: int  # used_memory, with one client connected
    keys: int
    expires: int  # keys with a TTL

    @property
    def tables(self) -> int:
        return table_bytes(self.keys, self.expires)


@dataclasses.dataclass(slots=True)
class Result:
    name: str
    unit: str
    units: int
    before: Reading
    after: Reading
    seconds: float
    breakdown: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def used(self) -> int:
        return self.after.used - self.before.used

    @property
    def tables(self) -> int:
        return self.after.tables - self.before.tables

    @property
    def data(self) -> int:
        """Growth less the key tables' slots: what the keys themselves take."""
        return self.used - self.tables

    def per_unit(self) -> float:
        return self.data / self.units

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.name,
            "unit": self.unit,
            "units": self.units,
            "keys_added": self.after.keys - self.before.keys,
            "keys_with_ttl_added": self.after.expires - self.before.expires,
            "used_memory_added": self.used,
            "key_tables_added": self.tables,
            "bytes_per_unit": round(self.per_unit(), 1),
            "bytes_per_unit_with_tables": round(self.used / self.units, 1),
            "seconds": round(self.seconds, 2),
            "breakdown": self.breakdown,
        }


async def read_memory(redis_url: str, pool: Redis) -> Reading:
    """Memory and key counts, read on a connection of its own once the scenario's connections are closed (their
    buffers are large, and Redis 7.0 accounts them in ``mem_clients_normal`` only from time to time) and Redis has
    finished resizing its key tables (while a table is rehashed, its old and new slots are both allocated). Redis
    7.0/7.2 report a table in MEMORY STATS as entries * 24 (dictEntry), plus 16 (robj) per key in the main one, plus
    8 a slot; when that does not match the settled size, the reading waits (up to 5 s) for the figures to stop
    moving."""
    await pool.connection_pool.disconnect()
    reader = Redis.from_url(redis_url, single_connection_client=True)
    try:
        deadline, previous = time.monotonic() + 5.0, None
        while True:
            clients = int((await reader.info("clients"))["connected_clients"])
            info = await reader.info("memory")
            keyspace = (await reader.info("keyspace")).get("db0", {})
            stats = (await reader.memory_stats()).get("db.0", {})
            reading = Reading(
                used=int(info["used_memory"]),
                keys=int(keyspace.get("keys", 0)),
                expires=int(keyspace.get("expires", 0)),
            )
            main = int(stats.get("overhead.hashtable.main", 0)) - reading.keys * 40
            expires = int(stats.get("overhead.hashtable.expires", 0)) - reading.expires * 24
            settled = clients == 1 and (main, expires) == (
                SLOT_BYTES * table_slots(reading.keys),
                SLOT_BYTES * table_slots(reading.expires),
            )
            if settled or (clients == 1 and reading == previous) or time.monotonic() > deadline:
                return reading
            previous = reading
            await asyncio.sleep(0.25)
    finally:
        await reader.aclose()


async def breakdown(redis: Redis) -> list[dict[str, Any]]:
    """Per class of key: how many, MEMORY USAGE (key name, value and its entry in the main table; not the TTL's entry
    nor table slots) of up to SAMPLE_KEYS of them, their items (stream entries, hash fields, ...), TTL and
    encodings."""
    counts: dict[str, int] = {}
    samples: dict[str, list[bytes]] = {}
    async for key in redis.scan_iter(count=5000):
        name = next((name for name, pattern in CLASSES if pattern.search(key)), "other")
        counts[name] = counts.get(name, 0) + 1
        if len(samples.setdefault(name, [])) < SAMPLE_KEYS:
            samples[name].append(key)
    rows = []
    for name, _ in (*CLASSES, ("other", None)):
        keys = samples.get(name)
        if not keys:
            continue
        async with redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.memory_usage(key, samples=0)
                pipe.pttl(key)
                pipe.type(key)
                pipe.execute_command("OBJECT", "ENCODING", key)
            replies = await pipe.execute()
        usage, ttls, types, encodings = replies[0::4], replies[1::4], replies[2::4], replies[3::4]
        async with redis.pipeline(transaction=False) as pipe:
            for key, kind in zip(keys, types, strict=True):
                command = LENGTH_COMMANDS.get(kind)
                pipe.execute_command(command, key) if command else pipe.exists(key)
            items = await pipe.execute()
        per_key = sum(usage) / len(keys)
        items_per_key = sum(items) / len(keys)
        with_ttl = sum(ttl >= 0 for ttl in ttls)
        rows.append(
            {
                "class": name,
                "keys": counts[name],
                "items_per_key": round(items_per_key, 1),
                "bytes_per_key": round(per_key, 1),
                "bytes_per_item": round(per_key / items_per_key, 1) if items_per_key else None,
                "ttl": "yes" if with_ttl == len(keys) else "NO" if with_ttl == 0 else "some",
                "encoding": ",".join(sorted({_text(encoding) for encoding in encodings})),
            }
        )
    return rows


class Bench:
    def __init__(self, redis_url: str, redis: Redis, settings: Settings, args: argparse.Namespace) -> None:
        self.url = redis_url
        self.redis = redis
        self.settings = settings
        self.args = args
        self.rng = random.Random(20241204)
        self.ledger = Ledger(redis, retention_for(settings))
        self.limiter = Limiter(redis, slot_ttl_seconds=settings.limits.slot_ttl_seconds)
        self.results: dict[str, Result] = {}
        self.verbose = True
        # Requests are dated from the start of last month: the bucket scenarios' 48 hours stay in one month (one spend
        # hash per tenant whether spread or not), and the buckets' expiry (400 days, 5 years on) is far off.
        this_month = time.strftime("%Y%m", time.gmtime())
        previous = time.strftime("%Y%m", time.gmtime(month_bounds(this_month)[0] - 86400))
        self.base = int(month_bounds(previous)[0])

    async def run(self, name: str, unit: str, units: int, write: Callable[[], Awaitable[None]]) -> Result:
        await self.redis.flushall()
        before = await read_memory(self.url, self.redis)
        started = time.monotonic()
        await write()
        seconds = time.monotonic() - started
        result = Result(name, unit, units, before, await read_memory(self.url, self.redis), seconds)
        result.breakdown = await breakdown(self.redis)
        self.results[name] = result
        if self.verbose:
            say(f"{name}: {result.per_unit():,.1f} B per {unit} ({units:,} in {seconds:.1f} s)")
        return result

    # -- the bill step ---------------------------------------------------------------------------------------------

    def record(self, tenant: int, model: str, started_at: float) -> UsageRecord:
        prompt, completion = self.rng.randint(20, 3000), self.rng.randint(1, 800)
        status = self.rng.choices([status for status, _ in STATUSES], [weight for _, weight in STATUSES])[0]
        configured = self.settings.models.get(model)
        return UsageRecord(
            request_id=uuid.uuid4().hex,  # as gateway/middleware.py makes them
            tenant=_tenant(tenant),
            key_id=_key_id(tenant),
            model=model,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_nano_usd=cost_nano_usd(price_of(configured) if configured else DEFAULT_PRICE, prompt, completion),
            status=status,
            started_at=started_at,
            duration_seconds=self.rng.uniform(0.2, 30.0),
        )

    async def bill(self, records: Sequence[UsageRecord]) -> None:
        pending = iter(records)

        async def worker() -> None:
            for record in pending:
                if not await self.ledger.record(record):
                    raise RuntimeError(f"request id {record.request_id} was billed twice")

        await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))

    async def bills(self, tenants: int, count: int) -> Result:
        """``count`` requests of ``tenants`` tenants over both models, all in one hour."""
        rng = self.rng
        records = [self.record(i % tenants, rng.choice(MODELS), self.base + rng.uniform(0, 3599)) for i in range(count)]
        name = f"bills, {tenants} tenant{'s' if tenants > 1 else ''}, 2 models, 1 hour"
        return await self.run(name, "request", count, lambda: self.bill(records))

    async def first_requests(self, tenants: int) -> Result:
        """One request for each of ``tenants`` tenants: what a tenant costs as soon as it is billed at all."""
        records = [self.record(i, MODELS[0], self.base + self.rng.uniform(0, 3599)) for i in range(tenants)]
        name = f"bills, {tenants} tenants, 1 request each"
        return await self.run(name, "tenant", tenants, lambda: self.bill(records))

    async def buckets(self, models: Sequence[str], label: str) -> float:
        """The same requests (one per tenant, model and hour of ``--bucket-hours``) dated in one hour, then spread over
        the hours: the difference is the extra hourly and daily buckets. Returns the bytes of one bucket (an hourly and
        a daily one hold the same fields)."""
        tenants, hours = self.args.bucket_tenants, self.args.bucket_hours
        shape = [(tenant, hour, model) for tenant in range(tenants) for hour in range(hours) for model in models]
        offsets = [self.rng.uniform(0, 3599) for _ in shape]
        runs = []
        for spread in (False, True):
            records = [
                self.record(tenant, model, self.base + (hour * 3600 if spread else 0) + offset)
                for (tenant, hour, model), offset in zip(shape, offsets, strict=True)
            ]
            where = f"{hours} hours" if spread else "1 hour"
            name = f"buckets, {tenants} tenants x {label}, {len(records):,} requests in {where}"
            runs.append(await self.run(name, "request", len(records), lambda records=records: self.bill(records)))
        concentrated, spread_run = runs
        extra = _bucket_keys(spread_run) - _bucket_keys(concentrated)
        return (spread_run.data - concentrated.data) / extra

    # -- keys, budgets, rate limits ----------------------------------------------------------------------------------

    async def keys(self) -> Result:
        count, tenants = self.args.keys, self.args.key_tenants
        store = KeyStore(self.redis)

        async def write() -> None:
            for offset in range(0, count, 16):
                batch = range(offset, min(count, offset + 16))
                await asyncio.gather(*(store.create(_tenant(i % tenants), f"key-{i}") for i in batch))

        return await self.run(f"API keys, {count} over {tenants} tenants", "key", count, write)

    async def budgets(self) -> Result:
        count = self.args.budgets
        budgets = Budgets(self.redis, default_monthly_nano_usd=None)

        async def write() -> None:
            for offset in range(0, count, 16):
                batch = range(offset, min(count, offset + 16))
                await asyncio.gather(*(budgets.set_tenant_budget(_tenant(i), 25_000_000_000) for i in batch))

        return await self.run(f"tenant budgets, {count}", "budget", count, write)

    async def window(self, rpm: int) -> Result:
        """``--rate-keys`` keys with ``rpm`` requests a minute each, and a minute's worth admitted: a full sliding
        window, as a steady rate keeps it (entries leave it as new ones come)."""
        keys = [ApiKey(_key_id(i), _tenant(i), "", 0.0, False) for i in range(self.args.rate_keys)]
        limits = Limits(requests_per_minute=rpm, tokens_per_minute=rpm * 10_000)

        async def fill(key: ApiKey) -> None:
            for _ in range(rpm):
                await self.admit(key, limits, self.rng.randint(300, 3500))  # prompt + max_tokens

        async def write() -> None:
            await asyncio.gather(*(fill(key) for key in keys))

        name = f"rate-limit window, {len(keys)} keys at {rpm} rpm"
        return await self.run(name, "active key", len(keys), write)

    async def admit(self, key: ApiKey, limits: Limits, reserve_tokens: int) -> None:
        """Admit one request as the gateway does; a refusal means the scenario is wrong."""
        decision = await self.limiter.admit(
            key,
            limits,
            request_id=uuid.uuid4().hex,
            reserve_tokens=reserve_tokens,
            max_cost_nano_usd=1_000_000,
            now_hint=time.time(),
            default_cap_nano_usd=None,
        )
        if not decision.admitted:
            raise RuntimeError(f"admission refused ({decision.verdict}): the scenario's limits are wrong")

    async def slots(self, streams: int) -> Result:
        keys = [ApiKey(_key_id(i), _tenant(i), "", 0.0, False) for i in range(self.args.rate_keys)]
        limits = Limits(concurrent_streams=streams)

        async def write() -> None:
            for _ in range(streams):
                await asyncio.gather(*(self.admit(key, limits, 1000) for key in keys))

        name = f"stream slots, {len(keys)} keys x {streams} running"
        return await self.run(name, "active key", len(keys), write)

    async def warm_up(self) -> None:
        """Load the scripts and open the connection pool, so that neither shows in the first scenario."""
        await self.bill([self.record(0, MODELS[0], self.base) for _ in range(self.args.concurrency * 2)])
        await self.admit(ApiKey(_key_id(0), _tenant(0), "", 0.0, False), Limits(requests_per_minute=1), 1)


async def scenarios(bench: Bench) -> dict[str, Any]:
    args = bench.args
    one = await bench.bills(1, args.requests)
    many = await bench.bills(args.tenants, args.requests)
    first = await bench.first_requests(args.floor_tenants)
    buckets = {}
    for label, models in (("1 model", MODELS[:1]), ("2 models", MODELS), ("1 long-named model", (LONG_MODEL,))):
        buckets[label] = await bench.buckets(models, label)
    keys = await bench.keys()
    budgets = await bench.budgets()
    windows = {rpm: await bench.window(rpm) for rpm in args.rpm}
    slots = await bench.slots(args.streams)
    return {
        "results": list(bench.results.values()),
        "request_one_tenant": one.per_unit(),
        "request": many.per_unit(),
        "first_request": first.per_unit(),
        "bucket": buckets,
        "spend": _class_bytes(many, "spend:m"),
        "key": keys.per_unit(),
        "budget": budgets.per_unit(),
        "window": {rpm: result.per_unit() / rpm for rpm, result in windows.items()},
        "slot": slots.per_unit() / args.streams,
    }


async def measure(redis_url: str, settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    redis = Redis.from_url(redis_url, max_connections=args.concurrency + 8)
    try:
        # Redis 7 gives each command a latency histogram (tens of KB) the first time it runs: not data, so off.
        await redis.config_set("latency-tracking", "no")
        tiny = argparse.Namespace(**{**vars(args), **SMALL_PASS, "rpm": [min(args.rpm), max(args.rpm)]})
        bench = Bench(redis_url, redis, settings, tiny)
        say("a small pass first, so that every command and structure has been used once (its figures are dropped)")
        bench.verbose = False
        await bench.warm_up()
        await scenarios(bench)
        bench.args, bench.verbose = args, True
        bench.results.clear()
        return await scenarios(bench)
    finally:
        await redis.aclose()


def report(figures: dict[str, Any], settings: Settings, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Print the tables, the rule of thumb and the worked example; return them as JSON-able lines."""
    results: list[Result] = figures["results"]
    print("## Scenarios (each from an empty database; growth of used_memory)\n")
    print("| scenario | units | keys added | used_memory added | of which key tables | bytes per unit | with tables |")
    print("|---|---|---|---|---|---|---|")
    for result in results:
        print(
            f"| {result.name} | {result.units:,} {result.unit}s | {result.after.keys - result.before.keys:,} "
            f"| {_size(result.used)} | {_size(result.tables)} | {result.per_unit():,.1f} "
            f"| {result.used / result.units:,.1f} |"
        )
    print("\n## What the keys are (MEMORY USAGE of up to 300 keys per class: key, value, main-table entry)\n")
    print("| scenario | class | keys | items per key | bytes per key | bytes per item | TTL | encoding |")
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        for row in result.breakdown:
            per_item = "" if row["bytes_per_item"] is None else f"{row['bytes_per_item']:,.1f}"
            print(
                f"| {result.name} | {row['class']} | {row['keys']:,} | {row['items_per_key']:,} "
                f"| {row['bytes_per_key']:,.1f} | {per_item} | {row['ttl']} | {row['encoding']} |"
            )

    ledger = settings.ledger
    request, bucket2, bucket1 = figures["request"], figures["bucket"]["2 models"], figures["bucket"]["1 model"]
    per_model = bucket2 - bucket1
    bucket_base = bucket1 - per_model
    # a tenant's first bill, less what any request and its buckets take: the stream's first node
    stream_floor = figures["first_request"] - request - 2 * bucket1 - figures["spend"]
    window = figures["window"]
    busiest = max(window)
    rule = {
        "request_bytes": round(request),
        "request_bytes_one_tenant": round(figures["request_one_tenant"]),
        "first_request_of_a_tenant_bytes": round(figures["first_request"]),
        "stream_floor_bytes_per_tenant": round(stream_floor),
        "bucket_bytes_base": round(bucket_base),
        "bucket_bytes_per_model": round(per_model),
        "bucket_bytes_long_model_name": round(figures["bucket"]["1 long-named model"]),
        "spend_bytes_per_tenant_month": round(figures["spend"]),
        "api_key_bytes": round(figures["key"]),
        "budget_bytes": round(figures["budget"]),
        "window_bytes_per_request": {str(rpm): round(value) for rpm, value in window.items()},
        "slot_bytes": round(figures["slot"]),
    }
    days = max(ledger.seen_ttl_seconds, ledger.events_retention_seconds) / 86400
    hours, daily = ledger.hourly_retention_seconds / 3600, ledger.daily_retention_seconds / 86400
    windows = ", ".join(f"{value:,.0f} B at {rpm} rpm" for rpm, value in window.items())
    print("\n## Rule of thumb (bytes of used_memory; the key tables apart)\n")
    print(
        f"memory ≈ {request:,.0f} B x requests billed in the last {days:g} days (dedup id + usage event)\n"
        f"       + {stream_floor:,.0f} B x tenants with an event stream in the last {days:g} days (its open node)\n"
        f"       + ({bucket_base:,.0f} + {per_model:,.0f} x models used) B x tenant-hours with usage in the last "
        f"{hours / 24:g} days\n"
        f"       + the same x tenant-days with usage in the last {daily:,.0f} days\n"
        f"       + {figures['spend']:,.0f} B x tenant-months since the start (by MEMORY USAGE; the spend hash has "
        f"no TTL)\n"
        f"       + {figures['key']:,.0f} B x API keys ever created (no TTL) + {figures['budget']:,.0f} B x "
        f"tenant budgets\n"
        f"       + {window[busiest]:,.0f} B x requests admitted in the last minute by keys with rate limits "
        f"(per entry: {windows})\n"
        f"       + {figures['slot']:,.0f} B x streams running under a concurrency limit\n"
        f"       + 8 B x (2^ceil(log2(keys)) + 2^ceil(log2(keys with a TTL))): the key tables, 16-32 B per key\n"
        f"\nA bucket is one hash per tenant and hour (or day) holding every model used: {bucket1:,.0f} B with one "
        f"model, {bucket2:,.0f} B with two ({bucket2 / 2:,.0f} B per tenant-model-hour). A model name over 46 "
        f"characters makes it a real hash table: {figures['bucket']['1 long-named model']:,.0f} B with one model. "
        f"A tenant's first bill costs {figures['first_request']:,.0f} B in all."
    )

    example = _worked_example(figures, settings, args, bucket_base + per_model * args.example_models, busiest)
    print("\n## Worked example\n")
    print(
        f"{args.example_requests_per_day:,} requests a day, {args.example_tenants} tenants each using "
        f"{args.example_models} models every hour, {args.example_keys_per_tenant} keys per tenant, "
        f"{args.example_years:g} years running, peak {example['peak_requests_per_minute']:,} requests a minute "
        f"(3x the average) under rate limits:\n"
    )
    print("| term | count | memory |")
    print("|---|---|---|")
    for term in example["terms"]:
        print(f"| {term['term']} | {term['count']:,} | {_size(term['bytes'])} |")
    print(f"| **total used_memory** | {example['keys']:,} keys | **{_size(example['total_bytes'])}** |")
    print(
        "\nPlan for the process's RSS above used_memory (fragmentation, typically 1.1-1.5x) and, with AOF rewrites "
        "or RDB saves, for the copy-on-write of the forked child. Eviction must stay off (maxmemory-policy "
        "noeviction): every ledger key has a TTL, so a volatile-* policy would evict usage buckets and dedup ids."
    )
    return [*(result.as_json() for result in results), {"rule_of_thumb": rule}, {"worked_example": example}]


def _worked_example(
    figures: dict[str, Any], settings: Settings, args: argparse.Namespace, bucket: float, busiest: int
) -> dict[str, Any]:
    ledger = settings.ledger
    tenants, models = args.example_tenants, args.example_models
    retention_days = max(ledger.seen_ttl_seconds, ledger.events_retention_seconds) / 86400
    requests = round(args.example_requests_per_day * retention_days)
    hour_keys = tenants * (ledger.hourly_retention_seconds // 3600 + 1)
    day_keys = tenants * (ledger.daily_retention_seconds // 86400 + 1)
    spend_keys = tenants * round(args.example_years * 12)
    api_keys = tenants * args.example_keys_per_tenant
    peak = round(args.example_requests_per_day / 1440 * 3)
    stream_floor = figures["first_request"] - figures["request"] - 2 * figures["bucket"]["1 model"] - figures["spend"]
    terms = [
        ("requests (dedup ids + events)", requests, figures["request"]),
        ("event streams' open nodes", tenants, stream_floor),
        (f"hourly buckets ({models} models each)", hour_keys, bucket),
        (f"daily buckets ({models} models each)", day_keys, bucket),
        ("monthly spend hashes", spend_keys, figures["spend"]),
        ("API keys", api_keys, figures["key"]),
        ("tenant budgets", tenants, figures["budget"]),
        (f"rate-limit window entries (at {busiest} rpm per key)", peak, figures["window"][busiest]),
    ]
    # keys: seen ids, one stream, key set and budget per tenant, buckets, spend, key records, the tenants set
    keys = requests + 3 * tenants + hour_keys + day_keys + spend_keys + api_keys + 1
    with_ttl = requests + hour_keys + day_keys
    rows = [{"term": term, "count": count, "bytes": round(count * per)} for term, count, per in terms]
    rows.append({"term": "key tables (all keys; keys with a TTL)", "count": keys, "bytes": table_bytes(keys, with_ttl)})
    total = sum(row["bytes"] for row in rows)
    return {
        "requests_per_day": args.example_requests_per_day,
        "tenants": tenants,
        "models": models,
        "peak_requests_per_minute": peak,
        "keys": keys,
        "terms": rows,
        "total_bytes": total,
        "total_gib": round(total / GIB, 2),
    }


def _bucket_keys(result: Result) -> int:
    return sum(row["keys"] for row in result.breakdown if row["class"] in ("usage:h", "usage:d"))


def _class_bytes(result: Result, name: str) -> float:
    return next(row["bytes_per_key"] for row in result.breakdown if row["class"] == name)


def _tenant(index: int) -> str:
    return f"acct-{index:06d}"


def _key_id(index: int) -> str:
    rng = random.Random(index)
    return "".join(rng.choice(KEY_ID_ALPHABET) for _ in range(12))


def _size(count: float) -> str:
    if abs(count) >= GIB:
        return f"{count / GIB:,.2f} GiB"
    if abs(count) >= MIB:
        return f"{count / MIB:,.2f} MiB"
    return f"{count / 1024:,.1f} KiB"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="bills per request scenario (default: 100000)")
    parser.add_argument("--tenants", type=int, default=100, help="tenants of the second request scenario")
    parser.add_argument("--concurrency", type=int, default=64, help="bills in flight at once")
    parser.add_argument("--floor-tenants", type=int, default=1000, help="tenants billed once each")
    parser.add_argument("--bucket-tenants", type=int, default=100)
    parser.add_argument("--bucket-hours", type=int, default=48, help="hours the bucket scenarios spread over")
    parser.add_argument("--keys", type=int, default=1000, help="API keys to create")
    parser.add_argument("--key-tenants", type=int, default=100, help="tenants the API keys belong to")
    parser.add_argument("--budgets", type=int, default=1000, help="tenant budgets to set")
    parser.add_argument("--rate-keys", type=int, default=20, help="keys of the rate-limit scenarios")
    parser.add_argument("--rpm", type=_ints, default=[60, 300, 600], help="comma-separated requests per minute per key")
    parser.add_argument("--streams", type=int, default=16, help="running streams per key of the slot scenario")
    parser.add_argument("--example-requests-per-day", type=int, default=1_000_000)
    parser.add_argument("--example-tenants", type=int, default=200)
    parser.add_argument("--example-models", type=int, default=2)
    parser.add_argument("--example-keys-per-tenant", type=int, default=5)
    parser.add_argument("--example-years", type=float, default=5.0, help="age of the deployment (spend hashes)")
    parser.add_argument("--output", help="also append the figures to FILE as JSON lines")
    return parser


def main(argv: Iterable[str] | None = None) -> int:
    args = _parser().parse_args(None if argv is None else list(argv))
    settings = load_settings()
    started = time.monotonic()
    try:
        with redis_server() as redis_url:
            say(f"private redis-server at {redis_url}")
            figures = asyncio.run(measure(redis_url, settings, args))
    except KeyboardInterrupt:
        say("interrupted; redis-server stopped")
        return 130
    lines = report(figures, settings, args)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as output:
            for line in lines:
                output.write(json.dumps(line) + "\n")
    say(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
