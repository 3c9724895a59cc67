"""Many small Redis reads at once: in pipelines of a bounded size, never one round trip per key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from redis.asyncio import Redis

READS_PER_PIPELINE: Final = 1000  # a round trip each; the event loop runs between them


async def hget_each(redis: Redis, reads: Sequence[tuple[str, str]]) -> list[bytes | str | None]:
    """``HGET key field`` for each ``(key, field)`` of ``reads``, answered in the same order (``None``: absent).

    The keys may belong to many tenants, and so to many Cluster slots; the pipelines hold no transaction.
    """
    values: list[bytes | str | None] = []
    for offset in range(0, len(reads), READS_PER_PIPELINE):
        async with redis.pipeline(transaction=False) as pipe:
            for key, field in reads[offset : offset + READS_PER_PIPELINE]:
                pipe.hget(key, field)
            values += await pipe.execute()
    return values
