"""Logging: one logger per component under ``cy_sidecar``, one line per event.

Text lines read ``TIME LEVEL role=ROLE pid=PID logger=NAME EVENT key=value ...``; messages are
written as an event word followed by key=value pairs with lazy ``%s`` arguments. With
``log_format = "json"`` each line is one JSON object with the same fields: ``msg`` is the
whole message, ``event`` its leading words, and each ``key=value`` of it is a field of its own
(numbers as numbers; a key that would replace one of the fixed fields is written as
``arg_KEY``). The role and pid are set once per process (after a fork) by :func:`setup`.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import sys
import threading
import time

import orjson

_ROLE = "main"


# Control characters from callers (a trace id with a newline) must not forge log lines.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _escape(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f"{ts}.{int(record.msecs):03d}Z {record.levelname.lower():<7} "
            f"role={_ROLE} pid={record.process} logger={record.name} "
            f"{_escape(record.getMessage())}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_KEY = re.compile(r"(?:^|(?<=\s))([A-Za-z_][A-Za-z0-9_]*)=")
# At most 15 digits: ids that happen to be all digits stay strings (and within JSON's range).
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]{0,14})(\.[0-9]+)?")
_FIXED = ("ts", "level", "role", "pid", "logger", "msg", "event", "exc")


def _quoted(msg: str, start: int) -> tuple[str, int]:
    """The string literal (a %r) at msg[start] and the index after it."""
    quote, i = msg[start], start + 1
    while i < len(msg) and msg[i] != quote:
        i += 2 if msg[i] == "\\" else 1
    try:
        return ast.literal_eval(msg[start:i + 1]), i + 1
    except (ValueError, SyntaxError):
        return msg[start + 1:i], i + 1


def _fields(msg: str) -> dict:
    """The event words and the key=value pairs of a message written as the module says.

    A value runs to the next ``key=`` (so ``next=SIGKILL and restart`` is one value), or is
    one quoted string literal; numbers become numbers.
    """
    match = _KEY.search(msg)
    out: dict = {"event": (msg[:match.start()] if match else msg).strip()}
    while match:
        key, pos = match.group(1), match.end()
        value: object
        if msg[pos:pos + 1] in ("'", '"'):
            value, pos = _quoted(msg, pos)
            match = _KEY.search(msg, pos)
        else:
            match = _KEY.search(msg, pos)
            value = msg[pos:match.start() if match else len(msg)].strip()
            number = _NUMBER.fullmatch(value)
            if number:
                value = float(value) if number.group(1) else int(value)
        out[f"arg_{key}" if key in _FIXED else key] = value
    return out


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
        obj.update(_fields(obj["msg"]))
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


# Substrings of native log lines that this process caused on purpose (logged at info).
_EXPECTED_NATIVE: set[str] = set()


def capture_native_stderr() -> None:
    """Route what native code (gRPC's core) writes to file descriptor 2 through this
    process's log format, a line at a time, so that JSON logs stay one object per line.

    Python's own stderr (the log handler, tracebacks) keeps writing to the original stream
    directly; only descriptor 2 is replaced by a pipe that a reader thread turns into log
    lines of the ``grpc.core`` logger.
    """
    out = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    for handler in logging.getLogger("cy_sidecar").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(out)
    sys.stderr = out
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    threading.Thread(target=_pump_native, args=(read_fd,), name="native-stderr",
                     daemon=True).start()


def expect_native(substring: str) -> None:
    """A native log line containing `substring` is the expected effect of what this
    process just did: log it at info level instead of as the error it claims to be."""
    _EXPECTED_NATIVE.add(substring)


def _pump_native(fd: int) -> None:
    core = get("grpc.core")
    with os.fdopen(fd, "rb") as pipe:
        for raw in pipe:
            text = raw.decode("utf-8", "replace").rstrip()
            if not text:
                continue
            # gRPC's core lines start with a severity letter: I, W, E or F.
            level = {"E": logging.ERROR, "F": logging.CRITICAL, "W": logging.WARNING}.get(
                text[:1], logging.INFO)
            if any(s in text for s in _EXPECTED_NATIVE):
                level = logging.INFO
            core.log(level, "grpc core line=%r", text)


def role() -> str:
    return _ROLE


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"cy_sidecar.{name}")


def pid() -> int:
    return os.getpid()
