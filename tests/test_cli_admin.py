"""The administrative commands as an operator runs them: ``keys``, ``budget`` and ``usage`` against a real Redis.

Each command runs as its own ``python -m gateway.cli`` process; independent ones run side by side to keep it fast.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
from redis.asyncio import Redis

from billing import Budgets, KeyLimits, KeyStore, Ledger, hash_key, month_of
from tests.conftest import USAGE_CSV_COLUMNS, usage_record

TOLLGATE = [sys.executable, "-m", "gateway.cli"]
MODEL = "@cf/meta/llama-3.1-8b-instruct"
FP8_MODEL = "@cf/meta/llama-3.1-8b-instruct-fp8"


async def tollgate(redis_url: str, command: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``tollgate <command> --redis-url <redis_url>`` (split like a shell) with extra environment ``env``."""
    return await asyncio.to_thread(
        subprocess.run,
        [*TOLLGATE, *shlex.split(command), "--redis-url", redis_url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return result.stdout


def iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def field(stdout: str, label: str) -> str:
    """The value of a ``label:   value`` line."""
    match = re.search(rf"^{re.escape(label)}:\s+(.*)$", stdout, re.MULTILINE)
    assert match is not None, f"no {label!r} line in:\n{stdout}"
    return match.group(1)


async def test_cli_keys_create_prints_the_settings_and_a_key_that_works(redis: Redis, redis_url: str) -> None:
    before = time.time()
    full, plain = await asyncio.gather(
        tollgate(
            redis_url,
            "keys create --tenant acct-cli --name ci --scope inference --scope admin --expires-in 3600 "
            "--monthly-budget-usd 5.5",
        ),
        tollgate(redis_url, "keys create --tenant acct-other"),
    )
    after = time.time()
    store = KeyStore(redis)

    stdout = ok(full)
    assert field(stdout, "tenant") == "acct-cli" and field(stdout, "scopes") == "admin, inference"
    assert field(stdout, "budget") == "$5.500000000 per month (UTC)"
    assert "shown once" in stdout
    record = await store.find(field(stdout, "key"))
    assert record is not None and record.key_id == field(stdout, "key id")
    assert (record.tenant, record.name, record.scopes, record.monthly_budget_nano_usd) == (
        "acct-cli",
        "ci",
        {"inference", "admin"},
        5_500_000_000,
    )
    assert record.expires_at is not None and before + 3600 - 0.001 <= record.expires_at <= after + 3600
    assert field(stdout, "expires") == iso(record.expires_at)

    stdout = ok(plain)
    record = await store.find(field(stdout, "key"))
    assert record is not None and record.usable_at(time.time()) and record.tenant == "acct-other"
    assert field(stdout, "scopes") == "inference, usage:read"
    assert "expires:" not in stdout and "budget:" not in stdout


async def test_cli_keys_list_shows_every_key_but_never_a_secret_or_hash(redis: Redis, redis_url: str) -> None:
    store = KeyStore(redis, clock=itertools.count(time.time() - 10).__next__)  # one second between creations
    issued = [
        await store.create("acct-b", "ops", scopes=["admin"], expires_at=time.time() + 3600),
        await store.create(
            "acct-a",
            "ci",
            monthly_budget_nano_usd=5_000_000_000,
            limits=KeyLimits(requests_per_minute=60, concurrent_streams=2),
        ),
        await store.create("acct-a", "old"),
        await store.create("acct-a", "gone"),
    ]
    await store.revoke(issued[2].record.key_id)
    await redis.hset(f"tg:key:{issued[3].record.key_id}", "expires_at", "1000000000.000")  # expired in 2001
    keys = await store.list_keys()
    table, as_json = await asyncio.gather(
        tollgate(redis_url, "keys list"),
        tollgate(redis_url, "keys list --tenant acct-a --json"),
    )

    lines = ok(table).splitlines()
    header = ["ID", "TENANT", "NAME", "SCOPES", "CREATED", "EXPIRES", "STATE", "BUDGET/MONTH", "OWN-LIMITS"]
    assert lines[0].split() == header
    assert [line.split() for line in lines[1:]] == [
        [
            key.key_id,
            key.tenant,
            key.name,
            ",".join(sorted(key.scopes)),
            iso(key.created_at),
            iso(key.expires_at) if key.expires_at else "never",
            state,
            budget,
            limits,
        ]
        for key, state, budget, limits in zip(
            keys,
            ["active", "revoked", "expired", "active"],
            ["$5.000000000", "-", "-", "-"],
            ["rpm=60,streams=2", "-", "-", "-"],
            strict=True,
        )
    ]
    assert [key.name for key in keys] == ["ci", "old", "gone", "ops"]  # by tenant, then oldest first
    assert json.loads(ok(as_json)) == [key.as_dict() for key in keys[:3]]  # acct-a's only
    for result in (table, as_json):
        for key in issued:
            assert key.secret_key not in result.stdout and hash_key(key.secret_key) not in result.stdout
        assert "tg_" not in result.stdout and "sha256" not in result.stdout


async def test_cli_keys_rotate_prints_the_new_key_and_retires_the_old_one(redis: Redis, redis_url: str) -> None:
    store = KeyStore(redis)
    old = await store.create("acct-r", "ci", scopes=["inference"], monthly_budget_nano_usd=2_000_000_000)
    graced = await store.create("acct-r", "web")
    revoked = await store.create("acct-r", "dead")
    await store.revoke(revoked.record.key_id)
    before = time.time()
    now_result, grace_result, refused = await asyncio.gather(
        tollgate(redis_url, f"keys rotate {old.record.key_id}"),
        tollgate(redis_url, f"keys rotate {graced.record.key_id} --grace-seconds 600"),
        tollgate(redis_url, f"keys rotate {revoked.record.key_id}"),
    )

    stdout = ok(now_result)
    new = await store.find(field(stdout, "key"))
    assert new is not None and new.key_id == field(stdout, "key id") != old.record.key_id
    assert (new.tenant, new.name, new.scopes, new.monthly_budget_nano_usd, new.revoked) == (
        "acct-r",
        "ci",
        {"inference"},
        2_000_000_000,
        False,
    )
    assert field(stdout, "budget") == "$2.000000000 per month (UTC)"
    assert f"The old key {old.record.key_id} is revoked." in stdout
    retired = await store.find(old.secret_key)
    assert retired is not None and retired.revoked

    stdout = ok(grace_result)
    assert await store.find(field(stdout, "key")) is not None
    retired = await store.find(graced.secret_key)
    assert retired is not None and not retired.revoked and retired.expires_at is not None
    assert before + 600 - 0.01 <= retired.expires_at <= time.time() + 600
    assert f"expires at {iso(retired.expires_at)}" in stdout

    assert refused.returncode == 1 and refused.stdout == ""
    assert f"no usable key with id '{revoked.record.key_id}'" in refused.stderr
    assert len(await store.list_keys("acct-r")) == 5  # two successors; nothing for the revoked key


async def test_cli_keys_rotate_with_grace_says_when_the_old_key_expires_in_plain_english(
    redis: Redis, redis_url: str
) -> None:
    old = await KeyStore(redis).create("acct-r")
    stdout = ok(await tollgate(redis_url, f"keys rotate {old.record.key_id} --grace-seconds 600"))
    assert re.search(rf"The old key {old.record.key_id} expires at \S+Z\.", stdout), stdout


async def test_cli_budget_set_show_and_reset(redis: Redis, redis_url: str) -> None:
    now = time.time()
    ledger = Ledger(redis)
    await ledger.record(usage_record("r1", "acct-a", started_at=now))
    await ledger.record(usage_record("r2", "acct-a", started_at=now, cost_nano_usd=1))
    await ledger.record(usage_record("r3", "acct-b", started_at=now, cost_nano_usd=999))  # another tenant's
    month = month_of(now)
    default = {"TOLLGATE_BUDGETS__DEFAULT_MONTHLY_NANO_USD": "3000000000"}
    await Budgets(redis, default_monthly_nano_usd=None).set_tenant_budget("acct-d", 1)
    changes = await asyncio.gather(
        tollgate(redis_url, "budget set --tenant acct-a 25"),
        tollgate(redis_url, "budget set --tenant acct-c None"),
        tollgate(redis_url, "budget reset --tenant acct-d"),
    )
    set_a, set_c, reset_d = map(ok, changes)
    assert set_a == "acct-a: $25.000000000 per month (UTC)\n"
    assert set_c == "acct-c: no monthly cap\n"
    assert reset_d == "acct-d: back to the configured default budget\n"

    shows = [
        tollgate(redis_url, f"budget show --tenant {tenant}", **default) for tenant in ("acct-a", "acct-c", "acct-d")
    ]
    show_a, show_c, show_d = map(ok, await asyncio.gather(*shows))
    assert show_a.splitlines() == [
        "tenant:   acct-a",
        "budget:   $25.000000000 per month",
        f"spent:    $0.000816131 in {month[:4]}-{month[4:]} (UTC)",  # r1 and r2; not the other tenant's r3
    ]
    assert field(show_c, "budget") == "no cap" and field(show_c, "spent").startswith("$0.000000000 in ")
    assert field(show_d, "budget") == "$3.000000000 per month (the configured default)"
    budgets = Budgets(redis, default_monthly_nano_usd=None)
    assert await budgets.tenant_budget("acct-a") == (25_000_000_000, False)
    assert await budgets.tenant_budget("acct-c") == (None, False)
    assert await budgets.tenant_budget("acct-d") == (None, True)


async def test_cli_usage_reports_exact_numbers_as_json_csv_and_table(redis: Redis, redis_url: str) -> None:
    day = int(time.time()) // 86400 * 86400 - 2 * 86400  # the day before yesterday, UTC
    ledger = Ledger(redis)
    await ledger.record(usage_record("r1", "acct-a", started_at=day + 2 * 3600 + 0.5))
    failed = {"model": FP8_MODEL, "prompt_tokens": 100, "completion_tokens": 0, "cost_nano_usd": 7_500}
    await ledger.record(usage_record("r2", "acct-a", started_at=day + 7200 + 1800, status="upstream_error", **failed))
    small = {"prompt_tokens": 1, "completion_tokens": 2, "cost_nano_usd": 1_000_000_001}
    await ledger.record(usage_record("r3", "acct-a", started_at=day + 3 * 3600 + 600, **small))
    await ledger.record(usage_record("r4", "acct-b", started_at=day + 2 * 3600 + 900))
    await ledger.record(usage_record("r5", "acct-b", started_at=day + 86400 + 60))  # the next day: outside all ranges
    for tenant in ("acct-a", "acct-b"):
        await KeyStore(redis).create(tenant)  # 'usage' without --tenant reports every tenant with a key
    hours = f"--from {iso(day + 2 * 3600)} --to {iso(day + 4 * 3600)}"
    days = f"--from {day} --to {day + 86400} --granularity day"
    as_json, as_csv, as_table = await asyncio.gather(
        tollgate(redis_url, f"usage --tenant acct-a {hours} --format json"),
        tollgate(redis_url, f"usage --tenant acct-a --tenant acct-b {days} --group-by model,tenant --format csv"),
        tollgate(redis_url, f"usage {hours} --model {MODEL}"),
    )

    report = json.loads(ok(as_json))
    assert (report["granularity"], report["from"], report["to"]) == ("hour", day + 2 * 3600, day + 4 * 3600)
    assert [bucket["start_time"] for bucket in report["data"]] == [day + 2 * 3600, day + 3 * 3600]
    assert [bucket["results"] for bucket in report["data"]] == [
        [
            {
                "model": None,
                "tenant": None,
                "requests": 2,
                "prompt_tokens": 1334,
                "completion_tokens": 567,
                "total_tokens": 1901,
                "cost_nano_usd": 823_630,
                "cost_usd": "0.000823630",
                "errors": 1,
            }
        ],
        [
            {
                "model": None,
                "tenant": None,
                "requests": 1,
                "prompt_tokens": 1,
                "completion_tokens": 2,
                "total_tokens": 3,
                "cost_nano_usd": 1_000_000_001,
                "cost_usd": "1.000000001",
                "errors": 0,
            }
        ],
    ]
    assert report["totals"] == {
        "requests": 3,
        "prompt_tokens": 1335,
        "completion_tokens": 569,
        "total_tokens": 1904,
        "cost_nano_usd": 1_000_823_631,
        "cost_usd": "1.000823631",
        "errors": 1,
    }
    assert report["has_more"] is False and report["next_page"] is None

    rows = list(csv.DictReader(io.StringIO(ok(as_csv))))
    assert [
        (row["model"], row["tenant"], row["requests"], row["prompt_tokens"], row["cost_usd"], row["errors"])
        for row in rows
    ] == [
        (MODEL, "acct-a", "2", "1235", "1.000816131", "0"),
        (MODEL, "acct-b", "1", "1234", "0.000816130", "0"),
        (FP8_MODEL, "acct-a", "1", "100", "0.000007500", "1"),
    ]  # grouped by tenant: no row for acct-b's fp8 model, which it never used
    assert {(row["start"], row["end"]) for row in rows} == {(iso(day), iso(day + 86400))}

    lines = ok(as_table).rstrip("\n").splitlines()
    assert lines[0].split() == [column for column in USAGE_CSV_COLUMNS if column != "end"]
    assert [line.split() for line in lines[1:]] == [
        [iso(day + 2 * 3600), "-", "-", "2", "2468", "1134", "3602", "1632260", "0.001632260", "0"],
        [iso(day + 3 * 3600), "-", "-", "1", "1", "2", "3", "1000000001", "1.000000001", "0"],
        ["TOTAL", "3", "2469", "1136", "3605", "1001632261", "1.001632261", "0"],
    ]  # both tenants, the 8b model only


async def test_cli_bad_input_exits_2_with_a_message_and_no_traceback(redis: Redis, redis_url: str) -> None:
    cases = {
        "keys create --tenant 'bad tenant'": "invalid tenant id 'bad tenant'",
        "keys create --tenant acct --monthly-budget-usd 1.0000000001": "at most 9 decimal places",
        "budget set --tenant acct five": "expected an amount of dollars such as 25.00, got 'five'",
        "usage --tenant acct --from yesterday": "'from': expected ISO 8601 or Unix seconds",
        "budget show --tenant 'bad{'": "invalid tenant id 'bad{'",
    }
    results = await asyncio.gather(*(tollgate(redis_url, command) for command in cases))
    for (command, message), result in zip(cases.items(), results, strict=True):
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.startswith("tollgate: ") and message in result.stderr, (command, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == "", command
    assert await redis.dbsize() == 0  # nothing was written


@pytest.mark.parametrize("command", ["keys create --tenant acct --expires-in inf", "budget set --tenant acct 1e999999"])
async def test_cli_refuses_out_of_range_numbers_without_a_traceback(redis: Redis, redis_url: str, command: str) -> None:
    result = await tollgate(redis_url, command)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2 and result.stderr.startswith("tollgate: ")
    assert await redis.dbsize() == 0


async def test_cli_key_limits_on_create_and_after(redis: Redis, redis_url: str) -> None:
    created = ok(await tollgate(redis_url, "keys create --tenant acct-a --rpm 600 --streams 5"))
    key_id = field(created, "key id")
    assert field(created, "limits") == "requests_per_minute 600, concurrent_streams 5"
    changed = ok(await tollgate(redis_url, f"keys limits {key_id} --tpm 60000 --rpm tenant"))
    assert field(changed, "limits") == "tokens_per_minute 60000, concurrent_streams 5"
    record = await KeyStore(redis).get(key_id)
    assert record is not None and record.limits == KeyLimits(tokens_per_minute=60000, concurrent_streams=5)
    bad = await tollgate(redis_url, f"keys limits {key_id} --rpm -3")
    assert bad.returncode == 2 and "expected a whole number >= 0 or 'tenant'" in bad.stderr
    missing = await tollgate(redis_url, "keys limits nosuchkeyid0 --rpm 1")
    assert missing.returncode == 1 and "no key with id" in missing.stderr
