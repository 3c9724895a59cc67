"""The spool: bills that cannot reach Redis wait in fsync'd local files and are replayed, once, when it answers."""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

import billing.spool as spool_module
from billing import DurableLedger, Ledger, Spool, UsageRecord, tenant_key
from gateway._processes import free_port
from tests.conftest import usage_record

MODEL = "@cf/meta/llama-3.1-8b-instruct"
HOUR = "2025112202"
STARTED_AT = 1_763_776_800.5  # 2025-11-22 02:00:00.5 UTC


@pytest.fixture
async def dead_redis() -> AsyncIterator[Redis]:
    """A client of a Redis that is down: nothing listens on its port, and it gives up fast."""
    client = Redis(
        host="127.0.0.1",
        port=free_port(),
        socket_timeout=0.2,
        socket_connect_timeout=0.2,
        retry=Retry(NoBackoff(), 1),
    )
    yield client
    await client.aclose()


def durable(redis: Redis, directory: Path, interval: float = 60.0) -> DurableLedger:
    return DurableLedger(Ledger(redis), Spool(directory), replay_interval_seconds=interval)


async def spool_with_redis_down(dead_redis: Redis, directory: Path, records: list[UsageRecord]) -> None:
    """Bill ``records`` while Redis is down, as the gateway would, and stop that process's replayer."""
    down = durable(dead_redis, directory)
    assert [await down.record(record) for record in records] == ["spooled"] * len(records)
    assert down.spooled_total == len(records)
    await down.aclose()  # its last replay attempt fails quietly: the files stay


async def requests_billed(redis: Redis, tenant: str = "acct-a") -> int:
    return (await Ledger(redis).bucket_totals(tenant, MODEL, HOUR))["requests"]


async def wait_for(predicate: Callable[[], bool], timeout_seconds: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_seconds
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_spool_append_writes_one_fsynced_json_line_per_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(spool_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    spool = Spool(tmp_path / "spool")  # the directory is created
    records = [usage_record("r1"), usage_record("r2", status="upstream_error", cost_nano_usd=0)]
    for record in records:
        spool.append(record)
    assert len(synced) == 2  # one fsync per bill, before append returns
    [path] = spool.files()
    # Named after this host and pid: pods sharing one volume repeat pids, not host names.
    assert path.name.startswith(f"spool-{socket.gethostname()}-{os.getpid()}-") and path.suffix == ".jsonl"
    data = path.read_bytes()  # readable while this process still holds the file: flushed
    assert data.endswith(b"\n") and data.count(b"\n") == 2
    assert [json.loads(line) for line in data.splitlines()] == [dataclasses.asdict(record) for record in records]


def test_spool_claim_waits_for_no_one_and_yields_none_while_another_process_holds_the_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(usage_record("r1"))
    [path] = spool.files()
    with spool.claim(path) as records:
        assert records is None  # this process still appends to it
    spool.seal()
    with path.open("rb") as other:  # another process's open file description, holding the lock
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with spool.claim(path) as records:
            assert records is None
    with spool.claim(path) as records:
        assert records == [usage_record("r1")]
        with Spool(tmp_path).claim(path) as again:  # another replayer, meanwhile
            assert again is None
    with spool.claim(tmp_path / "gone.jsonl") as records:  # replayed and deleted by someone else meanwhile
        assert records is None


async def test_spool_torn_last_line_is_skipped_and_the_rest_replayed(
    redis: Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path)
    spool.append(usage_record("r1"))
    spool.append(usage_record("r2"))
    spool.seal()
    [path] = spool.files()
    with path.open("ab") as file:  # a crash in the middle of an append
        file.write(b'{"request_id":"r3","tenant":"acc')
    with spool.claim(path) as records:
        assert records == [usage_record("r1"), usage_record("r2")]
    assert spool.depth()[0] == 2
    ledger = DurableLedger(Ledger(redis), spool, replay_interval_seconds=60)
    with caplog.at_level(logging.ERROR, logger="billing.spool"):
        assert await ledger.replay() is True
    assert "torn or malformed line 3" in caplog.text
    assert await requests_billed(redis) == 2 and ledger.replayed_total == 2
    assert spool.files() == []


def test_spool_depth_counts_every_file_and_reports_the_oldest_start(tmp_path: Path) -> None:
    first, second = Spool(tmp_path), Spool(tmp_path)
    assert first.depth() == (0, None)
    first.append(usage_record("r1", started_at=300.0))
    first.append(usage_record("r2", started_at=100.5))
    second.append(usage_record("r3", started_at=200.0))
    assert first.depth() == second.depth() == (3, 100.5)
    first.seal()
    with first.files()[0].open("ab") as file:
        file.write(b"garbage")
    assert first.depth() == (3, 100.5)


async def test_durable_ledger_spools_when_redis_is_down_instead_of_raising(dead_redis: Redis, tmp_path: Path) -> None:
    ledger = durable(dead_redis, tmp_path)
    try:
        assert await ledger.record(usage_record("r1", started_at=500.0)) == "spooled"
        assert await ledger.record(usage_record("r2", started_at=400.0)) == "spooled"
        assert ledger.spooled_total == 2 and ledger.replayed_total == 0
        assert ledger.spool.depth() == (2, 400.0)
        assert await ledger.replay() is False  # still down: the file stays
        assert ledger.spool.depth() == (2, 400.0)
    finally:
        await ledger.aclose()
    assert ledger.spool.depth() == (2, 400.0)


async def test_replay_bills_every_spooled_record_once_even_when_replayed_twice(
    redis: Redis, dead_redis: Redis, tmp_path: Path
) -> None:
    records = [usage_record(f"r{i}") for i in range(3)]
    await spool_with_redis_down(dead_redis, tmp_path, records)
    backup = tmp_path.parent / "backup"
    shutil.copytree(tmp_path, backup)

    ledger = durable(redis, tmp_path)
    assert await ledger.replay() is True
    assert ledger.spool.files() == [] and ledger.replayed_total == 3
    totals = await ledger.ledger.bucket_totals("acct-a", MODEL, HOUR)
    assert totals == {
        "requests": 3,
        "prompt_tokens": 3702,
        "completion_tokens": 1701,
        "cost_nano_usd": 2_448_390,
        "errors": 0,
    }
    for record in records:
        assert await redis.exists(tenant_key("acct-a", "seen", record.request_id))

    shutil.copytree(backup, tmp_path, dirs_exist_ok=True)  # the same bills again, e.g. files restored from a backup
    assert ledger.spool.depth()[0] == 3
    assert await ledger.replay() is True
    assert ledger.spool.files() == [] and ledger.replayed_total == 6
    assert await ledger.ledger.bucket_totals("acct-a", MODEL, HOUR) == totals
    assert len(await ledger.ledger.events("acct-a")) == 3
    assert await ledger.ledger.month_spend("acct-a", "202511") == 2_448_390
    await ledger.aclose()


async def test_two_processes_on_one_directory_never_replay_each_others_open_file(redis: Redis, tmp_path: Path) -> None:
    writer = Spool(tmp_path)  # another process, still appending to its file
    writer.append(usage_record("theirs"))
    replayer = durable(redis, tmp_path)
    replayer.spool.append(usage_record("mine"))
    assert len(replayer.spool.files()) == 2

    assert await replayer.replay() is False  # its own file is sealed and replayed; the other one is held
    [held] = replayer.spool.files()
    assert held.name == writer.files()[0].name and held.exists()
    assert await requests_billed(redis) == 1
    assert await redis.exists(tenant_key("acct-a", "seen", "mine"))

    writer.seal()  # that process moves on (or dies): its file is free
    assert await replayer.replay() is True
    assert replayer.spool.files() == [] and await requests_billed(redis) == 2
    await replayer.aclose()


async def test_background_replayer_replays_by_itself_once_redis_answers_and_stops_on_aclose(
    redis: Redis, dead_redis: Redis, tmp_path: Path
) -> None:
    await spool_with_redis_down(dead_redis, tmp_path, [usage_record("r1"), usage_record("r2")])
    assert Spool(tmp_path).depth()[0] == 2

    ledger = durable(redis, tmp_path, interval=0.05)  # the next process, on the same volume, Redis back
    ledger.start()
    ledger.start()  # idempotent
    await wait_for(lambda: not ledger.spool.files())
    assert await requests_billed(redis) == 2 and ledger.replayed_total == 2
    await ledger.aclose()

    other = Spool(tmp_path)  # a bill spooled after the replayer stopped stays put
    other.append(usage_record("r3"))
    other.seal()
    await asyncio.sleep(0.3)  # six replay intervals
    assert other.depth()[0] == 1 and await requests_billed(redis) == 2


async def test_aclose_makes_one_last_replay(redis: Redis, tmp_path: Path) -> None:
    ledger = durable(redis, tmp_path)
    ledger.spool.append(usage_record("r1"))  # spooled, its replay not yet due
    await ledger.aclose()
    assert ledger.spool.files() == [] and await requests_billed(redis) == 1


def rejected_lines(directory: Path) -> list[dict[str, Any]]:
    """The records set aside in ``directory``'s ``.rejected`` files."""
    return [json.loads(line) for path in directory.glob("*.rejected") for line in path.read_text().splitlines()]


async def test_a_record_the_ledger_refuses_does_not_hold_back_the_bills_after_it(redis: Redis, tmp_path: Path) -> None:
    ledger = durable(redis, tmp_path)
    ledger.spool.append(usage_record("bad", prompt_tokens=-1))  # e.g. spooled by an older version
    ledger.spool.append(usage_record("good"))  # spooled behind it, during an outage
    await ledger.replay()
    assert await requests_billed(redis) == 1 and ledger.spool.files() == []
    [line] = rejected_lines(tmp_path)
    assert line["record"]["request_id"] == "bad" and "bad usage" in line["reason"]


async def test_a_record_the_ledger_refuses_is_set_aside_not_spooled(redis: Redis, tmp_path: Path) -> None:
    ledger = durable(redis, tmp_path)
    assert await ledger.record(usage_record("bad", completion_tokens=-3)) == "refused"
    assert ledger.spool.files() == [] and ledger.spooled_total == 0
    [line] = rejected_lines(tmp_path)
    assert line["record"]["completion_tokens"] == -3


async def test_aclose_right_after_a_spooled_bill_returns(dead_redis: Redis, tmp_path: Path) -> None:
    ledger = durable(dead_redis, tmp_path)
    assert await ledger.record(usage_record("r1")) == "spooled"
    await asyncio.sleep(0.1)  # the replayer tried, failed, and now waits for its next wake-up
    assert await ledger.record(usage_record("r2")) == "spooled"  # wakes it ...
    closing = asyncio.create_task(ledger.aclose())  # ... and the shutdown cancels it at once
    try:
        done, _ = await asyncio.wait({closing}, timeout=1)
        assert done, "aclose() did not return"
    finally:
        closing.cancel()  # cancels the stuck replayer too, so the test ends
        await asyncio.wait({closing})


async def test_a_file_being_created_is_never_deleted_by_another_processs_replayer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, replayer = Spool(tmp_path), Spool(tmp_path)
    real_flock = fcntl.flock

    def flock_after_a_replay(fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_EX:  # the writer, between open() and flock(): another process replays now
            for path in replayer.files():  # as DurableLedger.replay does
                with replayer.claim(path) as records:
                    if records is not None:
                        replayer.done(path)
        real_flock(fd, operation)

    monkeypatch.setattr(spool_module.fcntl, "flock", flock_after_a_replay)
    writer.append(usage_record("r1"))
    monkeypatch.undo()
    writer.seal()
    assert writer.depth()[0] == 1


async def test_a_bill_written_twice_is_billed_once_and_says_so(redis: Redis, tmp_path: Path) -> None:
    ledger = durable(redis, tmp_path)
    assert await ledger.record(usage_record("r1")) == "billed"
    assert await ledger.record(usage_record("r1")) == "duplicate"  # e.g. a retry after a lost reply
    assert await requests_billed(redis) == 1 and ledger.spooled_total == 0
