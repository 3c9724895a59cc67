"""``tollgate serve``: uvicorn, with the gateway's drain in front of uvicorn's own shutdown.

On SIGTERM uvicorn closes its listening sockets, waits for open connections up to its grace period, and then cancels
whatever still runs. :class:`Server` first tells the app to drain (gateway/lifecycle.py): new requests get 503,
and streams still running at ``server.drain_seconds`` are ended cleanly and billed. uvicorn's grace period is set
past that deadline (plus the time to read what a worker sent until it stopped), so it never has to cancel one.
"""

from __future__ import annotations

import socket

import uvicorn
from uvicorn.supervisors import Multiprocess

from config import Settings
from gateway import lifecycle

_GRACE_MARGIN_SECONDS = 5.0


class Server(uvicorn.Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        lifecycle.begin_shutdown()
        await super().shutdown(sockets)


def serve(settings: Settings, *, host: str, port: int, workers: int) -> None:
    """Run the gateway until SIGTERM/SIGINT, in ``workers`` processes sharing one socket."""
    grace = settings.server.drain_seconds + settings.upstream.hang_up_drain_seconds + _GRACE_MARGIN_SECONDS
    config = uvicorn.Config(
        "gateway.app:create_app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=int(grace + 0.999),
    )
    server = Server(config)
    if config.workers > 1:
        Multiprocess(config, target=server.run, sockets=[config.bind_socket()]).run()
    else:
        server.run()
