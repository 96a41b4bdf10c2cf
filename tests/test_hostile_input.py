"""Hostile or broken peers on both sides: clear errors, nothing lost, the sidecar serves on."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading

import grpc
import pytest

from cy_sidecar import wire
from cy_sidecar.protos import cy_llm_pb2 as pb
from cy_sidecar.protos import cy_llm_pb2_grpc as pb_grpc

from helpers import collect, new_channel, record_for, request, wait_until


class ScriptedWorker:
    """A fake inference worker whose reply to each request is chosen by meta.extra["case"].

    Unlike the demo worker it can say things the SDK never would (a prompt count beyond
    any integer type, a bad hello), which is exactly what the sidecar must survive.
    """

    def __init__(self, path: str, hello: dict | None = None):
        self.path = path
        self.hello = hello or {}
        self.big_sent = False
        self.requests: list[dict] = []
        self.stuck = False  # "trickle": no more pongs, a frame that never completes
        self.sent_all = threading.Event()  # "big_chunks": every frame is in the proxy's hands
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_unix_server(self._serve, self.path))
        self.ready.set()
        self.loop.run_forever()

    async def _serve(self, reader, writer) -> None:
        decoder = wire.FrameDecoder(wire.FROM_PROXY)
        hello = {"t": "hello", "v": 1, "role": "worker", "pid": os.getpid(),
                 "models": ["demo"], "state": "ready", "name": "scripted"}
        hello.update(self.hello)
        try:
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    if frame["t"] == "hello":
                        writer.write(wire.encode(hello))
                    elif frame["t"] == "ping" and not self.stuck:
                        writer.write(wire.encode({"t": "pong", "id": frame["id"]}))
                    elif frame["t"] == "req":
                        self._reply(frame, writer)
                await writer.drain()
                if self.big_sent:
                    self.sent_all.set()
        except (ConnectionError, wire.FrameError):
            pass
        finally:
            writer.close()

    def _reply(self, req: dict, writer) -> None:
        self.requests.append(req)
        sid = req["s"]
        case = req["meta"]["extra"].get("case", "ok")
        if case == "trickle":
            self.stuck = True
            asyncio.ensure_future(self._trickle(writer))
            return
        if case == "big_chunks":  # 30 chunks of 200,000 characters, one token each
            for _ in range(30):
                writer.write(wire.encode({"t": "chunk", "s": sid, "text": "C" * 200_000,
                                          "n": 1}))
            writer.write(wire.encode({"t": "end", "s": sid, "reason": "stop"}))
            self.big_sent = True
            return
        chunk = {"t": "chunk", "s": sid, "text": "word ", "n": 1}
        frames = [dict(chunk), dict(chunk)]
        if case == "p_huge":
            frames.append({**chunk, "p": 1 << 63})
        elif case == "p_negative":
            frames.append({**chunk, "p": -1})
        elif case == "usage_huge":
            frames.append({"t": "end", "s": sid, "reason": "stop",
                           "usage": {"prompt_tokens": (1 << 64) - 1, "completion_tokens": 2}})
        elif case == "usage_inflated":
            frames.append({"t": "end", "s": sid, "reason": "stop",
                           "usage": {"prompt_tokens": 2, "completion_tokens": 1 << 31}})
        elif case == "err_huge":
            frames.append({"t": "err", "s": sid, "code": "internal", "msg": "x" * 900_000})
        elif case == "usage_bool":
            frames.append({"t": "end", "s": sid, "reason": "stop",
                           "usage": {"prompt_tokens": True, "completion_tokens": 2}})
        elif case == "conn_oom":  # says it is dying of OOM, then lives on
            frames.append({"t": "err", "code": "oom", "msg": "CUDA out of memory"})
        elif case == "close":
            writer.write(wire.encode(chunk))
            writer.close()
            return
        elif case == "after_end":
            frames.append({"t": "end", "s": sid, "reason": "stop", "usage": {}})
            frames.append(dict(chunk))
        if case == "ok":
            frames.append({"t": "end", "s": sid, "reason": "stop",
                           "usage": {"prompt_tokens": 2, "completion_tokens": 2}})
        for frame in frames:
            # Encoded by hand: wire.encode would refuse nothing here, the peer must.
            writer.write(wire.encode(frame))

    async def _trickle(self, writer) -> None:
        """A frame header announcing 1000 bytes, then one byte at a time (bounded)."""
        writer.write(wire.HEADER.pack(1000))
        for _ in range(60):
            await asyncio.sleep(0.25)
            if writer.is_closing():
                return
            writer.write(b" ")

    def close(self) -> None:
        async def shutdown():
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def scripted(stack):
    stack.worker.stop()
    if os.path.exists(stack.worker_path):
        os.unlink(stack.worker_path)
    worker = ScriptedWorker(stack.worker_path)
    stack.start_sidecar(procs=1)
    stack.scripted_worker = worker
    yield stack
    worker.close()


@pytest.mark.parametrize("case", ["p_huge", "p_negative", "usage_huge", "usage_bool",
                                  "after_end"])
def test_impossible_counts_from_the_worker_reset_the_connection_and_block_nothing(scripted,
                                                                                  case):
    with new_channel(scripted.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        if case == "after_end":
            assert collect(stub.StreamPredict(iter([request(case=case, trace_id=case)]),
                                              timeout=10))["tokens"] == 2
        else:
            err = _failure(stub, case)
            assert err.code() == grpc.StatusCode.INTERNAL
            assert "malformed frame" in err.details()
        # The proxy reconnects and the meter commits later records: nothing is blocked.
        ok = wait_until(lambda: _try(stub, "after"), timeout=10, what="service again")
        assert ok["tokens"] == 2
    rec = record_for(scripted, case)
    assert rec["delivered_tokens"] == 2 and rec["prompt_tokens"] < 1 << 31
    assert record_for(scripted, "after")["status"] == "finished"
    assert "worker protocol error" in scripted.sidecar.text()


def test_a_usage_report_cannot_add_tokens_the_chunks_did_not_carry(scripted):
    with new_channel(scripted.target) as channel:
        out = collect(pb_grpc.AiInferenceStub(channel).StreamPredict(
            iter([request(case="usage_inflated", trace_id="inflated")]), timeout=10))
    assert out["tokens"] == 2
    rec = record_for(scripted, "inflated")
    assert rec["status"] == "finished"
    assert rec["generated_tokens"] == 2 and rec["delivered_tokens"] == 2
    assert "worker usage disagrees" in scripted.sidecar.text()


def test_chunks_merged_for_a_slow_reader_stay_within_a_gateways_message_limit(scripted):
    # The caller reads nothing until the worker has handed over every 200,000-character
    # chunk, so they all wait in the proxy; merged, they must still fit the 4 MiB that a
    # gRPC client accepts by default.
    with new_channel(scripted.target) as channel:
        call = pb_grpc.AiInferenceStub(channel).StreamPredict(
            iter([request(case="big_chunks", trace_id="big")]), timeout=30)
        assert scripted.scripted_worker.sent_all.wait(20)
        sizes = []
        tokens = 0
        for msg in call:
            sizes.append(len(msg.chunk))
            tokens += msg.token_count
    assert tokens == 30
    assert max(sizes) <= 1 << 20 and len(sizes) > 1 + 30 * 200_000 // (4 << 20)
    rec = record_for(scripted, "big")
    assert rec["status"] == "finished" and rec["delivered_tokens"] == 30


def test_generation_parameters_left_unset_reach_the_worker_as_unset(scripted):
    unset = request(trace_id="unset")
    chosen = request(trace_id="chosen")
    chosen.generation.temperature = 0.7
    chosen.generation.top_p = 0.9
    chosen.generation.repetition_penalty = 1.1
    with new_channel(scripted.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        for req in (unset, chosen):
            assert collect(stub.StreamPredict(iter([req]), timeout=10))["tokens"] == 2
    seen = {r["meta"]["trace_id"]: r["params"] for r in scripted.scripted_worker.requests}
    # top_p and repetition_penalty of 0 mean nothing, so they are left to the engine's
    # defaults; temperature 0 is greedy decoding and max_new_tokens 0 the engine's default.
    assert seen["unset"] == {"max_new_tokens": 10, "temperature": 0.0}
    assert seen["chosen"] == {"max_new_tokens": 10, "temperature": 0.7, "top_p": 0.9,
                              "repetition_penalty": 1.1}


def test_a_connection_level_oom_ends_that_connection_and_names_nothing_later(scripted):
    with new_channel(scripted.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        err = _failure(stub, "conn_oom")
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "ran out of memory: CUDA out of memory" in err.details()
        # The proxy closed that connection itself; the worker lived on, so a fresh
        # connection serves, and a later loss of it is a crash, not the old OOM.
        wait_until(lambda: _try(stub, "after-oom"), timeout=10, what="service again")
        assert "closed the connection" in _failure(stub, "close").details()
    assert record_for(scripted, "conn_oom")["status"] == "worker_oom"
    assert record_for(scripted, "close")["status"] == "worker_crash"
    assert "worker error code=oom" in scripted.sidecar.text()


def test_a_worker_stuck_in_the_middle_of_a_frame_is_reset_like_a_silent_one(scripted):
    # Bytes keep coming but never complete a frame, and pings go unanswered.
    with new_channel(scripted.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        err = _failure(stub, "trickle", timeout=12)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "stopped answering pings" in err.details()
    assert record_for(scripted, "trickle")["status"] == "worker_crash"


def test_a_huge_worker_error_message_is_cut_and_the_usage_trailers_still_arrive(scripted):
    with new_channel(scripted.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            collect(pb_grpc.AiInferenceStub(channel).StreamPredict(
                iter([request(case="err_huge", trace_id="err-huge")]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "(900000 characters in all)" in err.value.details()
    assert len(err.value.details()) < 2000
    trailers = dict(err.value.trailing_metadata())
    assert trailers["cy-usage-status"] == "worker_error"
    assert trailers["cy-usage-delivered-tokens"] == "2"


def test_control_commands_too_long_or_too_large_are_invalid_and_harm_nothing(running):
    with new_channel(running.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        for message, expected in [
            (pb.ControlMessage(command="x" * 200), "command is 200 characters"),
            (pb.ControlMessage(command=""), "command is 0 characters"),
            (pb.ControlMessage(command="state", payload={"blob": "y" * 1_200_000}),
             "too large to send"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                stub.Control(message, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert expected in err.value.details()
        reply = stub.Control(pb.ControlMessage(command="state"), timeout=10)
        assert reply.payload["state"] == "ready"
        health = stub.Health(pb.WorkerHealthRequest(), timeout=5)
        assert health.healthy


def _failure(stub, case: str, timeout: float = 10) -> grpc.RpcError:
    """The error that a call of the scripted worker's `case` ends with (trace id: case)."""
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.StreamPredict(iter([request(case=case, trace_id=case)]), timeout=timeout))
    return err.value


def _try(stub, trace_id):
    try:
        return collect(stub.StreamPredict(iter([request(trace_id=trace_id)]), timeout=5))
    except grpc.RpcError:
        return None


@pytest.mark.parametrize("hello, problem", [
    ({"v": 2}, "unsupported protocol version"),
    ({"role": "proxy"}, "expected 'worker'"),
    ({"state": "exploded"}, "hello has state"),
])
def test_a_bad_hello_is_refused_and_retried_not_half_accepted(stack, hello, problem):
    stack.worker.stop()
    if os.path.exists(stack.worker_path):
        os.unlink(stack.worker_path)
    worker = ScriptedWorker(stack.worker_path, hello=hello)
    try:
        stack.start_sidecar(procs=1)
        stack.sidecar.wait_for(problem, timeout=10)
        with new_channel(stack.target) as channel:
            with pytest.raises(grpc.RpcError) as err:
                collect(pb_grpc.AiInferenceStub(channel).StreamPredict(
                    iter([request()]), timeout=5))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        worker.close()


def test_a_corrupt_first_message_is_invalid_argument(running):
    with new_channel(running.target) as channel:
        raw = channel.stream_stream("/cy.llm.AiInference/StreamPredict",
                                    request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            list(raw(iter([b"\x0a\xff\xff\xff"]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a StreamPredictRequest" in err.value.details()


def test_a_stream_closed_before_its_first_message_is_invalid_argument(running):
    with new_channel(running.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            collect(pb_grpc.AiInferenceStub(channel).StreamPredict(iter([]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "before its first StreamPredictRequest" in err.value.details()


def test_silent_streams_count_against_the_stream_limit(stack):
    stack.write_config(**{"server.max_concurrent_streams": 2})
    stack.start_sidecar(procs=1)

    async def scenario() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(stack.target) as channel:
            stub = pb_grpc.AiInferenceStub(channel)
            silent = [stub.StreamPredict() for _ in range(2)]  # open, never write
            for call in silent:
                await call.wait_for_connection()
            code = grpc.StatusCode.OK
            for _ in range(100):  # until the proxy has seen both silent streams
                third = stub.StreamPredict()
                try:
                    # The refusal may come before the write completes, or after.
                    await third.write(request())
                    await third.done_writing()
                    async for _ in third:
                        pass
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        break
                await asyncio.sleep(0.05)
            for call in silent:
                call.cancel()
            return code

    assert asyncio.run(scenario()) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_request_too_large_as_a_frame_is_refused_by_name(running):
    prompt = "\x01" * 200_000  # within max_prompt_bytes, six times that as escaped JSON
    with new_channel(running.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            collect(pb_grpc.AiInferenceStub(channel).StreamPredict(
                iter([request(prompt=prompt)]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "frame limit" in err.value.details()


def test_a_newline_in_a_trace_id_cannot_forge_a_log_line(running):
    forged = "x\n2026-01-01T00:00:00.000Z error   role=supervisor FAKE proxy killed"
    with new_channel(running.target) as channel:
        collect(pb_grpc.AiInferenceStub(channel).StreamPredict(
            iter([request(tokens=2, trace_id=forged)]), timeout=10))
    running.sidecar.wait_for(r"request done trace_id=x\\x0a")
    assert not any(line.startswith("2026-01-01") for _, line in running.sidecar.lines)


def test_a_control_socket_path_that_is_not_a_socket_is_never_deleted(stack):
    from cy_sidecar.localrun import cli

    precious = os.path.join(stack.root, "precious.db")
    with open(precious, "w") as fh:
        fh.write("keep me")
    stack.write_config(**{"server.control_socket": precious})
    proc = subprocess.run(cli("start", "--config", stack.config_path), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "not a socket" in proc.stderr
    assert open(precious).read() == "keep me"
