"""Structured logging for every georeg process.

JSON lines when stdout is not a terminal (so logs can be shipped and queried),
coloured key=value lines when it is. Secrets never reach a log line: values of
keys that name credentials are replaced before rendering, request logging
records paths, never headers, tracebacks show code but never the values of
a frame's variables (one may hold a password), and aiohttp's report of a
request its parser refused (a header line over 8190 bytes, say a 64 KiB
``Authorization``) keeps the refusal and drops the bytes it quotes.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import structlog

_SECRET_KEY = re.compile(r"(pass(word)?|secret|token|authorization|credential|api[_-]?key)", re.I)


def redact_secrets(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in list(event):
        if _SECRET_KEY.search(key):
            event[key] = "[redacted]"
    return event


class ParserRefusals(logging.Filter):
    """Rewrites aiohttp's "Error handling request" records for requests its HTTP
    parser refused: the exception's text quotes the offending bytes (the first
    hundred of an oversized header — a credential), so only its class and
    status are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__module__ == "aiohttp.http_exceptions":
            record.msg = "request refused by the HTTP parser: %s (status %s)"
            record.args = (type(exc).__name__, getattr(exc, "code", 400))
            record.exc_info = None
            record.exc_text = None
        return True


_PARSER_REFUSALS = ParserRefusals()
# Rich's tracebacks without the frames' locals (structlog's default shows them;
# a caller's frame may hold a source's password or an Authorization header).
_TRACEBACKS = structlog.dev.RichTracebackFormatter(show_locals=False)


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """``fmt``: ``json``, ``console`` or ``auto`` (console on a terminal)."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty(),
                                                 exception_formatter=_TRACEBACKS)
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    # Libraries (aiohttp, grpc) log through the standard library: same format.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
    ))
    server = logging.getLogger("aiohttp.server")
    if _PARSER_REFUSALS not in server.filters:
        server.addFilter(_PARSER_REFUSALS)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))
