"""The spool: bills that could not reach Redis wait in a local append-only file and are replayed later.

A bill is never dropped (RELIABILITY §4.3). When the ledger script fails after redis-py's bounded retries, the
:class:`UsageRecord` is appended as one JSON line to this process's spool file and fsync'd before the bill counts as
done. A background task replays the spool through the same script, under the same request id, so a record that had
in fact reached Redis (a timeout after the write) counts once; the file is deleted only after every line is in.

Several processes may share one spool directory (uvicorn workers, a pod restarted on the same volume, or the
replicas of a Deployment on one shared volume). Each writes its own files, named after its host, pid and start
time, and holds an exclusive ``flock`` on the file it appends to; a replayer takes the same lock without waiting, so
it replays only files nobody is writing, a dead process's files included. Before replaying, a process moves on to a
new file so its own records can be replayed too. A replayer opens a file for writing to lock it: NFS turns ``flock``
into a lock of the whole file, which it grants only on a file open for writing. (A shared volume must therefore
lock across its clients, as NFSv4 does unless mounted with ``local_lock``.)

A record the ledger script itself refuses (impossible numbers: a bug, not an outage) is never retried: it is set
aside in a ``.rejected`` file beside the spool, and logged, so the bills after it are not held back.

What remains at risk: records in a spool whose volume is lost, and a line torn by a crash in the middle of the
append itself (it is skipped, and logged, at replay).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Final, Literal

import anyio.to_thread
from redis.exceptions import RedisError, ResponseError

from billing.ledger import Ledger, UsageRecord

logger = logging.getLogger(__name__)

SUFFIX: Final = ".jsonl"
REJECTED_SUFFIX: Final = ".rejected"  # records the ledger script refuses: kept for an operator, never replayed
BillOutcome = Literal["billed", "duplicate", "spooled", "refused"]
# This process's part of a spool file's name: pids repeat across the pods that share a volume, host names do not.
_OWNER: Final = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())


def check_writable(directory: Path) -> None:
    """Create ``directory`` if needed and write a file there, or raise :class:`OSError`: a spool that cannot be
    written would only be found out during a Redis outage, when the bills it should hold are lost."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".probe-{_OWNER}-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


class Spool:
    """Append-only spool files in ``directory``; safe to share between threads and processes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._serial = 0

    def append(self, record: UsageRecord) -> None:
        """Append ``record`` durably (flushed and fsync'd). Blocking: call it from a worker thread."""
        line = json.dumps(dataclasses.asdict(record), separators=(",", ":")).encode() + b"\n"
        with self._lock:
            file = self._file or self._open_new()
            file.write(line)
            file.flush()
            os.fsync(file.fileno())

    def seal(self) -> None:
        """Close this process's current file (releasing its lock), so it can be replayed."""
        with self._lock:
            if self._file is not None:
                self._file.close()  # closing releases the flock
                self._file = None

    def files(self) -> list[Path]:
        """The spool files in the directory, oldest first."""
        return sorted(self.directory.glob("*" + SUFFIX), key=_age_key)

    def depth(self) -> tuple[int, float | None]:
        """How many records wait in the directory, and when the oldest one's request started (Unix seconds)."""
        count, oldest = 0, None
        for path in self.files():
            with contextlib.suppress(OSError):
                for record in _read(path.read_bytes(), path):
                    count += 1
                    oldest = record.started_at if oldest is None else min(oldest, record.started_at)
        return count, oldest

    @contextlib.contextmanager
    def claim(self, path: Path) -> Iterator[list[UsageRecord] | None]:
        """Lock ``path`` without waiting and yield its records; ``None`` if another process holds it. The caller
        calls :meth:`done` while the claim is held once every record is in the ledger."""
        try:
            file = path.open("r+b")  # NFS grants an exclusive lock only on a file open for writing
        except FileNotFoundError:  # replayed and deleted meanwhile
            yield None
            return
        with file:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            yield list(_read(file.read(), path))

    @staticmethod
    def done(path: Path) -> None:
        path.unlink(missing_ok=True)

    def reject(self, record: UsageRecord, reason: str) -> None:
        """Set aside a record the ledger refuses (a bug, not an outage): kept for an operator, never replayed."""
        line = json.dumps({"reason": reason, "record": dataclasses.asdict(record)}, separators=(",", ":")) + "\n"
        with self._lock, (self.directory / f"spool-{_OWNER}-{os.getpid()}{REJECTED_SUFFIX}").open("a") as file:
            file.write(line)
            file.flush()
            os.fsync(file.fileno())

    def _open_new(self) -> IO[bytes]:
        self._serial += 1
        name = f"spool-{_OWNER}-{os.getpid()}-{time.time_ns()}-{self._serial}"
        # Locked before it gets the name replayers look for: none can claim (and delete) it in between.
        file = (self.directory / (name + ".tmp")).open("ab")
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)
        os.rename(self.directory / (name + ".tmp"), self.directory / (name + SUFFIX))
        self._file = file
        return file


class DurableLedger:
    """The ledger as the bill step uses it: a write that cannot reach Redis goes to the spool, never lost.

    Usage::

        durable = DurableLedger(ledger, Spool(Path("var/spool")), replay_interval_seconds=1.0)
        await durable.record(record)      # never raises for Redis trouble
        ...
        await durable.aclose()            # stops the replayer, trying one last replay
    """

    def __init__(self, ledger: Ledger, spool: Spool, *, replay_interval_seconds: float) -> None:
        self.ledger = ledger
        self.spool = spool
        self._interval = replay_interval_seconds
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.spooled_total = 0  # records this process had to spool
        self.replayed_total = 0  # records this process replayed into the ledger (new or already there)

    async def record(self, record: UsageRecord) -> BillOutcome:
        """Bill ``record``. Returns ``"billed"``, or ``"duplicate"`` when its request id was billed already (by an
        earlier attempt of this same write whose reply was lost to a timeout, since request ids are never reused),
        ``"spooled"`` when Redis could not take it now (it is replayed later), or ``"refused"`` when the ledger
        script refuses it (set aside for an operator, never billed)."""
        try:
            return "billed" if await self.ledger.record(record) else "duplicate"
        except ResponseError as exc:
            if is_refusal(exc):
                logger.error("the ledger refuses the bill of %s (%s): set aside: %r", record.request_id, exc, record)
                await anyio.to_thread.run_sync(self.spool.reject, record, str(exc))
                return "refused"
            logger.warning("ledger cannot write now (%r); spooling the bill of %s", exc, record.request_id)
        except (RedisError, OSError) as exc:
            logger.warning("ledger unreachable (%r); spooling the bill of %s", exc, record.request_id)
        await anyio.to_thread.run_sync(self.spool.append, record)
        self.spooled_total += 1
        self.start()
        assert self._wake is not None
        self._wake.set()
        return "spooled"

    def start(self) -> None:
        """Start the background replayer (idempotent; needs a running event loop)."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._replay_forever(), name="tollgate-spool")

    async def replay(self) -> bool:
        """Replay every spool file nobody is writing; ``True`` if the spool is now empty of them."""
        await anyio.to_thread.run_sync(self.spool.seal)
        complete = True
        for path in self.spool.files():
            complete = await self._replay_file(path) and complete
        return complete

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})  # never raises: a cancellation of our caller still reaches it
            self._task = None
        if self.spool.files():
            with contextlib.suppress(RedisError, OSError):
                await self.replay()
        self.spool.seal()

    async def _replay_forever(self) -> None:
        assert self._wake is not None
        while True:
            if self.spool.files():
                try:
                    await self.replay()
                except Exception:  # the replayer must outlive any one bad pass; the files stay for the next
                    logger.exception("spool replay failed; will retry")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):  # not wait_for: on 3.11 it can swallow a cancel
                    await self._wake.wait()
            self._wake.clear()

    async def _replay_file(self, path: Path) -> bool:
        with self.spool.claim(path) as records:
            if records is None:
                return False
            try:
                for record in records:
                    try:
                        await self.ledger.record(record)
                    except ResponseError as exc:
                        if not is_refusal(exc):
                            raise
                        logger.error("the ledger refuses spooled bill %s (%s): set aside", record.request_id, exc)
                        await anyio.to_thread.run_sync(self.spool.reject, record, str(exc))
                    self.replayed_total += 1
            except (RedisError, OSError) as exc:
                logger.info("spool replay paused, Redis still unreachable: %r", exc)
                return False
            self.spool.done(path)
            logger.info("replayed %d spooled bills from %s", len(records), path.name)
            return True


def is_refusal(exc: ResponseError) -> bool:
    """The ledger script refused the record itself (bad numbers): retrying can never help. Other error replies
    (a read-only replica during failover, out of memory, loading) pass, and the record is retried."""
    return "tollgate ledger" in str(exc)


def _read(data: bytes, path: Path) -> Iterator[UsageRecord]:
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            yield UsageRecord(**json.loads(line))
        except (ValueError, TypeError):
            logger.error("skipping a torn or malformed line %d in spool file %s: %r", number, path, line[:200])


def _age_key(path: Path) -> tuple[int, str]:
    try:
        return path.stat().st_mtime_ns, path.name
    except OSError:
        return 0, path.name
