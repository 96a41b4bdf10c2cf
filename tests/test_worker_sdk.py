"""Worker SDK in-process: a test engine behind a WorkerServer, a raw-frame proxy in front.

Every wait is on a frame, an EOF or an event set by the engine, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import shutil
import socket
import stat
import tempfile
import time

import pytest

from cy_sidecar import wire
from cy_sidecar.worker_sdk import Chunk, Request, WorkerError, WorkerServer

TIMEOUT = 5.0


def run_async(fn):
    """Run an async test in a fresh event loop, bounded by a timeout."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        async def bounded():
            return await asyncio.wait_for(fn(*args, **kwargs), 4 * TIMEOUT)

        return asyncio.run(bounded())

    return wrapper


@pytest.fixture
def sock_path():
    # Short on purpose: a Unix socket path is limited to 107 bytes.
    folder = tempfile.mkdtemp(prefix="cysdk", dir="/tmp")
    yield os.path.join(folder, "w.sock")
    shutil.rmtree(folder, ignore_errors=True)


class Proxy:
    """The proxy side of one connection, frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.decoder = wire.FrameDecoder(wire.FROM_WORKER)
        self.pending: list[dict] = []
        self.hello: dict = {}

    @classmethod
    async def connect(cls, path: str, handshake: bool = True) -> Proxy:
        reader, writer = await asyncio.open_unix_connection(path)
        proxy = cls(reader, writer)
        if handshake:
            await proxy.send({"t": "hello", "v": 1, "role": "proxy", "pid": os.getpid(),
                              "max_frame": wire.DEFAULT_MAX_FRAME_BYTES})
            proxy.hello = await proxy.recv()
            assert proxy.hello["t"] == "hello", proxy.hello
        return proxy

    async def send(self, frame: dict) -> None:
        self.writer.write(wire.encode(frame))
        await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> dict:
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
            if not data:
                raise EOFError("inference worker closed the connection")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    async def recv_until(self, kind: str, sid: int | None = None) -> list[dict]:
        """Frames up to and including the first of ``kind`` (for stream ``sid``)."""
        got = []
        while True:
            frame = await self.recv()
            got.append(frame)
            if frame["t"] == kind and (sid is None or frame.get("s") == sid):
                return got

    async def expect_eof(self) -> list[dict]:
        got = []
        try:
            while True:
                got.append(await self.recv())
        except EOFError:
            return got

    async def ping(self, ident: int) -> list[dict]:
        """Round trip a ping; returns the frames that arrived before the pong."""
        await self.send({"t": "ping", "id": ident})
        frames = await self.recv_until("pong")
        assert frames[-1] == {"t": "pong", "id": ident}
        return frames[:-1]

    async def request(self, sid: int, credit: int = 1000, model: str = "m1",
                      prompt: str = "tell me about the harbour", **extra: str) -> None:
        await self.send({"t": "req", "s": sid, "model": model, "prompt": prompt,
                         "credit": credit, "params": {"max_new_tokens": 0},
                         "meta": {"trace_id": f"tr{sid}", "extra": dict(extra)}})

    def close(self) -> None:
        self.writer.close()


class Engine:
    """A test engine; ``meta.extra`` says what to do: tokens, hang_at, fail, exit_tokens."""

    WORDS = ("Fog", " lifts", " over", " the", " quiet", " bay", " at", " dawn", ".")

    def __init__(self):
        self.advanced = 0
        self.closed: dict[int, asyncio.Event] = {}
        self.requests: dict[int, Request] = {}
        self.hung = asyncio.Event()

    def closed_event(self, sid: int) -> asyncio.Event:
        return self.closed.setdefault(sid, asyncio.Event())

    async def generate(self, req: Request):
        self.requests[req.stream_id] = req
        extra = req.extra
        count = int(extra.get("tokens", "5"))
        hang_at = int(extra.get("hang_at", "-1"))
        if "end_only" not in extra:
            req.prompt_tokens = len(req.prompt.split())
        try:
            for i in range(count):
                if i == hang_at:
                    self.hung.set()
                    await asyncio.Event().wait()
                if extra.get("fail") == "worker_error" and i == 2:
                    raise WorkerError("oom", "out of memory on device 0")
                if extra.get("fail") == "crash" and i == 2:
                    raise RuntimeError("kernel launch failed")
                if extra.get("fail") == "cuda_oom" and i == 2:
                    raise CudaOutOfMemoryError("Tried to allocate 4 GiB")
                if extra.get("fail") == "self_cancel" and i == 2:
                    raise asyncio.CancelledError
                if extra.get("fail") == "bad_chunk":
                    yield Chunk("x", -1)
                self.advanced += 1
                yield Chunk(self.WORDS[i % len(self.WORDS)], int(extra.get("per", "1")))
        finally:
            if "end_only" in extra:
                req.prompt_tokens = 99
            self.closed_event(req.stream_id).set()


class CudaOutOfMemoryError(RuntimeError):
    pass


async def start_server(path: str, engine: Engine | None = None, **kwargs) -> WorkerServer:
    engine = engine or Engine()
    kwargs.setdefault("models", ["m1", "m2"])
    server = WorkerServer(engine.generate, path, name="test-engine", **kwargs)
    await server.start()
    return server


def chunks_of(frames: list[dict], sid: int) -> list[dict]:
    return [f for f in frames if f["t"] == "chunk" and f["s"] == sid]


@run_async
async def test_handshake_reports_the_worker(sock_path):
    server = await start_server(sock_path, max_frame_bytes=65536)
    proxy = await Proxy.connect(sock_path)
    hello = proxy.hello
    assert hello == {"t": "hello", "v": 1, "role": "worker", "pid": os.getpid(),
                     "models": ["m1", "m2"], "state": "ready", "eta_ms": 0,
                     "name": "test-engine", "max_frame": 65536}
    proxy.close()
    await server.close()


@run_async
async def test_socket_file_mode_and_removal_on_close(sock_path):
    server = await start_server(sock_path)
    mode = os.stat(sock_path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
    serving = asyncio.create_task(server.serve_forever())
    await server.close()
    await asyncio.wait_for(serving, TIMEOUT)
    assert not os.path.exists(sock_path)


@run_async
async def test_stale_socket_file_is_replaced(sock_path):
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(sock_path)
    dead.close()  # the file stays, nobody listens: what a killed process leaves behind
    server = await start_server(sock_path)
    proxy = await Proxy.connect(sock_path)
    assert proxy.hello["role"] == "worker"
    proxy.close()
    await server.close()


@run_async
async def test_live_socket_is_not_stolen(sock_path):
    live = socket.socket(socket.AF_UNIX)
    live.bind(sock_path)
    live.listen(1)
    try:
        with pytest.raises(OSError) as info:
            await start_server(sock_path)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        live.close()


@run_async
async def test_regular_file_is_not_removed(sock_path):
    with open(sock_path, "w") as f:
        f.write("not a socket")
    with pytest.raises(FileExistsError):
        await start_server(sock_path)
    assert os.path.isfile(sock_path)


@run_async
async def test_wrong_version_is_refused(sock_path):
    server = await start_server(sock_path)
    proxy = await Proxy.connect(sock_path, handshake=False)
    await proxy.send({"t": "hello", "v": 2, "role": "proxy", "pid": os.getpid()})
    frames = await proxy.expect_eof()
    assert frames[0]["t"] == "err" and frames[0]["code"] == "invalid"
    assert "v=2" in frames[0]["msg"] and "s" not in frames[0]
    await server.close()


@run_async
async def test_request_before_hello_is_a_violation(sock_path):
    server = await start_server(sock_path)
    proxy = await Proxy.connect(sock_path, handshake=False)
    await proxy.request(1)
    frames = await proxy.expect_eof()
    assert [f["t"] for f in frames] == ["err"]
    assert "before hello" in frames[0]["msg"]
    await server.close()


@run_async
async def test_stream_text_and_usage(sock_path):
    server = await start_server(sock_path)
    proxy = await Proxy.connect(sock_path)
    await proxy.request(1, tokens="7", per="2")
    frames = await proxy.recv_until("end", 1)
    chunks = chunks_of(frames, 1)
    assert "".join(c["text"] for c in chunks) == "Fog lifts over the quiet bay at"
    assert chunks[0]["p"] == 5 and all("p" not in c for c in chunks[1:])
    assert all("ts" not in c for c in chunks)
    end = frames[-1]
    assert end == {"t": "end", "s": 1, "reason": "stop",
                   "usage": {"prompt_tokens": 5, "completion_tokens": 14}}
    assert sum(c["n"] for c in chunks) == 14
    proxy.close()
    await server.close()


@run_async
async def test_reason_length_when_max_new_tokens_reached(sock_path):
    server = await start_server(sock_path)
    proxy = await Proxy.connect(sock_path)
    await proxy.send({"t": "req", "s": 3, "model": "m1", "prompt": "p", "credit": 10,
                      "params": {"max_new_tokens": 4}, "meta": {"extra": {"tokens": "4"}}})
    frames = await proxy.recv_until("end", 3)
    assert frames[-1]["reason"] == "length"
    proxy.close()
    await server.close()


@run_async
async def test_usage_at_end_only_engine(sock_path):
    server = await start_server(sock_path)
    proxy = await Proxy.connect(sock_path)
    await proxy.request(1, tokens="3", end_only="1")
    frames = await proxy.recv_until("end", 1)
    assert all("p" not in c for c in chunks_of(frames, 1))
    assert frames[-1]["usage"] == {"prompt_tokens": 99, "completion_tokens": 3}
    proxy.close()
    await server.close()


@run_async
async def test_stamp_puts_monotonic_ts_in_chunks(sock_path):
    server = await start_server(sock_path, stamp=True)
    proxy = await Proxy.connect(sock_path)
    await proxy.request(1, tokens="4")
    stamps = [c["ts"] for c in chunks_of(await proxy.recv_until("end", 1), 1)]
    assert len(stamps) == 4 and stamps == sorted(stamps)
    assert 0 < stamps[0] <= time.monotonic_ns()
    proxy.close()
    await server.close()


@run_async
async def test_credit_pauses_and_resumes_the_stream(sock_path):
    engine = Engine()
    server = await start_server(sock_path, engine)
    proxy = await Proxy.connect(sock_path)
    await proxy.request(1, credit=3, tokens="10")
    got = [await proxy.recv() for _ in range(3)]
    assert [f["t"] for f in got] == ["chunk"] * 3
    # The engine never suspends on its own, so without flow control all ten chunks would
    # be out before the pong.
    assert await proxy.ping(1) == []
    assert engine.advanced == 3
    await proxy.send({"t": "credit", "s": 1, "n": 4})
    got = [await proxy.recv() for _ in range(4)]
    assert [f["t"] for f in got] == ["chunk"] * 4
    assert await proxy.ping(2) == []
    assert engine.advanced == 7
    await proxy.send({"t": "credit", "s": 1, "n": 100})
    frames = await proxy.recv_until("end", 1)
    assert len(chunks_of(frames, 1)) == 3
    assert frames[-1]["usage"]["completion_tokens"] == 10
    proxy.close()
    await server.close()


@run_async
async def test_zero_credit_request_waits_for_credit(sock_path):
    engine = Engine()
    server = await start_server(sock_path, engine)
    proxy = await Proxy.connect(sock_path)
    await proxy.request(1, credit=0, tokens="2")
    assert await proxy.ping(1) == []
    assert engine.advanced == 0
    await proxy.send({"t": "credit", "s": 1, "n": 5})
    frames = await proxy.recv_until("end", 1)
    assert len(chunks_of(frames, 1)) == 2
    proxy.close()
    await server.close()


@run_async
async def test_cancel_at_zero_credit_closes_the_engine_and_reports_usage(sock_path):
    engine = Engine()
    server = await start_server(sock_path, engine)
    proxy = await Proxy.connect(sock_path)
    await proxy.request(1, credit=2, tokens="10")
    assert [(await proxy.recv())["t"] for _ in range(2)] == ["chunk", "chunk"]
    await proxy.send({"t": "cancel", "s": 1})
    frames = await proxy.recv_until("end", 1)
    assert frames[-1] == {"t": "end", "s": 1, "reason": "cancelled",
                          "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    assert engine.closed_event(1).is_set()
    proxy.close()
    await server.close()


@run_async
async def test_cancel_interrupts_an_engine_that_is_stuck(sock_path):
    engine = Engine()
    server = await start_server(sock_path, engine)
    proxy = await Proxy.connect(sock_path)
    await proxy.request(1, tokens="10", hang_at="3", end_only="1")
    await asyncio.wait_for(engine.hung.wait(), TIMEOUT)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await proxy.send({"t": "cancel", "s": 1})
    frames = await proxy.recv_until("end", 1)
    assert loop.time() - t0 < 1.0
    assert len(chunks_of(frames, 1)) == 3
    # The engine reported its prompt size in its finally block: it reaches the usage.
    assert frames[-1]["usage"] == {"prompt_tokens": 99, "completion_tokens": 3}
    assert frames[-1]["reason"] == "cancelled"
    proxy.close()
    await server.close()


@run_async
async def test_cancel_for_unknown_stream_is_ignored(sock_path):
    server = await start_server(sock_path)
    proxy = await Proxy.connect(sock_path)
    await proxy.send({"t": "cancel", "s": 424242})
    await proxy.send({"t": "credit", "s": 424242, "n": 3})
    assert await proxy.ping(7) == []
    await proxy.request(1, tokens="1")
    frames = await proxy.recv_until("end", 1)
    await proxy.send({"t": "cancel", "s": 1})  # already finished: also a race
    assert await proxy.ping(8) == []
    assert frames[-1]["reason"] == "stop"
    proxy.close()
    await server.close()


@run_async
async def test_unknown_model_and_wildcard(sock_path):
    server = await start_server(sock_path)
    proxy = await Proxy.connect(sock_path)
    await proxy.request(1, model="nope")
    err = await proxy.recv()
    assert err["t"] == "err" and err["s"] == 1 and err["code"] == "not_found"
    assert "'nope'" in err["msg"]
    proxy.close()
    await server.close()
    server = await start_server(sock_path, models=["*"])
    proxy = await Proxy.connect(sock_path)
    await proxy.request(2, model="anything-at-all", tokens="1")
    assert (await proxy.recv_until("end", 2))[-1]["reason"] == "stop"
    proxy.close()
    await server.close()


@run_async
async def test_loading_refuses_then_state_ready_is_broadcast(sock_path):
    server = await start_server(sock_path, state="loading")
    server.set_state("loading", eta_ms=60_000, msg="weights")
    proxy = await Proxy.connect(sock_path)
    assert proxy.hello["state"] == "loading" and 0 < proxy.hello["eta_ms"] <= 60_000
    await proxy.request(1)
    err = await proxy.recv()
    assert err["code"] == "overloaded" and "loading" in err["msg"]
    server.set_state("ready", msg="loaded")
    assert await proxy.recv() == {"t": "state", "state": "ready", "eta_ms": 0,
                                  "models": ["m1", "m2"], "msg": "loaded"}
    await proxy.request(2, tokens="1")
    assert (await proxy.recv_until("end", 2))[-1]["reason"] == "stop"
    server.set_state("draining")
    assert (await proxy.recv())["state"] == "draining"
    await proxy.request(3)
    err = await proxy.recv()
    assert err["code"] == "overloaded" and "draining" in err["msg"]
    with pytest.raises(ValueError):
        server.set_state("asleep")
    proxy.close()
    await server.close()


@run_async
async def test_ping_pong(sock_path):
    server = await start_server(sock_path)
    proxy = await Proxy.connect(sock_path)
    for ident in (0, 1, 2 ** 40):
        assert await proxy.ping(ident) == []
    proxy.close()
    await server.close()


@run_async
async def test_engine_errors_fail_only_their_stream(sock_path):
    server = await start_server(sock_path)
    proxy = await Proxy.connect(sock_path)
    cases = {1: ("worker_error", "oom", "out of memory on device 0"),
             2: ("crash", "internal", "RuntimeError: kernel launch failed"),
             3: ("cuda_oom", "oom", "Tried to allocate"),
             4: ("bad_chunk", "internal", "invalid chunk"),
             5: ("self_cancel", "internal", "cancelled inside the engine")}
    for sid, (fail, _, _) in cases.items():
        await proxy.request(sid, tokens="5", fail=fail)
    seen = {}
    while len(seen) < len(cases):
        frame = await proxy.recv()
        if frame["t"] == "err":
            seen[frame["s"]] = frame
        else:
            assert frame["t"] == "chunk"
    for sid, (_, code, text) in cases.items():
        assert seen[sid]["code"] == code and text in seen[sid]["msg"], seen[sid]
    await proxy.request(9, tokens="2")
    assert (await proxy.recv_until("end", 9))[-1]["usage"]["completion_tokens"] == 2
    proxy.close()
    await server.close()


@run_async
async def test_invalid_params_are_refused_per_stream(sock_path):
    server = await start_server(sock_path)
    proxy = await Proxy.connect(sock_path)
    bad = [({"max_new_tokens": "ten"}, {}, "max_new_tokens"),
           ({"max_new_tokens": True}, {}, "max_new_tokens"),
           ({"temperature": "hot"}, {}, "temperature"),
           ({}, {"extra": {"k": 1}}, "meta.extra"),
           ({}, {"tenant": 5}, "meta.tenant")]
    for sid, (params, meta, field) in enumerate(bad, start=1):
        await proxy.send({"t": "req", "s": sid, "model": "m1", "prompt": "p", "credit": 1,
                          "params": params, "meta": meta})
        err = await proxy.recv()
        assert err["t"] == "err" and err["s"] == sid and err["code"] == "invalid"
        assert field in err["msg"]
    await proxy.send({"t": "req", "s": 50, "model": "m1", "prompt": "p", "credit": -1})
    assert "negative" in (await proxy.recv())["msg"]
    proxy.close()
    await server.close()


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@run_async
async def test_malformed_frame_closes_the_connection_and_cancels_its_streams(sock_path):
    engine = Engine()
    lines = _Lines()
    sdk_log = logging.getLogger("cy_sidecar.worker_sdk")
    sdk_log.addHandler(lines)
    sdk_log.setLevel(logging.INFO)
    try:
        server = await start_server(sock_path, engine)
        bystander = await Proxy.connect(sock_path)
        proxy = await Proxy.connect(sock_path)
        await proxy.request(1, tokens="100", hang_at="1")
        await asyncio.wait_for(engine.hung.wait(), TIMEOUT)
        await proxy.send_raw(wire.HEADER.pack(9) + b'{"t":"pin')
        frames = await proxy.expect_eof()
        assert frames[-1]["t"] == "err" and "not valid JSON" in frames[-1]["msg"]
        await asyncio.wait_for(engine.closed_event(1).wait(), TIMEOUT)
        violations = [ln for ln in lines.lines if "proxy_protocol_violation" in ln]
        assert len(violations) == 1
        assert f"peer_pid={os.getpid()}" in violations[0]
        assert "not valid JSON" in violations[0] and "streams_cancelled=1" in violations[0]
        # Other connections are not affected.
        assert await bystander.ping(5) == []
        bystander.close()
        await server.close()
    finally:
        sdk_log.removeHandler(lines)


@run_async
async def test_frames_a_worker_may_not_receive_are_violations(sock_path):
    server = await start_server(sock_path)
    for frame in ({"t": "chunk", "s": 1, "text": "x", "n": 1},
                  {"t": "hello", "v": 1, "role": "proxy", "pid": 1}):
        proxy = await Proxy.connect(sock_path)
        await proxy.send(frame)
        frames = await proxy.expect_eof()
        assert frames[-1]["t"] == "err" and frames[-1]["code"] == "invalid"
    await server.close()


@run_async
async def test_duplicate_open_stream_id_is_a_violation(sock_path):
    server = await start_server(sock_path)
    proxy = await Proxy.connect(sock_path)
    await proxy.request(1, credit=0)
    await proxy.request(1, credit=0)
    frames = await proxy.expect_eof()
    assert frames[-1]["t"] == "err" and "still open" in frames[-1]["msg"]
    await server.close()


@run_async
async def test_disconnect_cancels_the_connections_streams(sock_path):
    engine = Engine()
    server = await start_server(sock_path, engine)
    proxy = await Proxy.connect(sock_path)
    await proxy.request(1, tokens="50", hang_at="2")
    await proxy.request(2, credit=1, tokens="50")
    await asyncio.wait_for(engine.hung.wait(), TIMEOUT)
    proxy.close()
    await asyncio.wait_for(engine.closed_event(1).wait(), TIMEOUT)
    await asyncio.wait_for(engine.closed_event(2).wait(), TIMEOUT)
    assert server.info()["open_streams"] == 0
    await server.close()


@run_async
async def test_two_proxy_connections_at_once(sock_path):
    server = await start_server(sock_path)
    first = await Proxy.connect(sock_path)
    second = await Proxy.connect(sock_path)
    assert server.info()["connections"] == 2
    # Same stream ids on both connections: ids are per connection.
    for proxy in (first, second):
        await proxy.request(1, tokens="6")
        await proxy.request(2, tokens="3", model="m2")
    for proxy in (first, second):
        frames = []
        ends = 0
        while ends < 2:
            frame = await proxy.recv()
            frames.append(frame)
            ends += frame["t"] == "end"
        assert len(chunks_of(frames, 1)) == 6 and len(chunks_of(frames, 2)) == 3
    server.set_state("draining", msg="bye")
    for proxy in (first, second):
        assert (await proxy.recv())["msg"] == "bye"
    first.close()
    second.close()
    await server.close()


@run_async
async def test_control_commands(sock_path):
    calls = []

    async def control(cmd, payload):
        calls.append((cmd, payload))
        if cmd == "refuse":
            raise WorkerError("invalid", "refused on purpose")
        if cmd == "explode":
            raise KeyError("boom")
        return {"answer": 42, "cmd": cmd}

    server = await start_server(sock_path, control=control)
    proxy = await Proxy.connect(sock_path)
    await proxy.send({"t": "ctl", "id": 1, "cmd": "ask", "payload": {"a": "b"}})
    assert await proxy.recv() == {"t": "ctl_reply", "id": 1, "ok": True,
                                  "payload": {"answer": "42", "cmd": "ask"}}
    await proxy.send({"t": "ctl", "id": 2, "cmd": "refuse"})
    assert await proxy.recv() == {"t": "ctl_reply", "id": 2, "ok": False,
                                  "msg": "refused on purpose"}
    await proxy.send({"t": "ctl", "id": 3, "cmd": "explode"})
    reply = await proxy.recv()
    assert reply["ok"] is False and "KeyError" in reply["msg"]
    assert calls[0] == ("ask", {"a": "b"})
    proxy.close()
    await server.close()
    server = await start_server(sock_path)
    proxy = await Proxy.connect(sock_path)
    await proxy.send({"t": "ctl", "id": 4, "cmd": "state"})
    reply = await proxy.recv()
    assert reply["ok"] is False and "no control commands" in reply["msg"]
    proxy.close()
    await server.close()


@run_async
async def test_close_stops_open_streams_with_err_cancelled(sock_path):
    engine = Engine()
    server = await start_server(sock_path, engine)
    proxy = await Proxy.connect(sock_path)
    await proxy.request(1, tokens="50", hang_at="2")
    await asyncio.wait_for(engine.hung.wait(), TIMEOUT)
    await server.close()
    frames = await proxy.expect_eof()
    assert frames[-1]["t"] == "err" and frames[-1]["code"] == "cancelled"
    assert "shutting down" in frames[-1]["msg"]
    assert engine.closed_event(1).is_set()
    assert not os.path.exists(sock_path)


@run_async
async def test_close_with_grace_lets_streams_finish(sock_path):
    server = await start_server(sock_path)
    proxy = await Proxy.connect(sock_path)
    await proxy.request(1, credit=1, tokens="3")
    await proxy.recv()  # the first chunk: the stream is open and waiting for credit
    closing = asyncio.create_task(server.close(grace_secs=TIMEOUT))
    assert (await proxy.recv())["state"] == "draining"
    await proxy.send({"t": "credit", "s": 1, "n": 10})
    frames = await proxy.expect_eof()
    assert frames[-1]["t"] == "end" and frames[-1]["usage"]["completion_tokens"] == 3
    await asyncio.wait_for(closing, TIMEOUT)


@run_async
async def test_backpressure_pauses_the_engine_instead_of_buffering(sock_path):
    class Big:
        advanced = 0

        async def generate(self, req):
            for _ in range(2000):
                Big.advanced += 1
                yield Chunk("x" * 4096, 1)

    server = WorkerServer(Big().generate, sock_path, ["m1"])
    await server.start()
    proxy = await Proxy.connect(sock_path)
    await proxy.request(1, credit=100_000)
    (conn,) = server._connections
    for _ in range(500):  # bounded: waits for the condition, not for a time
        if conn.paused:
            break
        await asyncio.sleep(0.01)
    assert conn.paused
    buffered = conn._transport.get_write_buffer_size()
    assert buffered < 1 << 20  # bounded by the high-water mark plus one flush
    assert Big.advanced < 2000
    frames = await proxy.recv_until("end", 1)
    assert len(chunks_of(frames, 1)) == 2000
    proxy.close()
    await server.close()
