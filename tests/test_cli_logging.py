"""The sidecar's log output: JSON lines, and a storm of one message costs a few lines."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from coalesce.sidecar.command import JsonFormatter, RepeatLimiter, log_handler


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.records]


@pytest.fixture
def logger(request: pytest.FixtureRequest) -> Iterator[logging.Logger]:
    log = logging.getLogger(f"test.{request.node.name}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)


def _limited(logger: logging.Logger, **kwargs: object) -> tuple[Collect, RepeatLimiter, Clock]:
    clock = Clock()
    limiter = RepeatLimiter(clock=clock, **kwargs)  # type: ignore[arg-type]
    collect = Collect()
    collect.addFilter(limiter)
    logger.addHandler(collect)
    return collect, limiter, clock


def test_json_lines_carry_time_level_logger_message_and_the_exception(
    logger: logging.Logger,
) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logger.exception("request %d failed\non two lines", 7)
    logger.warning("plain")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "ERROR"
    assert first["logger"] == logger.name
    assert first["message"] == "request 7 failed\non two lines"
    assert "ZeroDivisionError: division by zero" in first["exception"]
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert second["message"] == "plain" and "exception" not in second


def test_a_repeated_message_passes_a_burst_then_is_counted_when_the_window_reopens(
    logger: logging.Logger,
) -> None:
    collect, _, clock = _limited(logger, burst=3, interval=10.0)
    for fd in range(100):
        logger.error("accept failed: %s (fd %d)", "Too many open files", fd)
    assert len(collect.records) == 3
    clock.now += 10.0
    logger.error("accept failed: %s (fd %d)", "Too many open files", 100)
    summary, record = collect.records[3:]
    assert summary.getMessage().startswith("97 more records like this were suppressed")
    assert summary.getMessage().endswith("accept failed: %s (fd %d)")
    assert summary.levelno == logging.ERROR and summary.name == logger.name
    assert record.getMessage() == "accept failed: Too many open files (fd 100)"


def test_different_templates_and_loggers_have_their_own_budgets(
    logger: logging.Logger,
) -> None:
    collect, _, _ = _limited(logger, burst=2, interval=10.0)
    other = logging.getLogger(logger.name + ".child")
    for _ in range(5):
        logger.warning("one")
        logger.warning("two")
        other.warning("one")
    assert collect.messages() == ["one", "two", "one", "one", "two", "one"]


def test_flush_reports_what_the_current_windows_dropped(logger: logging.Logger) -> None:
    collect, limiter, _ = _limited(logger, burst=1, interval=60.0)
    for _ in range(5):
        logger.info("storm")
    logger.info("calm")
    limiter.flush()
    assert collect.messages()[:2] == ["storm", "calm"]
    assert collect.messages()[2].startswith("4 more records like this were suppressed")
    assert len(collect.messages()) == 3
    limiter.flush()  # nothing new dropped: nothing more said
    assert len(collect.messages()) == 3


def test_forgetting_the_oldest_key_reports_its_count_first(logger: logging.Logger) -> None:
    collect, _, _ = _limited(logger, burst=1, interval=60.0, max_keys=2)
    logger.info("a")
    logger.info("a")  # dropped
    logger.info("b")
    logger.info("c")  # "a" is forgotten, and its one dropped record reported
    assert collect.messages()[:3] == ["a", "b", "1 more records like this were suppressed "
                                                "(at most 1 per 60s): a"]
    assert collect.messages()[3] == "c"


def test_a_storm_of_one_error_writes_kilobytes_not_megabytes(logger: logging.Logger) -> None:
    out = io.StringIO()
    logger.addHandler(log_handler("json", out))
    for _ in range(5_000):
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            logger.exception("socket.accept() out of system resource")
    lines = out.getvalue().splitlines()
    assert len(lines) == 10
    assert len(out.getvalue()) < 10_000
    assert all(json.loads(line)["message"] == "socket.accept() out of system resource"
               for line in lines)


def test_text_format_is_one_readable_line(logger: logging.Logger) -> None:
    out = io.StringIO()
    logger.addHandler(log_handler("text", out))
    logger.warning("upstream %s lost", "10.0.0.1:9042")
    assert out.getvalue().endswith(f"WARNING {logger.name}: upstream 10.0.0.1:9042 lost\n")
