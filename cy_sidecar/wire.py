"""Frame codec of the inference worker protocol (see docs/worker-protocol.md).

A frame is a 4-byte big-endian unsigned length followed by that many bytes of one
orjson-encoded JSON object. Every object has a string field ``t`` naming its kind. Both ends
use this module: the proxy processes and the worker SDK, which is why it imports nothing but
the standard library and orjson.

Validation happens here, once, for both directions: a frame that fails any check raises
:class:`FrameError` whose message names the kind, the field and what was wrong, and the
receiver resets the connection. Lengths are bounded before any allocation: a length prefix
above the negotiated maximum is rejected from the 4 header bytes alone.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size

# Largest frame either end accepts unless configured lower; the hard ceiling keeps a corrupt
# length prefix from ever asking for more than this.
DEFAULT_MAX_FRAME_BYTES = 1 << 20
HARD_MAX_FRAME_BYTES = 16 << 20
MAX_STREAM_ID = (1 << 53) - 1  # exact in a JSON double, so no end can lose precision
# Bounds on what a worker may claim: far above any real chunk or request, far below what
# would overflow a counter, the ledger's 64-bit integers or the Gateway's uint64 fields.
MAX_CHUNK_TOKENS = 1 << 20
MAX_USAGE_TOKENS = 1 << 31
MAX_ETA_MS = 86_400_000  # a day

ERROR_CODES = ("oom", "not_found", "invalid", "overloaded", "internal", "cancelled")
WORKER_STATES = ("loading", "ready", "draining")
END_REASONS = ("stop", "length", "cancelled")

# Field checks per frame kind: name -> (type or tuple of types, required).
_INT = int
_STR = str
_NUM = (int, float)
_MAP = dict
_LIST = list
_BOOL = bool

SCHEMAS: dict[str, dict[str, tuple[Any, bool]]] = {
    "hello": {
        "v": (_INT, True),
        "role": (_STR, True),
        "pid": (_INT, True),
        "models": (_LIST, False),
        "state": (_STR, False),
        "eta_ms": (_INT, False),
        "max_frame": (_INT, False),
        "name": (_STR, False),
    },
    "req": {
        "s": (_INT, True),
        "model": (_STR, True),
        "prompt": (_STR, True),
        "params": (_MAP, False),
        "meta": (_MAP, False),
        "adapter": (_STR, False),
        "priority": (_INT, False),
        "credit": (_INT, True),
    },
    "chunk": {
        "s": (_INT, True),
        "text": (_STR, True),
        "n": (_INT, True),
        "p": (_INT, False),
        "ts": (_INT, False),
    },
    "end": {
        "s": (_INT, True),
        "reason": (_STR, True),
        "usage": (_MAP, False),
    },
    "err": {
        "s": (_INT, False),
        "code": (_STR, True),
        "msg": (_STR, True),
    },
    "cancel": {"s": (_INT, True)},
    "credit": {"s": (_INT, True), "n": (_INT, True)},
    "ping": {"id": (_INT, True)},
    "pong": {"id": (_INT, True)},
    "state": {
        "state": (_STR, True),
        "eta_ms": (_INT, False),
        "models": (_LIST, False),
        "msg": (_STR, False),
    },
    "ctl": {
        "id": (_INT, True),
        "cmd": (_STR, True),
        "payload": (_MAP, False),
    },
    "ctl_reply": {
        "id": (_INT, True),
        "ok": (_BOOL, True),
        "payload": (_MAP, False),
        "msg": (_STR, False),
    },
}

# Which kinds each side may send. A frame of another kind is a protocol violation.
FROM_PROXY = frozenset({"hello", "req", "cancel", "credit", "ping", "pong", "ctl"})
FROM_WORKER = frozenset(
    {"hello", "chunk", "end", "err", "ping", "pong", "state", "ctl_reply"}
)


def _check_usage(usage: Any) -> None:
    """An end frame's usage: token counts are ints in range (no bools, floats, negatives)."""
    if usage is None:
        return
    for key in ("prompt_tokens", "completion_tokens"):
        value = usage.get(key)
        if value is None:
            continue
        if type(value) is not int or not 0 <= value <= MAX_USAGE_TOKENS:
            raise FrameError(f"end frame has usage.{key}={value!r:.40}; expected an "
                             f"integer 0..{MAX_USAGE_TOKENS}")


def _check_hello(frame: dict) -> None:
    if frame["v"] != PROTOCOL_VERSION:
        raise FrameError(f"hello has unsupported protocol version v={frame['v']!r}; this "
                         f"side speaks v={PROTOCOL_VERSION}")
    if frame["role"] not in ("proxy", "worker"):
        raise FrameError(f"hello has role {frame['role']!r}; expected proxy or worker")
    if frame["pid"] < 0:
        raise FrameError(f"hello has pid {frame['pid']!r}")
    state = frame.get("state")
    if state is not None and state not in WORKER_STATES:
        raise FrameError(f"hello has state {state!r}; expected one of "
                         + ", ".join(WORKER_STATES))
    limit = frame.get("max_frame")
    if limit is not None and not 4096 <= limit <= HARD_MAX_FRAME_BYTES:
        raise FrameError(f"hello has max_frame {limit!r}; expected "
                         f"4096..{HARD_MAX_FRAME_BYTES}")


class FrameError(ValueError):
    """A frame that breaks the protocol. The connection that carried it must be reset.

    ``frames`` holds the valid frames that :meth:`FrameDecoder.feed` decoded from the same
    input before the bad one, so that a receiver can still act on them (count their tokens).
    """

    frames: list[dict] = []


def encode(frame: dict, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Serialize one frame, header included. Raises FrameError when it is too large."""
    body = orjson.dumps(frame)
    if len(body) > max_frame_bytes:
        raise FrameError(
            f"frame kind={frame.get('t')!r} is {len(body)} bytes, "
            f"over the limit of {max_frame_bytes}"
        )
    return HEADER.pack(len(body)) + body


def check(frame: Any, allowed: frozenset[str]) -> dict:
    """Validate a decoded frame against its schema and the sender's allowed kinds."""
    if not isinstance(frame, dict):
        raise FrameError(f"frame is a JSON {type(frame).__name__}, expected an object")
    kind = frame.get("t")
    if not isinstance(kind, str):
        raise FrameError(f"frame has no string field 't' (got {kind!r})")
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise FrameError(f"unknown frame kind t={kind!r}")
    if kind not in allowed:
        raise FrameError(f"frame kind t={kind!r} is not allowed from this peer")
    for name, (typ, required) in schema.items():
        value = frame.get(name)
        if value is None:
            if required:
                raise FrameError(f"frame kind={kind!r} is missing field {name!r}")
            continue
        # bool is an int in Python; an int field must not accept true/false.
        if not isinstance(value, typ) or (typ is _INT and isinstance(value, bool)):
            raise FrameError(
                f"frame kind={kind!r} field {name!r} has type "
                f"{type(value).__name__}, value {value!r:.60}"
            )
    # Range checks only where the kind defines the field: an extra "s" or "n" on another
    # kind is ignored like any unknown field (it was compared unchecked, a TypeError).
    sid = frame.get("s") if "s" in schema else None
    if sid is not None and not 0 < sid <= MAX_STREAM_ID:
        raise FrameError(f"frame kind={kind!r} has stream id {sid!r} out of range")
    count = frame.get("n") if "n" in schema else None
    if count is not None and not 0 <= count <= MAX_CHUNK_TOKENS:
        raise FrameError(f"frame kind={kind!r} has n={count!r} out of range "
                         f"0..{MAX_CHUNK_TOKENS}")
    if kind == "chunk":
        prompt = frame.get("p")
        if prompt is not None and not 0 <= prompt <= MAX_USAGE_TOKENS:
            raise FrameError(f"chunk frame has p={prompt!r} out of range "
                             f"0..{MAX_USAGE_TOKENS}")
    elif kind == "end":
        _check_usage(frame.get("usage"))
    elif kind == "hello":
        _check_hello(frame)
    eta = frame.get("eta_ms") if "eta_ms" in schema else None
    if eta is not None and not 0 <= eta <= MAX_ETA_MS:
        raise FrameError(f"frame kind={kind!r} has eta_ms={eta!r} out of range "
                         f"0..{MAX_ETA_MS}")
    if kind == "err" and frame["code"] not in ERROR_CODES:
        raise FrameError(f"err frame has unknown code {frame['code']!r}")
    if kind == "state" and frame["state"] not in WORKER_STATES:
        raise FrameError(f"state frame has unknown state {frame['state']!r}")
    if kind == "end" and frame["reason"] not in END_REASONS:
        raise FrameError(f"end frame has unknown reason {frame['reason']!r:.60}: expected "
                         + ", ".join(END_REASONS))
    return frame


def _plain_chunk(obj: Any) -> bool:
    """The hot path: a chunk frame with exactly its usual fields, all valid.

    Anything else (another kind, an optional field, a bad value) goes through check(),
    which gives the same verdict with a message; this only skips the generic loop.
    """
    if type(obj) is not dict or obj.get("t") != "chunk" or len(obj) != 4:
        return False
    sid = obj.get("s")
    count = obj.get("n")
    return (
        type(sid) is int and 0 < sid <= MAX_STREAM_ID
        and type(count) is int and 0 <= count <= MAX_CHUNK_TOKENS
        and type(obj.get("text")) is str
    )


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, get whole validated frames back.

    After a FrameError the decoder is unusable; the caller resets the connection.
    """

    __slots__ = ("_buf", "_max", "_allowed", "_chunks")

    def __init__(self, allowed: frozenset[str], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self._buf = bytearray()
        self._max = min(max_frame_bytes, HARD_MAX_FRAME_BYTES)
        self._allowed = allowed
        self._chunks = "chunk" in allowed

    def feed(self, data: bytes) -> list[dict]:
        buf = self._buf
        buf += data
        frames = []
        chunks_allowed = self._chunks
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            (length,) = HEADER.unpack_from(buf, pos)
            if length == 0 or length > self._max:
                err = FrameError(f"frame length {length} outside 1..{self._max} bytes")
                err.frames = frames
                raise err
            if end - pos - HEADER_SIZE < length:
                break
            start = pos + HEADER_SIZE
            try:
                obj = orjson.loads(memoryview(buf)[start : start + length])
            except orjson.JSONDecodeError as exc:
                err = FrameError(f"frame of {length} bytes is not valid JSON: {exc}")
                err.frames = frames
                raise err from None
            if not (chunks_allowed and _plain_chunk(obj)):
                try:
                    check(obj, self._allowed)
                except FrameError as err:
                    err.frames = frames
                    raise
            frames.append(obj)
            pos = start + length
        if pos:
            del buf[:pos]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)
