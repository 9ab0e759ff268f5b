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


class AccessLog:
    """Logs a request's line. Where `logging_config` set logging up (one BufferedStderrHandler
    of ours, no filters), the line goes into that handler's buffer without a LogRecord or
    `Logger.handle`: that path cost 5% of the throughput (bench/RESULTS.md). Otherwise, as
    under a test's log capture or a logging set up by hand, it goes through `logging`."""

    def __init__(self, logger: logging.Logger = access_logger) -> None:
        self._logger = logger
        self._handler = _sole_handler(logger)

    def __call__(self, fields: dict[str, Any]) -> None:
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        handler = self._handler
        if handler is not None:
            formatter: TextFormatter | JsonFormatter = handler.formatter  # type: ignore[assignment]
            if handler.write_line(formatter.access_line(time.time(), logger.name, fields)):
                return
        # Straight to the handlers: Logger.info would walk the stack for a caller nobody logs.
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "request", (), None)
        record.fields = fields
        logger.handle(record)


def _sole_handler(logger: logging.Logger) -> BufferedStderrHandler | None:
    """The one handler `logger`'s records reach, if it is ours and nothing filters them."""
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters or current.disabled:
            return None
        handlers += current.handlers
        current = current.parent if current.propagate else None
    if len(handlers) != 1:
        return None
    handler = handlers[0]
    if (
        type(handler) is not BufferedStderrHandler
        or handler.filters
        or handler.level > logging.INFO
        or type(handler.formatter) not in (TextFormatter, JsonFormatter)
    ):
        return None
    return handler


def _text_fields(fields: dict[str, Any]) -> str:
    parts = []
    for name, value in fields.items():
        if value is None:
            continue
        if type(value) is str:
            value = escape(value)
        elif type(value) is not int and type(value) is not float:
            value = escape(str(value))
        parts.append(f"{name}={value}")
    return " ".join(parts)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._time(record.created)

    def _time(self, created: float) -> str:
        # One strftime a second, not one a line.
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(created))
        return f"{self._stamp},{int((created - second) * 1000):03d}"

    def access_line(self, created: float, name: str, fields: dict[str, Any]) -> str:
        """What `format` makes of an access-log record of these fields."""
        return f"{self._time(created)} INFO {name} request {_text_fields(fields)}"

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(record.getMessage())
        record.asctime = self.formatTime(record)
        line = self.formatMessage(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + _text_fields(fields)
        else:
            request_id = current_request_id.get()
            if request_id is not None:
                line += " request_id=" + request_id
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def access_line(self, created: float, name: str, fields: dict[str, Any]) -> str:
        """What `format` makes of an access-log record of these fields."""
        entry = _json_entry(created, "info", name, "request")
        entry.update(fields)
        return orjson.dumps(entry, default=str).decode()

    def format(self, record: logging.LogRecord) -> str:
        entry = _json_entry(
            record.created, record.levelname.lower(), record.name, record.getMessage()
        )
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


def _json_entry(created: float, level: str, name: str, message: str) -> dict[str, Any]:
    return {
        "ts": round(created, 6),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)),
        "level": level,
        "logger": name,
        "message": message,
    }


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

    def write_line(self, line: str) -> bool:
        """Buffers an info line made without a LogRecord (`AccessLog`); False if it could
        not be written."""
        self.acquire()
        try:
            self.stream.write(line + "\n")
        except Exception:
            return False
        finally:
            self.release()
        if not self._pending.is_set():
            self._pending.set()
        return True

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
