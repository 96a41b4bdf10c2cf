"""When the inference worker fails or reloads: fast, specific errors and exact records."""

from __future__ import annotations

import os
import signal
import socket
import time

import grpc
import psutil
import pytest

from cy_sidecar.protos import cy_llm_pb2 as pb
from cy_sidecar.protos import cy_llm_pb2_grpc as pb_grpc

from helpers import (channel_per_proxy, collect, health_status, new_channel, record_for,
                     request, scrape, sink_records, wait_until)


def proxy_pids(stack) -> set[int]:
    return {c.pid for c in psutil.Process(stack.sidecar.pid).children()}


def fails_fast(stub, trace_id: str) -> grpc.RpcError:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.StreamPredict(iter([request(trace_id=trace_id)]), timeout=10))
    assert time.monotonic() - started < 0.5, "a call to a dead worker must not wait"
    return err.value


def test_worker_killed_mid_stream_then_missing_then_stale_then_back(running):
    before = proxy_pids(running)
    wait_until(lambda: scrape(running).get("sidecar_worker_connection_status") == 1,
               what="the connection status metric at 1 while the worker is up")
    channel = new_channel(running.target)
    stub = pb_grpc.AiInferenceStub(channel)
    call = stub.StreamPredict(iter([request(
        tokens=0, demo_tokens=200, demo_tps=100, demo_fault="crash", demo_fault_after=5,
        trace_id="killed")]), timeout=30)
    got = 0
    with pytest.raises(grpc.RpcError) as err:
        for msg in call:
            got += msg.token_count
            last = time.monotonic()
    assert time.monotonic() - last < 1.0
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "crashed" in err.value.details() or "closed the connection" in err.value.details()
    assert got == 5
    running.worker.popen.wait(5)

    # Socket path missing: new calls fail at once, health says NOT_SERVING.
    if os.path.exists(running.worker_path):
        os.unlink(running.worker_path)
    wait_until(lambda: health_status(running.target) == "NOT_SERVING", what="NOT_SERVING")
    assert health_status(running.target, "liveness") == "SERVING"
    wait_until(lambda: scrape(running).get("sidecar_worker_connection_status") == 0,
               what="the connection status metric at 0")
    e = fails_fast(stub, "while-missing")
    assert e.code() == grpc.StatusCode.UNAVAILABLE
    assert "grpc-retry-pushback-ms" in dict(e.trailing_metadata())

    # A stale socket file with no listener behind it.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(running.worker_path)
    stale.close()
    assert fails_fast(stub, "while-stale").code() == grpc.StatusCode.UNAVAILABLE

    # The worker comes back on the same path: served again, no proxy restarted.
    running.start_worker("--tokens-per-sec", "400", "--ttft-ms", "5")
    wait_until(lambda: health_status(running.target) == "SERVING", timeout=10,
               what="SERVING after the worker returned")
    wait_until(lambda: scrape(running).get("sidecar_worker_connection_status") == 1,
               timeout=10, what="the connection status metric back at 1")
    # Each proxy reconnects on its own when it sees the new socket: within the backoff.
    wait_until(lambda: _try_stream(stub), timeout=3, what="a stream on the old connection")
    for i in range(4):
        out = collect(stub.StreamPredict(iter([request(tokens=7)]), timeout=10))
        assert out["tokens"] == 7
    channel.close()
    assert proxy_pids(running) == before

    rec = record_for(running, "killed")
    assert rec["status"] == "worker_crash"
    assert rec["delivered_tokens"] == 5
    assert not any(r["trace_id"].startswith("while-") for r in sink_records(running))


def test_an_oom_death_is_named_as_such_and_metered(running):
    with new_channel(running.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.StreamPredict(iter([request(
                tokens=0, demo_tokens=100, demo_fault="oom_exit", demo_fault_after=3,
                trace_id="oom-exit")]), timeout=10))
    assert err.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
    assert "out of memory" in err.value.details()
    rec = record_for(running, "oom-exit")
    assert rec["status"] == "worker_oom"
    assert rec["delivered_tokens"] == 3


def test_an_oom_death_is_named_on_every_proxy_not_only_the_one_that_saw_it(running):
    channels = channel_per_proxy(running.target, 2)
    try:
        stubs = [pb_grpc.AiInferenceStub(ch) for ch in channels]
        bystanders = [stub.StreamPredict(iter([request(
            tokens=0, demo_tokens=5000, demo_tps=50, trace_id=f"bystander-{i}")]), timeout=20)
            for i, stub in enumerate(stubs)]
        for call in bystanders:
            next(call)
        with pytest.raises(grpc.RpcError) as err:
            collect(stubs[0].StreamPredict(iter([request(
                tokens=0, demo_tokens=100, demo_fault="oom_exit", demo_fault_after=3,
                trace_id="oom-everywhere")]), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in bystanders:
            with pytest.raises(grpc.RpcError) as cut:
                collect(call)
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "ran out of memory" in cut.value.details()
    finally:
        for ch in channels:
            ch.close()
    assert record_for(running, "oom-everywhere")["status"] == "worker_oom"
    for i in range(2):
        assert record_for(running, f"bystander-{i}")["status"] == "worker_oom"
    assert running.sidecar.text().count("worker error code=oom") == 2


def test_an_oom_the_worker_survived_does_not_name_a_later_crash(stack):
    stack.start_sidecar(procs=1)  # one worker connection for all three calls
    with new_channel(stack.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.StreamPredict(iter([request(
                tokens=0, demo_tokens=50, demo_fault="oom", demo_fault_after=2,
                trace_id="oom-lives")]), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert collect(stub.StreamPredict(iter([request(tokens=3, trace_id="after-oom")]),
                                          timeout=10))["tokens"] == 3
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.StreamPredict(iter([request(
                tokens=0, demo_tokens=50, demo_fault="crash", demo_fault_after=2,
                trace_id="crash-later")]), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "closed the connection (crashed or stopped)" in err.value.details()
    assert record_for(stack, "oom-lives")["status"] == "worker_oom"
    assert record_for(stack, "crash-later")["status"] == "worker_crash"


def test_a_worker_that_stops_a_stream_on_its_own_shutdown_gives_a_retryable_error(stack):
    stack.start_sidecar(procs=1)
    with new_channel(stack.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        call = stub.StreamPredict(iter([request(tokens=0, demo_tokens=5000, demo_tps=50,
                                                trace_id="worker-stops")]), timeout=20)
        next(call)
        stack.worker.popen.send_signal(signal.SIGTERM)  # the demo worker closes at once
        with pytest.raises(grpc.RpcError) as err:
            collect(call)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "inference worker stopped this stream" in err.value.details()
    assert "grpc-retry-pushback-ms" in dict(err.value.trailing_metadata())
    rec = record_for(stack, "worker-stops")
    assert rec["status"] == "worker_error" and rec["finish_reason"] == "cancelled"
    assert 0 < rec["delivered_tokens"] < 5000


def test_a_slow_start_holds_requests_with_loading_and_serves_them(stack):
    stack.worker.stop()
    stack.start_worker("--tokens-per-sec", "400", "--ttft-ms", "5", "--slow-start-secs", "2")
    stack.start_sidecar(procs=2)
    with new_channel(stack.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        out = collect(stub.StreamPredict(iter([request(tokens=6, trace_id="held")]),
                                         timeout=20))
    assert out["system"] and out["system"][0].startswith("Loading demo")
    assert out["tokens"] == 6
    assert out["indexes"] == list(range(len(out["indexes"])))
    rec = record_for(stack, "held")
    assert rec["status"] == "finished" and rec["delivered_tokens"] == 6


def test_a_reload_command_holds_new_streams_until_the_worker_is_ready(running):
    with new_channel(running.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        stub.Control(pb.ControlMessage(command="reload", payload={"secs": "1"}), timeout=5)
        wait_until(lambda: stub.Health(pb.WorkerHealthRequest(), timeout=5)
                   .metrics["state"] == "loading", what="loading state")
        started = time.monotonic()
        out = collect(stub.StreamPredict(iter([request(tokens=4, trace_id="reload")]),
                                         timeout=20))
        assert out["system"], "a held stream is told it is loading"
        assert out["tokens"] == 4
        assert time.monotonic() - started < 5


def test_a_restart_longer_than_the_grace_period_sheds_held_streams(stack):
    stack.write_config(**{"health.reload_grace_secs": 0.5})
    stack.worker.stop()
    stack.start_worker("--slow-start-secs", "30")
    stack.start_sidecar(procs=1)
    with new_channel(stack.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.StreamPredict(iter([request(trace_id="shed")]), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "still loading" in err.value.details()
    rec = record_for(stack, "shed")
    assert rec["status"] == "shed" and rec["delivered_tokens"] == 0


def test_a_stalled_worker_ends_at_the_deadline_with_a_deadline_record(running):
    with new_channel(running.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.StreamPredict(iter([request(
                tokens=0, demo_tokens=100, demo_fault="stall", demo_fault_after=2,
                trace_id="stalled")]), timeout=1.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Ended by the sidecar's own timer, just before gRPC's: the usage trailers arrive too.
    assert dict(err.value.trailing_metadata())["cy-usage-status"] == "deadline"
    rec = record_for(running, "stalled")
    assert rec["status"] == "deadline" and rec["delivered_tokens"] == 2
    # Reported once: one request line, one failure and its 2 tokens in the metrics.
    assert running.sidecar.text().count("request done trace_id=stalled ") == 1
    samples = scrape(running)
    assert samples['sidecar_requests_failed_total{status="deadline"}'] == 1
    assert samples['sidecar_tokens_by_status_total{model="demo",status="deadline"}'] == 2


@pytest.mark.parametrize(
    "kind", ["badlen", "oversize", "badjson", "unknown_stream", "unknown_kind", "not_object"]
)
def test_a_malformed_frame_resets_the_connection_and_the_sidecar_recovers(stack, kind):
    stack.start_sidecar(procs=1)
    with new_channel(stack.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.StreamPredict(iter([request(
                tokens=0, demo_tokens=50, demo_fault="malformed", demo_malformed=kind,
                demo_fault_after=2, trace_id=f"bad-{kind}")]), timeout=10))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "malformed" in err.value.details()
        # Reconnected: the same proxy serves the next stream.
        out = wait_until(lambda: _try_stream(stub), timeout=10, what="service after reset")
        assert out["tokens"] == 5
    assert "worker protocol error" in stack.sidecar.text()
    rec = record_for(stack, f"bad-{kind}")
    assert rec["status"] == "worker_error" and rec["delivered_tokens"] == 2


def _try_stream(stub):
    try:
        return collect(stub.StreamPredict(iter([request(tokens=5)]), timeout=5))
    except grpc.RpcError:
        return None


@pytest.mark.parametrize(
    "req, message",
    [
        (pb.StreamPredictRequest(prompt="hi"), "model_id is required"),
        (pb.StreamPredictRequest(model_id="demo"), "prompt is empty"),
        (pb.StreamPredictRequest(model_id="demo", prompt="x" * 300_000), "over the limit"),
        (pb.StreamPredictRequest(model_id="demo", prompt="hi",
                                 generation=pb.GenerationParameters(top_p=1.5)),
         "generation.top_p"),
        (pb.StreamPredictRequest(model_id="demo", prompt="hi",
                                 generation=pb.GenerationParameters(temperature=-1)),
         "generation.temperature"),
    ],
)
def test_bad_gateway_input_is_invalid_argument_before_reaching_the_worker(running, req,
                                                                          message):
    with new_channel(running.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.StreamPredict(iter([req]), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()
        state = stub.Control(pb.ControlMessage(command="state"), timeout=5).payload
        assert state["open_streams"] == "0"


def test_beyond_the_stream_limit_new_streams_get_resource_exhausted(stack):
    stack.write_config(**{"server.max_concurrent_streams": 2})
    stack.start_sidecar(procs=1)
    with new_channel(stack.target) as channel:
        stub = pb_grpc.AiInferenceStub(channel)
        calls = [stub.StreamPredict(iter([request(tokens=0, demo_tokens=500, demo_tps=50)]),
                                    timeout=20) for _ in range(2)]
        for call in calls:
            next(call)
        with pytest.raises(grpc.RpcError) as err:
            collect(stub.StreamPredict(iter([request()]), timeout=5))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "grpc-retry-pushback-ms" in dict(err.value.trailing_metadata())
        for call in calls:
            call.cancel()
