"""uvicorn's Server with the proxy's way of stopping.

The first SIGTERM (or SIGINT) drains: readiness reports "draining" at once, the listening
sockets close (new connections are refused), requests in flight finish for up to
`server.shutdown_grace_seconds`, then whatever is left is cut and the process exits 0.
A keep-alive connection that is still open meanwhile is served, with `Connection: close`,
so a load balancer polling /readyz on it sees the 503 rather than a dropped connection.
A second signal cuts everything at once.

SIGHUP reloads the configuration (reload.py) inside the event loop. Under `--workers` the
supervisor handles SIGHUP and sends each worker the new configuration through a pipe,
which the worker's loop reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import pickle
import signal
import socket
from collections.abc import Callable, Collection, Generator
from multiprocessing.connection import Connection
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from sentinel_proxy.app import Gateway, create_app
from sentinel_proxy.config import Config
from sentinel_proxy.metrics import MetricsSlot
from sentinel_proxy.reload import Loader, reread

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
        on_hangup: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._on_drain = on_drain
        self._on_ready = on_ready
        self._stop_signals = stop_signals
        self._on_hangup = on_hangup

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Unlike uvicorn's, the signal is not raised again afterwards: a stop that was
        # asked for is a clean exit, with no KeyboardInterrupt and no status -15.
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in self._stop_signals}
        loop = asyncio.get_running_loop()
        hangup = signal.getsignal(signal.SIGHUP)
        if self._on_hangup is not None:
            # Run by the loop between two callbacks, never in the middle of a request's code.
            loop.add_signal_handler(signal.SIGHUP, self._hangup)
        try:
            yield
        finally:
            if self._on_hangup is not None:
                loop.remove_signal_handler(signal.SIGHUP)
                signal.signal(signal.SIGHUP, hangup or signal.SIG_DFL)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _hangup(self) -> None:
        if self.should_exit:
            logger.info("SIGHUP while stopping: the configuration is not reloaded")
        elif self._on_hangup is not None:
            self._on_hangup()

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
    load: Loader | None = None,
    updates: Connection | None = None,
    metrics_slot: MetricsSlot | None = None,
) -> int:
    """Serve `config` with uvicorn `options` until a signal stops it; the exit status.

    With `load`, SIGHUP reloads the configuration with it. With `updates`, every Config
    that arrives there is served from then on (a worker, whose supervisor reloads)."""
    app = create_app(config, metrics_slot=metrics_slot)

    def hangup() -> None:
        assert load is not None
        reloaded = reread(app.config, load)
        if reloaded is not None:
            app.reload(reloaded)

    def ready() -> None:
        if updates is not None:
            # Before the supervisor learns that this worker is ready, and so before it
            # sends any connection here: whatever arrived during the start is applied.
            _follow(updates, app)
        if on_ready is not None:
            on_ready()

    server = Server(
        uvicorn.Config(app, **options),
        on_drain=app.drain,
        on_ready=ready,
        stop_signals=stop_signals,
        on_hangup=hangup if load is not None else None,
    )
    server.run(sockets=sockets)
    return 0 if server.started else STARTUP_FAILURE


def _follow(updates: Connection, app: Gateway) -> None:
    """Apply each Config sent on `updates`, now and whenever the loop finds more."""
    loop = asyncio.get_running_loop()

    def receive() -> None:
        try:
            while updates.poll():
                app.reload(pickle.loads(updates.recv_bytes()))
        except EOFError:  # the supervisor is gone; PR_SET_PDEATHSIG stops this worker
            loop.remove_reader(updates.fileno())

    receive()
    loop.add_reader(updates.fileno(), receive)
