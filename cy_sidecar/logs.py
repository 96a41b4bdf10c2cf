"""Logging: one logger per component under ``cy_sidecar``, one line per event.

Text lines read ``TIME LEVEL role=ROLE pid=PID logger=NAME EVENT key=value ...``; messages are
written as an event word followed by key=value pairs with lazy ``%s`` arguments. With
``log_format = "json"`` each line is one JSON object with the same fields. The role and pid
are set once per process (after a fork) by :func:`setup`.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import orjson

_ROLE = "main"


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f"{ts}.{int(record.msecs):03d}Z {record.levelname.lower():<7} "
            f"role={_ROLE} pid={record.process} logger={record.name} {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "role": _ROLE,
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            obj["trace_id"] = trace_id
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(obj).decode()


def setup(role: str, level: str = "info", fmt: str = "text") -> None:
    """Configure the process's logging; call again after fork with the child's role."""
    global _ROLE
    _ROLE = role
    root = logging.getLogger("cy_sidecar")
    root.setLevel(level.upper())
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root.addHandler(handler)
    # grpc's own logger goes through Python logging too; keep it quiet below warnings.
    logging.getLogger("grpc").setLevel(logging.WARNING)


def role() -> str:
    return _ROLE


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"cy_sidecar.{name}")


def pid() -> int:
    return os.getpid()
