"""A streamed chat completion through the proxy, read to its end in a thread of its own."""

from __future__ import annotations

import threading

import httpx

from tests.support.procs import connection_owner
from tests.support.proxy_process import TEST_AUTH, ProxyProcess
from tests.support.workers import client_port


class Stream(threading.Thread):
    """`started_streaming` is set once the response's head has come (or the request
    failed); `error` holds what cut it, for the test to look at."""

    def __init__(self, proxy: ProxyProcess, model: str, pids: list[int] | None = None) -> None:
        super().__init__(daemon=True)
        self._proxy, self._model, self._pids = proxy, model, pids or []
        self.body = b""
        self.headers = httpx.Headers()
        self.error: Exception | None = None
        # Which of `pids` (the proxy's workers) serves the stream.
        self.owner: int | None = None
        self.started_streaming = threading.Event()

    def run(self) -> None:
        try:
            with (
                httpx.Client(trust_env=False, timeout=60.0) as client,
                client.stream(
                    "POST",
                    f"{self._proxy.base_url}/chat/completions",
                    json={"model": self._model, "messages": [], "stream": True},
                    headers=TEST_AUTH,
                ) as response,
            ):
                assert response.status_code == 200
                self.headers = response.headers
                if self._pids:
                    port = client_port(response)
                    self.owner = connection_owner(self._pids, self._proxy.port, port)
                self.started_streaming.set()
                for chunk in response.iter_raw():
                    self.body += chunk
        except Exception as exc:  # a cut stream: the test looks at it
            self.error = exc
        finally:
            self.started_streaming.set()

    def finish(self, timeout: float = 30.0) -> Stream:
        self.join(timeout)
        assert not self.is_alive(), "the stream did not end"
        return self


def start_stream(proxy: ProxyProcess, model: str, pids: list[int] | None = None) -> Stream:
    """A Stream whose response has begun, without error."""
    stream = Stream(proxy, model, pids)
    stream.start()
    assert stream.started_streaming.wait(20) and stream.error is None, stream.error
    return stream
