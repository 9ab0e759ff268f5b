from __future__ import annotations

import io
import logging
import logging.config
import sys
import time
from collections.abc import Generator

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel_proxy.logs import (
    AccessLog,
    BufferedStderrHandler,
    JsonFormatter,
    TextFormatter,
    client_request_id,
    current_request_id,
    logging_config,
    new_request_id,
)


def record(level: int = logging.INFO, **fields: object) -> logging.LogRecord:
    made = logging.LogRecord("sentinel_proxy.access", level, __file__, 1, "request", None, None)
    made.fields = fields
    return made


def test_text_lines_carry_the_fields() -> None:
    line = TextFormatter().format(record(status=200, provider="a", model=None))
    assert line.endswith("INFO sentinel_proxy.access request status=200 provider=a")
    assert line[:4].isdigit() and line[19] == ","  # 2026-01-01 00:00:00,000


def test_text_fields_and_messages_cannot_start_a_new_line() -> None:
    forged = record(path="/v1/models\nforged=1 status=200", model="m\r\x1b[2J\u2028x")
    forged.msg, forged.args = "conversation %s", ("c\n2026-01-01 00:00:00,000 ERROR fake",)
    line = TextFormatter().format(forged)
    assert line.splitlines() == [line]
    assert "path=/v1/models\\x0aforged=1" in line
    assert "model=m\\x0d\\x1b[2J\\u2028x" in line
    assert "conversation c\\x0a2026" in line


def test_text_tracebacks_stay_readable() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    lines = TextFormatter().format(failed).splitlines()
    assert lines[0].endswith("ERROR x failed") and lines[1].startswith("Traceback")
    assert lines[-1] == "ValueError: boom"


def test_json_lines_are_one_object_each() -> None:
    entry = orjson.loads(JsonFormatter().format(record(status=502, conversation_id="c1")))
    assert entry["status"] == 502 and entry["conversation_id"] == "c1"
    assert entry["level"] == "info" and entry["message"] == "request"


class Sink(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.written = ""

    def flush(self) -> None:
        self.written = self.getvalue()


def test_buffered_handler_flushes_warnings_at_once_and_the_rest_soon() -> None:
    sink = Sink()
    handler = BufferedStderrHandler(sink, interval=0.05)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.handle(record(logging.WARNING))
    assert sink.written == "WARNING request\n"
    handler.handle(record(logging.INFO))
    deadline = time.monotonic() + 5
    while sink.written.count("\n") < 2:
        assert time.monotonic() < deadline, "the info line was never flushed"
        time.sleep(0.01)  # polling a deadline: the flush happens on the handler's thread
    assert sink.written == "WARNING request\nINFO request\n"


def test_the_logging_config_writes_through_the_buffered_handler() -> None:
    config = logging_config("info", "text")
    try:
        logging.config.dictConfig(config)
        for name in ("sentinel_proxy", "uvicorn"):
            handlers = logging.getLogger(name).handlers
            assert [type(h) for h in handlers] == [BufferedStderrHandler]
            assert isinstance(handlers[0].formatter, TextFormatter)
    finally:
        for name in ("sentinel_proxy", "uvicorn"):
            for handler in logging.getLogger(name).handlers:
                logging.getLogger(name).removeHandler(handler)
                handler.close()


def test_made_request_ids_are_32_hex_digits_and_distinct() -> None:
    made = {new_request_id() for _ in range(1000)}
    assert len(made) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in made)


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b"req_123", "req_123"),
        (b"a b:c/d=e", "a b:c/d=e"),
        (b"x" * 128, "x" * 128),
        (b"x" * 129, None),
        (b"", None),
        (b"caf\xe9", None),
        (b"a\tb", None),
        (b"a\x7fb", None),
    ],
)
def test_a_clients_request_id_is_kept_only_when_sane(sent: bytes, kept: str | None) -> None:
    assert client_request_id(sent) == kept


def test_lines_logged_while_serving_a_request_carry_its_id() -> None:
    plain = logging.LogRecord("sentinel_proxy.x", logging.WARNING, __file__, 1, "slow", None, None)
    assert "request_id" not in TextFormatter().format(plain)
    token = current_request_id.set("r-42")
    try:
        assert (
            TextFormatter().format(plain).endswith("WARNING sentinel_proxy.x slow request_id=r-42")
        )
        assert orjson.loads(JsonFormatter().format(plain))["request_id"] == "r-42"
        # The access line has the id among its fields already: not twice.
        access = TextFormatter().format(record(request_id="r-42", status=200))
        assert access.count("r-42") == 1
    finally:
        current_request_id.reset(token)
    assert "request_id" not in JsonFormatter().format(plain)


fields_values = st.one_of(
    st.none(),
    st.text(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
)


@settings(max_examples=200)
@given(
    fields=st.dictionaries(st.text(min_size=1, max_size=20), fields_values, max_size=8),
    created=st.floats(min_value=0, max_value=4e9),
)
def test_an_access_line_made_without_a_record_is_the_records_line(
    fields: dict[str, object], created: float
) -> None:
    made = record()
    made.fields = fields
    made.created, made.msecs = created, int((created - int(created)) * 1000) + 0.0
    for formatter in (TextFormatter(), JsonFormatter()):
        line = formatter.access_line(created, "sentinel_proxy.access", fields)
        if fields or isinstance(formatter, JsonFormatter):
            assert line == formatter.format(made)
        else:  # text: the record's line has no trailing space
            assert line == formatter.format(made) + " "


@pytest.fixture
def access_logger() -> Generator[tuple[logging.Logger, Sink], None, None]:
    """A logger set up as logging_config sets sentinel_proxy.access up, writing to a Sink;
    made outside logging's registry, where pytest's capture would add its handlers."""
    parent = logging.Logger("test_access", logging.INFO)
    logger = logging.Logger("test_access.access")
    logger.parent = parent
    sink = Sink()
    handler = BufferedStderrHandler(sink, interval=3600)
    handler.setFormatter(TextFormatter())
    parent.addHandler(handler)
    parent.propagate = False
    yield logger, sink
    handler.close()


def test_the_access_log_writes_its_line_straight_to_our_handler(
    access_logger: tuple[logging.Logger, Sink],
) -> None:
    logger, sink = access_logger
    access = AccessLog(logger)
    assert logger.parent is not None
    handler = logger.parent.handlers[0]
    # The handler's own entry for records fails the test: the line must not come through it.
    handler.handle = None  # type: ignore[assignment,method-assign]
    access({"status": 200, "path": "/v1/x\n"})
    del handler.handle
    assert sink.getvalue().endswith(" INFO test_access.access request status=200 path=/v1/x\\x0a\n")


def test_the_access_log_goes_through_logging_when_something_filters_it(
    access_logger: tuple[logging.Logger, Sink],
) -> None:
    logger, sink = access_logger
    seen: list[logging.LogRecord] = []

    def keep(made: logging.LogRecord) -> bool:
        seen.append(made)
        return True

    logger.addFilter(keep)
    AccessLog(logger)({"status": 200})
    assert [getattr(r, "fields", None) for r in seen] == [{"status": 200}]
    assert sink.getvalue().endswith(" INFO test_access.access request status=200\n")


def test_the_access_log_goes_through_logging_to_other_handlers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="sentinel_proxy.access"):
        AccessLog()({"status": 201})
    assert [getattr(r, "fields", None) for r in caplog.records] == [{"status": 201}]
