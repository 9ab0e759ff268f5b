"""An upstream on a raw loopback socket, for answers no well-behaved server sends.

uvicorn (under ``UpstreamStub``) refuses to send a status of 600, a 304 with a body length or a
chunked body cut in the middle; this server sends whatever bytes the test gives it. Each
connection carries one exchange: the server reads the request (head and Content-Length body),
records its bytes exactly as received in :attr:`RawUpstream.requests`, then either sends the
canned ``response`` bytes or calls ``response(conn, request)`` to write an answer at its own
pace or chosen by the request, and closes the connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

Responder = Callable[[socket.socket, bytes], None]


class RawUpstream:
    def __init__(self, response: bytes | Responder) -> None:
        self._response = response
        self._lock = threading.Lock()
        self._requests: list[bytes] = []
        self._conns: list[socket.socket] = []
        self._closing = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="raw-upstream", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[bytes]:
        with self._lock:
            return list(self._requests)

    @property
    def closing(self) -> threading.Event:
        """Set at ``stop()``: a responder that waits should wait on this."""
        return self._closing

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.requests)} request(s) arrived, expected {count}")
            time.sleep(0.01)  # polling with a deadline
        return self.requests

    def start(self) -> RawUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            request = _read_request(conn)
            if request is None:
                return
            with self._lock:
                self._requests.append(request)
            with contextlib.suppress(OSError):
                if isinstance(self._response, bytes):
                    conn.sendall(self._response)
                else:
                    self._response(conn, request)


def _read_request(conn: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            piece = conn.recv(65536)
        except OSError:
            return None
        if not piece:
            return None
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        piece = conn.recv(65536)
        if not piece:
            break
        body += piece
    return head + b"\r\n\r\n" + body
