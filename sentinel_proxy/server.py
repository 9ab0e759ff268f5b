"""uvicorn's Server with the proxy's way of stopping.

The first SIGTERM (or SIGINT) drains: readiness reports "draining" at once, the listening
sockets close (new connections are refused), requests in flight finish for up to
`server.shutdown_grace_seconds`, then whatever is left is cut and the process exits 0.
A keep-alive connection that is still open meanwhile is served, with `Connection: close`,
so a load balancer polling /readyz on it sees the 503 rather than a dropped connection.
A second signal cuts everything at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
from collections.abc import Callable, Collection, Generator
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from sentinel_proxy.app import create_app
from sentinel_proxy.config import Config
from sentinel_proxy.metrics import MetricsSlot

logger = logging.getLogger("sentinel_proxy.server")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# How often the drain looks at what is still in flight (uvicorn's own tick).
_DRAIN_POLL_SECONDS = 0.1
# How long cut requests get to notice their client is gone and close their upstream.
_CUT_SECONDS = 1.0


class Server(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        *,
        on_drain: Callable[[], None],
        on_ready: Callable[[], None] | None = None,
        stop_signals: Collection[signal.Signals] = STOP_SIGNALS,
    ) -> None:
        super().__init__(config)
        self._on_drain = on_drain
        self._on_ready = on_ready
        self._stop_signals = stop_signals

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Unlike uvicorn's, the signal is not raised again afterwards: a stop that was
        # asked for is a clean exit, with no KeyboardInterrupt and no status -15.
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in self._stop_signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = True
            return
        self._on_drain()
        self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._on_ready is not None:
            self._on_ready()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or ():
            sock.close()
        state = self.server_state
        grace = self.config.timeout_graceful_shutdown
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (math.inf if grace is None else grace)
        if state.tasks:
            logger.info("draining %d open request(s) for up to %s s", len(state.tasks), grace)
        while state.tasks and not self.force_exit and loop.time() < deadline:
            await asyncio.sleep(_DRAIN_POLL_SECONDS)
        cut = len(state.tasks)
        if cut:
            why = "a second signal" if self.force_exit else "the grace period is over"
            logger.warning("%s: cutting %d open request(s)", why, cut)
        for connection in list(state.connections):
            connection.transport.close()
        if state.tasks and not self.force_exit:
            # A cut client makes the proxy close its upstream request and log the request.
            await asyncio.wait(set(state.tasks), timeout=_CUT_SECONDS)
        for task in list(state.tasks):
            task.cancel()
        if not self.force_exit:
            await self.lifespan.shutdown()


def serve(
    config: Config,
    options: dict[str, Any],
    *,
    sockets: list[socket.socket] | None = None,
    on_ready: Callable[[], None] | None = None,
    stop_signals: Collection[signal.Signals] = STOP_SIGNALS,
    metrics_slot: MetricsSlot | None = None,
) -> int:
    """Serve `config` with uvicorn `options` until a signal stops it; the exit status."""
    app = create_app(config, metrics_slot=metrics_slot)
    server = Server(
        uvicorn.Config(app, **options),
        on_drain=app.drain,
        on_ready=on_ready,
        stop_signals=stop_signals,
    )
    server.run(sockets=sockets)
    return 0 if server.started else STARTUP_FAILURE
