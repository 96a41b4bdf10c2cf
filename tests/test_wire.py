"""Frame codec: round trips, partial input, every rejection, and a bounded fuzz run."""

from __future__ import annotations

import random

import orjson
import pytest

from cy_sidecar import wire

CHUNK = {"t": "chunk", "s": 7, "text": " harbour", "n": 1, "p": 12, "ts": 123456789}
SAMPLES_FROM_WORKER = [
    {"t": "hello", "v": 1, "role": "worker", "pid": 42, "models": ["demo"], "state": "ready",
     "eta_ms": 0, "name": "demo", "max_frame": 1 << 20},
    CHUNK,
    {"t": "end", "s": 7, "reason": "stop",
     "usage": {"prompt_tokens": 12, "completion_tokens": 30}},
    {"t": "err", "s": 7, "code": "oom", "msg": "CUDA out of memory"},
    {"t": "err", "code": "invalid", "msg": "connection-level"},
    {"t": "pong", "id": 3},
    {"t": "state", "state": "loading", "eta_ms": 2000, "models": ["demo"], "msg": "reload"},
    {"t": "ctl_reply", "id": 9, "ok": True, "payload": {"state": "ready"}},
]
SAMPLES_FROM_PROXY = [
    {"t": "hello", "v": 1, "role": "proxy", "pid": 41, "max_frame": 1 << 20},
    {"t": "req", "s": 1, "model": "demo", "prompt": "hi", "credit": 8,
     "params": {"max_new_tokens": 5, "temperature": 0.7, "top_p": 1.0,
                "repetition_penalty": 1.0},
     "meta": {"trace_id": "t", "tenant": "a", "player_id": "p", "locale": "en",
              "extra": {"k": "v"}}, "adapter": "", "priority": 0},
    {"t": "cancel", "s": 1},
    {"t": "credit", "s": 1, "n": 16},
    {"t": "ping", "id": 1},
    {"t": "ctl", "id": 2, "cmd": "state", "payload": {}},
]


def framed(body: bytes) -> bytes:
    return wire.HEADER.pack(len(body)) + body


def reject(data: bytes, allowed=wire.FROM_WORKER, max_frame=wire.DEFAULT_MAX_FRAME_BYTES):
    with pytest.raises(wire.FrameError) as info:
        wire.FrameDecoder(allowed, max_frame).feed(data)
    return str(info.value)


@pytest.mark.parametrize("frame", SAMPLES_FROM_WORKER)
def test_round_trip_from_worker(frame):
    assert wire.FrameDecoder(wire.FROM_WORKER).feed(wire.encode(frame)) == [frame]


@pytest.mark.parametrize("frame", SAMPLES_FROM_PROXY)
def test_round_trip_from_proxy(frame):
    assert wire.FrameDecoder(wire.FROM_PROXY).feed(wire.encode(frame)) == [frame]


def test_byte_by_byte_feed_gives_each_frame_once():
    data = b"".join(wire.encode(f) for f in SAMPLES_FROM_WORKER)
    decoder = wire.FrameDecoder(wire.FROM_WORKER)
    got = []
    for i in range(len(data)):
        got.extend(decoder.feed(data[i : i + 1]))
    assert got == SAMPLES_FROM_WORKER
    assert decoder.buffered == 0


def test_uneven_feeds_and_buffered_count():
    data = wire.encode(CHUNK) * 3
    decoder = wire.FrameDecoder(wire.FROM_WORKER)
    assert decoder.feed(data[:2]) == []
    assert decoder.buffered == 2
    first = decoder.feed(data[2 : len(data) // 2])
    rest = decoder.feed(data[len(data) // 2 :])
    assert first + rest == [CHUNK] * 3


def test_encode_refuses_a_frame_over_the_limit():
    with pytest.raises(wire.FrameError, match="over the limit of 64"):
        wire.encode({"t": "chunk", "s": 1, "text": "x" * 100, "n": 1}, 64)


def test_zero_length_is_rejected():
    assert "frame length 0 outside" in reject(wire.HEADER.pack(0))


def test_length_above_maximum_is_rejected_from_the_header_alone():
    msg = reject(wire.HEADER.pack(5000), max_frame=4096)
    assert "frame length 5000 outside 1..4096" in msg


def test_oversize_is_bounded_by_the_hard_ceiling():
    decoder = wire.FrameDecoder(wire.FROM_WORKER, 1 << 30)
    with pytest.raises(wire.FrameError, match="outside 1..16777216"):
        decoder.feed(wire.HEADER.pack(wire.HARD_MAX_FRAME_BYTES + 1))


def test_invalid_json_is_rejected():
    assert "is not valid JSON" in reject(framed(b'{"t":"chunk","s":1,'))


def test_invalid_utf8_is_rejected():
    assert "is not valid JSON" in reject(framed(b'{"t":"chunk","text":"\xff"}'))


def test_not_an_object_is_rejected():
    assert "JSON list, expected an object" in reject(framed(b'["chunk",1]'))
    assert "JSON int, expected an object" in reject(framed(b"17"))


def test_missing_kind_is_rejected():
    assert "no string field 't'" in reject(framed(b'{"s":1}'))
    assert "no string field 't'" in reject(framed(b'{"t":5}'))


def test_unknown_kind_is_rejected():
    assert "unknown frame kind t='bogus'" in reject(framed(b'{"t":"bogus"}'))


def test_kind_not_allowed_from_that_side():
    assert "t='req' is not allowed" in reject(wire.encode(SAMPLES_FROM_PROXY[1]))
    chunk = wire.encode(CHUNK)
    assert "t='chunk' is not allowed" in reject(chunk, allowed=wire.FROM_PROXY)


def test_missing_field_is_rejected():
    msg = reject(wire.encode({"t": "chunk", "s": 1, "n": 1}))
    assert "kind='chunk' is missing field 'text'" in msg
    msg = reject(wire.encode({"t": "chunk", "s": 1, "text": "a", "n": None}))
    assert "missing field 'n'" in msg


def test_ill_typed_field_is_rejected():
    msg = reject(wire.encode({"t": "chunk", "s": 1, "text": 3, "n": 1}))
    assert "field 'text' has type int" in msg
    msg = reject(wire.encode({"t": "chunk", "s": 1.5, "text": "a", "n": 1}))
    assert "field 's' has type float" in msg


def test_bool_is_not_an_int():
    msg = reject(wire.encode({"t": "chunk", "s": True, "text": "a", "n": 1}))
    assert "field 's' has type bool" in msg
    msg = reject(wire.encode({"t": "pong", "id": False}))
    assert "field 'id' has type bool" in msg


def test_bool_field_requires_a_bool():
    msg = reject(wire.encode({"t": "ctl_reply", "id": 1, "ok": 1}))
    assert "field 'ok' has type int" in msg


def test_stream_id_out_of_range():
    for sid in (0, -1, wire.MAX_STREAM_ID + 1):
        msg = reject(wire.encode({"t": "chunk", "s": sid, "text": "a", "n": 1}))
        assert f"stream id {sid} out of range" in msg
    ok = {"t": "chunk", "s": wire.MAX_STREAM_ID, "text": "a", "n": 1}
    assert wire.FrameDecoder(wire.FROM_WORKER).feed(wire.encode(ok)) == [ok]


def test_count_out_of_range():
    msg = reject(wire.encode({"t": "chunk", "s": 1, "text": "a", "n": -1}))
    assert "n=-1 out of range" in msg
    msg = reject(wire.encode({"t": "credit", "s": 1, "n": (1 << 31) + 1}),
                 allowed=wire.FROM_PROXY)
    assert "out of range" in msg


def test_unknown_error_code_and_state():
    assert "unknown code 'boom'" in reject(
        wire.encode({"t": "err", "code": "boom", "msg": "x"}))
    assert "unknown state 'asleep'" in reject(wire.encode({"t": "state", "state": "asleep"}))
    message = reject(wire.encode({"t": "end", "s": 1, "reason": "R" * 500_000}))
    assert "unknown reason 'RRR" in message and len(message) < 200


def test_extra_fields_are_ignored_even_named_s_or_n():
    # An "s" or "n" on a kind that does not define them is just an unknown field.
    frame = {"t": "pong", "id": 1, "s": "x", "n": [1], "future": {"a": 1}}
    assert wire.FrameDecoder(wire.FROM_WORKER).feed(wire.encode(frame)) == [frame]


def test_good_frames_before_a_bad_one_are_kept_on_the_error():
    data = wire.encode(CHUNK) + wire.encode(CHUNK) + framed(b"nope")
    with pytest.raises(wire.FrameError) as info:
        wire.FrameDecoder(wire.FROM_WORKER).feed(data)
    assert info.value.frames == [CHUNK, CHUNK]


def _valid(frame: dict, allowed: frozenset[str]) -> bool:
    """An independent restatement of the rules, to judge what the decoder returned."""
    if not isinstance(frame, dict) or frame.get("t") not in allowed:
        return False
    for name, (typ, required) in wire.SCHEMAS[frame["t"]].items():
        value = frame.get(name)
        if value is None:
            if required:
                return False
        elif isinstance(value, bool) and typ is not bool:
            return False
        elif not isinstance(value, typ):
            return False
    return True


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 1 and buf:
            del buf[rng.randrange(len(buf))]
        elif op == 2:
            buf.insert(rng.randrange(len(buf) + 1), rng.randrange(256))
        else:
            # Replace a JSON value by another JSON value: keeps the frame parseable more often.
            pick = rng.choice([b"true", b"null", b"-1", b"0", b"1.5", b'"x"', b"[]", b"{}",
                               b"9007199254740993", b"18446744073709551616"])
            at = rng.randrange(len(buf) + 1)
            buf[at:at + rng.randint(0, 3)] = pick
    return bytes(buf)


def _mutated_frame(rng: random.Random, frame: dict) -> bytes:
    obj = dict(frame)
    key = rng.choice(list(obj) + ["s", "n", "t", "extra"])
    obj[key] = rng.choice([None, True, -5, 0, 2 ** 53, 1.0, "", "bogus", [], {}, "chunk"])
    body = orjson.dumps(obj)
    if rng.random() < 0.3:
        body = _mutate(rng, body)
    return framed(body)


def test_fuzz_decoder_returns_valid_frames_or_raises_frame_error():
    rng = random.Random(20240601)
    samples = SAMPLES_FROM_WORKER + SAMPLES_FROM_PROXY
    outcomes = {"frames": 0, "rejected": 0}
    for i in range(4000):
        allowed = wire.FROM_WORKER if i % 2 else wire.FROM_PROXY
        kind = i % 3
        if kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        elif kind == 1:
            data = _mutate(rng, wire.encode(rng.choice(samples)))
        else:
            data = _mutated_frame(rng, rng.choice(samples))
        decoder = wire.FrameDecoder(allowed, 4096)
        try:
            # Feed in two pieces at a random cut, as a socket might deliver it.
            cut = rng.randint(0, len(data))
            frames = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        except wire.FrameError as exc:
            assert str(exc)
            assert all(_valid(f, allowed) for f in exc.frames)
            outcomes["rejected"] += 1
            continue
        assert all(_valid(f, allowed) for f in frames), frames
        outcomes["frames"] += len(frames)
    # The run must have exercised both paths, or it proves nothing.
    assert outcomes["frames"] > 100
    assert outcomes["rejected"] > 1000
