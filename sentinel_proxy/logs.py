"""Logging: one line per proxied request, as text or JSON, with uvicorn's own loggers
formatted the same way; request ids, and every line logged while serving a request
marked with its id."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from contextvars import ContextVar
from typing import IO, Any

import orjson

from sentinel_proxy.config import LogFormat

access_logger = logging.getLogger("sentinel_proxy.access")

REQUEST_ID_HEADER = b"x-request-id"
# A client's x-request-id longer than this, or with other than printable ASCII, is replaced.
MAX_REQUEST_ID_LENGTH = 128
# The id of the request being served in this task, read by the formatters: a context
# variable costs about 0.15 µs a request to set and reset.
current_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
# Mersenne Twister, seeded from os.urandom in each process: ids need to be unique, not
# secret, and it makes one without a syscall (0.33 µs against os.urandom's 0.45).
_random_bits = random.Random().getrandbits

# How late a log line may reach stderr; warnings and worse are written at once.
FLUSH_INTERVAL_SECONDS = 0.2
_BUFFER_BYTES = 1 << 16
# Control characters (C0, DEL, C1) and Unicode's line and paragraph separators, written as
# escapes: a value a client chose can never start a log line of its own.
_ESCAPES = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
}


def escape(text: str) -> str:
    """`text` with control characters written as escapes."""
    return text if text.isprintable() else text.translate(_ESCAPES)


def new_request_id() -> str:
    return _random_bits(128).to_bytes(16).hex()


def client_request_id(value: bytes) -> str | None:
    """A client's x-request-id, when it is one to keep: 1 to MAX_REQUEST_ID_LENGTH
    printable ASCII characters."""
    if 0 < len(value) <= MAX_REQUEST_ID_LENGTH and value.isascii():
        text = value.decode()
        if text.isprintable():
            return text
    return None


def access_log(fields: dict[str, Any]) -> None:
    # Straight to the handlers: Logger.info would walk the stack for a caller nobody logs.
    if access_logger.isEnabledFor(logging.INFO):
        record = access_logger.makeRecord(
            access_logger.name, logging.INFO, __file__, 0, "request", (), None
        )
        record.fields = fields
        access_logger.handle(record)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # One strftime a second, not one a line.
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, super().formatTime(record, datefmt)[:-4]
        return f"{self._stamp},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(record.getMessage())
        record.asctime = self.formatTime(record)
        line = self.formatMessage(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(
                f"{k}={escape(str(v))}" for k, v in fields.items() if v is not None
            )
        else:
            request_id = current_request_id.get()
            if request_id is not None:
                line += " request_id=" + request_id
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        else:
            request_id = current_request_id.get()
            if request_id is not None:
                entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class BufferedStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes log lines through a buffer that a background thread flushes at most
    FLUSH_INTERVAL_SECONDS after a line arrives, and at once for warnings and worse.
    A write(2) for every access-log line cost 3% of the throughput with stderr going to a
    file and 7% with stderr going to a pipe (bench/RESULTS.md); a process killed outright
    loses at most that interval's lines."""

    def __init__(
        self, stream: IO[str] | None = None, *, interval: float = FLUSH_INTERVAL_SECONDS
    ) -> None:
        if stream is None:
            # Closed by logging.shutdown at exit.
            stream = open(
                os.dup(2), "w", buffering=_BUFFER_BYTES, encoding="utf-8", errors="replace"
            )
        super().__init__(stream)
        self._interval = interval
        self._pending = threading.Event()
        threading.Thread(target=self._flush_later, name="log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.flush()
        elif not self._pending.is_set():
            self._pending.set()

    def _flush_later(self) -> None:
        while True:
            self._pending.wait()
            time.sleep(self._interval)
            self._pending.clear()
            self.flush()


def logging_config(level: str, fmt: LogFormat) -> dict[str, Any]:
    """A dictConfig for our loggers and uvicorn's; uvicorn applies it in every worker."""
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    handler = {"class": f"{__name__}.BufferedStderrHandler", "formatter": "default"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {"default": handler},
        "loggers": {
            "sentinel_proxy": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": [], "propagate": False},
        },
    }
